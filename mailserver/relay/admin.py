"""
The C{mailserver queue} commands: list, show, flush, delete, bounce, and
adopt (another node's queue, L{mailserver.relay.adoption}).

Listing reads the queue folder, whether the server runs or not: the names
in C{envelopes/} and C{messages/} (two directory listings; ids sort by
arrival, and only the page's are sorted) and the envelopes of one page
only, so a page costs
little more with 100,000 messages queued than with ten.  Changes are requests: a file in
C{<data_dir>/queue/requests/} that the running server applies on its next
scan (every C{relay.scan_interval} seconds), so they never race an attempt
in progress; a stopped server applies them when it starts.
"""

from __future__ import annotations

import argparse
import heapq
import time

from mailserver.relay.adoption import adopt_queue
from mailserver.relay.queue import PENDING, CorruptEntry, QueueError, QueueStore


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _when(timestamp: float, now: float) -> str:
    if timestamp <= now:
        return "now"
    return "in " + _age(timestamp - now)


PAGE = 100


def _list(config, args: argparse.Namespace) -> str:
    if args.limit < 0:
        raise QueueError("--limit must be 0 (everything) or more")
    store = QueueStore(config.queue_path)
    now = time.time()
    ids = store.ids(ordered=False)
    later = [i for i in ids if i > args.after] if args.after else ids
    start = len(ids) - len(later)
    page = heapq.nsmallest(args.limit + 1, later) if args.limit else sorted(later)
    end = start + len(page)
    more = len(page) > args.limit > 0
    if more:
        page.pop()
        end -= 1
    messages, unusable = [], []
    for queue_id in page:
        try:
            messages.append(store.load(queue_id))
        except CorruptEntry as e:
            unusable.append(e)
        except QueueError:
            continue  # removed meanwhile
    lines = _table(messages, now) if messages else [
        "the queue is empty" if not ids else "no queued message on this page"]
    if not page and ids:
        lines.append(f"nothing after {args.after}; {len(ids)} in the queue")
    elif start or more:
        lines.append(f"entries {start + 1}-{end} of {len(ids)} in the queue, oldest first"
                     + (f"; next page: --after {page[-1]}" if more else ""))
    if unusable:
        lines.append(f"{len(unusable)} corrupt envelope(s), set aside by the server when it "
                     "next starts or tries them:")
        lines.extend(f"  {e.queue_id}: {e.problem}" for e in unusable)
    aside = store.corrupt_entries()
    if aside:
        lines.append(f"{len(aside)} corrupt entr{'y' if len(aside) == 1 else 'ies'} set aside "
                     f"in {store.corrupt_path}:")
        lines.extend(f"  {name}: {problem}" for name, problem in aside)
    return "\n".join(lines)


def _table(messages, now: float) -> list[str]:
    rows = [("ID", "AGE", "SENDER", "RECIPIENTS", "NEXT", "LAST ERROR")]
    for m in messages:
        pending = [r.address for r in m.recipients if r.state == PENDING]
        rows.append((
            m.id,
            _age(now - m.arrival),
            f"<{m.sender}>",
            ",".join(pending) or "(reports owed)",
            _when(m.next_attempt, now) if pending else "-",
            m.last_error or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5]
             for row in rows]
    lines.append(f"{len(messages)} message(s)")
    return [line.rstrip() for line in lines]


def _show(config, args: argparse.Namespace) -> str:
    store = QueueStore(config.queue_path)
    m = store.load(args.id)
    now = time.time()
    out = [
        f"id: {m.id}",
        f"sender: <{m.sender}>",
        f"arrival: {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(m.arrival))}"
        f" ({_age(now - m.arrival)} ago)",
        f"size: {m.size}",
        f"attempts: {m.attempts}",
        f"next attempt: {_when(m.next_attempt, now) if m.pending() else '-'}",
        f"last error: {m.last_error or '-'}",
        f"dsn: ret={m.ret or '-'} envid={m.envid or '-'}",
        "recipients:",
    ]
    for r in m.recipients:
        detail = f" {r.status} {r.diagnostic}".rstrip() if r.status else ""
        notify = ",".join(r.notify) or "-"
        out.append(f"  <{r.address}> {r.state} notify={notify}{detail}"
                   + (f" via {r.remote_mta}" if r.remote_mta else ""))
    try:
        with store.open_body(m) as body:
            headers = []
            for line in body:
                if line.strip() == b"":
                    break
                headers.append(line.decode("utf-8", "replace").rstrip("\n"))
        out.append("headers:")
        out.extend("  " + h for h in headers)
    except OSError as e:
        out.append(f"message file missing: {e.strerror}")
    return "\n".join(out)


def _request(config, verb: str, target: str) -> str:
    store = QueueStore(config.queue_path)
    store.request(verb, target)
    running = config.pid_path.exists()
    when = (f"the running server applies it within {config.relay.scan_interval:g}s" if running
            else "it is applied when the server starts")
    return f"{verb} of {target} requested; {when}"


def _flush(config, args: argparse.Namespace) -> str:
    if args.id and args.domain:
        raise QueueError("give a queue id or --domain, not both")
    if args.id:
        QueueStore(config.queue_path).load(args.id)
        return _request(config, "flush", args.id)
    if args.domain:
        domain = args.domain.lower().rstrip(".")
        if not domain or "/" in domain or "@" in domain:
            raise QueueError(f"{args.domain!r} is not a domain")
        return _request(config, "flush", f"domain:{domain}")
    return _request(config, "flush", "*")


def _delete(config, args: argparse.Namespace) -> str:
    try:
        QueueStore(config.queue_path).load(args.id)
    except CorruptEntry:
        pass  # unusable, but it may still be deleted
    return _request(config, "delete", args.id)


def _bounce(config, args: argparse.Namespace) -> str:
    QueueStore(config.queue_path).load(args.id)
    return _request(config, "bounce", args.id)


def _adopt(config, args: argparse.Namespace) -> str:
    done = adopt_queue(config.data_path, config.nodes_path, QueueStore(config.queue_path),
                       args.node)
    lines = [f"adopted {len(done.moved)} message(s) from node {args.node!r} into node "
             f"{config.node_name!r}"]
    if done.moved:
        running = config.pid_path.exists()
        lines.append(f"the running server takes them up within {config.relay.scan_interval:g}s"
                     if running else "they are taken up when this node's server starts")
    lines.extend(f"  left {queue_id}: {why}" for queue_id, why in done.left)
    return "\n".join(lines)


def add_queue_commands(subparsers) -> None:
    """
    Register C{queue list|show|flush|delete|bounce} on the console script's
    sub-command parsers; each sets C{handler(config, args) -> str}.
    """
    queue = subparsers.add_parser("queue", help="inspect and manage the outbound queue")
    actions = queue.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list queued messages, oldest first")
    listing.add_argument("--limit", type=int, default=PAGE,
                         help=f"at most this many (default {PAGE}; 0: all)")
    listing.add_argument("--after", metavar="ID", help="start after this queue id")
    listing.set_defaults(handler=_list)
    show = actions.add_parser("show", help="show one queued message")
    show.add_argument("id")
    show.set_defaults(handler=_show)
    flush = actions.add_parser("flush", help="retry now (all, one message, or one domain)")
    flush.add_argument("id", nargs="?")
    flush.add_argument("--domain", help="only messages with recipients in this domain")
    flush.set_defaults(handler=_flush)
    delete = actions.add_parser("delete", help="remove a message without notice")
    delete.add_argument("id")
    delete.set_defaults(handler=_delete)
    bounce = actions.add_parser("bounce", help="fail a message and notify its sender")
    bounce.add_argument("id")
    bounce.set_defaults(handler=_bounce)
    adopt = actions.add_parser(
        "adopt", help="move a stopped node's queue into this node's (the data folder is shared)")
    adopt.add_argument("node", help="the other node's node_name")
    adopt.set_defaults(handler=_adopt)
