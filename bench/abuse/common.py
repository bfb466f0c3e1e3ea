"""
What every part of the abuse bench shares: the server's address and users,
the kinds of slow client, the latency target and its summaries.
"""

from __future__ import annotations

import re

from bench.smtp_load import percentile

HOST = "127.0.0.1"
GOOD_USER = "bob@localhost"
SLOW_USER = "slow@localhost"
FLOOD_USER = "flood@localhost"
SINK_USER = "sink@localhost"
USERS = (GOOD_USER, SLOW_USER, FLOOD_USER, SINK_USER)
PASSWORD = "bench-password"
KINDS = ("cmd", "data", "noread")
KIND_NAMES = {
    "cmd": "slow-loris, command line",
    "data": "slow-loris, in DATA",
    "noread": "never reads replies",
}
TARGET_MS = 50.0
MiB = 1024 * 1024


def stats_ms(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 50),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else float("nan"),
        "over_target": sum(1 for v in ordered if v > TARGET_MS),
    }


def fmt_ms(s: dict) -> str:
    return (
        f"{s['n']} msgs, p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms, max {s['max']:.1f} ms, "
        f"over {TARGET_MS:.0f} ms: {s['over_target']}"
    )


def short_reply(line: bytes) -> str:
    """
    A reply line without the host name and details: "421 4.4.2 ... timeout exceeded".
    """
    text = line.decode("ascii", "replace").strip()
    return re.sub(r"mx\.test ", "", text)[:80]


def error_sample(samples: list[str], text: str, keep: int = 5) -> None:
    if len(samples) < keep:
        samples.append(text[:200])
