"""
The wire room: what every protocol session shares, whatever it speaks
(the SMTP server, the relay's SMTP client, POP3, and IMAP later).

  - L{reply}: the one reply value type (SMTP's, with enhanced codes).
  - L{dots}: the dot codec, stuffing for the wire and un-stuffing DATA.
  - L{session}: the line-session plumbing a protocol's glue composes.
  - L{flow}: reading no faster than the client reads our replies.
  - L{login}: throttled password checks.
  - L{effects}: what a pure handler asks its glue to do.

Nothing here imports a protocol.
"""
