"""
The POP3 server (RFC 1939 with CAPA, STLS, SASL and response codes).
"""

from mailserver.pop3.protocol import POP3Factory

__all__ = ["POP3Factory"]
