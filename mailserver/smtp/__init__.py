"""
The SMTP server: grammar, replies, policy, the session's state machine and
its glue.
"""

from mailserver.smtp.dependencies import SMTPDependencies
from mailserver.smtp.factory import SMTPFactory
from mailserver.smtp.protocol import SMTPServer

__all__ = ["SMTPDependencies", "SMTPFactory", "SMTPServer"]
