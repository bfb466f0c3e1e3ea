"""
The IMAP4rev1 server: grammar, responses, the session's state machine and
its glue, on the folders of L{mailserver.folders} (reached through
L{mailserver.interfaces}).

  - L{grammar}, L{arguments}: commands and their arguments.
  - L{responses}: responses as values.
  - L{session} (with L{mailboxes} and L{selected}): the state machine.
  - L{view}: a session's view of its selected mailbox.
  - L{mime}, L{structure}, L{cache}: message structure, ENVELOPE and
    BODYSTRUCTURE, parsed once.
  - L{fetch}, L{fetcher}: FETCH responses and sending them.
  - L{search}: SEARCH keys.
  - L{listing}: LIST and LSUB.
  - L{protocol}, L{factory}, L{dependencies}, L{state}: the glue.
"""

from mailserver.imap.dependencies import IMAPDependencies
from mailserver.imap.factory import IMAPFactory
from mailserver.imap.protocol import IMAPServer

__all__ = ["IMAPDependencies", "IMAPFactory", "IMAPServer"]
