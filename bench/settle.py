"""
Waiting, before a measured run, for file creation to cost what it usually does.

On ext4 without a journal (this project's benchmark VMs), the kernel avoids
reusing an inode freed in the last 60 seconds (300 if its inode-table block
is still dirty): C{find_inode_bit} in C{fs/ext4/ialloc.c} skips each such
free inode, looking each one up with C{recently_deleted}.  A block group
where thousands of files were just removed so makes every new file in it
cost up to a millisecond of kernel CPU instead of about 25 us, for up to
five minutes.  The benchmarks remove tens of thousands of files themselves
(every peer's folder when a run ends, 100,000 for the big mailbox), so the
run after another would measure that rather than the servers.  Every
durable peer creates a file per message, but a server whose cost is CPU
(ours, with group commit) loses more to it than one that waits on one
fsync at a time (aiosmtpd).

So files made while measuring are removed only when the run ends
(L{Leftovers}), which notes the time in a file beside them; L{settle}, at
the next run's start, waits until five minutes have passed since, then
probes the cost of creating files where the peers' folders go, and waits
while it is high (files removed by something else, such as the tests).
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

# Kernel microseconds per file created above which creation is "slow": a
# fresh folder on this kind of VM costs 5-40 us, the slow state 300-1,300.
SLOW_US = 100.0
# The kernel's longest window (RECENTCY_DIRTY), and a little more.
REUSE_S = 300.0
_LIMIT_S = 330.0
# Enough files that free inodes left over from older removals (which are
# reused at once) are not all the probe sees.
PROBE_FILES = 2000
_REMOVED_MARK = Path(tempfile.gettempdir()) / "mailserver-bench-removed"


class Leftovers:
    """
    Folders of files made while measuring, removed together when the run
    ends instead of one by one between the measurements.
    """

    def __init__(self) -> None:
        self._folders: list[Path] = []

    def folder(self, prefix: str) -> Path:
        folder = Path(tempfile.mkdtemp(prefix=prefix))
        self._folders.append(folder)
        return folder

    def add(self, folder: Path) -> None:
        self._folders.append(folder)

    def remove(self) -> None:
        """
        Remove the folders, and note when (for the next run's L{settle}).
        """
        if not self._folders:
            return
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._folders = []
        _REMOVED_MARK.write_text(f"{time.time()}\n")


def creation_us(leftovers: Leftovers) -> float:
    """
    Kernel CPU microseconds per empty file created in a new folder beside
    the peers' folders, over the probe's last quarter.
    """
    folder = leftovers.folder("bench-probe-")
    quarter = PROBE_FILES // 4
    for i in range(PROBE_FILES - quarter):
        os.close(os.open(folder / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    for i in range(PROBE_FILES - quarter, PROBE_FILES):
        os.close(os.open(folder / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    return (after - before) * 1e6 / quarter


def _removed_ago() -> float | None:
    try:
        return time.time() - float(_REMOVED_MARK.read_text())
    except (OSError, ValueError):
        return None


def settle(leftovers: Leftovers, wait: bool = True, every_s: float = 15.0) -> dict:
    """
    Wait out the last run's removals, then probe file creation and, while
    it is slow, wait and probe again; in all at most C{_LIMIT_S}.  With
    C{wait} false, only probe once (C{--no-settle}).

    @return: the first and last probe's figures and the seconds waited.
    """
    start = time.monotonic()
    limit_s = _LIMIT_S if wait else 0.0
    ago = _removed_ago()
    if wait and ago is not None and ago < REUSE_S:
        print(f"the last benchmark removed its files {ago:.0f} s ago; waiting {REUSE_S - ago:.0f} s", flush=True)
        time.sleep(REUSE_S - ago)
    first = last = creation_us(leftovers)
    while last > SLOW_US and time.monotonic() - start < limit_s:
        print(
            f"file creation costs {last:.0f} us of kernel CPU a file (usually under {SLOW_US:.0f}): "
            "recently removed files' inodes are being skipped; waiting", flush=True,
        )
        time.sleep(every_s)
        last = creation_us(leftovers)
    return {
        "first_us": first,
        "last_us": last,
        "waited_s": time.monotonic() - start,
        "settled": last <= SLOW_US,
    }


def settle_report(settled: dict | None) -> str | None:
    """
    The report's line on file creation before the run (L{settle}'s result).
    """
    if not settled:
        return None
    waited = (f", after waiting {settled['waited_s']:.0f} s (it was {settled['first_us']:.0f} us)"
              if settled["waited_s"] >= 1 else "")
    verdict = ("" if settled["settled"]
               else f"; still above {SLOW_US:.0f} us, so every durable peer ran slower than usual")
    return (f"File creation before the run (the last {PROBE_FILES // 4} of {PROBE_FILES} empty files in a new "
            f"folder): {settled['last_us']:.0f} us kernel CPU a file{waited}{verdict}")
