"""
The commands of the AUTHENTICATED state (RFC 3501 6.3): choosing a
mailbox, managing the folder tree and subscriptions, STATUS and APPEND.
Each asks the account's folder store (a Deferred) and answers when it
has.
"""

from __future__ import annotations

from twisted.internet import defer

from mailserver.imap import responses as R
from mailserver.imap.arguments import list_arguments, status_items
from mailserver.imap.grammar import (
    Literal,
    ParseError,
    String,
    date_time,
    flag_list,
    list_pattern,
    mailbox,
)
from mailserver.imap.listing import list_responses, root_response
from mailserver.imap.state import State
from mailserver.imap.view import SelectedView
from mailserver.interfaces import FolderError
from mailserver.mailbox_names import INBOX, SEPARATOR, normalize


class MailboxHandlers:
    """
    Mixed into L{mailserver.imap.session.IMAPSession}.
    """

    # SELECT and EXAMINE.

    def do_SELECT(self, tag: str, args: tuple):
        return self._select(tag, args, readonly=False)

    def do_EXAMINE(self, tag: str, args: tuple):
        return self._select(tag, args, readonly=True)

    def _select(self, tag: str, args: tuple, readonly: bool):
        if not 1 <= len(args) <= 2 or (len(args) == 2 and not isinstance(args[1], list)):
            raise ParseError("SELECT needs a mailbox name")
        name = mailbox(args[0])
        # Selecting closes the mailbox selected before, even if it fails.
        self._deselect()
        self.state = State.AUTHENTICATED
        opening = self.account.open(name)
        opening.addCallback(self._open_view, readonly)
        return self.after(tag, opening, lambda view: self._selected(tag, view))

    def _open_view(self, folder, readonly: bool):
        def made(claimed):
            if self.state is State.LOGOUT:  # the connection went meanwhile
                folder.release()
                return None
            return SelectedView(folder, readonly, set(claimed))

        def failed(failure):
            folder.release()
            return failure

        claiming = defer.succeed([]) if readonly else folder.claim_recent()
        return claiming.addCallbacks(made, failed)

    def _selected(self, tag: str, view: SelectedView):
        self._deselect()
        self.view = view
        self.state = State.SELECTED
        folder = view.folder
        recent = len(folder.in_new()) if view.readonly else len(view.recent)
        out = [
            R.Untagged(b"FLAGS " + R.flag_list(view.flag_names())),
            R.Untagged(
                b"OK [PERMANENTFLAGS "
                + R.flag_list([] if view.readonly else view.permanent_flags())
                + b"] Flags permitted."
            ),
            R.Untagged(b"%d EXISTS" % view.exists),
            R.Untagged(b"%d RECENT" % recent),
        ]
        unseen = view.first_unseen()
        if unseen is not None:
            out.append(R.Untagged(b"OK [UNSEEN %d] First unseen." % unseen))
        out += [
            R.Untagged(b"OK [UIDVALIDITY %d] UIDs valid" % folder.uidvalidity),
            R.Untagged(b"OK [UIDNEXT %d] Predicted next UID" % folder.uidnext),
        ]
        mode = "READ-ONLY" if view.readonly else "READ-WRITE"
        verb = "Examine" if view.readonly else "Select"
        return (*out, R.ok(tag, f"{verb} completed.", mode))

    # The folder tree.

    def _name(self, args: tuple, count: int = 1) -> str:
        if len(args) != count:
            raise ParseError("Wrong number of arguments")
        return mailbox(args[0])

    def do_CREATE(self, tag: str, args: tuple):
        name = self._name(args).rstrip(SEPARATOR)
        if normalize(name) == INBOX:
            return R.no(tag, "Mailbox already exists", "ALREADYEXISTS")
        return self.after(tag, self.account.create(name), lambda _: self.done(tag, "Create completed."))

    def do_DELETE(self, tag: str, args: tuple):
        name = self._name(args)
        if self.view is not None and normalize(name) == self.view.folder.name:
            return R.no(tag, "Can't delete the selected mailbox", "CANNOT")
        return self.after(tag, self.account.delete(name), lambda _: self.done(tag, "Delete completed."))

    def do_RENAME(self, tag: str, args: tuple):
        if len(args) != 2:
            raise ParseError("RENAME needs two mailbox names")
        old, new = mailbox(args[0]), mailbox(args[1]).rstrip(SEPARATOR)
        return self.after(tag, self.account.rename(old, new), lambda _: self.done(tag, "Rename completed."))

    def do_SUBSCRIBE(self, tag: str, args: tuple):
        name = self._name(args)
        return self.after(
            tag, self.account.subscribe(name, True), lambda _: self.done(tag, "Subscribe completed.")
        )

    def do_UNSUBSCRIBE(self, tag: str, args: tuple):
        name = self._name(args)
        return self.after(
            tag, self.account.subscribe(name, False), lambda _: self.done(tag, "Unsubscribe completed.")
        )

    def do_NAMESPACE(self, tag: str, args: tuple):
        return (
            R.Untagged(b'NAMESPACE (("" "' + SEPARATOR.encode("ascii") + b'")) NIL NIL'),
            self.done(tag, "Namespace completed."),
        )

    def do_LIST(self, tag: str, args: tuple):
        options, reference, patterns = list_arguments(args)
        base = list_pattern(reference)
        texts = [list_pattern(p) for p in patterns]
        if not options.extended and texts == [""]:
            return (root_response(), self.done(tag, "List completed."))
        return self._listing(tag, "LIST", options, base, texts)

    def do_LSUB(self, tag: str, args: tuple):
        if len(args) != 2:
            raise ParseError("LSUB needs a reference and a mailbox pattern")
        options, base, patterns = list_arguments(args)
        return self._listing(tag, "LSUB", options, list_pattern(base), [list_pattern(p) for p in patterns])

    def _listing(self, tag: str, command: str, options, reference: str, patterns: list[str]):
        account = self.account
        both = defer.gatherResults([account.names(), account.subscriptions()], consumeErrors=True)
        both.addErrback(lambda failure: failure.value.subFailure)

        def answer(found):
            names, subscribed = found
            lines = list_responses(
                names, subscribed, reference, patterns, options, account.special_use, command
            )
            return (*lines, self.done(tag, f"{command.capitalize()} completed."))

        return self.after(tag, both, answer)

    # STATUS (RFC 3501 6.3.10).

    def do_STATUS(self, tag: str, args: tuple):
        if len(args) != 2:
            raise ParseError("STATUS needs a mailbox name and items")
        name = mailbox(args[0])
        items = status_items(args[1])
        return self.after(tag, self.account.open(name), lambda folder: self._status(tag, name, items, folder))

    def _status(self, tag: str, name: str, items: list[str], folder):
        try:
            values = {
                "MESSAGES": lambda: len(folder.uids),
                "RECENT": lambda: len(folder.in_new()),
                "UIDNEXT": lambda: folder.uidnext,
                "UIDVALIDITY": lambda: folder.uidvalidity,
                "UNSEEN": lambda: len(folder.unseen()),
            }
            text = " ".join(f"{item} {values[item]()}" for item in items)
        finally:
            folder.release()
        line = R.Untagged(b"STATUS " + R.mailbox(name) + b" (" + text.encode("ascii") + b")")
        return (line, self.done(tag, "Status completed."))

    # APPEND (RFC 3501 6.3.11, RFC 4315 APPENDUID).

    def do_APPEND(self, tag: str, args: tuple):
        if len(args) < 2:
            raise ParseError("APPEND needs a mailbox name and a message")
        name = mailbox(args[0])
        rest = list(args[1:])
        flags: list[str] = []
        when = None
        if isinstance(rest[0], list):
            flags = [f for f in flag_list(rest.pop(0)) if f.lower() != "\\recent"]
        if len(rest) == 2:
            when = date_time(rest.pop(0))
        if len(rest) != 1 or not isinstance(rest[0], (String, Literal)):
            raise ParseError("APPEND needs the message as a literal")
        message = rest[0]
        source = message.file if isinstance(message, Literal) else bytes(message)
        size = message.size if isinstance(message, Literal) else len(source)
        if size == 0:
            return R.no(tag, "Can't save a zero byte message.")
        if size > self.deps.limits.max_message_size:
            return R.no(tag, "Message is too large.", "TOOBIG")

        def store(folder):
            appending = folder.append(source, flags, when)
            appending.addCallback(lambda uid: (folder.uidvalidity, uid))
            return appending.addBoth(_release, folder)

        def answer(result):
            uidvalidity, uid = result
            return self.done(tag, "Append completed.", f"APPENDUID {uidvalidity} {uid}")

        d = self.account.open(name)
        d.addErrback(_try_create)
        d.addCallback(store)
        d.addBoth(_close_literal, message)
        return self.after(tag, d, answer)


def _release(result, folder):
    folder.release()
    return result


def _try_create(failure):
    """
    A missing target mailbox is C{TRYCREATE} (RFC 3501 6.3.11).
    """
    error = failure.value
    if isinstance(error, FolderError) and error.code == "NONEXISTENT":
        raise FolderError("TRYCREATE", str(error))
    return failure


def _close_literal(result, message):
    if isinstance(message, Literal):
        message.close()
    return result
