"""
A/B: our server at another revision against the working tree, side by side.

    .venv/bin/python bench/ab.py --base HEAD~1                 # SMTP, 1 KiB
    .venv/bin/python bench/ab.py --base main --size 102400 --messages 600
    .venv/bin/python bench/ab.py --base 2224905~1 --mode pop3

For telling whether a change made us faster: the two versions run at once
(each a L{MailServerPeer}, the base one from a temporary C{git worktree}),
warmed up alike, and take turns round by round (A B, B A, ...), so a drift
of the machine hits both.  Per round: msgs/s, server CPU ms/msg and the
reactor thread's (the main thread's) CPU ms/msg; then the medians and the
ratio new/base.  C{--mode pop3} fetches fresh 1,000 x 10 KiB mailboxes
with 4 clients per round, as in C{run.py}, and also shows msgs/s after the
logins.  Hand-run, like the rest of C{bench/}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import REPO, MailServerPeer, cpu_seconds  # noqa: E402
from bench.pop3_load import fill_maildir, run_pop3_load  # noqa: E402
from bench.settle import Leftovers, settle  # noqa: E402
from bench.smtp_load import run_load  # noqa: E402

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def main_thread_cpu(pid: int) -> float:
    """
    CPU seconds of the process's main thread: the reactor's.
    """
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@contextlib.contextmanager
def worktree(revision: str):
    folder = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), revision],
        check=True, capture_output=True, text=True,
    )
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)],
            check=False, capture_output=True,
        )


def imported_from(peer: MailServerPeer) -> str:
    result = subprocess.run(
        [sys.executable, "-c", "import mailserver; print(mailserver.__file__)"],
        env=peer.env(), cwd=peer.root, capture_output=True, text=True, check=True,
    )
    return result.stdout.strip()


def one_round(peer: MailServerPeer, args, users: list[str]) -> dict:
    cpu0, main0 = cpu_seconds(peer.pid), main_thread_cpu(peer.pid)
    if args.mode == "smtp":
        r = run_load(port=peer.port, clients=args.clients, messages=args.messages, size=args.size)
        count, rate, after_login = args.messages - r.errors, r.msgs_per_s, None
    else:
        r = run_pop3_load(peer.pop3_port, users, peer.password, window=8)
        count, rate, after_login = r.messages, r.msgs_per_s, r.fetch_msgs_per_s
    cpu1, main1 = cpu_seconds(peer.pid), main_thread_cpu(peer.pid)
    return {
        "rate": rate,
        "after_login": after_login,
        "errors": r.errors,
        "cpu_ms": 1000 * (cpu1 - cpu0) / max(1, count),
        "reactor_ms": 1000 * (main1 - main0) / max(1, count),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the git revision to compare the working tree with")
    p.add_argument("--mode", choices=["smtp", "pop3"], default="smtp")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--messages", type=int, default=2000, help="SMTP messages per round")
    p.add_argument("--size", type=int, default=1024, help="SMTP message size, octets")
    args = p.parse_args(argv)

    pop3_users = [[f"pop{i}r{k}@localhost" for i in range(1, 5)] for k in range(args.rounds)]
    users = ("bob@localhost",) if args.mode == "smtp" else tuple(u for r in pop3_users for u in r)
    rows: dict[str, list[dict]] = {"base": [], "new": []}
    with contextlib.ExitStack() as stack:
        leftovers = Leftovers()
        stack.callback(leftovers.remove)
        base_code = stack.enter_context(worktree(args.base))
        peers = {
            "base": stack.enter_context(MailServerPeer(users=users, code=base_code)),
            "new": stack.enter_context(MailServerPeer(users=users)),
        }
        for name, peer in peers.items():
            print(f"{name}: {imported_from(peer)}", flush=True)
            if args.mode == "smtp":
                run_load(port=peer.port, clients=10, messages=300, size=args.size)
            else:
                for user in users:
                    fill_maildir(peer.maildir(user), 1000, 10240, tag=user.split("@")[0])
                    peer.own_mailbox(peer.maildir(user))
        os.sync()  # the fills' writeback would slow whoever fetches first
        settled = settle(leftovers)
        print(f"file creation: {settled['last_us']:.0f} us a file, after {settled['waited_s']:.0f} s", flush=True)
        for k in range(args.rounds):
            for name in ("base", "new") if k % 2 == 0 else ("new", "base"):
                row = one_round(peers[name], args, pop3_users[k] if args.mode == "pop3" else [])
                rows[name].append(row)
                extra = f", after login {row['after_login']:.0f}" if row["after_login"] else ""
                print(
                    f"  round {k + 1} {name}: {row['rate']:.0f} msgs/s{extra}, errors {row['errors']},"
                    f" CPU {row['cpu_ms']:.3f} ms/msg, reactor thread {row['reactor_ms']:.3f}",
                    flush=True,
                )
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in ("rate", "cpu_ms", "reactor_ms")}
        for name, runs in rows.items()
    }
    for name, m in medians.items():
        print(
            f"{name}: median {m['rate']:.0f} msgs/s, CPU {m['cpu_ms']:.3f} ms/msg,"
            f" reactor thread {m['reactor_ms']:.3f} ms/msg"
        )
    print(f"new/base: {medians['new']['rate'] / medians['base']['rate']:.2f}x msgs/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
