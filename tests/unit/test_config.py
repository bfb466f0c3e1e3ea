"""
The configuration file: defaults, every key parsed, every problem named.
"""

import pytest

from mailserver.config import Config, ConfigError, default, load


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
        ("[limits]\nmax_recipients = -1", "limits.max_recipients", "must not be negative"),
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
        ('[relay]\ntls_policies = ["example.org"]', "relay.tls_policies", "not domain=level"),
        ('[relay]\ntls_policies = ["example.org=dane"]', "relay.tls_policies", "must be one of"),
        ('[relay]\ntls_policies = ["a@b=may"]', "relay.tls_policies", "not a domain name"),
        ('[relay]\nca_file = "/nonexistent/ca.pem"', "relay.ca_file", "cannot read"),
        ("[relay]\nsmarthost_tls_verify = \"no\"", "relay.smarthost_tls_verify", "true or false"),
        ("[relay]\nmta_sts_port = 0", "relay.mta_sts_port", "must be a TCP port"),
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


def test_relay_ca_file_must_hold_a_certificate(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN PRIVATE KEY-----\nnot a certificate\n")
    path = write(tmp_path, f'[relay]\nca_file = "{ca}"\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.key == "relay.ca_file"
    assert caught.value.problem == f"{ca} holds no PEM certificate"
