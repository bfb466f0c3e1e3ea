"""
DKIM signing (RFC 6376, RFC 8463) of mail that authenticated users send.

A message hook that runs after every other one, so it signs the header
section as it will be stored and relayed.  It signs with every key configured
for the domain of the From address (or a parent domain of it), else for the
envelope sender's domain, with relaxed/relaxed canonicalisation, and adds
each C{DKIM-Signature} field at the top, folded as dkimpy folds it.  The
hashing runs in a thread, a piece of the body at a time
(L{mailserver.mailauth.bodyhash}): a large body never holds up the reactor
or sits in memory whole.  A message
that cannot be signed is logged and delivered unsigned.

Our signature vouches for the From address, so it is given only when every
From address is one the authenticated account may send as (the rule MAIL
FROM is held to) or is in a shared domain (C{dkim.shared_domains}).  Other
mail is logged and delivered unsigned rather than refused: it is what any
other server would send for that From, and the receiver's DMARC check judges
it on the From domain's own policy.

A message with a line over 998 octets is stored as it came but sent
re-encoded (L{mailserver.relay.line_length}): it is signed in that
re-encoded form, which is what the peer receives and verifies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from mailserver.interfaces import IMessageHook
from mailserver.logs import emit
from mailserver.mailauth.bodyhash import BODY_CHUNK, sign
from mailserver.mailauth.dmarc import domain_of, from_addresses
from mailserver.mailauth.keys import SigningKey
from mailserver.relay.line_length import any_long_line, fit
from mailserver.safe_text import printable


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
    @param owns: whether an account may send as an address
        (L{mailserver.accounts.Accounts.owns}).
    @param shared_domains: domains whose addresses any account may sign.
    @param threadpool: where to hash and sign (default: the reactor's).
    """

    log = Logger()

    def __init__(
        self,
        keys: dict[str, list[tuple[str, SigningKey]]],
        signed_headers: tuple[str, ...],
        oversigned_headers: tuple[str, ...],
        reactor,
        *,
        owns: Callable[[str, str], bool],
        shared_domains: Iterable[str] = (),
        threadpool=None,
    ) -> None:
        self._keys = keys
        self._owns = owns
        self._shared = frozenset(shared_domains)
        self._signed = signed_headers
        self._oversigned = oversigned_headers
        self._reactor = reactor
        self._threadpool = threadpool

    def may_sign_for(self, account: str, address: str) -> bool:
        return domain_of(address) in self._shared or self._owns(account, address)

    def signing_domain(self, envelope, headers) -> str | None:
        """
        The domain whose keys sign: the From domain or its closest parent
        with keys, else the envelope sender's; C{None} when a From address
        is not one the account may sign for.
        """
        account = envelope.authenticated
        senders = from_addresses(headers.get_all("From"))
        foreign = [a for a in senders if not self.may_sign_for(account, a)]
        if foreign:
            emit(self.log, LogLevel.warn, "dkim.not_signed",
                 "not signed: the From address is not one the account may send as",
                 user=printable(account), address=printable(foreign[0]))
            return None
        candidates = senders[:1]
        if self.may_sign_for(account, envelope.sender):
            candidates.append(envelope.sender)
        for domain in filter(None, map(domain_of, candidates)):
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
                 sender=printable(envelope.sender), domain=domain,
                 error=f"{type(e).__name__}: {e}")
            return None
        for field in reversed(fields):
            headers.add_raw(field)
        return None

    def _sign(self, domain: str, head: bytes, names: list[str], body) -> list[bytes]:
        include = [n.encode("ascii") for n in include_headers(names, self._signed,
                                                                self._oversigned)]
        keys = [(selector.encode("ascii"), key.algorithm, key.private)
                for selector, key in self._keys[domain]]
        chunks = body.chunks(BODY_CHUNK)
        if any_long_line([head]) or any_long_line(body.chunks(BODY_CHUNK)):
            head, chunks = _fitted(head, body.read())
        return sign(head, chunks, keys, domain.encode("ascii"), include)


def _fitted(head: bytes, body: bytes) -> tuple[bytes, list[bytes]]:
    """
    The header section and body of the message as the relay will send it
    (L{fit}): a message with a long line is read whole, here only.
    """
    message = fit((head + b"\r\n" + body).replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    end = message.find(b"\r\n\r\n")
    return message[: end + 2], [message[end + 4:]]
