"""
The configuration file: defaults, every key parsed, every problem named.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailserver.config import (
    CatchAll,
    CheckAction,
    Config,
    ConfigError,
    Disclosure,
    HostPort,
    RelayTLS,
    SmarthostTLS,
    Transport,
    default,
    file_keys,
    load,
    override,
)
from mailserver.config.endpoints import is_loopback_only


def write(tmp_path, text):
    path = tmp_path / "mailserver.toml"
    path.write_text(text)
    return path


def test_default_serves_loopback_on_unprivileged_ports():
    config = default()
    assert config.listeners.smtp == ("tcp:2525:interface=127.0.0.1",)
    assert config.listeners.submission == ("tcp:2587:interface=127.0.0.1",)
    assert config.listeners.pop3 == ("tcp:2110:interface=127.0.0.1",)
    assert config.local_domains == ("localhost",)
    assert str(config.data_path) == "mailserver-data"
    assert str(config.users_path) == "mailserver-data/users"


def test_none_is_the_default():
    assert load(None) == Config(hostname=load(None).hostname)


def test_full_file(tmp_path):
    path = write(
        tmp_path,
        """
hostname = "mx.example.org"
data_dir = "/var/mail/state"
local_domains = ["example.org", "example.net"]
users_file = "/etc/mail/users"
[listeners]
smtp = ["tcp:25"]
pop3 = []
[limits]
max_message_size = 1000000
auth_failure_delay = 2
[smtp]
vrfy = "answer"
""",
    )
    config = load(path)
    assert config.hostname == "mx.example.org"
    assert config.local_domains == ("example.org", "example.net")
    assert config.listeners.smtp == ("tcp:25",)
    assert config.listeners.pop3 == ()
    assert config.listeners.submission == ("tcp:2587:interface=127.0.0.1",)
    assert config.limits.max_message_size == 1000000
    assert config.limits.auth_failure_delay == 2.0
    assert config.smtp.vrfy == "answer"
    assert str(config.users_path) == "/etc/mail/users"
    assert str(config.aliases_path) == "/var/mail/state/aliases"
    assert config.source == str(path)
    assert config.is_local_domain("Example.NET.")


@pytest.mark.parametrize(
    "text, key, problem",
    [
        ('hostnme = "x"', "hostnme", "unknown key"),
        ("[limits]\nmax_recipients = \"ten\"", "limits.max_recipients", "must be an integer"),
        ("[limits]\nmax_recipients = true", "limits.max_recipients", "must be an integer"),
        ("[limits]\nmax_junk_commands = -1", "limits.max_junk_commands", "must not be negative"),
        ("[limits]\nmax_recipients = 0", "limits.max_recipients", "must be at least 1"),
        ("[limits]\nbogus = 1", "limits.bogus", "unknown key"),
        ("local_domains = \"example.org\"", "local_domains", "must be a list of strings"),
        ("local_domains = []", "local_domains", "must name at least one domain"),
        ("listeners = 5", "listeners", "must be a table"),
        ("[listeners]\nsmtp = [\"nonsense:25\"]", "listeners.smtp", "bad endpoint"),
        ("[listeners]\npop3 = [\"tcp:notaport\"]", "listeners.pop3", "bad endpoint"),
        ("[tls]\ncertificate = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\"", "tls.certificate", "cannot read"),
        ("[tls]\ncertificate = \"/etc/hostname\"", "tls", "set both"),
        ("[smtp]\nvrfy = \"maybe\"", "smtp.vrfy", "must be"),
        ("[limits]\nmax_command_line = 100", "limits.max_command_line", "at least 512"),
        ("this is not toml", "-", "not valid TOML"),
    ],
)
def test_problems_name_file_and_key(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{path}: {key}: ")
    assert "\n" not in str(caught.value)


def test_unreadable_certificate_is_named(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    path = write(tmp_path, f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.key == "tls.certificate"
    assert "not a PEM file" in caught.value.problem


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "absent.toml")
    assert "cannot read file" in str(caught.value)


# The admin API needs a token unless every admin listener is local.


@pytest.mark.parametrize(
    "description",
    [
        "tcp:2080:interface=127.0.0.1",
        "tcp:2080:127.0.0.1",
        "tcp:2080:interface=127.0.0.53",
        "tcp:2080:interface=localhost",
        r"tcp6:2080:interface=\:\:1",
        "unix:/run/mailserver/admin.sock",
        "unix:@mailserver-admin",
    ],
)
def test_local_admin_listeners_need_no_token(description):
    assert is_loopback_only(description) is True


@pytest.mark.parametrize(
    "description",
    [
        "tcp:2080",
        "tcp:2080:interface=0.0.0.0",
        "tcp:2080:interface=192.0.2.1",
        "tcp6:2080",
        r"tcp6:2080:interface=\:\:",
        "systemd:domain=INET:index=0",
        "2080",
        "nonsense:x",
        "",
    ],
)
def test_reachable_admin_listeners_need_a_token(description):
    assert is_loopback_only(description) is False


# The typed model: values parsed once, at load.


def test_every_default_is_its_file_spelling_parsed():
    config = default()
    for key, setting in file_keys():
        if setting.shown:  # computed (the machine's name)
            continue
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        assert setting.kind.parse(setting.default) == value, key


def test_durations_addresses_and_words_are_typed(tmp_path):
    path = write(
        tmp_path,
        """
local_domains = ["example.org"]
[smtp]
vrfy = "answer"
catch_all = ["@Example.org=Bob@Example.org"]
[relay]
resolver = "[2001:db8::53]"
smarthost = "smtp.example.net"
smarthost_tls = "implicit"
transports = ["Example.COM.=[2001:db8::25]:2525", "example.net=mx.example.net"]
tls = "required"
retry_schedule = ["90", "1.5m", " 2h "]
max_retry_interval = "1d"
delay_warning = "4h"
[checks]
spf_fail = "reject"
""",
    )
    config = load(path)
    assert config.smtp.vrfy is Disclosure.ANSWER and config.smtp.vrfy == "answer"
    assert config.smtp.catch_all == (CatchAll("example.org", "bob@example.org"),)
    relay = config.relay
    assert relay.resolver == HostPort("2001:db8::53", 53)
    assert str(relay.resolver) == "[2001:db8::53]:53"
    assert relay.smarthost == HostPort("smtp.example.net", 587)
    assert relay.smarthost_tls is SmarthostTLS.IMPLICIT
    assert relay.transports == (
        Transport("example.com", "2001:db8::25", 2525), Transport("example.net", "mx.example.net", None))
    assert relay.tls is RelayTLS.REQUIRED and relay.tls == "required"
    assert relay.retry_schedule == (90.0, 90.0, 7200.0)
    assert (relay.max_retry_interval, relay.max_age, relay.delay_warning) == (86400.0, 432000.0, 14400.0)
    assert config.checks.spf_fail is CheckAction.REJECT
    assert default().relay.delay_warning is None and default().relay.resolver is None


@pytest.mark.parametrize(
    "text, key",
    [
        ('[relay]\ntransports = ["a.example=x.example", "A.example.=y.example"]', "relay.transports"),
        ('[plugins]\nenabled = ["headers", "headers"]', "plugins.enabled"),
        ('[relay]\nsmarthost = "[mx.example.net]:25"', "relay.smarthost"),
        ('[relay]\nsmarthost = "mx.example.net:"', "relay.smarthost"),
        ('[relay]\nsmarthost = "mx.example.net:0"', "relay.smarthost"),
        ('[relay]\ndelay_warning = "soon"', "relay.delay_warning"),
        ('local_domains = ["Example.org"]', "local_domains"),
        ('[limits]\nmax_command_line = 2000000', "limits.max_command_line"),
        ('workers = 0', "workers"),
        ('data_dir = ""', "data_dir"),
    ],
)
def test_more_refusals(tmp_path, text, key):
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text))
    assert caught.value.key == key


def test_listeners_that_are_fine(tmp_path):
    config = load(write(tmp_path, """
[listeners]
smtp = ["tcp:0:interface=127.0.0.1", "tcp6:25:interface=\\\\:\\\\:1", "tcp:25:interface=localhost"]
pop3 = ["unix:/tmp/pop3.sock", "tcp:65535:backlog=0"]
"""))
    assert len(config.listeners.smtp) == 3 and len(config.listeners.pop3) == 2


def test_an_admin_listener_off_loopback_needs_a_long_token(tmp_path):
    text = '[listeners]\nadmin = ["tcp:2080:interface=0.0.0.0"]\n'
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text))
    assert caught.value.key == "admin.token"
    config = load(write(tmp_path, text + '[admin]\ntoken = "abcdefghijklmnop+/=="\n'))
    assert config.admin.token == "abcdefghijklmnop+/=="


def test_a_command_line_override_is_checked_like_the_file():
    assert override(default(), "workers", 4, "--workers").workers == 4
    with pytest.raises(ConfigError) as caught:
        override(default(), "workers", 0, "--workers")
    assert str(caught.value) == "--workers: workers: must be at least 1"


def test_loading_imports_no_room_of_the_server(tmp_path):
    """
    The configuration sits below every room: loading a file that uses every
    table imports no other part of the server, nor Twisted's test doubles.
    """
    path = write(tmp_path, """
[listeners]
admin = ["tcp:2080:interface=127.0.0.1", "unix:/tmp/admin.sock"]
[relay]
transports = ["example.org=127.0.0.1:2525"]
[dkim]
keys = ["example.org:s1"]
[checks]
exempt_networks = ["10.0.0.0/8"]
""")
    script = (
        "import sys\n"
        "from mailserver.config import load\n"
        f"load({str(path)!r})\n"
        "print(' '.join(sorted(m for m in sys.modules"
        " if m.startswith('mailserver') or m == 'twisted.internet.testing')))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert loaded, result.stdout
    assert {m for m in loaded if not m.startswith("mailserver.config")} == {"mailserver", "mailserver.names"}
