"""
A small Prometheus-style metrics registry, rendered in the text exposition
format 0.0.4 for C{GET /metrics}.

There is no global registry: L{service} builds one L{Metrics} and hands the
instruments (L{ServerMetrics}) to the protocols that count things, so tests
get a fresh registry each.  Instruments keep plain dicts keyed by the tuple of
label values, so counting costs a dict lookup and an add.  They are meant to
be used from the reactor thread.

With C{workers = N} each process counts its own; the workers send their
counts to the primary (L{Metrics.snapshot}, carried by
L{mailserver.worker_link}), whose scrape adds them in (L{Metrics.count_elsewhere})
and keeps the counters of a worker that ended (L{Metrics.absorb}).

Label values must come from a small fixed set (a role, a result, a plugin
name, a short reason word), never from client input: every distinct value is
a time series kept for the life of the process.

Why not C{prometheus_client} (0.26 weighed, for issue 18): it is not smaller
once it does what this does, and it is looser.
 - Size: the registry here is 390 lines, about 220 of them code.  An adapter
   keeping this API over prometheus_client took 160 and still failed 20 of
   the 73 metrics, workers and admin API tests, on top of a 5,300-line
   dependency.  Its Twisted C{MetricsResource} is a WSGI resource run in the
   reactor's thread pool, without the admin token, so we would still render
   in our own resource; and scrape-time gauges would read the queue from
   another thread.
 - Exposition: this output parses with prometheus_client's own parser
   (escapes, NaN, +Inf, merged histograms included).  prometheus_client
   writes every count as a float (C{1.0}), series in insertion order, a
   C{_created} family per counter and histogram unless a process-wide switch
   is thrown, accepts a bad metric name (C{"has space"} is exported as
   C{has_space_total}) and duplicate bucket bounds (two C{le="1.0"} series);
   here a bad name or bucket list is refused when it is registered.
 - The workers' merge: its multiprocess mode shares mmap files in a folder
   named by an environment variable set before import, and has no
   scrape-time callback gauges.  Adding the workers' JSON snapshots instead
   takes a collector that rebuilds every family from its samples (55 lines
   of the adapter); here each instrument adds the other processes' entries
   to its own (L{_Values._with}, L{Histogram._with}), and input from another
   process that does not fit is left out entry by entry.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

from twisted.logger import Logger

_log = Logger()

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

# One sample: the name suffix (C{"_bucket"}, ...), its labels, its value.
_Sample = tuple[str, tuple[tuple[str, str], ...], float]
# A family's counts as JSON carries them: [[label values, value], ...] for a
# counter or gauge, [[label values, [bucket counts..., sum]], ...] for a
# histogram.
_Entries = list[list[Any]]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _entries(entries: object, labels: int, width: int | None) -> Iterator[tuple[tuple[str, ...], Any]]:
    """
    The well-formed entries of a snapshot from another process: C{labels}
    label values each, and a number (C{width} None) or that many numbers.
    """
    if not isinstance(entries, list):
        return
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)):
            continue
        key, value = entry
        if len(key) != labels or not all(isinstance(k, str) for k in key):
            continue
        if width is None:
            if _is_number(value):
                yield tuple(key), value
        elif isinstance(value, list) and len(value) == width and all(map(_is_number, value)):
            yield tuple(key), value


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class _Instrument:
    """
    What every metric family shares: a name, a help text, a type and the
    names of its labels, checked once at registration.
    """

    type: str

    def __init__(self, name: str, help: str, labels: Iterable[str]) -> None:
        self.name = name
        self.help = help
        self.label_names = tuple(labels)
        self._label_set = frozenset(self.label_names)
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in self.label_names:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for {name}")
        if len(self._label_set) != len(self.label_names):
            raise ValueError(f"duplicate label name for {name}")

    def _key(self, labels: Mapping[str, str]) -> tuple[str, ...]:
        # On every count, so: a length check and lookups, no set building.
        if not labels and not self.label_names:
            return ()
        if len(labels) == len(self.label_names):
            try:
                return tuple(map(labels.__getitem__, self.label_names))
            except KeyError:
                pass
        raise ValueError(
            f"{self.name} takes labels {sorted(self._label_set)}, got {sorted(labels)}"
        )

    def _labels(self, key: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        return tuple(zip(self.label_names, map(str, key)))

    def samples(self, elsewhere: Iterable[object] = ()) -> Iterator[_Sample]:
        """
        The family's samples, with the counts of other processes
        (C{elsewhere}: their snapshot entries for this family) added in.
        """
        raise NotImplementedError

    def snapshot(self) -> _Entries | None:
        """
        This process's counts for another to add in, or C{None} for a family
        each process need not send.
        """
        return None

    def absorb(self, entries: object) -> None:
        """
        Keep the counts of a process that ended (gauges are not kept: what
        they measured ended with it).
        """


class _Values(_Instrument):
    """
    One number per label set; without labels the single series starts at
    zero, so it is exported before the first event.
    """

    def __init__(self, name: str, help: str, labels: Iterable[str]) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {} if self.label_names else {(): 0}

    def value(self, **labels: str) -> float:
        """
        The current value for C{labels} (0 before the first change).
        """
        return self._values.get(self._key(labels), 0)

    def _with(self, elsewhere: Iterable[object]) -> dict[tuple[str, ...], float]:
        values = self._values
        for entries in elsewhere:
            if values is self._values:
                values = dict(values)
            for key, value in _entries(entries, len(self.label_names), None):
                values[key] = values.get(key, 0) + value
        return values

    def samples(self, elsewhere: Iterable[object] = ()) -> Iterator[_Sample]:
        values = self._with(elsewhere)
        for key in sorted(values):
            yield "", self._labels(key), values[key]

    def snapshot(self) -> _Entries:
        return [[list(key), value] for key, value in self._values.items()]


class Counter(_Values):
    """
    A number that only goes up: events and octets since the process started.
    """

    type = "counter"

    def inc(self, amount: float = 1, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease")
        key = self._key(labels)
        values = self._values
        values[key] = values.get(key, 0) + amount

    def absorb(self, entries: object) -> None:
        self._values = self._with([entries])


class Gauge(_Values):
    """
    A number that goes up and down, such as open connections.
    """

    type = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = value

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = self._key(labels)
        values = self._values
        values[key] = values.get(key, 0) + amount

    def dec(self, amount: float = 1, **labels: str) -> None:
        self.inc(-amount, **labels)


class _CallbackGauge(_Instrument):
    """
    A gauge whose value is asked for at scrape time, for things that are
    cheaper to measure than to track (the queue's size).  Every process
    measures its own (a worker's relay holds the messages it is sending
    the first time) and sends it in its snapshot; the scrape combines them
    with C{merge} (C{sum} for a count, C{max} for an age).
    """

    type = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float],
                 merge: Callable[[Iterable[float]], float] = sum) -> None:
        super().__init__(name, help, ())
        self._fn = fn
        self._merge = merge

    def _measured(self) -> float | None:
        # A failing callback must not take the other metrics down with it:
        # the family is rendered without this process's sample, and the
        # failure logged.
        try:
            return self._fn()
        except Exception:
            _log.failure("metric {name} could not be measured", name=self.name,
                         event="metrics.failed", log_system="metrics.failed#critical")
            return None

    def snapshot(self) -> _Entries | None:
        value = self._measured()
        return None if value is None else [[[], value]]

    def samples(self, elsewhere: Iterable[object] = ()) -> Iterator[_Sample]:
        value = self._measured()
        if value is None:
            return
        others = [v for entries in elsewhere for _, v in _entries(entries, 0, None)]
        yield "", (), self._merge([value, *others])


class Histogram(_Instrument):
    """
    Counts of observations per bucket (an observation lands in every bucket
    whose upper bound C{le} it does not exceed), plus their sum and count.
    """

    type = "histogram"

    def __init__(
        self, name: str, help: str, buckets: Iterable[float], labels: Iterable[str]
    ) -> None:
        super().__init__(name, help, labels)
        if "le" in self._label_set:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        bounds = [float(b) for b in buckets]
        if not bounds or bounds != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be increasing and not empty")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        # Per label set: [count in each bucket (not cumulative)..., sum].
        self._series: dict[tuple[str, ...], list[float]] = (
            {} if self.label_names else {(): self._empty()}
        )

    def _empty(self) -> list[float]:
        return [0] * len(self.bounds) + [0]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._empty()
        series[bisect.bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def _with(self, elsewhere: Iterable[object]) -> dict[tuple[str, ...], list[float]]:
        merged = self._series
        for entries in elsewhere:
            if merged is self._series:
                merged = {key: list(series) for key, series in merged.items()}
            for key, counts in _entries(entries, len(self.label_names), len(self.bounds) + 1):
                series = merged.setdefault(key, self._empty())
                for i, count in enumerate(counts):
                    series[i] += count
        return merged

    def snapshot(self) -> _Entries:
        return [[list(key), list(series)] for key, series in self._series.items()]

    def absorb(self, entries: object) -> None:
        self._series = self._with([entries])

    def samples(self, elsewhere: Iterable[object] = ()) -> Iterator[_Sample]:
        merged = self._with(elsewhere)
        for key in sorted(merged):
            series = merged[key]
            labels = self._labels(key)
            cumulative = 0
            for bound, count in zip(self.bounds, series):
                cumulative += count
                yield "_bucket", labels + (("le", _format_value(bound)),), cumulative
            yield "_sum", labels, series[-1]
            yield "_count", labels, cumulative


class Metrics:
    """
    A registry of metric families, rendered together for a scrape.
    """

    def __init__(self) -> None:
        self._families: dict[str, _Instrument] = {}
        self._elsewhere: Callable[[], Iterable[Mapping[str, object]]] = tuple

    def snapshot(self) -> dict[str, _Entries]:
        """
        This process's counts, JSON-able, for the primary to add in.
        """
        found = {}
        for name, family in self._families.items():
            entries = family.snapshot()
            if entries is not None:
                found[name] = entries
        return found

    def count_elsewhere(self, snapshots: Callable[[], Iterable[Mapping[str, object]]]) -> None:
        """
        Add C{snapshots()} (other processes' latest L{snapshot}s) into every
        scrape; a family or entry that does not fit is left out.
        """
        self._elsewhere = snapshots

    def absorb(self, snapshot: Mapping[str, object]) -> None:
        """
        Keep the counters and histograms of an ended process's last
        L{snapshot}, so the totals do not fall back.
        """
        for name, family in self._families.items():
            if name in snapshot:
                family.absorb(snapshot[name])

    def _register(self, instrument: _Instrument) -> None:
        if instrument.name in self._families:
            raise ValueError(f"metric {instrument.name} is already registered")
        self._families[instrument.name] = instrument

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        counter = Counter(name, help, labels)
        self._register(counter)
        return counter

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Gauge:
        gauge = Gauge(name, help, labels)
        self._register(gauge)
        return gauge

    def gauge_callback(self, name: str, help: str, fn: Callable[[], float],
                       merge: Callable[[Iterable[float]], float] = sum) -> None:
        """
        Register a gauge whose value is C{fn()} at each scrape, combined
        with the other processes' by C{merge}.
        """
        self._register(_CallbackGauge(name, help, fn, merge))

    def histogram(
        self, name: str, help: str, buckets: Iterable[float], labels: Iterable[str] = ()
    ) -> Histogram:
        """
        Register a histogram; C{buckets} are the upper bounds, increasing,
        and C{+Inf} is added when missing.
        """
        histogram = Histogram(name, help, buckets, labels)
        self._register(histogram)
        return histogram

    def render(self) -> bytes:
        """
        Every family in the Prometheus text exposition format 0.0.4,
        in registration order.
        """
        lines = []
        snapshots = [s for s in self._elsewhere() if isinstance(s, Mapping)]
        for family in self._families.values():
            lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {family.name} {family.type}")
            elsewhere = [s[family.name] for s in snapshots if family.name in s]
            for suffix, labels, value in family.samples(elsewhere):
                if labels:
                    pairs = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in labels)
                    lines.append(f"{family.name}{suffix}{{{pairs}}} {_format_value(value)}")
                else:
                    lines.append(f"{family.name}{suffix} {_format_value(value)}")
        return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


# Seconds from MAIL FROM to the final reply to the data; slow clients and
# large messages reach the data timeout (600 s by default).
TRANSACTION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class ServerMetrics:
    """
    The server's instruments, named as they are exported.

    Label values: C{role} is the listener role (C{smtp}, C{submission},
    C{submissions}); C{reason} a word of L{mailserver.smtp.refusals} (e.g.
    C{size}, C{relay-denied}, C{unknown-recipient}) or a hook's
    L{mailserver.hooks.Reject} reason (C{dnsbl}, C{greylist}, C{dmarc},
    C{plugin:NAME}...): fixed words, never client input; C{result} one of
    C{delivered}, C{deferred}, C{bounced}; C{plugin} the plugin's name.
    C{relay_tls_policy_total}'s C{domain} is a policy domain (one with an
    MTA-STS policy or a C{relay.tls_policies} entry; past 1000 of them,
    C{"other"}: L{mailserver.relay.tls_policy.TLSPolicyCounter}).
    """

    smtp_connections_total: Counter
    smtp_connections_active: Gauge
    smtp_messages_accepted_total: Counter
    smtp_refusals_total: Counter
    smtp_bytes_received_total: Counter
    smtp_transaction_seconds: Histogram
    pop3_logins_total: Counter
    pop3_login_failures_total: Counter
    pop3_messages_retrieved_total: Counter
    pop3_bytes_sent_total: Counter
    imap_logins_total: Counter
    imap_login_failures_total: Counter
    relay_deliveries_total: Counter
    relay_queue_corrupt_total: Counter
    relay_queue_scan_seconds: Gauge
    relay_tls_policy_total: Counter
    plugin_errors_total: Counter


def server_metrics(
    metrics: Metrics,
    *,
    queue_messages: Callable[[], float],
    queue_oldest_seconds: Callable[[], float],
) -> ServerMetrics:
    """
    Register the server's metrics in C{metrics}.

    The relay queue's two gauges are measured at scrape time:
    C{queue_messages()} is the number of queued messages and
    C{queue_oldest_seconds()} the age of the oldest one (0 when empty), in
    each process: the scrape adds up the counts and takes the oldest age.
    """
    metrics.gauge_callback(
        "relay_queue_messages", "Messages waiting in the relay queue.", queue_messages
    )
    metrics.gauge_callback(
        "relay_queue_oldest_seconds",
        "Age of the oldest message in the relay queue, in seconds.",
        queue_oldest_seconds,
        merge=max,
    )
    return ServerMetrics(
        smtp_connections_total=metrics.counter(
            "smtp_connections_total", "SMTP connections accepted.", ["role"]
        ),
        smtp_connections_active=metrics.gauge(
            "smtp_connections_active", "SMTP connections open now.", ["role"]
        ),
        smtp_messages_accepted_total=metrics.counter(
            "smtp_messages_accepted_total", "Messages accepted with a 250 reply.", ["role"]
        ),
        smtp_refusals_total=metrics.counter(
            "smtp_refusals_total",
            "SMTP refusals (of a connection, a command or a message), by reason: the "
            "server's own, the defences' (dnsbl, pregreet, greylist, rate, rspamd) and "
            "plugins' (plugin:NAME).",
            ["role", "reason"],
        ),
        smtp_bytes_received_total=metrics.counter(
            "smtp_bytes_received_total", "Octets of message data accepted.", ["role"]
        ),
        smtp_transaction_seconds=metrics.histogram(
            "smtp_transaction_seconds",
            "Seconds from MAIL FROM to the reply to the message data.",
            TRANSACTION_BUCKETS,
        ),
        pop3_logins_total=metrics.counter("pop3_logins_total", "Successful POP3 logins."),
        pop3_login_failures_total=metrics.counter(
            "pop3_login_failures_total", "Failed POP3 login attempts."
        ),
        pop3_messages_retrieved_total=metrics.counter(
            "pop3_messages_retrieved_total", "Messages sent with RETR."
        ),
        pop3_bytes_sent_total=metrics.counter(
            "pop3_bytes_sent_total", "Octets of message data sent by RETR and TOP."
        ),
        imap_logins_total=metrics.counter("imap_logins_total", "Successful IMAP logins."),
        imap_login_failures_total=metrics.counter(
            "imap_login_failures_total", "Failed IMAP login attempts."
        ),
        relay_deliveries_total=metrics.counter(
            "relay_deliveries_total",
            "Outbound delivery attempts per recipient, by result.",
            ["result"],
        ),
        relay_queue_corrupt_total=metrics.counter(
            "relay_queue_corrupt_total",
            "Corrupt relay queue entries moved into queue/corrupt/.",
        ),
        relay_queue_scan_seconds=metrics.gauge(
            "relay_queue_scan_seconds",
            "Seconds the last look at the relay queue's requests and other processes' "
            "messages took.",
        ),
        relay_tls_policy_total=metrics.counter(
            "relay_tls_policy_total",
            "Outbound TLS sessions under a per-domain policy (MTA-STS or relay.tls_policies), "
            "by policy domain, mode and result (success or a TLS-RPT failure kind).",
            ["domain", "mode", "result"],
        ),
        plugin_errors_total=metrics.counter(
            "plugin_errors_total", "Exceptions raised by plugins.", ["plugin"]
        ),
    )


def unregistered_metrics() -> ServerMetrics:
    """
    Instruments counting into a private registry nobody scrapes: the default
    for protocols built without the server's registry (tests, tools).
    """
    return server_metrics(Metrics(), queue_messages=lambda: 0, queue_oldest_seconds=lambda: 0)
