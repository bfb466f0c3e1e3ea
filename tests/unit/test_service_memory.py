"""
Large buffers freed in worker threads go back to the system once the server
has set its allocator up, and password checks keep none at all.
"""

import subprocess
import sys
import textwrap
import threading

import pytest

from mailserver.passwords import hash_password, verify_password

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# In a fresh interpreter (the allocator's thresholds depend on history),
# with or without the server's allocator set-up: four threads each run
# C{work}, then the growth of RSS is printed.
_SET_UP = textwrap.dedent(
    """
    import sys, threading
    from mailserver.process import return_large_buffers

    if sys.argv[1] == "set-up":
        return_large_buffers()

    def resident_mib():
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith("VmRSS")).split()[1]) / 1024
    """
)
_RUN_FOUR_THREADS = textwrap.dedent(
    """
    before = resident_mib()
    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(resident_mib() - before)
    """
)

# Each thread allocates and touches a 16 MiB buffer, all four held at once
# so each thread has its own malloc arena, then frees it.  One buffer freed
# first in the main thread raises glibc's dynamic mmap threshold, as a
# first large message would in the server.
_THREADS_FREEING_BUFFERS = _SET_UP + textwrap.dedent(
    """
    SIZE = 16 * 1024 * 1024

    def touched_buffer():
        buffer = bytearray(SIZE)
        buffer[::4096] = b"x" * len(buffer[::4096])
        return buffer

    first = touched_buffer()
    del first
    all_holding = threading.Barrier(4)

    def work():
        buffer = touched_buffer()
        all_holding.wait()
        del buffer
    """
) + _RUN_FOUR_THREADS

# Each thread runs three OpenSSL scrypt checks (16 MiB each).
_THREADS_CHECKING_PASSWORDS = _SET_UP + textwrap.dedent(
    """
    from mailserver.passwords import hash_password, openssl_scrypt, verify_password

    stored = hash_password("secret")
    all_started = threading.Barrier(4)

    def work():
        all_started.wait()
        for _ in range(3):
            assert verify_password("secret", stored, openssl_scrypt)
    """
) + _RUN_FOUR_THREADS


def kept_mib(mode: str, script: str = _THREADS_FREEING_BUFFERS) -> float:
    result = subprocess.run(
        [sys.executable, "-c", script, mode],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return float(result.stdout)


def test_large_buffers_freed_in_threads_are_returned():
    # The control shows the check can fail: glibc's own thresholds keep
    # about 16 MiB per thread (64 MiB here).
    assert kept_mib("as-is") > 32
    assert kept_mib("set-up") < 8


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def test_password_checks_keep_no_scrypt_buffer():
    stored = hash_password("secret")
    before = resident_mib()

    def check() -> None:
        for _ in range(3):
            assert verify_password("secret", stored)

    threads = [threading.Thread(target=check) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert resident_mib() - before < 16


def test_openssl_password_checks_keep_no_buffer_once_the_allocator_is_set_up():
    # The control: without the set-up, glibc keeps each thread's buffer.
    assert kept_mib("as-is", _THREADS_CHECKING_PASSWORDS) > 32
    assert kept_mib("set-up", _THREADS_CHECKING_PASSWORDS) < 16
