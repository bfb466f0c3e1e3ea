"""
The POP3 listener's factory: builds one session per connection, each given
the listener's dependencies.
"""

from __future__ import annotations

from twisted.internet.protocol import ServerFactory

from mailserver.pop3.dependencies import POP3Dependencies
from mailserver.pop3.protocol import POP3Server


class POP3Factory(ServerFactory):
    """
    @param dependencies: what every session of this listener is given.
    """

    protocol = POP3Server

    def __init__(self, dependencies: POP3Dependencies) -> None:
        self.dependencies = dependencies

    def buildProtocol(self, addr) -> POP3Server:
        return self.protocol(self.dependencies)
