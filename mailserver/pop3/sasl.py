"""
The SASL mechanisms POP3's C{AUTH} offers (RFC 5034): PLAIN (RFC 4616) and
LOGIN (the de-facto mechanism older clients still use).

Each exchange is a small object fed the client's decoded responses; it
answers with the next challenge or, at the end, the credentials.  Base64 and
the C{*} cancel are handled here too, so the protocol only moves lines.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from dataclasses import dataclass


class SASLError(Exception):
    """
    The exchange cannot go on; C{str()} is the text of the C{-ERR} reply.
    """


class SASLCancelled(SASLError):
    """
    The client sent C{*} (RFC 5034 section 4).
    """


@dataclass(frozen=True)
class Credentials:
    username: bytes
    password: bytes


def decode_response(line: bytes) -> bytes:
    """
    A client response: base64, where C{=} stands for an empty initial
    response and C{*} cancels.
    """
    if line == b"*":
        raise SASLCancelled("Authentication aborted by client.")
    if line == b"=":
        return b""
    try:
        return b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("Invalid base64 data in continued response.") from None


class PlainExchange:
    """
    PLAIN: one response, C{authzid NUL authcid NUL password}.  Acting as
    another user is not offered, so an authzid must be empty or the authcid.
    """

    first_challenge = b""

    def respond(self, response: bytes) -> bytes | Credentials:
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise SASLError("Invalid AUTH PLAIN response.")
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            raise SASLError("[AUTH] Authorization identity must match the user.")
        return Credentials(authcid, password)


class LoginExchange:
    """
    LOGIN: the user name, then the password, each asked for in turn.
    """

    first_challenge = b"Username:"

    def __init__(self) -> None:
        self._username: bytes | None = None

    def respond(self, response: bytes) -> bytes | Credentials:
        if self._username is None:
            if not response:
                raise SASLError("Invalid AUTH LOGIN user name.")
            self._username = response
            return b"Password:"
        return Credentials(self._username, response)


MECHANISMS = {b"PLAIN": PlainExchange, b"LOGIN": LoginExchange}
