"""
The states of an IMAP session (RFC 3501 3) and the connection facts it is
given.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    """
    @ivar reads_commands: input is command lines (not SASL responses, not
        the DONE that ends IDLE).
    """

    NOT_AUTHENTICATED = ("not authenticated", True)
    AUTHENTICATED = ("authenticated", True)
    SELECTED = ("selected", True)
    SASL = ("authenticate", False)  # a response to a + challenge is due
    IDLE = ("idle", False)  # waiting for DONE (RFC 2177)
    LOGOUT = ("logout", False)

    def __init__(self, label: str, reads_commands: bool) -> None:
        self.label = label
        self.reads_commands = reads_commands

    __hash__ = object.__hash__


@dataclass(slots=True)
class Connection:
    """
    @ivar client: C{host:port}, for the log.
    """

    address: str
    client: str
    loopback: bool
