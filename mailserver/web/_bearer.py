"""
Bearer-token checks for the admin API (RFC 6750 section 2.1 and 3).
"""

from __future__ import annotations

import hmac

from twisted.web.http_headers import Headers

REALM = b"mailserver"


def authorization_problem(headers: Headers, token: bytes) -> bytes | None:
    """
    Check C{Authorization: Bearer <token>} in a request's C{headers}; return
    C{None} when they carry C{token}, else the C{WWW-Authenticate} value to
    send with the 401.

    The token is compared with L{hmac.compare_digest}, so the time taken does
    not tell a guesser how much of the token was right.
    """
    challenge = b'Bearer realm="' + REALM + b'"'
    header = (headers.getRawHeaders(b"authorization") or [b""])[-1]
    scheme, _, credentials = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        # No bearer credentials at all: RFC 6750 3.1 sends no error code.
        return challenge
    if not hmac.compare_digest(credentials.strip(), token):
        return challenge + b', error="invalid_token"'
    return None
