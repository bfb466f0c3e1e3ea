"""
Who may do what over SMTP: the relay rules, the MX and submission roles,
recipient resolution, VRFY and EXPN.

Every decision is a pure function of the configuration, the accounts and the
session's facts (authenticated or not), answering a L{Reply} or the data
needed to go on, so the whole policy is tested without a connection.

Relaying is decided on the parsed domain only: a local part is never routed
on, so C{user%other@local}, C{other!user@local} and C{"user@other"@local}
are local parts that do not resolve (550 5.1.1), and source routes are
dropped by the grammar before we get here.
"""

from __future__ import annotations

from mailserver.config import SMTP, Disclosure
from mailserver.interfaces import IAccounts
from mailserver.safe_text import printable
from mailserver.smtp.grammar import Mailbox
from mailserver.smtp.replies import (
    AUTH_REQUIRED,
    RELAY_DENIED,
    USER_UNKNOWN,
    Reply,
    reply,
)

MX = "smtp"
SUBMISSION = "submission"


class Policy:
    """
    The rules for one listener role (C{"smtp"}: MX, C{"submission"}:
    RFC 6409 message submission).
    """

    def __init__(self, smtp: SMTP, role: str, accounts: IAccounts) -> None:
        """
        @param smtp: the C{[smtp]} section (VRFY and EXPN disclosure, C{mx_auth}).
        @param accounts: which domains are local, and their addresses.
        """
        if role not in (MX, SUBMISSION):
            raise ValueError(f"unknown SMTP role {role!r}")
        self._smtp = smtp
        self._accounts = accounts
        self.role = role

    @property
    def offers_auth(self) -> bool:
        """
        Whether this role offers AUTH at all: submission always, MX only
        with C{smtp.mx_auth}.
        """
        return self.role == SUBMISSION or self._smtp.mx_auth

    def auth_required(self, authenticated: str | None) -> Reply | None:
        """
        Submission takes mail only from authenticated clients (RFC 6409
        4.3); C{None} means go on.
        """
        if self.role == SUBMISSION and authenticated is None:
            return AUTH_REQUIRED
        return None

    def qualify(self, mailbox: Mailbox) -> Mailbox:
        """
        A mailbox without a domain (C{<Postmaster>}, RFC 5321 4.5.1, or a
        bare name given to VRFY) is in the first local domain.
        """
        if mailbox.domain:
            return mailbox
        return Mailbox(mailbox.local, self._accounts.default_domain)

    def sender(self, mailbox: Mailbox | None, authenticated: str | None) -> Reply | None:
        """
        May this client use this reverse-path?  C{None} means yes.

        An authenticated client, on any role, must use a sender its account
        owns, so one user cannot send as another (AUTH lets it relay, and
        its mail is DKIM-signed).  Submission requires AUTH (RFC 6409 4.3);
        MX accepts any sender from other servers, including the null sender
        of bounces.
        """
        if authenticated is not None:
            if mailbox is None or not self._accounts.owns(authenticated, mailbox.address):
                return reply(
                    553, "5.7.1",
                    f"Sender address rejected: not owned by user {printable(authenticated)}",
                )
            return None
        return self.auth_required(authenticated)

    def recipient(self, mailbox: Mailbox, authenticated: str | None) -> Reply | tuple[str, ...]:
        """
        Where mail to C{mailbox} goes, or why it is refused.

        Local domains resolve through the accounts (aliases, lists,
        subaddress, catch-all).  A relay domain's recipients are relayed for
        anyone, if its list of recipients has them.  Any other domain, and
        any address literal, is relaying: allowed only to authenticated
        clients, whose recipient is kept as given for the relay queue.
        """
        refusal = self.auth_required(authenticated)
        if refusal is not None:
            return refusal
        mailbox = self.qualify(mailbox)
        if not mailbox.is_address_literal and self._accounts.is_local_domain(mailbox.domain):
            destinations = self._accounts.resolve(mailbox.address)
            if not destinations:
                return USER_UNKNOWN
            return tuple(destinations)
        if not mailbox.is_address_literal and self._accounts.is_relay_domain(mailbox.domain):
            if not self._accounts.is_relay_recipient(mailbox.address):
                return USER_UNKNOWN
            return (mailbox.address,)
        if authenticated is not None:
            return (mailbox.address,)
        return RELAY_DENIED

    def vrfy(self, mailbox: Mailbox | None, authenticated: str | None) -> Reply:
        """
        RFC 5321 3.5.3: 252 when we will not say; 250 or 550 when we do.
        """
        if authenticated is None and self._smtp.vrfy == Disclosure.REFUSE:
            return reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
        if mailbox is None or mailbox.is_address_literal or not self._is_local(mailbox):
            return reply(252, "2.5.0", "Cannot VRFY a non-local address")
        address = self.qualify(mailbox).address
        if self._accounts.exists(address):
            return reply(250, "2.1.5", f"<{address}>")
        return reply(550, "5.1.1", "User unknown")

    def expn(self, mailbox: Mailbox | None, authenticated: str | None) -> Reply:
        """
        RFC 5321 3.5.2: the members of a list, one per line.
        """
        if authenticated is None and self._smtp.expn == Disclosure.REFUSE:
            return reply(502, "5.5.1", "EXPN is disabled")
        if mailbox is None or mailbox.is_address_literal or not self._is_local(mailbox):
            return reply(550, "5.1.1", "Not a local mailing list")
        members = self._accounts.expand(self.qualify(mailbox).address)
        if not members:
            return reply(550, "5.1.1", "Not a mailing list")
        return Reply(250, "2.1.5", tuple(f"<{member}>" for member in members))

    def _is_local(self, mailbox: Mailbox) -> bool:
        return not mailbox.domain or self._accounts.is_local_domain(mailbox.domain)
