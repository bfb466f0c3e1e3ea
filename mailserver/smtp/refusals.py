"""
Why the SMTP server refused something, in a word from a fixed set: the
C{reason} of every C{smtp.rejected} log event and the label of
C{smtp_refusals_total}.

A reply the policy or the session makes is named here by what it is; a
plugin's L{mailserver.hooks.Reject} carries its own (C{plugin:NAME}, or
C{dmarc} and C{spf} from the inbound checks).  Syntax errors and commands
out of sequence are no refusals of mail and are not logged one by one
(too many of them end the session, which is: C{errors}).
"""

from __future__ import annotations

import mailserver.smtp.replies as R
from mailserver.wire.reply import Reply

RELAY_DENIED = "relay-denied"
UNKNOWN_RECIPIENT = "unknown-recipient"
AUTH_REQUIRED = "auth-required"
TLS_REQUIRED = "tls-required"
SENDER_NOT_OWNED = "sender-not-owned"
SMTPUTF8_REQUIRED = "smtputf8-required"
TOO_MANY_RECIPIENTS = "too-many-recipients"
SIZE = "size"
STORAGE = "storage"
LINE_LENGTH = "line-length"
BARE_NEWLINE = "bare-newline"
LOOP = "loop"
ETRN_DENIED = "etrn-denied"
AUTH_FAILED = "auth-failed"
RATE = "rate"
CONNECTION_LIMIT = "connection-limit"
SHUTDOWN = "shutdown"
ERRORS = "errors"
POLICY = "policy"

# The fixed replies, by what they refuse.
_BY_REPLY = {
    R.RELAY_DENIED: RELAY_DENIED,
    R.USER_UNKNOWN: UNKNOWN_RECIPIENT,
    R.AUTH_REQUIRED: AUTH_REQUIRED,
    R.ENCRYPTION_REQUIRED: TLS_REQUIRED,
    R.SMTPUTF8_REQUIRED: SMTPUTF8_REQUIRED,
    R.TOO_MANY_RECIPIENTS: TOO_MANY_RECIPIENTS,
    R.TOO_BIG: SIZE,
    R.INSUFFICIENT_STORAGE: STORAGE,
    R.TEMPORARY_FAILURE: STORAGE,
    R.DATA_LINE_TOO_LONG: LINE_LENGTH,
    R.BARE_NEWLINE: BARE_NEWLINE,
    R.LOOP_DETECTED: LOOP,
    R.LOGINS_REFUSED: RATE,
    R.BAD_CREDENTIALS: AUTH_FAILED,
}
# Replies whose text names the client's input, by code.
_BY_CODE = {
    (553, "5.7.1"): SENDER_NOT_OWNED,
    (552, "5.3.4"): SIZE,
    (459, "4.7.1"): ETRN_DENIED,
}


def reason_of(reply: Reply) -> str:
    """
    The word a refusal is logged and counted under.
    """
    reason = getattr(reply, "reason", "")  # a plugin's Reject
    if reason:
        return reason
    return _BY_REPLY.get(reply) or _BY_CODE.get((reply.code, reply.enhanced), POLICY)
