"""
SMTP AUTH's SASL mechanisms (RFC 4954): PLAIN (RFC 4616) and LOGIN.

Each exchange is fed the client's decoded responses and answers with the
next challenge or, at the end, the credentials, so the protocol only moves
lines and the mechanisms are tested alone.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from dataclasses import dataclass


class SASLError(Exception):
    """
    The exchange cannot go on (501 5.5.2 in the protocol).
    """


class SASLCancelled(SASLError):
    """
    The client answered C{*} (RFC 4954 4: 501).
    """


@dataclass(frozen=True)
class Credentials:
    username: bytes
    password: bytes


def decode_response(text: bytes) -> bytes:
    """
    A client response: base64, C{=} for an empty initial response, C{*} to
    cancel.
    """
    if text == b"*":
        raise SASLCancelled("Authentication aborted")
    if text == b"=":
        return b""
    try:
        return b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("Cannot decode response") from None


class PlainExchange:
    """
    PLAIN: C{authzid NUL authcid NUL password} in one response.  Acting for
    another user is not offered, so an authzid must be empty or the authcid.
    """

    first_challenge = b""

    def respond(self, response: bytes) -> bytes | Credentials:
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise SASLError("Invalid AUTH PLAIN response")
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            raise SASLError("Authorization identity must match the user")
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
                raise SASLError("Invalid AUTH LOGIN user name")
            self._username = response
            return b"Password:"
        return Credentials(self._username, response)


MECHANISMS = {"PLAIN": PlainExchange, "LOGIN": LoginExchange}
