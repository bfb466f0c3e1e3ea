"""
Every extension point and every seam between the rooms of the server.

Protocols (C{smtp/}, C{pop3/}, C{imap/}) talk to storage only through these interfaces,
so each side can be replaced by an in-memory fake in tests
(see L{mailserver.testing}).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IAccount(Interface):
    """
    The avatar a successful login yields through the C{twisted.cred} portal.
    """

    address = Attribute("The account's canonical address, C{str}, e.g. 'bob@example.org'.")


class IAccounts(Interface):
    """
    The accounts as the SMTP policy sees them: which domains are local,
    where an address delivers, and who may send as whom.
    """

    default_domain = Attribute(
        "The domain of an address given without one (C{<Postmaster>}, RFC 5321 4.5.1): "
        "the first local domain, C{str}."
    )

    def is_local_domain(domain: str) -> bool:
        """
        Is mail to C{domain} (any case, a trailing dot allowed) delivered here?
        """

    def is_relay_domain(domain: str) -> bool:
        """
        Is C{domain} one whose mail we take from anyone and relay
        (C{relay.relay_domains}: a backup MX, a gateway)?
        """

    def is_relay_recipient(address: str) -> bool:
        """
        Is mail for C{address}, of a relay domain, accepted (C{relay.relay_recipients})?
        """

    def resolve(address: str) -> object:
        """
        Where mail to C{address} in a local domain goes (after aliases,
        lists, subaddress and catch-all): a tuple of account addresses and,
        for forwarding aliases, remote addresses; C{None} if there is no
        such recipient or the domain is not local.
        """

    def exists(address: str) -> bool:
        """
        Is C{address} a recipient here (VRFY)?
        """

    def expand(address: str) -> object:
        """
        The members of an alias or list (EXPN), a tuple, or C{None}.
        """

    def owns(account: str, address: str) -> bool:
        """
        May the authenticated C{account} send as C{address}?
        """


class IMessageReceiver(Interface):
    """
    Takes one message's bytes as the SMTP server receives them and makes them
    durable.  Obtained from L{IIntake.begin}.
    """

    def write(data: bytes) -> None:
        """
        Add the next piece of the message: CRLF line endings, already
        un-dot-stuffed, without the terminating C{.}.  Every CR is in a CRLF
        (the SMTP server makes a bare LF a line end and a bare CR a space,
        or refuses them), though a piece may end between the two.  The first piece starts with the trace headers the
        SMTP server adds.
        """

    def finish() -> object:
        """
        The message is complete.  Return a Deferred that fires with the
        message's ID (C{str}: the envelope's, or one the intake gave it)
        once every copy is on stable storage, or fails
        (the SMTP server then answers 451 and the client keeps the message).
        """

    def abort() -> None:
        """
        Throw the message away (the client went away, or it was refused).
        """


class IIntake(Interface):
    """
    Where accepted mail goes: the router in front of the Maildir store (and,
    later, the relay queue).
    """

    def begin(envelope: object) -> IMessageReceiver:
        """
        Start receiving one message for C{envelope}, an
        L{mailserver.envelope.Envelope}, under its ID (a new one when it has
        none).
        """

    def has_room(size: int) -> bool:
        """
        Is there space to store a message of C{size} octets (0 when the
        client did not say) and still keep the configured reserve free?
        Asked at MAIL, so a full disk is refused (452) before any data is
        sent rather than after.
        """


class IStoredMessage(Interface):
    """
    One message of a mailbox as POP3 lists it; handed back to the
    L{IMailbox} that listed it to read, flag or remove the message.
    """

    uid = Attribute("A unique name, C{str}, stable across sessions: POP3's UIDL.")
    size = Attribute("Octets as sent, C{int}: every stored LF counts as CRLF.")
    seen = Attribute("Marked read, C{bool}.")


class IMailbox(Interface):
    """
    One account's stored mail as a POP3 session uses it.  Every method may
    block on the disk: the session calls them in a worker thread, or a few
    at a time on the reactor thread for the quick ones (L{mark_seen},
    L{remove}).
    """

    def lock() -> bool:
        """
        Take the exclusive lock without waiting; C{False} if another session
        holds it.  Taking it again while holding it is C{True}.
        """

    def unlock() -> None:
        """
        Give up the lock (nothing if not held).
        """

    def messages() -> list:
        """
        Every message, oldest first, as L{IStoredMessage}s.
        """

    def read_whole(message: object, limit: int) -> object:
        """
        The message's stored bytes (LF line endings) if they are fewer than
        C{limit} octets, else C{None} (then L{open} it and read it in
        pieces).
        """

    def open(message: object) -> object:
        """
        The message's stored bytes as a binary file object.
        """

    def mark_seen(message: object) -> None:
        """
        Flag the message read, where other readers of the mailbox see it.
        """

    def remove(message: object) -> None:
        """
        Remove the message (made durable by L{sync_removals}).
        """

    def sync_removals(messages: object) -> None:
        """
        Make the removal of these messages durable.
        """


class IMailboxStore(Interface):
    """
    Every account's mailbox, as POP3 reaches them.
    """

    def mailbox(address: str) -> IMailbox:
        """
        The mailbox of the account with this canonical address (not locked
        yet).

        @raise LookupError: the account has no mailbox here.
        @raise OSError: the storage failed.
        """


class FolderError(Exception):
    """
    A folder operation that cannot be done: C{code} is the IMAP response
    code that says why (RFC 5530: C{NONEXISTENT}, C{ALREADYEXISTS},
    C{CANNOT}, C{TRYCREATE}...) and C{str()} the text for the client.
    """

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


class FolderGone(FolderError):
    """
    An open folder's directory is no longer there: another session or
    program deleted or renamed it.  C{path} is the folder's.
    """

    def __init__(self, path: str) -> None:
        super().__init__("NONEXISTENT", "Mailbox doesn't exist")
        self.path = path


class IFolderStore(Interface):
    """
    Every account's folders, as the IMAP server reaches them.
    """

    def account(address: str) -> IMailAccount:
        """
        The folders of the account with this canonical address.
        """


class IMailAccount(Interface):
    """
    One account's folder tree (INBOX and the folders under it).  Names are
    Unicode text with C{/} between levels; C{INBOX} in any case is INBOX.
    Every method that touches the disk returns a Deferred and does its
    work off the reactor thread; failures are L{FolderError}s (with an
    IMAP response code) or C{OSError}s.
    """

    def prepare() -> object:
        """
        Create INBOX and the special-use folders where missing (at login).
        """

    def names() -> object:
        """
        A Deferred list of every folder's name.
        """

    def subscriptions() -> object:
        """
        A Deferred list of the subscribed names (which may not exist).
        """

    def special_use(name: str) -> object:
        """
        The folder's SPECIAL-USE attribute (RFC 6154, C{"\\Sent"}), or
        C{None}.
        """

    def create(name: str) -> object:
        """
        Make a folder (and any missing parent).
        """

    def delete(name: str) -> object:
        """
        Remove a folder and its messages.
        """

    def rename(old: str, new: str) -> object:
        """
        Rename a folder and its children (INBOX: move its messages).
        """

    def subscribe(name: str, subscribed: bool) -> object:
        """
        Add the name to, or take it off, the subscriptions.
        """

    def open(name: str) -> object:
        """
        A Deferred L{IMailFolder}, up to date with the disk; the caller
        calls its C{release} when done with it.
        """


class IMailFolder(Interface):
    """
    One folder as sessions share it in a process: the messages' UIDs and
    flags are read at once on the reactor thread; changes go to disk in a
    worker thread, one at a time per folder, and every session watching
    the folder is told of each change (its own, another session's, a
    delivery's or another process's), on the reactor thread.

    Flags are IMAP's: system flags (C{"\\Seen"}) and keywords.
    """

    name = Attribute("The folder's name, C{str}.")
    uidvalidity = Attribute("UIDVALIDITY, C{int}.")
    uidnext = Attribute("The next UID to be given, C{int}.")
    uids = Attribute("The messages' UIDs, ascending (a sequence to keep, not change).")
    keywords = Attribute("The keywords the folder knows, C{list[str]}.")
    can_add_keywords = Attribute("Room for another keyword, C{bool}.")

    def flags(uid: int) -> list:
        """
        The message's flags (without \\Recent); empty if it is gone.
        """

    def unseen() -> list:
        """
        UIDs of the messages without \\Seen, ascending.
        """

    def size(uid: int) -> int:
        """
        Octets in CRLF form, or -1 until L{describe} or L{read} learnt it.
        """

    def internaldate(uid: int) -> float:
        """
        When it was stored (seconds since the epoch), or 0 until known.
        """

    def in_new() -> list:
        """
        UIDs of messages no session has taken as \\Recent yet.
        """

    def key(uid: int) -> object:
        """
        A name no other message has, C{str} (what a cache of parsed
        messages may key on), or C{None} if the message is gone.
        """

    def refresh() -> object:
        """
        Catch up with the disk now (a Deferred of nothing).
        """

    def claim_recent() -> object:
        """
        Take every message no session took yet: a Deferred list of the
        UIDs that are \\Recent for the caller.
        """

    def store(uids: object, mode: str, flags: object, origin: object) -> object:
        """
        Set (C{mode} C{""}), add (C{"+"}) or remove (C{"-"}) flags; a
        Deferred list of the UIDs whose flags changed.  Watchers are told
        of the change with C{origin}.
        """

    def expunge(uids: object, origin: object) -> object:
        """
        Remove these messages durably: a Deferred list of the UIDs gone.
        """

    def transfer(uids: object, target: str, move: bool, origin: object) -> object:
        """
        COPY (or MOVE) messages into the folder named C{target}: a Deferred
        (target UIDVALIDITY, [(source UID, target UID)]).
        """

    def append(source: object, flags: object, internaldate: object) -> object:
        """
        Store a message (CRLF bytes, or a binary file of them) durably: a
        Deferred of its UID.
        """

    def read(uids: object, whole_limit: int) -> object:
        """
        A Deferred list of (UID, content): the stored bytes (LF line
        endings) when smaller than C{whole_limit}, else an open binary
        file (the caller closes it), or C{None} for a message gone.
        """

    def describe(uids: object) -> object:
        """
        Learn sizes and dates not known yet (a Deferred of nothing).
        """

    def watch(listener: object) -> None:
        """
        Call C{listener(change)} after each change: C{change.added},
        C{change.removed} and C{change.changed} (flags) are tuples of UIDs,
        C{change.origin} is whoever asked for it (C{None}: someone else).
        """

    def unwatch(listener: object) -> None:
        """
        Stop telling C{listener}.
        """

    def release() -> None:
        """
        The caller is done with the folder (from L{IMailAccount.open}).
        """


class ICourier(Interface):
    """
    One attempt at delivering a queued message onward; the relay's layers
    (logging, routing, the SMTP client) each provide it and wrap the next.
    """

    def deliver(message: object, recipients: tuple) -> object:
        """
        Try once to deliver C{message} (a
        L{mailserver.relay.queue.QueuedMessage}) to C{recipients} (its
        C{RecipientState}s), which all share one destination.

        @return: a Deferred firing with C{dict[str, Outcome]}
            (L{mailserver.relay.delivery.Outcome}), one per recipient
            address; never fails.
        """


# Extension points for plugins.
#
# A plugin is a module in the package C{mailserver.plugins} (or in a folder
# named by C{plugins.paths} in the configuration) that holds an object
# providing L{IPluginFactory}, found with C{twisted.plugin.getPlugins}.  When
# the configuration enables it by name, its factory builds a hook object from
# the plugin's options table; the hook object provides any of the hook
# interfaces below, and the server calls the methods it provides, in the order
# the plugins are enabled.  Every hook method may return its answer directly,
# return a Deferred of it, or be C{async def}.  A hook that raises is logged
# with the plugin's name and the client gets a temporary failure (451 4.3.0):
# a broken plugin never crashes the server or loses a message.


class IPluginFactory(Interface):
    """
    What a plugin module exports, e.g.::

        from twisted.plugin import IPlugin
        from zope.interface import provider
        from mailserver.interfaces import IPluginFactory

        @provider(IPlugin, IPluginFactory)   # IPlugin: how twisted.plugin finds it
        class MyPlugin:
            name = "myplugin"
            description = "Refuses mail to sales@"

            @staticmethod
            def build(options, context):
                return MyHooks(options.get("text", "no thanks"))

        plugin = MyPlugin   # any module-level name will do
    """

    name = Attribute("The name the configuration enables it by, C{str}.")
    description = Attribute("One line saying what it does, C{str}.")

    def build(options: object, context: object) -> object:
        """
        Check C{options} (a read-only mapping: the plugin's table from the
        configuration, C{[plugins.NAME]}) and build the hook object.

        @param context: a L{mailserver.hooks.PluginContext} with the reactor,
            the server's hostname, the data folder and a logger in the
            namespace C{mailserver.plugins.NAME}.
        @raise mailserver.hooks.PluginOptionsError: for a bad option; the
            server then refuses to start, naming the plugin and the key.
        """


class IConnectionHook(Interface):
    def connection(client: object) -> object:
        """
        A client connected to an SMTP listener.

        @param client: a L{mailserver.hooks.Client} (address, port, role).
        @return: C{None} to go on, or a L{mailserver.hooks.Reject} to greet
            the client with that reply (e.g. 554 5.7.1) and close.
        """


class IEnvelopeHook(Interface):
    def sender(client: object, address: str) -> object:
        """
        MAIL FROM was given (C{""} for the null sender).

        @return: C{None} to go on, or a L{mailserver.hooks.Reject}.
        """

    def recipient(client: object, sender: str, address: str) -> object:
        """
        RCPT TO was given, before the server checks the recipient.

        @return: C{None} to go on, a L{mailserver.hooks.Reject} to refuse this
            recipient, or a L{mailserver.hooks.Rewrite} to use another address
            in its place (which the server then checks as usual).
        """


class IMessageHook(Interface):
    def message(envelope: object, headers: object, body: object) -> object:
        """
        The whole message arrived (end of DATA), before the 250.

        @param envelope: the L{mailserver.envelope.Envelope}.
        @param headers: the message's L{mailserver.hooks.MessageHeaders}, which
            the hook may change (add, remove, replace) in place.
        @param body: the L{mailserver.hooks.MessageBody} (read-only).
        @return: C{None} to accept, or a L{mailserver.hooks.Reject}.
        """


class IDeliveredHook(Interface):
    def delivered(event: object) -> None:
        """
        A recipient's delivery is final: stored in a local Maildir, handed to
        the next hop, or bounced.  Told after the fact; the return value is
        ignored, and a slow hook never delays mail.

        @param event: a L{mailserver.hooks.Delivery}.
        """
