"""
The intake's CPU per message, without the SMTP session or the syncs.

Hand-run, never part of the test suite; for comparing two trees::

    PYTHONPATH=. .venv/bin/python bench/intake_cpu.py
    PYTHONPATH=/path/to/other/tree .venv/bin/python bench/intake_cpu.py

Each message (1 KiB, one recipient, then two) goes through L{Intake} as the
SMTP server hands it over: the receiver takes the text, and at the end the
message is written into the first Maildir's C{tmp/}, renamed into its
C{new/} and hard-linked into the second's.  The committer runs both phases
inline and does not sync, so what is measured is the Python and the file
system calls; the data folder is on tmpfs by default, so the file system's
own cost (on ext4, creating files after many were removed) does not drown
the difference.  Prints process CPU time per message after a warm-up.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from mailserver.config import Config
from mailserver.envelope import Envelope, Recipient
from mailserver.from_config import accounts_for
from mailserver.intake import Intake
from mailserver.testing import InlineCommitter, InlineReactor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--folder", default="/dev/shm", help="where the data folder goes")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.folder))
    try:
        config = Config(hostname="mx.test", data_dir=str(root / "data"),
                        local_domains=("example.org",))
        accounts = accounts_for(config)
        for user in ("a", "b"):
            accounts.add_user(f"{user}@example.org", "x")
        intake = Intake(accounts=accounts, reactor=InlineReactor(), data_path=config.data_path,
                        hostname=config.hostname, min_free_space=0, committer=InlineCommitter())
        text = b"Subject: x\r\n\r\n" + b"y" * 1000 + b"\r\n"
        for users in (("a",), ("a", "b")):
            envelope = Envelope(sender="s@remote.test", recipients=tuple(
                Recipient(f"{u}@example.org", (f"{u}@example.org",)) for u in users))
            for _ in range(200):  # Maildirs made, caches filled
                _deliver(intake, envelope, text)
            start = time.process_time()
            for _ in range(args.messages):
                _deliver(intake, envelope, text)
            spent = (time.process_time() - start) / args.messages
            print(f"{len(users)} recipient(s): {spent * 1e6:.1f} us CPU per message")
    finally:
        shutil.rmtree(root)


def _deliver(intake: Intake, envelope: Envelope, text: bytes) -> None:
    receiver = intake.begin(envelope)
    receiver.write(text)
    results: list = []
    receiver.finish().addBoth(results.append)
    if not isinstance(results[0], str):
        results[0].raiseException()


if __name__ == "__main__":
    main()
