"""
Values the loader used to accept and must refuse (issue 19): each is one
clear line naming the key.
"""

import pytest

from mailserver.config import ConfigError, load

HUGE_NAME = ".".join(["a" * 63] * 33_000)  # about 2 MB

REFUSED = {
    "port above 65535": ('[listeners]\nsmtp = ["tcp:99999"]', "listeners.smtp", "port"),
    "negative port": ('[listeners]\npop3 = ["tcp:-1"]', "listeners.pop3", "port"),
    "newline in interface": (
        '[listeners]\nsmtp = ["tcp:25:interface=127.0.0.1\\nevil"]', "listeners.smtp", "interface"),
    "C1 control in interface": (
        '[listeners]\nsmtp = ["tcp:25:interface=127.0.0.1\\u0085"]', "listeners.smtp",
        "interface"),
    "tab in interface": (
        '[listeners]\nadmin = ["tcp:2080:interface=\\t127.0.0.1"]', "listeners.admin", "interface"),
    "negative backlog": (
        '[listeners]\nsmtp = ["tcp:25:backlog=-1"]', "listeners.smtp", "backlog"),
    "catch-all not an entry": ('[smtp]\ncatch_all = ["nonsense"]', "smtp.catch_all", "nonsense"),
    "catch-all target not an address": (
        'local_domains = ["example.org"]\n[smtp]\ncatch_all = ["example.org=bob"]',
        "smtp.catch_all", "address"),
    "catch-all of a domain not local": (
        'local_domains = ["example.org"]\n[smtp]\ncatch_all = ["other.example=bob@example.org"]',
        "smtp.catch_all", "local_domains"),
    "smarthost with an extra part": (
        '[relay]\nsmarthost = "host.example:25:extra"', "relay.smarthost", "host:port"),
    "transport with an extra part": (
        '[relay]\ntransports = ["example.org=host.example:25:extra"]', "relay.transports",
        "host:port"),
    "resolver by name": ('[relay]\nresolver = "dns.example:53"', "relay.resolver", "IP address"),
    "resolver with an extra part": (
        '[relay]\nresolver = "127.0.0.1:53:1"', "relay.resolver", "host:port"),
    "smarthost of 2 MB": (f'[relay]\nsmarthost = "{HUGE_NAME}:25"', "relay.smarthost", "253"),
    "expire with a line break": (
        '[pop3]\nexpire = "NEVER\\r\\n+OK injected"', "pop3.expire", "NEVER"),
    "expire not a number": ('[pop3]\nexpire = "soon"', "pop3.expire", "NEVER"),
    "tiny scan interval": ("[relay]\nscan_interval = 1e-300", "relay.scan_interval", "at least"),
    "tiny retry delay": (
        '[relay]\nretry_schedule = ["0.000001s"]', "relay.retry_schedule", "at least"),
    "tiny max retry interval": (
        '[relay]\nmax_retry_interval = "0.000001s"', "relay.max_retry_interval", "at least"),
    "infinite duration": (
        f'[relay]\nmax_age = "{"9" * 400}d"', "relay.max_age", "at most"),
    "tiny connect timeout": ("[relay]\nconnect_timeout = 1e-300", "relay.connect_timeout",
                             "at least"),
    "tiny command timeout": ("[relay]\ncommand_timeout = 1e-300", "relay.command_timeout",
                             "at least"),
    "tiny data timeout": ("[relay]\ndata_timeout = 1e-300", "relay.data_timeout", "at least"),
    "relay domain also local": (
        'local_domains = ["example.org"]\n[relay]\nrelay_domains = ["example.org"]',
        "relay.relay_domains", "local_domains"),
    "relay domain in capitals": ('[relay]\nrelay_domains = ["Primary.test"]',
                                 "relay.relay_domains", "lower-case"),
    "relay recipients unreadable": ('[relay]\nrelay_recipients = "/nonexistent/list"',
                                    "relay.relay_recipients", "cannot read"),
    "own address by name": ('[relay]\nown_addresses = ["mx2.example.net"]',
                            "relay.own_addresses", "IP address"),
    "own name with a space": ('[relay]\nown_names = ["not a name"]', "relay.own_names",
                              "host name"),
    "tiny relay dns timeout": ("[relay]\ndns_timeout = 1e-300", "relay.dns_timeout", "at least"),
    "tiny checks dns timeout": ("[checks]\ndns_timeout = 1e-300", "checks.dns_timeout",
                                "at least"),
    "zero SMTP command timeout": (
        "[limits]\nsmtp_command_timeout = 0", "limits.smtp_command_timeout", "at least"),
    "zero POP3 idle timeout": (
        "[limits]\npop3_idle_timeout = 0", "limits.pop3_idle_timeout", "at least"),
    "zero failure window": (
        "[limits]\nauth_failure_window = 0", "limits.auth_failure_window", "at least"),
    "zero connections": ("[limits]\nmax_connections = 0", "limits.max_connections", "at least"),
    "zero message size": ("[limits]\nmax_message_size = 0", "limits.max_message_size",
                          "at least"),
    "memory budget under 1 MiB": (
        "[limits]\nmemory_budget = 65536", "limits.memory_budget", "at least 1048576 (1 MiB)"),
    "memory budget as a word": (
        '[limits]\nmemory_budget = "64M"', "limits.memory_budget", "integer"),
    "hostname of 2 MB": (f'hostname = "{HUGE_NAME}"', "hostname", "253"),
    "hostname label of 64": (f'hostname = "{"a" * 64}.example"', "hostname", "63"),
    "hostname with a control character": ('hostname = "mx\\u0085.example"', "hostname", "name"),
    "local domain of 2 MB": (f'local_domains = ["{HUGE_NAME}"]', "local_domains", "253"),
    "admin token too short": ('[admin]\ntoken = "a"', "admin.token", "16"),
    "admin token with a space": (
        '[admin]\ntoken = "0123456789 abcdefghij"', "admin.token", "characters"),
    "separator @": ('[smtp]\nsubaddress_separator = "@"', "smtp.subaddress_separator", "@"),
    "separator newline": (
        '[smtp]\nsubaddress_separator = "\\n"', "smtp.subaddress_separator", "printable"),
    "mx_auth not a flag": ('[smtp]\nmx_auth = "yes"', "smtp.mx_auth", "true or false"),
    "shared domain in upper case": (
        '[dkim]\nshared_domains = ["Example.org"]', "dkim.shared_domains", "lower-case"),
    "shared domain with a trailing dot": (
        '[dkim]\nshared_domains = ["example.org."]', "dkim.shared_domains", "trailing dot"),
    "shared domain an address": (
        '[dkim]\nshared_domains = ["@example.org"]', "dkim.shared_domains", "name"),
    "shared domain with a space": (
        '[dkim]\nshared_domains = ["a b.org"]', "dkim.shared_domains", "name"),
    "shared domain with a line break": (
        '[dkim]\nshared_domains = ["example.org\\nX-Injected: 1"]', "dkim.shared_domains",
        "name"),
    "shared domains not a list": (
        '[dkim]\nshared_domains = "example.org"', "dkim.shared_domains", "list"),
}


@pytest.mark.parametrize("text, key, problem", REFUSED.values(), ids=REFUSED.keys())
def test_refused_in_one_line(tmp_path, text, key, problem):
    path = tmp_path / "mailserver.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert (caught.value.key, problem in caught.value.problem) == (key, True), caught.value
    message = str(caught.value)
    assert message.isprintable() and len(message) < 400, message[:400]
