"""
IMAP's view of the Maildir: an account's Maildir++ folders, flags in the
file names, UIDs and UIDVALIDITY in Dovecot's C{dovecot-uidlist}, shared by
every session of a process (L{store}), with the file work in worker threads.

  - L{names}: mailbox names and their Maildir++ folders (modified UTF-7).
  - L{uidlist}: Dovecot's uidlist, keywords and UIDVALIDITY files.
  - L{state}: what a process knows of one folder, and the scan.
  - L{ops}: flags, expunges, \\Recent, APPEND, COPY/MOVE, reading.
  - L{flags}: IMAP flags as Maildir info letters.
  - L{tree}: the account's folders and subscriptions.
  - L{store}: the shared folders the IMAP sessions use.
  - L{watch}: noticing changes on disk.
"""
