"""
The SMTP server: protocol, grammar, replies and policy.
"""

from mailserver.smtp.factory import SMTPFactory
from mailserver.smtp.protocol import SMTPServer

__all__ = ["SMTPFactory", "SMTPServer"]
