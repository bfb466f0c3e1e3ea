"""
Mail authentication without a network: DMARC records and alignment,
Authentication-Results reading and writing, the signed-header list, keys and
the keygen command, the configuration, and the checks over an in-memory DNS.
"""

from __future__ import annotations

import ipaddress
import random
import stat
from pathlib import Path

import dkim
import pytest

from mailserver import cli
from mailserver.config import CheckAction, ConfigError, DKIMKey, load
from mailserver.hooks import MessageHeaders
from mailserver.mailauth import load_signing_keys
from mailserver.mailauth.dmarc import (
    Record,
    aligned,
    evaluate,
    from_domains,
    organizational_domain,
    parse_record,
)
from mailserver.mailauth.dns import DictDNS, DNSTempError, spf_lookup
from mailserver.mailauth.keys import (
    DKIMKeyError,
    generate,
    load_key,
    parse_key,
    txt_record,
    write_key,
    zone_entry,
)
from mailserver.mailauth.results import DKIMResult, Report, SPFResult, authserv_id, render
from mailserver.mailauth.signing import include_headers
from mailserver.mailauth.verify import check_message, client_ip

pytestmark = pytest.mark.filterwarnings("ignore::BytesWarning")

ED = parse_key(generate("ed25519"))


# DMARC


def test_parse_record():
    assert parse_record("v=DMARC1; p=reject") == Record(p="reject", sp="reject")
    assert parse_record("v=DMARC1;p=quarantine;sp=none;adkim=s;aspf=s;pct=20") == Record(
        p="quarantine", sp="none", adkim="s", aspf="s", pct=20)
    assert parse_record("v=DMARC1; rua=mailto:x@example.org") == Record(p="none", sp="none")
    assert parse_record("v=DMARC1; p=bogus") is None
    assert parse_record("p=reject; v=DMARC1") is None
    assert parse_record("v=spf1 -all") is None


def test_organizational_domain_and_alignment():
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("mail.example.org") == "example.org"
    assert organizational_domain("sub.sender.test") == "sender.test"
    assert aligned("mail.example.org", "example.org", "r")
    assert not aligned("mail.example.org", "example.org", "s")
    assert aligned("Example.org.", "example.org", "s")
    assert not aligned("example.net", "example.org", "r")
    assert not aligned("", "example.org", "r")


def test_from_domains():
    assert from_domains(["A <a@Example.ORG>", "b@x.test, c@y.test"]) == [
        "example.org", "x.test", "y.test"]
    assert from_domains([]) == []


DMARC_DNS = DictDNS({
    ("_dmarc.example.org", "TXT"): [[b"v=DMARC1; p=reject; sp=quarantine"]],
    ("_dmarc.strict.test", "TXT"): [[b"v=DMARC1; p=reject; adkim=s; aspf=s"]],
    ("_dmarc.half.test", "TXT"): [[b"v=DMARC1; p=reject; pct=50"]],
    ("_dmarc.two.test", "TXT"): [[b"v=DMARC1; p=reject"], [b"v=DMARC1; p=none"]],
    ("_dmarc.down.test", "TXT"): DNSTempError("timeout"),
})


def test_dmarc_pass_through_aligned_spf_or_dkim():
    assert evaluate(DMARC_DNS, ["example.org"], "pass", "bounce.example.org", []).result == "pass"
    assert evaluate(DMARC_DNS, ["example.org"], "fail", "x.test", ["example.org"]).result == "pass"
    assert evaluate(DMARC_DNS, ["strict.test"], "pass", "a.strict.test", []).result == "fail"


def test_dmarc_fail_policy_and_subdomain_policy():
    verdict = evaluate(DMARC_DNS, ["example.org"], "pass", "other.test", ["other.test"])
    assert (verdict.result, verdict.policy, verdict.disposition) == ("fail", "reject", "reject")
    verdict = evaluate(DMARC_DNS, ["news.example.org"], "none", "", [])
    assert (verdict.result, verdict.policy) == ("fail", "quarantine")


def test_dmarc_pct_samples_with_the_given_rng():
    dispositions = {
        evaluate(DMARC_DNS, ["half.test"], "fail", "", [], random.Random(seed)).disposition
        for seed in range(20)
    }
    assert dispositions == {"reject", "quarantine"}


def test_dmarc_none_temperror_permerror():
    assert evaluate(DMARC_DNS, ["nothing.test"], "pass", "nothing.test", []).result == "none"
    assert evaluate(DMARC_DNS, ["two.test"], "fail", "", []).result == "none"
    assert evaluate(DMARC_DNS, ["down.test"], "fail", "", []).result == "temperror"
    assert evaluate(DMARC_DNS, ["a.test", "b.test"], "fail", "", []).result == "permerror"
    assert evaluate(DMARC_DNS, [], "fail", "", []).result == "none"


# Authentication-Results


def test_authserv_id():
    assert authserv_id("mx.test; spf=pass") == "mx.test"
    assert authserv_id(" (c (nested)) MX.Test. 1; none") == "mx.test"
    assert authserv_id('"mx.test"; none') == "mx.test"
    assert authserv_id("mx.test;") == "mx.test"
    assert authserv_id("") == ""


def test_render_is_folded_one_result_a_line():
    report = Report(
        spf=(SPFResult("mailfrom", "a@x.test", "pass"), SPFResult("helo", "h.x.test", "none")),
        dkim=(DKIMResult("fail", "x.test", "s1", "rsa-sha256", "abc+/def", "bad\r\n(x)"),),
    )
    assert render("mx.test", report) == (
        b"Authentication-Results: mx.test;\r\n"
        b"\tspf=pass smtp.mailfrom=a@x.test;\r\n"
        b"\tspf=none smtp.helo=h.x.test;\r\n"
        b'\tdkim=fail (bad??[x]) header.d=x.test header.a=rsa-sha256 header.s=s1 header.b="abc+/def";\r\n'
        b"\tdmarc=none\r\n"
    )
    headers = MessageHeaders(b"Subject: x\r\n")
    headers.add_raw(render("mx.test", Report()))
    assert headers.get("Authentication-Results").startswith("mx.test;")


def test_render_escapes_client_text():
    report = Report(
        spf=(SPFResult("mailfrom", "a\u202e@x.test", "none"),
             SPFResult("helo", "h\u0085\u2028x.test", "none")),
        dkim=(DKIMResult("fail", "x\u2028.test", "s\u0085"),),
    )
    text = render("mx.test", report).decode()
    assert text.replace("\r\n\t", "").endswith("\r\n")
    assert text[:-2].replace("\r\n\t", "").isprintable(), text
    assert "smtp.mailfrom=a?@x.test" in text and 'smtp.helo="h??x.test"' in text
    assert 'header.d="x?.test"' in text and 'header.s="s?"' in text


def test_headers_add_raw_and_selective_remove():
    headers = MessageHeaders(b"A: 1\r\nB: x\r\n y\r\nB: z\r\n")
    headers.add_raw(b"C: one\r\n\ttwo\r\n")
    assert headers.to_bytes().startswith(b"C: one\r\n\ttwo\r\nA: 1\r\n")
    for bad in (b"C: x", b"C: x\r\nD: y\r\n", b"no colon\r\n", b"C: a\rb\r\n"):
        with pytest.raises(ValueError):
            headers.add_raw(bad)
    assert headers.remove("b", where=lambda v: v == "x y") == 1
    assert headers.get_all("B") == ["z"]


# DKIM signing


def test_include_headers():
    present = ["Received", "From", "To", "To", "Subject"]
    assert include_headers(present, ("from", "to", "subject", "cc", "date"),
                           ("from", "cc")) == ["from", "from", "to", "to", "subject", "cc"]
    assert include_headers([], ("to",), ()) == ["from"]


# Keys


@pytest.mark.parametrize("algorithm, k", [("rsa", "rsa"), ("ed25519", "ed25519")])
def test_keys_round_trip_and_sign(algorithm, k):
    key = parse_key(generate(algorithm))
    assert txt_record(key).startswith(f"v=DKIM1; k={k}; p=")
    message = b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    signature = dkim.DKIM(message, signature_algorithm=key.algorithm).sign(
        b"s", b"example.org", key.private, include_headers=[b"from"])
    record = txt_record(key).encode()
    assert dkim.verify(signature + message, dnsfunc=lambda name, timeout=5: record)


def test_key_formats():
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    seed = base64.b64decode(ED.private)
    assert parse_key(base64.b64encode(seed)) == ED  # dknewkey's format
    pkcs8 = rsa.generate_private_key(65537, 1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    assert parse_key(pkcs8).algorithm == b"rsa-sha256"
    with pytest.raises(DKIMKeyError):
        parse_key(b"junk")


def test_zone_entry_splits_long_records():
    key = parse_key(generate("rsa"))
    entry = zone_entry("example.org", "sel", key)
    assert entry.startswith('sel._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=')
    strings = entry.split('"')[1::2]
    assert all(len(s) <= 255 for s in strings) and "".join(strings) == txt_record(key)
    assert zone_entry("example.org", "e", ED) == (
        f'e._domainkey.example.org. IN TXT "{txt_record(ED)}"')


def test_write_key_is_private_and_does_not_overwrite(tmp_path):
    path = tmp_path / "dkim" / "k.key"
    write_key(path, b"one")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_key(path, b"two")
    write_key(path, b"two", force=True)
    assert path.read_bytes() == b"two"


# Configuration and the command line


def write_config(tmp_path, text: str):
    path = tmp_path / "mailserver.toml"
    path.write_text(f'hostname = "mx.test"\ndata_dir = "{tmp_path / "data"}"\n' + text)
    return path


def test_config_defaults_and_tables(tmp_path):
    config = load(write_config(tmp_path, (
        '[dkim]\nkeys = ["example.org:sel", "example.org:ed:/k/ed.key"]\n'
        'shared_domains = ["lists.example.org"]\n'
        '[checks]\nspf_fail = "reject"\ndmarc_reject = "reject"\n'
        'exempt_domains = [".partner.test"]\nexempt_networks = ["10.0.0.0/8"]\n'
    )))
    assert config.dkim.keys == (
        DKIMKey("example.org", "sel"), DKIMKey("example.org", "ed", Path("/k/ed.key")))
    assert [str(key) for key in config.dkim.keys] == ["example.org:sel", "example.org:ed:/k/ed.key"]
    assert config.dkim.keys[0].file(config.dkim_key_path) == tmp_path / "data/dkim/example.org.sel.key"
    assert config.dkim.shared_domains == ("lists.example.org",)
    assert "from" in config.dkim.signed_headers
    assert (config.checks.spf_fail, config.checks.dmarc_reject) == (CheckAction.REJECT,) * 2
    assert config.checks.exempt_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert config.checks.enabled and config.checks.skip_networks == (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize("text, key", [
    ('[dkim]\nkeys = ["example.org"]\n', "dkim.keys"),
    ('[dkim]\nkeys = ["exa mple.org:s"]\n', "dkim.keys"),
    ('[dkim]\nkeys = ["example.org:s_1"]\n', "dkim.keys"),
    ('[dkim]\nkeys = ["example.org:s", "example.org:s:/x"]\n', "dkim.keys"),
    ('[dkim]\nkeys = ["example.org:s"]\nsigned_headers = ["to"]\n', "dkim.signed_headers"),
    ('[checks]\nspf_fail = "bounce"\n', "checks.spf_fail"),
    ('[checks]\ndmarc_reject = "quarantine"\n', "checks.dmarc_reject"),
    ('[checks]\nexempt_domains = ["Example.org"]\n', "checks.exempt_domains"),
    ('[checks]\nexempt_networks = ["10.0.0.0/33"]\n', "checks.exempt_networks"),
    ('[checks]\nskip_networks = ["nowhere"]\n', "checks.skip_networks"),
    ('[checks]\ndns_timeout = 0\n', "checks.dns_timeout"),
])
def test_config_errors(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load(write_config(tmp_path, text))
    assert e.value.key == key


def test_keygen_writes_the_key_and_prints_the_record(tmp_path, capsys):
    config_path = write_config(tmp_path, 'local_domains = ["example.org"]\n')
    argv = ["--config", str(config_path), "dkim", "keygen", "example.org", "--selector", "s1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    path = tmp_path / "data" / "dkim" / "example.org.s1.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(path)
    assert key.algorithm == b"rsa-sha256"
    assert "s1._domainkey.example.org. IN TXT" in out
    assert txt_record(key) in out
    assert 'keys = ["example.org:s1"]' in out

    assert cli.main(argv) == 1  # never overwrites
    assert "--force" in capsys.readouterr().err

    argv = ["--config", str(config_path), "dkim", "keygen", "example.org", "-a", "ed25519",
            "-s", "e1"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(["--config", str(config_path), "dkim", "record", "example.org", "e1"]) == 0
    assert "v=DKIM1; k=ed25519; p=" in capsys.readouterr().out

    config_path.write_text(config_path.read_text()
                           + '[dkim]\nkeys = ["example.org:s1", "example.org:e1"]\n')
    config = load(config_path)
    keys = load_signing_keys(config.dkim, config.dkim_key_path, config.source)
    assert [(s, k.algorithm) for s, k in keys["example.org"]] == [
        ("s1", b"rsa-sha256"), ("e1", b"ed25519-sha256")]


def test_a_missing_key_file_is_a_config_error(tmp_path):
    config = load(write_config(tmp_path, '[dkim]\nkeys = ["example.org:nope"]\n'))
    with pytest.raises(ConfigError, match="dkim.keys: cannot read"):
        load_signing_keys(config.dkim, config.dkim_key_path, config.source)


# The checks over an in-memory DNS (the loopback server is in tests/protocol)


def test_spf_lookup_shape():
    dns = DictDNS({("x.test", "MX"): [(10, "mx.x.test")], ("x.test", "TXT"): [[b"a", b"b"]]})
    assert spf_lookup(dns, "x.test", "MX") == [(("x.test", "MX"), (10, "mx.x.test"))]
    assert spf_lookup(dns, "x.test", "TXT") == [(("x.test", "TXT"), [b"a", b"b"])]
    import spf

    with pytest.raises(spf.TempError):
        spf_lookup(DictDNS({("x.test", "A"): DNSTempError("t")}), "x.test", "A")


def test_client_ip():
    assert client_ip("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_ip("2001:db8::1") == "2001:db8::1"
    assert client_ip("") is None


def test_check_message_mx_include_and_temperror():
    dns = DictDNS({
        ("x.test", "TXT"): [[b"v=spf1 mx include:_spf.y.test -all"]],
        ("x.test", "MX"): [(10, "mx.x.test")],
        ("mx.x.test", "A"): ["192.0.2.1"],
        ("_spf.y.test", "TXT"): [[b"v=spf1 ip6:2001:db8::/32 -all"]],
        ("down.test", "TXT"): DNSTempError("timeout"),
    })
    head, body = b"From: a@x.test\r\n", b"hi\r\n"

    def spf_of(ip, sender):
        report = check_message(dns, ip=ip, helo="h", sender=sender, head=head, body=[body],
                               from_values=["a@x.test"])
        return report.spf[0].result

    assert spf_of("192.0.2.1", "a@x.test") == "pass"
    assert spf_of("2001:db8::5", "a@x.test") == "pass"
    assert spf_of("192.0.2.2", "a@x.test") == "fail"
    assert spf_of("192.0.2.2", "a@down.test") == "temperror"
    report = check_message(dns, ip="192.0.2.1", helo="[192.0.2.1]", sender="a@x.test",
                           head=head, body=[body], from_values=["a@x.test"])
    assert report.spf[1] == SPFResult("helo", "[192.0.2.1]", "none", "HELO is not a domain name")
    assert report.dkim == () and report.dmarc.result == "none"


def test_check_message_dkim_ed25519_and_key_lookup_failure():
    head, body = b"From: <a@x.test>\r\nSubject: s\r\n", b"body\r\n"
    signature = dkim.DKIM(head + b"\r\n" + body, signature_algorithm=ED.algorithm).sign(
        b"ed", b"x.test", ED.private, include_headers=[b"from", b"subject"],
        canonicalize=(b"relaxed", b"relaxed"))
    good = DictDNS({("ed._domainkey.x.test", "TXT"): [[txt_record(ED).encode()]],
                    ("_dmarc.x.test", "TXT"): [[b"v=DMARC1; p=reject"]]})
    report = check_message(good, ip="192.0.2.1", helo="h.x.test", sender="a@x.test",
                           head=signature + head, body=[body], from_values=["a@x.test"])
    assert [(r.result, r.algorithm) for r in report.dkim] == [("pass", "ed25519-sha256")]
    assert report.dmarc.result == "pass"
    down = DictDNS({("ed._domainkey.x.test", "TXT"): DNSTempError("timeout")})
    report = check_message(down, ip="192.0.2.1", helo="h.x.test", sender="a@x.test",
                           head=signature + head, body=[body], from_values=["a@x.test"])
    assert report.dkim[0].result == "temperror"
