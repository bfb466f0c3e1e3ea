"""
The commands of the SELECTED state (RFC 3501 6.4, RFC 4315 UIDPLUS, RFC
6851 MOVE): FETCH, STORE, SEARCH, COPY, MOVE, EXPUNGE, CLOSE, UNSELECT,
CHECK and their UID forms.

FETCH is answered by the glue's L{Fetcher} (it reads message files in
worker threads and streams large ones); the others ask the shared folder
(a Deferred) and answer when it has.  EXPUNGE responses are held back
during FETCH, STORE and SEARCH (RFC 3501 7.4.1), and the changes other
sessions made are told at the end of every command.
"""

from __future__ import annotations

from twisted.internet import defer

from mailserver.imap import responses as R
from mailserver.imap import search as S
from mailserver.imap.arguments import fetch_items, search_keys, store_action
from mailserver.imap.fetch import implied_seen
from mailserver.imap.fetcher import FetchRequest
from mailserver.imap.grammar import ParseError, mailbox, sequence_set
from mailserver.imap.state import State

# Messages read for SEARCH per worker-thread call, at most, and octets.
SEARCH_BATCH = 256
SEARCH_BATCH_OCTETS = 4 * 1024 * 1024
# Messages up to this size are searched in memory, larger ones read in pieces.
SEARCH_WHOLE = 256 * 1024


def uid_set(uids: list[int]) -> str:
    """
    UIDs as a compact set (C{1:3,7}), for COPYUID.
    """
    out = []
    start = previous = None
    for uid in uids:
        if previous is not None and uid == previous + 1:
            previous = uid
            continue
        if start is not None:
            out.append(f"{start}:{previous}" if previous != start else str(start))
        start = previous = uid
    if start is not None:
        out.append(f"{start}:{previous}" if previous != start else str(start))
    return ",".join(out)


class SelectedHandlers:
    """
    Mixed into L{mailserver.imap.session.IMAPSession}.
    """

    def _messages(self, tag: str, numbers, uid: bool):
        view = self.view
        if uid:
            return view.by_uid(numbers)
        found = view.by_sequence(numbers)
        if found is None:
            raise ParseError("Invalid messageset")
        return found

    # FETCH.

    def do_FETCH(self, tag: str, args: tuple):
        return self._fetch(tag, args, uid=False)

    def do_UID_FETCH(self, tag: str, args: tuple):
        return self._fetch(tag, args, uid=True)

    def _fetch(self, tag: str, args: tuple, uid: bool):
        if len(args) != 2:
            raise ParseError("FETCH needs a sequence set and items")
        numbers = sequence_set(args[0])
        items = fetch_items(args[1])
        if uid and "UID" not in items:
            items.insert(0, "UID")
        messages = self._messages(tag, numbers, uid)
        view = self.view
        return FetchRequest(
            view=view,
            messages=messages,
            items=items,
            mark_seen=implied_seen(items) and not view.readonly,
            then=lambda expunged: self._fetched(tag, expunged),
        )

    def _fetched(self, tag: str, expunged: bool):
        if expunged:
            updates = self.view.updates(False) if self.view is not None else []
            return (*updates, R.no(tag, "Some of the requested messages no longer exist.", "EXPUNGEISSUED"))
        return self.done(tag, "Fetch completed.", expunges=False)

    # STORE (RFC 3501 6.4.6).

    def do_STORE(self, tag: str, args: tuple):
        return self._store(tag, args, uid=False)

    def do_UID_STORE(self, tag: str, args: tuple):
        return self._store(tag, args, uid=True)

    def _store(self, tag: str, args: tuple, uid: bool):
        if len(args) != 3:
            raise ParseError("STORE needs a sequence set, an item and flags")
        numbers = sequence_set(args[0])
        action = store_action(args[1], args[2])
        messages = self._messages(tag, numbers, uid)
        view = self.view
        if view.readonly:
            return R.no(tag, "Mailbox is read-only.", "READ-ONLY")
        flags = [flag for flag in action.flags if flag.lower() != "\\recent"]
        storing = view.folder.store([u for _, u in messages], action.mode, flags, view)

        def answer(_):
            # A new keyword's FLAGS comes before the FETCH that shows it.
            out = view.updates(False)
            if not action.silent:
                folder = view.folder
                for seq, message_uid in messages:
                    if folder.key(message_uid) is None:
                        continue
                    flag_text = R.flag_list(view.flags(message_uid))
                    if uid:
                        out.append(R.Untagged(b"%d FETCH (UID %d FLAGS %s)" % (seq, message_uid, flag_text)))
                    else:
                        out.append(R.Untagged(b"%d FETCH (FLAGS %s)" % (seq, flag_text)))
            return (*out, R.ok(tag, "Store completed."))

        return self.after(tag, storing, answer)

    # SEARCH (RFC 3501 6.4.4).

    def do_SEARCH(self, tag: str, args: tuple):
        return self._search(tag, args, uid=False)

    def do_UID_SEARCH(self, tag: str, args: tuple):
        return self._search(tag, args, uid=True)

    def _search(self, tag: str, args: tuple, uid: bool):
        charset, keys = search_keys(args)
        if charset not in (None, "US-ASCII", "UTF-8"):
            return R.no(tag, "Unsupported charset.", "BADCHARSET (US-ASCII UTF-8)")
        searching = defer.ensureDeferred(self._matching(keys))

        def answer(found):
            numbers = " ".join(str(c.uid if uid else c.seq) for c in found)
            line = R.Untagged(("SEARCH " + numbers).strip().encode("ascii"))
            return (line, self.done(tag, "Search completed.", expunges=False))

        return self.after(tag, searching, answer)

    async def _matching(self, keys) -> list:
        view = self.view
        folder = view.folder
        uids = list(view.uids)
        if S.needs_description(keys):
            await folder.describe(uids)
        largest = (len(uids), uids[-1] if uids else 0)
        candidates = [
            S.Candidate(
                seq, uid, folder.flags(uid), uid in view.recent, folder.size(uid),
                folder.internaldate(uid), largest,
            )
            for seq, uid in enumerate(uids, 1)
        ]
        if not S.needs_message(keys):
            return [c for c in candidates if all(S.matches(key, c) for key in keys)]
        found = []
        start = 0
        while start < len(candidates):
            batch = []
            octets = 0
            for candidate in candidates[start : start + SEARCH_BATCH]:
                batch.append(candidate)
                octets += min(max(candidate.size, 0), SEARCH_WHOLE)
                if octets >= SEARCH_BATCH_OCTETS:
                    break
            start += len(batch)
            contents = await folder.read([c.uid for c in batch], SEARCH_WHOLE)
            for candidate, (_, content) in zip(batch, contents):
                candidate.content = content
            found += await self.deps.run_blocking(S.matching, batch, keys)
        return found

    # COPY and MOVE (RFC 4315 COPYUID, RFC 6851).

    def do_COPY(self, tag: str, args: tuple):
        return self._transfer(tag, args, uid=False, move=False)

    def do_UID_COPY(self, tag: str, args: tuple):
        return self._transfer(tag, args, uid=True, move=False)

    def do_MOVE(self, tag: str, args: tuple):
        return self._transfer(tag, args, uid=False, move=True)

    def do_UID_MOVE(self, tag: str, args: tuple):
        return self._transfer(tag, args, uid=True, move=True)

    def _transfer(self, tag: str, args: tuple, uid: bool, move: bool):
        if len(args) != 2:
            raise ParseError("COPY needs a sequence set and a mailbox name")
        numbers = sequence_set(args[0])
        target = mailbox(args[1])
        messages = self._messages(tag, numbers, uid)
        view = self.view
        verb = "Move" if move else "Copy"
        if move and view.readonly:
            return R.no(tag, "Mailbox is read-only.", "READ-ONLY")
        if not messages:
            return self.done(tag, f"No messages found to {verb.lower()}.", expunges=move)
        moving = view.folder.transfer([u for _, u in messages], target, move, view)

        def answer(result):
            uidvalidity, pairs = result
            code = ""
            if pairs:
                sources = uid_set([source for source, _ in pairs])
                targets = uid_set([copy for _, copy in pairs])
                code = f"COPYUID {uidvalidity} {sources} {targets}"
            if not move:
                return self.done(tag, "Copy completed.", code)
            first = [R.untagged(f"OK [{code}] Moved UIDs.")] if code else []
            return (*first, self.done(tag, "Move completed."))

        return self.after(tag, moving, answer)

    # EXPUNGE, CLOSE, UNSELECT, CHECK.

    def _deleted(self, numbers=None) -> list[int]:
        view = self.view
        folder = view.folder
        uids = view.uids if numbers is None else [u for _, u in view.by_uid(numbers)]
        return [uid for uid in uids if "\\Deleted" in folder.flags(uid)]

    def do_EXPUNGE(self, tag: str, args: tuple):
        if args:
            raise ParseError("EXPUNGE takes no arguments")
        return self._expunge(tag, self._deleted())

    def do_UID_EXPUNGE(self, tag: str, args: tuple):
        if len(args) != 1:
            raise ParseError("UID EXPUNGE needs a UID set")
        return self._expunge(tag, self._deleted(sequence_set(args[0])))

    def _expunge(self, tag: str, uids: list[int]):
        view = self.view
        if view.readonly:
            return R.no(tag, "Mailbox is read-only.", "READ-ONLY")
        return self.after(
            tag, view.folder.expunge(uids, view), lambda _: self.done(tag, "Expunge completed.")
        )

    def do_CLOSE(self, tag: str, args: tuple):
        view = self.view
        if view.readonly:
            return self._closed(tag)
        expunging = view.folder.expunge(self._deleted(), view)
        return self.after(tag, expunging, lambda _: self._closed(tag))

    def _closed(self, tag: str):
        if self.view is not None:
            self.view.forget_expunges_silently()
        self._deselect()
        self.state = State.AUTHENTICATED
        return R.ok(tag, "Close completed.")

    def do_UNSELECT(self, tag: str, args: tuple):
        self._deselect()
        self.state = State.AUTHENTICATED
        return R.ok(tag, "Unselect completed.")

    def do_CHECK(self, tag: str, args: tuple):
        return self.after(tag, self.catch_up(), lambda _: self.done(tag, "Check completed."))
