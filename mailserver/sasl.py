"""
The SASL mechanisms SMTP AUTH (RFC 4954) and POP3 AUTH (RFC 5034) offer:
PLAIN (RFC 4616) and LOGIN (the de-facto mechanism older clients still use),
and where a password may travel without TLS.

Each exchange is a small object fed the client's decoded responses; it
answers with the next challenge or, at the end, the credentials.  Base64 and
the C{*} cancel are handled here too, so the protocols only move lines.
"""

from __future__ import annotations

import binascii
import ipaddress
from base64 import b64decode
from dataclasses import dataclass

from twisted.internet.address import UNIXAddress


class SASLError(Exception):
    """
    The exchange cannot go on; C{str()} says why, for the error reply.
    """


class SASLCancelled(SASLError):
    """
    The client sent C{*} (RFC 4954 section 4, RFC 5034 section 4).
    """


class SASLRefused(SASLError):
    """
    A well-formed request this server will not grant (POP3 says C{[AUTH]}).
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
            raise SASLRefused("Authorization identity must match the user.")
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


MECHANISMS = {"PLAIN": PlainExchange, "LOGIN": LoginExchange}


def is_loopback(address: object) -> bool:
    """
    Is the peer on this machine?  A password sent over loopback (or a UNIX
    socket) never crosses a network, so it may go without TLS.
    """
    if isinstance(address, UNIXAddress):
        return True
    try:
        ip = ipaddress.ip_address(getattr(address, "host", ""))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
