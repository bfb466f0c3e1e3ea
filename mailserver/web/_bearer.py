"""
Bearer-token checks for the admin API (RFC 6750 section 2.1 and 3).
"""

from __future__ import annotations

import hmac

from twisted.web.server import Request

REALM = b"mailserver"


def authorization_problem(request: Request, token: bytes) -> bytes | None:
    """
    Check C{Authorization: Bearer <token>} on C{request}; return C{None}
    when it carries C{token}, else the C{WWW-Authenticate} value to send
    with the 401.

    The token is compared with L{hmac.compare_digest}, so the time taken does
    not tell a guesser how much of the token was right.
    """
    challenge = b'Bearer realm="' + REALM + b'"'
    header = request.getHeader(b"authorization") or b""
    scheme, _, credentials = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        # No bearer credentials at all: RFC 6750 3.1 sends no error code.
        return challenge
    if not hmac.compare_digest(credentials.strip(), token):
        return challenge + b', error="invalid_token"'
    return None
