"""
DKIM signing (RFC 6376, RFC 8463) of mail that authenticated users send.

A message hook that runs after every other one, so it signs the header
section as it will be stored and relayed.  It signs with every key configured
for the domain of the From address (or a parent domain of it), else for the
envelope sender's domain, with relaxed/relaxed canonicalisation, and adds
each C{DKIM-Signature} field at the top, folded as dkimpy folds it.  The
hashing runs in a thread: a large body never holds up the reactor.  A message
that cannot be signed is logged and delivered unsigned.

A message with a line over 998 octets is stored as it came but sent
re-encoded (L{mailserver.relay.line_length}): it is signed in that
re-encoded form, which is what the peer receives and verifies.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from mailserver.interfaces import IMessageHook
from mailserver.logs import emit
from mailserver.mailauth._message import whole_message
from mailserver.mailauth.dmarc import domain_of, from_domains
from mailserver.mailauth.keys import SigningKey
from mailserver.relay.line_length import fit, has_long_lines


def include_headers(
    present: Iterable[str], signed: Iterable[str], oversigned: Iterable[str]
) -> list[str]:
    """
    The C{h=} list: each signed field as often as it is present, oversigned
    fields once more (RFC 6376 8.15), and From always.

    @param present: the names of the fields in the header section.
    """
    counts: dict[str, int] = {}
    for name in present:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    extra = {name.lower() for name in oversigned}
    out: list[str] = []
    for name in dict.fromkeys(["from", *(n.lower() for n in signed)]):
        times = counts.get(name, 0) + (1 if name in extra else 0)
        out.extend([name] * max(times, 1 if name == "from" else 0))
    return out


@implementer(IMessageHook)
class DKIMSigner:
    """
    @param keys: domain to its C{(selector, key)} pairs.
    @param threadpool: where to hash and sign (default: the reactor's).
    """

    log = Logger()

    def __init__(
        self,
        keys: dict[str, list[tuple[str, SigningKey]]],
        signed_headers: tuple[str, ...],
        oversigned_headers: tuple[str, ...],
        reactor,
        threadpool=None,
    ) -> None:
        self._keys = keys
        self._signed = signed_headers
        self._oversigned = oversigned_headers
        self._reactor = reactor
        self._threadpool = threadpool

    def signing_domain(self, envelope, headers) -> str | None:
        """
        The domain whose keys sign: the From domain or its closest parent
        with keys, else the envelope sender's.
        """
        candidates = from_domains(headers.get_all("From"))[:1] + [domain_of(envelope.sender)]
        for domain in filter(None, candidates):
            labels = domain.split(".")
            for i in range(len(labels) - 1):
                parent = ".".join(labels[i:])
                if parent in self._keys:
                    return parent
        return None

    async def message(self, envelope, headers, body) -> None:
        if envelope.authenticated is None:
            return None
        domain = self.signing_domain(envelope, headers)
        if domain is None:
            return None
        head = headers.to_bytes()
        names = headers.names()
        threadpool = self._threadpool or self._reactor.getThreadPool()
        try:
            fields = await deferToThreadPool(
                self._reactor, threadpool, self._sign, domain, head, names, body
            )
        except Exception as e:
            emit(self.log, LogLevel.error, "dkim.sign_failed", "cannot sign; sent unsigned",
                 sender=envelope.sender, domain=domain, error=f"{type(e).__name__}: {e}")
            return None
        for field in reversed(fields):
            headers.add_raw(field)
        return None

    def _sign(self, domain: str, head: bytes, names: list[str], body) -> list[bytes]:
        import dkim

        message = whole_message(head, body.read())
        stored = message.replace(b"\r\n", b"\n")
        if has_long_lines(stored):
            message = fit(stored).replace(b"\n", b"\r\n")
        include = [n.encode("ascii") for n in include_headers(names, self._signed,
                                                                self._oversigned)]
        fields = []
        for selector, key in self._keys[domain]:
            signer = dkim.DKIM(message, signature_algorithm=key.algorithm, linesep=b"\r\n")
            fields.append(signer.sign(
                selector.encode("ascii"), domain.encode("ascii"), key.private,
                canonicalize=(b"relaxed", b"relaxed"), include_headers=include,
            ))
        return fields
