"""
mailserver: SMTP in, Maildir storage, relay and POP3 out, on Twisted.
"""
