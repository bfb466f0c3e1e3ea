"""
Maildir storage: durable delivery, names that carry sizes, listing, locking.
"""

import os
import subprocess
import sys
from pathlib import Path

from mailserver.maildir import Mailbox, SpoolFile, ensure_maildir, file_name_host
from mailserver.message_ids import MessageIDs, new_message_id


def deliver(tmp_path, data, maildirs):
    spool = tmp_path / "spool" / "tmp"
    spool.mkdir(parents=True, exist_ok=True)
    f = SpoolFile(spool, f"{new_message_id()}.{file_name_host('host/with:odd chars')}")
    f.write(data)
    return f.deliver(maildirs)


def test_delivery_links_one_copy_into_every_new(tmp_path):
    a, b = tmp_path / "mail" / "a", tmp_path / "mail" / "b"
    paths = deliver(tmp_path, b"Subject: hi\n\nbody\n", [a, b])
    assert [p.parent for p in paths] == [a / "new", b / "new"]
    assert paths[0].read_bytes() == b"Subject: hi\n\nbody\n"
    assert os.stat(paths[0]).st_ino == os.stat(paths[1]).st_ino
    assert os.listdir(tmp_path / "spool" / "tmp") == []
    name = paths[0].name
    assert name.endswith(",S=18,W=21")
    assert "/" not in name and ":" not in name


def test_listing_uses_names_and_marks_seen(tmp_path):
    box = tmp_path / "box"
    deliver(tmp_path, b"one\n", [box])
    deliver(tmp_path, b"two\nlines\n", [box])
    mailbox = Mailbox(box)
    first, second = mailbox.messages()
    assert (first.size, second.size) == (5, 12)
    assert not first.seen
    assert len(first.uid) <= 70 and first.uid.isprintable()
    mailbox.mark_seen(first)
    seen, unseen = mailbox.messages()
    assert seen.seen and Path(seen.path).parent.name == "cur" and seen.path.endswith(":2,S")
    assert (seen.uid, unseen) == (first.uid, second)
    with mailbox.open(seen) as f:
        assert f.read() == b"one\n"
    for info in (seen, second):
        mailbox.remove(info)
    mailbox.remove(second)  # already gone: no error
    mailbox.sync_removals([seen, second])
    assert mailbox.messages() == []


def test_marking_seen_keeps_other_flags(tmp_path):
    box = tmp_path / "box"
    ensure_maildir(box)
    (box / "cur" / "12345.foreign:2,FR").write_bytes(b"a\n")
    (info,) = Mailbox(box).messages()
    Mailbox(box).mark_seen(info)
    assert os.listdir(box / "cur") == ["12345.foreign:2,FRS"]


def test_a_locked_mailbox_renames_and_unlinks_in_its_folders_and_unlock_closes_them(tmp_path):
    box = tmp_path / "box"
    deliver(tmp_path, b"one\n", [box])
    deliver(tmp_path, b"two\n", [box])
    mailbox = Mailbox(box)
    open_before = len(os.listdir("/proc/self/fd"))
    assert mailbox.lock()
    assert len(os.listdir("/proc/self/fd")) == open_before + 3  # the lock, new/, cur/
    first, second = mailbox.messages()
    mailbox.mark_seen(first)
    mailbox.remove(second)
    (seen,) = mailbox.messages()
    assert seen.uid == first.uid and seen.seen and Path(seen.path).parent.name == "cur"
    mailbox.remove(seen)
    mailbox.unlock()
    assert len(os.listdir("/proc/self/fd")) == open_before
    assert os.listdir(box / "new") == [] and os.listdir(box / "cur") == []


def test_foreign_files_without_sizes_are_measured(tmp_path):
    box = tmp_path / "box"
    ensure_maildir(box)
    (box / "cur" / "12345.foreign:2,S").write_bytes(b"a\nb\n")
    (info,) = Mailbox(box).messages()
    assert info.size == 6 and info.seen and info.uid == "12345.foreign"


def test_lock_is_exclusive_across_processes_and_dies_with_them(tmp_path):
    box = tmp_path / "box"
    first = Mailbox(box)
    assert first.lock()
    assert not Mailbox(box).lock()
    first.unlock()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from pathlib import Path\nfrom mailserver.maildir import Mailbox\n"
         f"assert Mailbox(Path({str(box)!r})).lock()\nprint('locked', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert not Mailbox(box).lock()
    finally:
        holder.kill()
        holder.wait()
    assert Mailbox(box).lock()


def test_start_up_removes_what_dead_writers_left_in_tmp(tmp_path):
    import time

    from mailserver.maildir import remove_stale_tmp

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    live = subprocess.Popen(["sleep", "30"])
    try:
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        dead_file = tmp / f"{MessageIDs(pid=lambda: gone.pid).next()}.mx"
        live_file = tmp / f"{MessageIDs(pid=lambda: live.pid).next()}.mx"
        # Names of the version before message IDs.
        dead_old_name = tmp / f"1700000000.M000001P{gone.pid}Q1.mx"
        live_old_name = tmp / f"1700000000.M000002P{live.pid}Q1.mx"
        foreign_new = tmp / "written-by-another-mda"
        foreign_old = tmp / "old-foreign-file"
        for path in (dead_file, live_file, dead_old_name, live_old_name, foreign_new, foreign_old):
            path.write_bytes(b"partial")
        old = time.time() - 37 * 3600
        os.utime(foreign_old, (old, old))
        assert remove_stale_tmp(str(tmp)) == 3
        assert sorted(p.name for p in tmp.iterdir()) == sorted(
            [live_file.name, live_old_name.name, foreign_new.name])
    finally:
        live.kill()
        live.wait()
    assert remove_stale_tmp(str(tmp_path / "missing")) == 0
