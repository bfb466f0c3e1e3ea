"""
The metrics registry: instruments, and the exact text exposition format.
"""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailserver.metrics import Metrics, ServerMetrics, server_metrics


def test_counter_without_labels_starts_at_zero_and_counts():
    metrics = Metrics()
    logins = metrics.counter("pop3_logins_total", "Successful POP3 logins.")
    assert metrics.render() == (
        b"# HELP pop3_logins_total Successful POP3 logins.\n"
        b"# TYPE pop3_logins_total counter\n"
        b"pop3_logins_total 0\n"
    )
    logins.inc()
    logins.inc(2)
    assert logins.value() == 3
    assert metrics.render().endswith(b"\npop3_logins_total 3\n")


def test_labelled_counter_has_one_series_per_label_set_in_sorted_order():
    metrics = Metrics()
    rejected = metrics.counter("rejected_total", "Refused.", ["role", "reason"])
    rejected.inc(role="submission", reason="size")
    rejected.inc(reason="relay", role="smtp")
    rejected.inc(role="smtp", reason="relay")
    assert metrics.render() == (
        b"# HELP rejected_total Refused.\n"
        b"# TYPE rejected_total counter\n"
        b'rejected_total{role="smtp",reason="relay"} 2\n'
        b'rejected_total{role="submission",reason="size"} 1\n'
    )
    assert rejected.value(role="smtp", reason="relay") == 2
    assert rejected.value(role="smtp", reason="size") == 0


def test_float_amounts_render_as_python_floats():
    metrics = Metrics()
    seconds = metrics.counter("busy_seconds_total", "Time spent.")
    seconds.inc(0.25)
    assert metrics.render().endswith(b"\nbusy_seconds_total 0.25\n")


def test_wrong_labels_are_refused():
    counter = Metrics().counter("c_total", "C.", ["role"])
    with pytest.raises(ValueError):
        counter.inc()
    with pytest.raises(ValueError):
        counter.inc(role="smtp", extra="x")
    with pytest.raises(ValueError):
        counter.inc(rol="smtp")


def test_counter_cannot_decrease():
    with pytest.raises(ValueError):
        Metrics().counter("c_total", "C.").inc(-1)


@pytest.mark.parametrize("name", ["", "1abc", "has space", "dash-ed"])
def test_invalid_metric_names_are_refused(name):
    with pytest.raises(ValueError):
        Metrics().counter(name, "x")


@pytest.mark.parametrize("labels", [["__reserved"], ["a-b"], ["a", "a"]])
def test_invalid_label_names_are_refused(labels):
    with pytest.raises(ValueError):
        Metrics().gauge("g", "x", labels)


def test_a_name_is_registered_once():
    metrics = Metrics()
    metrics.counter("c_total", "C.")
    with pytest.raises(ValueError):
        metrics.gauge("c_total", "C again.")


def test_gauge_set_inc_dec():
    metrics = Metrics()
    active = metrics.gauge("active", "Open now.", ["role"])
    active.inc(role="smtp")
    active.inc(role="smtp")
    active.dec(role="smtp")
    active.set(7.5, role="pop3")
    assert metrics.render() == (
        b"# HELP active Open now.\n"
        b"# TYPE active gauge\n"
        b'active{role="pop3"} 7.5\n'
        b'active{role="smtp"} 1\n'
    )


def test_gauge_callback_is_measured_at_each_scrape():
    metrics = Metrics()
    queue = ["a", "b"]
    metrics.gauge_callback("queue_messages", "Queued.", lambda: len(queue))
    assert metrics.render().endswith(b"\nqueue_messages 2\n")
    queue.append("c")
    assert metrics.render().endswith(b"\nqueue_messages 3\n")


def test_failing_gauge_callback_leaves_the_other_metrics():
    metrics = Metrics()

    def broken() -> float:
        raise OSError("queue folder gone")

    metrics.gauge_callback("queue_messages", "Queued.", broken)
    metrics.counter("c_total", "C.").inc()
    assert metrics.render() == (
        b"# HELP queue_messages Queued.\n"
        b"# TYPE queue_messages gauge\n"
        b"# HELP c_total C.\n"
        b"# TYPE c_total counter\n"
        b"c_total 1\n"
    )


def test_special_values():
    metrics = Metrics()
    gauge = metrics.gauge("g", "G.", ["k"])
    gauge.set(math.inf, k="a")
    gauge.set(-math.inf, k="b")
    gauge.set(math.nan, k="c")
    assert metrics.render().splitlines()[2:] == [
        b'g{k="a"} +Inf',
        b'g{k="b"} -Inf',
        b'g{k="c"} NaN',
    ]


def test_histogram_buckets_are_cumulative_with_sum_count_and_inf():
    metrics = Metrics()
    seconds = metrics.histogram("t_seconds", "Duration.", [0.1, 1, 10])
    for value in (0.05, 0.1, 0.5, 3, 100):
        seconds.observe(value)
    assert metrics.render() == (
        b"# HELP t_seconds Duration.\n"
        b"# TYPE t_seconds histogram\n"
        b't_seconds_bucket{le="0.1"} 2\n'
        b't_seconds_bucket{le="1.0"} 3\n'
        b't_seconds_bucket{le="10.0"} 4\n'
        b't_seconds_bucket{le="+Inf"} 5\n'
        b"t_seconds_sum 103.65\n"
        b"t_seconds_count 5\n"
    )


def test_unobserved_histogram_without_labels_renders_zeros():
    metrics = Metrics()
    metrics.histogram("t_seconds", "Duration.", [1, math.inf])
    assert metrics.render().splitlines()[2:] == [
        b't_seconds_bucket{le="1.0"} 0',
        b't_seconds_bucket{le="+Inf"} 0',
        b"t_seconds_sum 0",
        b"t_seconds_count 0",
    ]


def test_labelled_histogram_puts_le_last():
    metrics = Metrics()
    size = metrics.histogram("size_bytes", "Size.", [1000], ["role"])
    size.observe(10, role="smtp")
    assert metrics.render().splitlines()[2:] == [
        b'size_bytes_bucket{role="smtp",le="1000.0"} 1',
        b'size_bytes_bucket{role="smtp",le="+Inf"} 1',
        b'size_bytes_sum{role="smtp"} 10',
        b'size_bytes_count{role="smtp"} 1',
    ]


@pytest.mark.parametrize("buckets", [[], [2, 1], [1, 1]])
def test_histogram_buckets_must_increase(buckets):
    with pytest.raises(ValueError):
        Metrics().histogram("h", "H.", buckets)


def test_histogram_refuses_le_label():
    with pytest.raises(ValueError):
        Metrics().histogram("h", "H.", [1], ["le"])


def test_help_and_label_values_are_escaped():
    metrics = Metrics()
    errors = metrics.counter("errors_total", 'Back\\slash and\nnewline "kept".', ["plugin"])
    errors.inc(plugin='we"ird\\name\n')
    assert metrics.render() == (
        b'# HELP errors_total Back\\\\slash and\\nnewline "kept".\n'
        b"# TYPE errors_total counter\n"
        b'errors_total{plugin="we\\"ird\\\\name\\n"} 1\n'
    )


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), text)


@given(st.text())
def test_any_label_value_stays_on_one_line_and_reads_back(value):
    metrics = Metrics()
    metrics.counter("c_total", "C.", ["v"]).inc(v=value)
    sample = metrics.render().decode("utf-8").split("\n")[2:]
    assert sample[1:] == [""]
    match = re.fullmatch(r'c_total\{v="((?:[^"\\\n]|\\.)*)"\} 1', sample[0])
    assert match is not None
    assert _unescape(match.group(1)) == value


def test_server_metrics_registers_every_family():
    metrics = Metrics()
    instruments = server_metrics(metrics, queue_messages=lambda: 4, queue_oldest_seconds=lambda: 90.5)
    assert isinstance(instruments, ServerMetrics)
    instruments.smtp_connections_total.inc(role="smtp")
    instruments.smtp_refusals_total.inc(role="smtp", reason="relay-denied")
    instruments.relay_deliveries_total.inc(result="deferred")
    instruments.plugin_errors_total.inc(plugin="webhook")
    instruments.smtp_transaction_seconds.observe(0.3)
    text = metrics.render().decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert types == {
        "relay_queue_messages": "gauge",
        "relay_queue_oldest_seconds": "gauge",
        "smtp_connections_total": "counter",
        "smtp_connections_active": "gauge",
        "smtp_messages_accepted_total": "counter",
        "smtp_refusals_total": "counter",
        "smtp_bytes_received_total": "counter",
        "smtp_transaction_seconds": "histogram",
        "pop3_logins_total": "counter",
        "pop3_login_failures_total": "counter",
        "pop3_messages_retrieved_total": "counter",
        "pop3_bytes_sent_total": "counter",
        "imap_logins_total": "counter",
        "imap_login_failures_total": "counter",
        "relay_deliveries_total": "counter",
        "relay_queue_corrupt_total": "counter",
        "relay_queue_scan_seconds": "gauge",
        "relay_tls_policy_total": "counter",
        "plugin_errors_total": "counter",
    }
    assert "\nrelay_queue_messages 4\n" in text
    assert "\nrelay_queue_oldest_seconds 90.5\n" in text
    assert '\nsmtp_refusals_total{role="smtp",reason="relay-denied"} 1\n' in text
    assert "\nsmtp_transaction_seconds_count 1\n" in text
    assert "\npop3_logins_total 0\n" in text


def test_registries_are_independent():
    first, second = Metrics(), Metrics()
    server_metrics(first, queue_messages=lambda: 0, queue_oldest_seconds=lambda: 0)
    server_metrics(second, queue_messages=lambda: 0, queue_oldest_seconds=lambda: 0)
    assert first.render() == second.render()
