"""
The mail-authentication hooks against a real C{twisted.names} server on
127.0.0.1: DNS through the reactor while the checks run in threads, DKIM
signatures that dkimpy verifies with the published key, Authentication-Results
verdicts for SPF pass/fail/softfail, good and broken DKIM signatures and a
DMARC-reject domain, and the reject policy through the hooked intake.
"""

from __future__ import annotations

import functools
import io
import ipaddress
import re
import shutil
import socket
import tempfile
from pathlib import Path

import dkim
import pytest
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.names import client
from twisted.trial import unittest

from tests.dns_zone import listen
from mailserver.config import DKIM, CheckAction, Checks, Config, DKIMKey
from mailserver.envelope import Envelope, Recipient
from mailserver.hooked_intake import HookedIntake
from mailserver.hooks import Hooks, MessageBody, MessageHeaders, MessageRejected, Reject
from mailserver.mailauth import mail_auth_hooks
from mailserver.mailauth.dns import DNSTempError, ThreadDNS, dkim_txt, lookup
from mailserver.mailauth.keys import generate, parse_key, txt_record, write_key
from mailserver.mailauth.signing import DKIMSigner
from mailserver.mailauth.verify import InboundChecks
from mailserver.testing import MemoryIntake

# dkimpy formats bytes into its debug messages.
pytestmark = pytest.mark.filterwarnings("ignore::BytesWarning")

RSA = parse_key(generate("rsa"))
ED = parse_key(generate("ed25519"))
GOOD_IP = "192.0.2.10"
BAD_IP = "198.51.100.7"

ZONE = {
    # SPF: pass, fail and softfail domains; HELO name with its own record.
    "pass.test": {"TXT": [f"v=spf1 ip4:{GOOD_IP} -all"]},
    "mail.pass.test": {"TXT": ["v=spf1 a -all"], "A": [GOOD_IP]},
    "fail.test": {"TXT": [f"v=spf1 ip4:{GOOD_IP} -all"]},
    "softfail.test": {"TXT": [f"v=spf1 ip4:{GOOD_IP} ~all"]},
    # DKIM-signed domain with a strict DMARC policy.
    "signed.test": {"TXT": [f"v=spf1 ip4:{GOOD_IP} -all"]},
    "rsa1._domainkey.signed.test": {"TXT": [txt_record(RSA)]},
    "ed1._domainkey.signed.test": {"TXT": [txt_record(ED)]},
    "_dmarc.signed.test": {"TXT": ["v=DMARC1; p=reject; rua=mailto:d@signed.test"]},
    # DMARC reject and nothing that passes for it.
    "reject.test": {"TXT": [f"v=spf1 ip4:{GOOD_IP} -all"]},
    "_dmarc.reject.test": {"TXT": ["v=DMARC1; p=reject"]},
    # Long TXT (over 512 octets in all): the answer comes over TCP.
    "long.test": {"TXT": ["x" * 300, "y" * 300]},
}


def inline(f):
    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return defer.ensureDeferred(f(self, *args, **kwargs))

    return wrapper


def envelope(sender: str, ip: str = GOOD_IP, helo: str = "mail.pass.test",
             authenticated: str | None = None) -> Envelope:
    return Envelope(
        sender=sender,
        recipients=(Recipient("u@example.org", ("u@example.org",)),),
        client_address=ip, helo=helo, authenticated=authenticated,
    )


def message(from_: str, extra: bytes = b"") -> tuple[MessageHeaders, MessageBody]:
    head = extra + (f"From: Someone <{from_}>\r\nTo: u@example.org\r\nSubject: test\r\n"
                    "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@test>\r\n").encode()
    # As the hooked intake gives it: the body starts with the empty line.
    return MessageHeaders(head), MessageBody(io.BytesIO(b"Hello.\r\n\r\n.dots\r\n"))


def signed(domain: str, keys, body: bytes = b"Hello.\r\n\r\n.dots\r\n") -> bytes:
    """
    A message signed with dkimpy by C{domain}'s keys, C{[(selector, key)]}.
    """
    raw = (f"From: <a@{domain}>\r\nTo: u@example.org\r\nSubject: signed\r\n\r\n").encode() + body
    fields = b""
    for selector, key in keys:
        fields += dkim.DKIM(raw, signature_algorithm=key.algorithm).sign(
            selector.encode(), domain.encode(), key.private,
            canonicalize=(b"relaxed", b"relaxed"), include_headers=[b"from", b"to", b"subject"])
    return fields + raw


def split(raw: bytes) -> tuple[MessageHeaders, MessageBody]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return MessageHeaders(head + b"\r\n"), MessageBody(io.BytesIO(body))


def verdicts(headers: MessageHeaders) -> list[str]:
    [value] = headers.get_all("Authentication-Results")
    assert value.startswith("mx.test;")
    return [re.sub(r"\s+", " ", part.strip()) for part in value.split(";")[1:]]


class LoopbackDNSTestCase(unittest.TestCase):
    def setUp(self):
        port, listening = listen(reactor, ZONE)
        for p in listening:
            self.addCleanup(p.stopListening)
        self.resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
        self.dns = ThreadDNS(reactor, self.resolver, timeout=5.0)

    def checks(self, **kw) -> InboundChecks:
        settings = Checks(skip_networks=(), **kw)
        return InboundChecks(settings, "mx.test", self.dns, reactor)


class DNSTests(LoopbackDNSTestCase):
    @inline
    async def test_records(self):
        self.assertEqual(await lookup(self.resolver, "mail.pass.test", "A"), [GOOD_IP])
        [[text]] = await lookup(self.resolver, "pass.test", "TXT")
        self.assertEqual(text, f"v=spf1 ip4:{GOOD_IP} -all".encode())
        self.assertEqual(await lookup(self.resolver, "nowhere.test", "TXT"), [])
        self.assertEqual(await lookup(self.resolver, "pass.test", "MX"), [])

    @inline
    async def test_long_answers_come_over_tcp(self):
        records = await lookup(self.resolver, "long.test", "TXT")
        self.assertEqual(sorted(b"".join(r) for r in records), [b"x" * 300, b"y" * 300])

    @inline
    async def test_an_unreachable_server_is_a_temporary_error(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        resolver = client.Resolver(servers=[("127.0.0.1", closed)], reactor=reactor)
        with self.assertRaises(DNSTempError):
            await lookup(resolver, "pass.test", "TXT", timeout=0.3)

    @inline
    async def test_shutdown_releases_waiting_threads(self):
        started = defer.Deferred()

        class Silent:
            def lookupText(self, name, timeout=None):
                started.callback(name)
                return defer.Deferred()  # never answers

        threaded = ThreadDNS(reactor, Silent(), timeout=30.0)
        waiting = deferToThread(threaded.query, "x.test", "TXT")
        await started
        threaded.close()
        with self.assertRaises(DNSTempError):
            await waiting
        with self.assertRaises(DNSTempError):
            threaded.query("x.test", "TXT")

    @inline
    async def test_threads_ask_through_the_reactor(self):
        key = await deferToThread(dkim_txt(self.dns), b"rsa1._domainkey.signed.test.")
        self.assertEqual(key, txt_record(RSA).encode())


def owns(account: str, address: str) -> bool:
    """
    The ownership rule, reduced: an account owns its own address.
    """
    return account.lower() == address.lower()


class SigningTests(LoopbackDNSTestCase):
    def signer(self, shared_domains=()) -> DKIMSigner:
        return DKIMSigner({"signed.test": [("rsa1", RSA), ("ed1", ED)]},
                          DKIM().signed_headers, DKIM().oversigned_headers, reactor,
                          owns=owns, shared_domains=shared_domains)

    @inline
    async def test_authenticated_mail_is_signed_with_rsa_and_ed25519(self):
        headers, body = message("a@signed.test")
        await self.signer().message(envelope("a@signed.test", authenticated="a@signed.test"),
                                    headers, body)
        signatures = headers.get_all("DKIM-Signature")
        self.assertEqual(len(signatures), 2)
        self.assertIn("a=rsa-sha256", signatures[0])
        self.assertIn("a=ed25519-sha256", signatures[1])
        self.assertIn("c=relaxed/relaxed", signatures[0])
        stored = headers.to_bytes() + b"\r\n" + body.read()
        self.assertTrue(all(len(line) < 998 for line in stored.split(b"\r\n")))

        def verify_both():
            verifier = dkim.DKIM(stored)
            return [verifier.verify(idx=i, dnsfunc=dkim_txt(self.dns)) for i in (0, 1)]

        self.assertEqual(await deferToThread(verify_both), [True, True])

    @inline
    async def test_the_inbound_checks_pass_what_we_signed(self):
        headers, body = message("a@signed.test")
        await self.signer().message(envelope("a@signed.test", authenticated="a@signed.test"),
                                    headers, body)
        stored = headers.to_bytes() + b"\r\n" + body.read()
        headers, body = split(stored)
        await self.checks().message(envelope("a@signed.test", ip=BAD_IP), headers, body)
        results = verdicts(headers)
        self.assertIn("spf=fail smtp.mailfrom=a@signed.test", results)
        self.assertTrue(any(r.startswith("dkim=pass") and "header.s=rsa1" in r for r in results))
        self.assertTrue(any(r.startswith("dkim=pass") and "header.s=ed1" in r for r in results))
        self.assertIn("dmarc=pass (p=reject sp=reject dis=none) header.from=signed.test",
                      results)

    @inline
    async def test_unauthenticated_or_unknown_domains_are_not_signed(self):
        for env, from_ in ((envelope("a@signed.test"), "a@signed.test"),
                           (envelope("a@other.test", authenticated="a@other.test"),
                            "a@other.test")):
            headers, body = message(from_)
            await self.signer().message(env, headers, body)
            self.assertEqual(headers.get_all("DKIM-Signature"), [])

    @inline
    async def test_subdomains_sign_with_the_parent_domains_key(self):
        headers, body = message("a@news.signed.test")
        await self.signer().message(
            envelope("bounce@elsewhere.test", authenticated="a@news.signed.test"), headers, body)
        [signature] = headers.get_all("DKIM-Signature")[:1]
        self.assertIn("d=signed.test", signature)


    @inline
    async def test_a_from_the_account_may_not_send_as_is_logged_and_not_signed(self):
        # Issue 19: bob got d=other.example for From: CEO <ceo@other.example>.
        for from_ in (b"CEO <ceo@signed.test>", b"<a@signed.test>, CEO <ceo@signed.test>",
                      b"<a@signed.test>\r\nFrom: <ceo@signed.test>"):
            headers = MessageHeaders(b"From: " + from_ + b"\r\nSubject: x\r\n")
            body = MessageBody(io.BytesIO(b"Hello.\r\n"))
            await self.signer().message(
                envelope("a@signed.test", authenticated="a@signed.test"), headers, body)
            self.assertEqual(headers.get_all("DKIM-Signature"), [])
        # The envelope sender's domain does not sign for a foreign From either.
        headers, body = message("ceo@signed.test")
        await self.signer().message(
            envelope("bob@signed.test", authenticated="bob@signed.test"), headers, body)
        self.assertEqual(headers.get_all("DKIM-Signature"), [])

    @inline
    async def test_the_refusal_is_logged(self):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        headers, body = message("ceo@signed.test")
        await self.signer().message(
            envelope("bob@signed.test", authenticated="bob@signed.test"), headers, body)
        [event] = [e for e in events if e.get("event") == "dkim.not_signed"]
        self.assertEqual((event["user"], event["address"]),
                         ("bob@signed.test", "ceo@signed.test"))

    @inline
    async def test_a_shared_domain_is_signed_for_any_account(self):
        headers, body = message("news@signed.test")
        await self.signer(shared_domains=("signed.test",)).message(
            envelope("bob@signed.test", authenticated="bob@signed.test"), headers, body)
        self.assertEqual(len(headers.get_all("DKIM-Signature")), 2)

    @inline
    async def test_without_a_from_address_the_owned_envelope_sender_signs(self):
        body = MessageBody(io.BytesIO(b"Hello.\r\n"))
        headers = MessageHeaders(b"Subject: no from\r\n")
        await self.signer().message(
            envelope("a@signed.test", authenticated="a@signed.test"), headers, body)
        self.assertIn("d=signed.test", headers.get_all("DKIM-Signature")[0])
        headers = MessageHeaders(b"Subject: no from\r\n")
        await self.signer().message(
            envelope("a@signed.test", authenticated="bob@other.test"), headers, body)
        self.assertEqual(headers.get_all("DKIM-Signature"), [])


class InboundTests(LoopbackDNSTestCase):
    async def check(self, sender, headers_body, ip=GOOD_IP, helo="mail.pass.test", **kw):
        headers, body = headers_body
        verdict = await self.checks(**kw).message(envelope(sender, ip, helo), headers, body)
        return verdict, verdicts(headers)

    @inline
    async def test_spf_pass(self):
        verdict, results = await self.check("a@pass.test", message("a@pass.test"))
        self.assertIsNone(verdict)
        self.assertEqual(results, [
            "spf=pass smtp.mailfrom=a@pass.test",
            "spf=pass smtp.helo=mail.pass.test",
            "dkim=none",
            "dmarc=none header.from=pass.test",
        ])

    @inline
    async def test_spf_fail_and_softfail(self):
        _, results = await self.check("a@fail.test", message("a@fail.test"), ip=BAD_IP)
        self.assertEqual(results[:2], ["spf=fail smtp.mailfrom=a@fail.test",
                                       "spf=fail smtp.helo=mail.pass.test"])
        _, results = await self.check("a@softfail.test", message("a@softfail.test"), ip=BAD_IP)
        self.assertEqual(results[0], "spf=softfail smtp.mailfrom=a@softfail.test")

    @inline
    async def test_spf_none_and_null_sender(self):
        _, results = await self.check("a@nowhere.test", message("a@nowhere.test"))
        self.assertEqual(results[0], "spf=none smtp.mailfrom=a@nowhere.test")
        _, results = await self.check("", message("a@pass.test"))
        self.assertEqual(results[0], "spf=pass smtp.helo=mail.pass.test")

    @inline
    async def test_valid_and_broken_dkim_signatures(self):
        raw = signed("signed.test", [("rsa1", RSA), ("ed1", ED)])
        _, results = await self.check("a@signed.test", split(raw), ip=BAD_IP)
        dkim_results = [r for r in results if r.startswith("dkim=")]
        self.assertEqual(len(dkim_results), 2)
        self.assertTrue(all(r.startswith("dkim=pass header.d=signed.test") for r in dkim_results))
        self.assertTrue(results[-1].startswith("dmarc=pass"))

        broken = raw.replace(b"Hello.", b"Hullo.")
        verdict, results = await self.check("a@signed.test", split(broken), ip=BAD_IP)
        self.assertIsNone(verdict)  # the default policy only tags
        dkim_results = [r for r in results if r.startswith("dkim=")]
        self.assertEqual([r.split(" (")[0] for r in dkim_results], ["dkim=fail"] * 2)
        self.assertIn("body hash did not verify", dkim_results[0])
        self.assertEqual(results[-1],
                         "dmarc=fail (p=reject sp=reject dis=reject) header.from=signed.test")

    @inline
    async def test_a_signature_without_a_published_key(self):
        raw = signed("pass.test", [("nokey", RSA)])
        _, results = await self.check("a@pass.test", split(raw))
        self.assertTrue(results[2].startswith("dkim=permerror (no key for signature)"))
        self.assertTrue(results[3].startswith("dmarc=none"))

    @inline
    async def test_dmarc_reject_domain(self):
        verdict, results = await self.check("a@reject.test", message("a@reject.test"), ip=BAD_IP)
        self.assertIsNone(verdict)
        self.assertEqual(results, [
            "spf=fail smtp.mailfrom=a@reject.test",
            "spf=fail smtp.helo=mail.pass.test",
            "dkim=none",
            "dmarc=fail (p=reject sp=reject dis=reject) header.from=reject.test",
        ])

    @inline
    async def test_reject_policies(self):
        verdict, _ = await self.check("a@reject.test", message("a@reject.test"), ip=BAD_IP,
                                      dmarc_reject=CheckAction.REJECT)
        self.assertEqual(verdict, Reject(550, "5.7.1",
                                         "Message refused: it fails the DMARC policy of reject.test"))
        verdict, _ = await self.check("a@fail.test", message("a@fail.test"), ip=BAD_IP,
                                      spf_fail=CheckAction.REJECT)
        self.assertEqual((verdict.code, verdict.enhanced), (550, "5.7.1"))
        verdict, _ = await self.check("a@softfail.test", message("a@softfail.test"), ip=BAD_IP,
                                      spf_fail=CheckAction.REJECT)
        self.assertIsNone(verdict)
        verdict, _ = await self.check("a@reject.test", message("a@reject.test"), ip=BAD_IP,
                                      dmarc_reject=CheckAction.REJECT, exempt_domains=(".reject.test",))
        self.assertIsNone(verdict)
        verdict, _ = await self.check("a@reject.test", message("a@reject.test"), ip=BAD_IP,
                                      dmarc_reject=CheckAction.REJECT, exempt_networks=(ipaddress.ip_network("198.51.100.0/24"),))
        self.assertIsNone(verdict)

    @inline
    async def test_forged_results_for_our_name_are_removed_others_kept(self):
        forged = (b"Authentication-Results: MX.test; spf=pass smtp.mailfrom=a@reject.test\r\n"
                  b"Authentication-Results: (comment) mx.test 1;\r\n dkim=pass\r\n"
                  b"Authentication-Results: other.example; spf=pass\r\n")
        headers, body = message("a@reject.test", extra=forged)
        await self.checks().message(envelope("a@reject.test", ip=BAD_IP), headers, body)
        values = headers.get_all("Authentication-Results")
        self.assertEqual(len(values), 2)
        self.assertTrue(values[0].startswith("mx.test;"))
        self.assertEqual(values[1], "other.example; spf=pass")

    @inline
    async def test_authenticated_and_skipped_clients_are_not_checked(self):
        forged = b"Authentication-Results: mx.test; spf=pass\r\n"
        headers, body = message("a@reject.test", extra=forged)
        await self.checks().message(
            envelope("a@reject.test", ip=BAD_IP, authenticated="a@reject.test"), headers, body)
        self.assertEqual(headers.get_all("Authentication-Results"), [])
        headers, body = message("a@reject.test")
        checks = InboundChecks(Checks(), "mx.test", self.dns, reactor)  # skips loopback
        await checks.message(envelope("a@reject.test", ip="127.0.0.1"), headers, body)
        self.assertEqual(headers.get_all("Authentication-Results"), [])


class WiringTests(LoopbackDNSTestCase):
    """
    The hooks as the server runs them: checks first, plugins, signing last,
    in front of the intake.
    """

    def config(self, tmp: Path, **checks) -> Config:
        write_key(tmp / "dkim" / "signed.test.rsa1.key", RSA.private)
        return Config(
            hostname="mx.test", data_dir=str(tmp), local_domains=("signed.test",),
            dkim=DKIM(keys=(DKIMKey("signed.test", "rsa1"),)),
            checks=Checks(skip_networks=(), **checks),
        )

    def tmp(self) -> Path:
        path = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, path)
        return path

    async def feed(self, config, env, raw: bytes):
        tmp = self.tmp()
        first, last = mail_auth_hooks(
            checks=config.checks, dkim=config.dkim, hostname=config.hostname,
            key_folder=config.dkim_key_path, resolver=self.resolver, reactor=reactor,
            source=config.source, owns=owns,
        )
        inner = MemoryIntake()
        intake = HookedIntake(inner, Hooks(first + last), tmp)
        receiver = intake.begin(env)
        receiver.write(raw)
        try:
            await receiver.finish()
        except MessageRejected as e:
            return e.reject, [m.data for m in inner.finished]
        return None, [m.data for m in inner.finished]

    @inline
    async def test_dmarc_reject_is_refused_and_nothing_stored(self):
        config = self.config(self.tmp(), dmarc_reject=CheckAction.REJECT)
        raw = b"From: <a@reject.test>\r\nSubject: hi\r\n\r\nbody\r\n"
        verdict, stored = await self.feed(config, envelope("a@reject.test", ip=BAD_IP), raw)
        self.assertEqual((verdict.code, verdict.enhanced), (550, "5.7.1"))
        self.assertEqual(stored, [])

    @inline
    async def test_submitted_mail_is_signed_and_stored(self):
        config = self.config(self.tmp())
        raw = b"From: <a@signed.test>\r\nSubject: hi\r\n\r\nbody\r\n\r\n"
        verdict, [data] = await self.feed(
            config, envelope("a@signed.test", authenticated="a@signed.test"), raw)
        self.assertIsNone(verdict)
        self.assertTrue(data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"))
        self.assertTrue(data.endswith(b"\r\n" + raw))
        self.assertNotIn(b"Authentication-Results", data)
        verified = await deferToThread(dkim.verify, data, dnsfunc=dkim_txt(self.dns))
        self.assertTrue(verified)
        # ... and the MX role of a server checking it says so.
        verdict, [data] = await self.feed(config, envelope("a@signed.test", ip=BAD_IP), data)
        self.assertIn(b"\tdkim=pass header.d=signed.test", data)
        self.assertIn(b"\tdmarc=pass", data)

    @inline
    async def test_refusals_of_the_checks_are_logged_and_counted_as_dmarc_and_spf(self):
        """
        Through an SMTP session: not counted as a plugin's (issue 21).
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import deferLater
        from twisted.logger import globalLogPublisher

        from mailserver.testing import SMTPHarness, reply_codes

        seen: list[dict] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        for sender, checks, reason in [
            ("a@reject.test", {"dmarc_reject": CheckAction.REJECT}, "dmarc"),
            ("a@fail.test", {"spf_fail": CheckAction.REJECT}, "spf"),
        ]:
            config = self.config(self.tmp(), **checks)
            first, _ = mail_auth_hooks(
                checks=config.checks, dkim=config.dkim, hostname=config.hostname,
                key_folder=config.dkim_key_path, resolver=self.resolver, reactor=reactor,
                source=config.source, owns=lambda account, address: True,
            )
            hooks = Hooks(first)
            session = SMTPHarness(hooks=hooks, peer=IPv4Address("TCP", BAD_IP, 4000),
                                  intake=HookedIntake(MemoryIntake(), hooks, self.tmp()))
            session.ehlo()
            out = session.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
                               f"From: <{sender}>\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
            for _ in range(200):
                if len(reply_codes(out)) == 4:
                    break
                await deferLater(reactor, 0.05, lambda: None)
                out += session.read()
            self.assertEqual(reply_codes(out)[-1], "550 5.7.1")
            [event] = [e for e in seen if e.get("event") == "smtp.rejected"]
            seen.clear()
            self.assertEqual((event["command"], event["reason"], event["sender"]),
                             ("DATA", reason, sender))
            metrics = session.factory.dependencies.metrics
            self.assertEqual(metrics.smtp_refusals_total.value(role="smtp", reason=reason), 1)
            self.assertEqual(
                metrics.smtp_refusals_total.value(role="smtp", reason="plugin:mailauth-checks"), 0)
