"""
Every extension point and every seam between the rooms of the server.

Protocols (C{smtp/}, C{pop3/}) talk to storage only through these interfaces,
so each side can be replaced by an in-memory fake in tests
(see L{mailserver.testing}).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IAccount(Interface):
    """
    The avatar a successful login yields through the C{twisted.cred} portal.
    """

    address = Attribute("The account's canonical address, C{str}, e.g. 'bob@example.org'.")


class IMessageReceiver(Interface):
    """
    Takes one message's bytes as the SMTP server receives them and makes them
    durable.  Obtained from L{IIntake.begin}.
    """

    def write(data: bytes) -> None:
        """
        Add the next piece of the message: CRLF line endings, already
        un-dot-stuffed, without the terminating C{.}.  The first piece starts
        with the trace headers the SMTP server adds.
        """

    def finish() -> object:
        """
        The message is complete.  Return a Deferred that fires with the
        queue id (C{str}) once every copy is on stable storage, or fails
        (the SMTP server then answers 451 and the client keeps the message).
        """

    def abort() -> None:
        """
        Throw the message away (the client went away, or it was refused).
        """


class IIntake(Interface):
    """
    Where accepted mail goes: the router in front of the Maildir store (and,
    later, the relay queue).
    """

    def begin(envelope: object) -> IMessageReceiver:
        """
        Start receiving one message for C{envelope}, an
        L{mailserver.envelope.Envelope}.
        """
