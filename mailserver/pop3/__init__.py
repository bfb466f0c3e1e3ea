"""
The POP3 server (RFC 1939 with CAPA, STLS, SASL and response codes).
"""

from mailserver.pop3.dependencies import POP3Dependencies
from mailserver.pop3.factory import POP3Factory

__all__ = ["POP3Dependencies", "POP3Factory"]
