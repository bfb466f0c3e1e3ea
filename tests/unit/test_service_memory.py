"""
Password checks do not leave their 16 MiB scrypt buffers resident in the
threads that ran them once the server has set its allocator up.
"""

import sys
import threading

import pytest

from mailserver.accounts import hash_password, verify_password
from mailserver.service import _return_large_buffers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def test_scrypt_buffers_are_returned_after_each_check():
    _return_large_buffers()
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
    # Without it, each of the four threads keeps 16 MiB (64 MiB in all).
    assert resident_mib() - before < 16
