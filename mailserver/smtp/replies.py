"""
The SMTP server's fixed replies (RFC 5321 4.2, with RFC 3463 enhanced
status codes), as L{mailserver.wire.reply.Reply} values made once.
"""

from __future__ import annotations

import errno

from mailserver.wire.reply import Reply


def reply(code: int, enhanced: str, *lines: str) -> Reply:
    return Reply(code, enhanced, lines)


OK = reply(250, "2.0.0", "Ok")
BAD_SEQUENCE = reply(503, "5.5.1", "Error: bad sequence of commands")
NEED_HELO = reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = reply(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RECIPIENTS = reply(554, "5.5.1", "Error: no valid recipients")
UNKNOWN_COMMAND = reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = reply(500, "5.5.2", "Error: line too long")
BAD_BYTES = reply(500, "5.5.2", "Error: command contains invalid characters")
NOT_IMPLEMENTED = reply(502, "5.5.1", "Error: command not implemented")
TEMPORARY_FAILURE = reply(451, "4.3.0", "Error: queue file write error")
INSUFFICIENT_STORAGE = reply(452, "4.3.1", "Error: insufficient system storage")
TOO_MANY_RECIPIENTS = reply(452, "4.5.3", "Error: too many recipients")
TOO_BIG = reply(552, "5.3.4", "Error: message file too big")
BARE_NEWLINE = reply(550, "5.5.2", "Error: bare <CR> or <LF> received")
DATA_LINE_TOO_LONG = reply(500, "5.5.2", "Error: message line too long")
LOOP_DETECTED = reply(554, "5.4.6", "Error: too many hops (mail loop detected)")
RELAY_DENIED = reply(554, "5.7.1", "Relay access denied")
USER_UNKNOWN = reply(550, "5.1.1", "Recipient address rejected: User unknown")
AUTH_REQUIRED = reply(530, "5.7.0", "Authentication required")
SMTPUTF8_REQUIRED = reply(553, "5.6.7", "Error: SMTPUTF8 is required for this address")
SENDER_OK = reply(250, "2.1.0", "Ok")
RECIPIENT_OK = reply(250, "2.1.5", "Ok")
START_MAIL_INPUT = reply(354, "", "End data with <CR><LF>.<CR><LF>")
IN_TRANSACTION = reply(503, "5.5.1", "Error: MAIL transaction in progress")
NEED_EHLO = reply(503, "5.5.1", "Error: send EHLO first")
AUTH_NOT_OFFERED = reply(503, "5.5.1", "Error: authentication not enabled")
ALREADY_AUTHENTICATED = reply(503, "5.5.1", "Error: already authenticated")
ENCRYPTION_REQUIRED = reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
UNKNOWN_MECHANISM = reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_ABORTED = reply(501, "5.0.0", "Authentication aborted")
AUTH_SUCCESSFUL = reply(235, "2.7.0", "Authentication successful")
BAD_CREDENTIALS = reply(535, "5.7.8", "Authentication credentials invalid")
LOGINS_REFUSED = reply(454, "4.7.0", "Too many failed logins from your address, try again later")
AUTH_UNAVAILABLE = reply(454, "4.7.0", "Temporary authentication failure")
READY_FOR_TLS = reply(220, "2.0.0", "Ready to start TLS")
TLS_ACTIVE = reply(503, "5.5.1", "Error: TLS already active")
BYE = reply(221, "2.0.0", "Bye")


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def storage_failure(error: BaseException) -> Reply:
    """
    What to tell a client whose message could not be stored: a full disk or
    quota is 452 4.3.1 (RFC 3463 "mail system full"), anything else (an
    unwritable or read-only data folder, an I/O error) 451 4.3.0.  Both are
    temporary: the client keeps the message and tries again.
    """
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return INSUFFICIENT_STORAGE
    return TEMPORARY_FAILURE
