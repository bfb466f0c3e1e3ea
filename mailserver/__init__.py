"""
mailserver: SMTP in, Maildir storage, relay and POP3 out, on Twisted.
"""

__version__ = "0.1.0"
