"""
The outbound TLS keys of C{[relay]}: parsed once into typed values, and
every bad value refused in one line naming the key.
"""

import pytest

from mailserver.config import ConfigError, TLSLevel, TLSPolicyRule, default, load
from tests.tls_ca import CA

REFUSED = {
    "policy without a level": (
        '[relay]\ntls_policies = ["example.org"]', "relay.tls_policies", "must be domain=level"),
    "policy without a domain": (
        '[relay]\ntls_policies = ["=verify"]', "relay.tls_policies", "must be domain=level"),
    "policy for the dot alone": (
        '[relay]\ntls_policies = [".=verify"]', "relay.tls_policies", "must be domain=level"),
    "policy at an unknown level": (
        '[relay]\ntls_policies = ["example.org=dane"]', "relay.tls_policies",
        "the level must be one of none, may, encrypt, verify"),
    "policy for an address": (
        '[relay]\ntls_policies = ["a@b=may"]', "relay.tls_policies", "is not a host name"),
    "policy with a line break": (
        '[relay]\ntls_policies = ["example\\r\\n.org=may"]', "relay.tls_policies",
        "is not a host name"),
    "policy for a domain twice": (
        '[relay]\ntls_policies = ["example.org=may", "Example.ORG.=verify"]',
        "relay.tls_policies", "listed twice"),
    "policies not a list": (
        '[relay]\ntls_policies = "example.org=verify"', "relay.tls_policies",
        "must be a list of strings"),
    "CA file missing": (
        '[relay]\nca_file = "/nonexistent/ca.pem"', "relay.ca_file",
        "cannot read /nonexistent/ca.pem: No such file or directory"),
    "CA file a folder": ('[relay]\nca_file = "/"', "relay.ca_file", "cannot read /: "),
    "verify not a boolean": (
        '[relay]\nsmarthost_tls_verify = "no"', "relay.smarthost_tls_verify", "true or false"),
    "MTA-STS not a boolean": ("[relay]\nmta_sts = 1", "relay.mta_sts", "true or false"),
    "MTA-STS port 0": ("[relay]\nmta_sts_port = 0", "relay.mta_sts_port", "at least 1"),
    "MTA-STS port above 65535": (
        "[relay]\nmta_sts_port = 65536", "relay.mta_sts_port", "at most 65535"),
    "MTA-STS port a string": (
        '[relay]\nmta_sts_port = "443"', "relay.mta_sts_port", "must be an integer"),
}


def refusal(path):
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert message.isprintable() and len(message) < 400, message[:400]
    assert message.startswith(f"{path}: {caught.value.key}: "), message
    return caught.value


@pytest.mark.parametrize("text, key, problem", REFUSED.values(), ids=REFUSED.keys())
def test_refused_in_one_line(tmp_path, text, key, problem):
    path = tmp_path / "mailserver.toml"
    path.write_text(text + "\n")
    error = refusal(path)
    assert (error.key, problem in error.problem) == (key, True), error


CA_FILE_CONTENTS = {
    "a private key": b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
    "a damaged certificate": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    "no PEM at all": b"not a certificate\n",
    "nothing": b"",
}


@pytest.mark.parametrize("contents", CA_FILE_CONTENTS.values(), ids=CA_FILE_CONTENTS.keys())
def test_a_ca_file_must_hold_certificates(tmp_path, contents):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(contents)
    path = tmp_path / "mailserver.toml"
    path.write_text(f'[relay]\nca_file = "{ca}"\n')
    error = refusal(path)
    assert (error.key, error.problem) == (
        "relay.ca_file", f"{ca} holds no PEM certificate, or a damaged one")


def test_the_keys_as_typed_values(tmp_path):
    ca = CA().write(tmp_path / "ca.pem")
    path = tmp_path / "mailserver.toml"
    path.write_text(
        "[relay]\n"
        'tls_policies = ["Example.ORG.=VERIFY", " .example.net = encrypt", "example.com=none"]\n'
        f'ca_file = "{ca}"\n'
        "smarthost_tls_verify = false\nmta_sts = false\nmta_sts_port = 8443\n"
    )
    relay = load(path).relay
    assert relay.tls_policies == (
        TLSPolicyRule("example.org", TLSLevel.VERIFY),
        TLSPolicyRule(".example.net", TLSLevel.ENCRYPT),
        TLSPolicyRule("example.com", TLSLevel.NONE),
    )
    assert relay.tls_policies[0].level is TLSLevel.VERIFY
    assert (relay.ca_file, relay.smarthost_tls_verify, relay.mta_sts, relay.mta_sts_port) == (
        str(ca), False, False, 8443)


def test_the_defaults_verify_and_apply_mta_sts():
    config = default()
    relay = config.relay
    assert (relay.tls_policies, relay.ca_file) == ((), "")
    assert (relay.smarthost_tls_verify, relay.mta_sts, relay.mta_sts_port) == (True, True, 443)
    assert config.mta_sts_path == config.data_path / "mta-sts"
