"""
One memory budget for every message buffer: what fits is held, the rest
goes to disk, and header sections waiting for the hooks take turns.
"""

from __future__ import annotations

import tempfile

from mailserver.memory_budget import _PIECE_OVERHEAD as OVERHEAD
from mailserver.memory_budget import MemoryBudget, SpooledBuffer


def test_take_what_fits_and_give_it_back():
    budget = MemoryBudget(100)
    assert budget.take(60) and not budget.take(41) and budget.take(40)
    budget.give_back(100)
    assert budget.held == 0


def test_a_buffer_holds_in_memory_what_the_budget_allows_then_spools(tmp_path):
    budget = MemoryBudget(16 + 3 * OVERHEAD + 3)  # three pieces, each with its overhead
    first, second = SpooledBuffer(budget, lambda: tempfile.TemporaryFile(dir=tmp_path)), SpooledBuffer(budget, lambda: tempfile.TemporaryFile(dir=tmp_path))
    first.write(b"1234")
    first.write(b"5678")
    second.write(b"abcdefgh")
    assert first.in_memory and second.in_memory and budget.held == 16 + 3 * OVERHEAD
    second.write(b"ij")  # would not fit: all of it goes to disk
    assert not second.in_memory and budget.held == 8 + 2 * OVERHEAD
    second.write(b"kl")
    first.write(b"9")
    assert budget.held == 9 + 3 * OVERHEAD
    assert second.seek(0, 2) == 12 and second.tell() == 12
    second.seek(1)
    assert second.read(3) == b"bcd" and second.read() == b"efghijkl" and second.read() == b""
    assert second.getvalue() == b"abcdefghijkl"
    first.seek(3)
    assert first.read(3) == b"456" and first.read(2) == b"78"  # across pieces
    first.seek(1)
    assert first.read() == b"23456789"
    first.truncate(6)
    assert first.getvalue() == b"123456" and budget.held == 6 + OVERHEAD
    counted = first.counted()
    assert first.detach() == b"123456" and budget.held == counted  # the caller's now
    second.close()
    second.close()
    assert second.size == 0 and budget.held == counted


def test_a_buffer_spools_past_its_own_size_limit_and_gives_its_memory_back(tmp_path):
    budget = MemoryBudget(1000)
    body = SpooledBuffer(budget, lambda: tempfile.TemporaryFile(dir=tmp_path), spill_size=5)
    body.write(b"1234")
    assert body.in_memory and budget.held == 4 + OVERHEAD
    body.write(b"56")
    assert not body.in_memory and budget.held == 0
    body.seek(0)
    assert body.read(100) == b"123456"
    body.close()


def test_reservations_wait_for_each_other_when_the_budget_is_spent():
    budget = MemoryBudget(100)
    assert budget.take(90)  # held by messages still arriving
    granted = []
    budget.reserve(50).addCallback(granted.append)  # none held yet: over, once
    assert granted == [None] and budget.held == 140
    budget.reserve(30).addCallback(lambda _: granted.append("second"))
    budget.reserve(5).addCallback(lambda _: granted.append("third"))
    assert granted == [None]  # first come, first served
    budget.give_back(90)  # room now
    assert granted == [None, "second", "third"] and budget.held == 85
    budget.release(50)
    budget.release(30)
    budget.release(5)
    assert budget.held == 0
    assert budget.take(100)
    budget.reserve(10).addCallback(lambda _: granted.append("alone"))
    assert granted[-1] == "alone"  # none held: it goes ahead
