"""
Mail authentication in the real C{twistd mailserver} process, with a
C{twisted.names} server on 127.0.0.1 serving the SPF, DKIM and DMARC records
and an aiosmtpd peer as the remote MX:

  - mail submitted by an authenticated user and relayed to the peer carries
    a DKIM signature that dkimpy verifies with the key from the DNS server;
  - mail to the MX role gets the Authentication-Results verdicts, and with
    C{dmarc_reject = "reject"} a DMARC-reject domain gets 550 5.7.1 and
    nothing is stored;
  - C{mailserver dkim keygen} writes a 0600 key and prints its record.
"""

from __future__ import annotations

import importlib.util
import smtplib
import stat

import pytest

from harness import REPO, MailServer
from relay_fixtures import SMTPPeer

from tests.dns_zone import DNSProcess

from mailserver.mailauth.keys import generate, parse_key, txt_record, write_key  # noqa: E402

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore::BytesWarning"),
    pytest.mark.skipif(
        importlib.util.find_spec("mailserver.smtp.protocol") is None
        or "mail_auth_hooks" not in (REPO / "mailserver" / "service.py").read_text(),
        reason="the SMTP server or the mail-authentication wiring in service.py is missing",
    ),
]

PEM = generate("rsa")
KEY = parse_key(PEM)
ZONE = {
    "remote.test": {"MX": [[10, "mx1.remote.test"]]},
    "mx1.remote.test": {"A": ["127.0.0.1"]},
    "e2e._domainkey.example.org": {"TXT": [txt_record(KEY)]},
    "pass.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "helo.pass.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "reject.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "_dmarc.reject.test": {"TXT": ["v=DMARC1; p=reject"]},
}


@pytest.fixture
def dns_server():
    server = DNSProcess(ZONE)
    yield server
    server.stop()


@pytest.fixture
def peer():
    smtp_peer = SMTPPeer().start()
    yield smtp_peer
    smtp_peer.stop()


@pytest.fixture
def server(tmp_path, dns_server, peer):
    mail_server = MailServer(
        tmp_path, local_domains=("localhost", "example.org"),
        extra_toml=(
            "[smtp]\nauth_over_plaintext = true\n"
            f'[relay]\nresolver = "{dns_server.resolver}"\nport = {peer.port}\n'
            'retry_schedule = ["1s"]\nscan_interval = 0.5\nconnect_timeout = 2.0\n'
            '[dkim]\nkeys = ["example.org:e2e"]\n'
            '[checks]\nskip_networks = []\ndmarc_reject = "reject"\ndns_timeout = 3.0\n'
        ),
    )
    write_key(mail_server.data_path / "dkim" / "example.org.e2e.key", PEM)
    mail_server.start()
    mail_server.add_user("s@example.org", "secret")
    yield mail_server
    mail_server.stop()


def dnsfunc(dns_server):
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dns_server.port

    def lookup(name, timeout=5):
        answer = resolver.resolve(name.decode().rstrip("."), "TXT", tcp=True, lifetime=timeout)
        return b"".join(answer[0].strings)

    return lookup


def test_submitted_mail_arrives_signed(server, dns_server, peer):
    import dkim

    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
        client.login("s@example.org", "secret")
        client.sendmail("s@example.org", ["user@remote.test"],
                        b"From: S <s@example.org>\r\nTo: user@remote.test\r\n"
                        b"Subject: signed\r\n\r\nHello.\r\n.dot\r\n")
    [(_, _, data)] = peer.wait_for(1)
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert dkim.verify(data, dnsfunc=dnsfunc(dns_server))
    assert not dkim.verify(data.replace(b"Hello.", b"Hullo."), dnsfunc=dnsfunc(dns_server))


def test_inbound_verdicts_and_dmarc_reject(server):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30,
                      local_hostname="helo.pass.test") as client:
        client.sendmail("a@pass.test", ["s@example.org"],
                        b"Authentication-Results: mx.test; dmarc=pass\r\n"
                        b"From: <a@pass.test>\r\nSubject: in\r\n\r\nhi\r\n")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("a@reject.test", ["s@example.org"],
                            b"From: <a@reject.test>\r\nSubject: no\r\n\r\nhi\r\n")
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.7.1")
    [stored] = list((server.maildir("s@example.org") / "new").iterdir())
    text = stored.read_bytes().replace(b"\r\n", b"\n").decode()
    assert text.count("Authentication-Results:") == 1
    assert ("Authentication-Results: mx.test;\n\tspf=pass smtp.mailfrom=a@pass.test;\n"
            "\tspf=pass smtp.helo=helo.pass.test;\n\tdkim=none;\n"
            "\tdmarc=none header.from=pass.test\n") in text


def test_keygen_command(server):
    result = server.cli("dkim", "keygen", "example.org", "--selector", "new", "-a", "ed25519")
    assert result.returncode == 0, result.stderr
    path = server.data_path / "dkim" / "example.org.new.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert 'new._domainkey.example.org. IN TXT "v=DKIM1; k=ed25519; p=' in result.stdout
    assert 'keys = ["example.org:e2e", "example.org:new"]' in result.stdout
