"""
The states of a POP3 session and the connection facts it is given.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    """
    @ivar reads_commands: input lines are commands (not SASL responses),
        looked up in the session's command table.
    """

    AUTHORIZATION = ("AUTHORIZATION", True)  # greeted, not logged in (RFC 1939 4)
    SASL = ("SASL", False)  # an AUTH exchange waits for the client's response line
    TRANSACTION = ("TRANSACTION", True)  # logged in, the mailbox locked (RFC 1939 5)
    UPDATE = ("UPDATE", False)  # QUIT is removing and flagging messages (RFC 1939 6)
    CLOSED = ("CLOSED", False)

    def __init__(self, label: str, reads_commands: bool) -> None:
        self.label = label
        self.reads_commands = reads_commands

    # Members are singletons: hashed by identity in C, not by name in
    # Python, as the command table is looked up once per command.
    __hash__ = object.__hash__


@dataclass(slots=True)
class Connection:
    """
    The facts of the connection a session is told by its glue.

    @ivar address: the client's IP address, the unit of login throttling.
    @ivar client: how the logs name the client (C{address:port}).
    @ivar loopback: the client is on this machine (passwords may travel
        without TLS).
    """

    address: str
    client: str
    loopback: bool
