"""
The SMTP server: protocol, grammar, replies and policy.
"""

from mailserver.smtp.protocol import SMTPFactory, SMTPServer

__all__ = ["SMTPFactory", "SMTPServer"]
