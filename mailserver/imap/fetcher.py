"""
Answering a FETCH (the glue's part of it): the messages' files are read a
batch at a time in a worker thread (through the folder), parsed there
when an item needs their structure (once: parsed structures are cached
for every session), and the responses written as the client reads them.
A large message's text is never held whole: it is read, turned into CRLF
form and sent a piece at a time, each piece read in a worker thread.

While it runs, the L{Fetcher} is the transport's producer: when the
client stops reading, it stops (the transport pauses it) and goes on when
the client has caught up, so a FETCH of a whole large folder holds about
one batch in memory, not the folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from mailserver.imap import mime
from mailserver.imap.fetch import (
    SEPARATE,
    Message,
    Stream,
    needs_structure,
    needs_text,
    quick,
    render,
    render_quick,
)
from mailserver.imap.responses import flag_list
from mailserver.wire.flow import BUSY

# Messages smaller than this are read whole and sent from memory.
WHOLE_MESSAGE = 256 * 1024
# Messages per batch when their text is read, and when it is not.
TEXT_BATCH = 64
PLAIN_BATCH = 2000
# A batch of text stops growing past this many octets.
BATCH_OCTETS = 1024 * 1024
CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchRequest:
    """
    What a FETCH handler asks of the glue.

    @ivar messages: (sequence number, UID) pairs.
    @ivar mark_seen: set \\Seen on the messages first (a BODY[] fetch).
    @ivar then: told whether some messages were gone; returns the
        result that ends the command.
    """

    view: object
    messages: list
    items: list
    mark_seen: bool
    then: Callable[[bool], object]


class Gone(Exception):
    """
    The connection went away during the fetch.
    """


def wire_form(data: bytes) -> bytes:
    """
    Stored text as it is sent: CRLF line ends, and NUL (which RFC 3501's
    literals cannot hold) as 0x80, as Dovecot sends it; sizes do not change
    but for the CRs.
    """
    return data.replace(b"\n", b"\r\n").replace(b"\x00", b"\x80")


def _prepare(contents: list, cached: dict, want_structure: bool) -> list:
    """
    In a worker thread: each message's CRLF text (if small) and structure.
    """
    out = []
    for uid, content in contents:
        structure = cached.get(uid)
        if content is None:
            out.append((uid, None, None, None))
        elif isinstance(content, bytes):
            if want_structure and structure is None:
                structure = mime.parse_bytes(content)
            out.append((uid, wire_form(content), None, structure))
        else:
            if want_structure and structure is None:
                structure = mime.parse(content)
            out.append((uid, None, content, structure))
    return out


def _read_piece(source, start_lf: int | None, size: int) -> bytes:
    if start_lf is not None:
        source.seek(start_lf)
    return wire_form(source.read(size))


@implementer(IPushProducer)
class Fetcher:
    log = Logger()

    def __init__(self, lines, run_blocking, structures) -> None:
        self._lines = lines
        self._run_blocking = run_blocking
        self._structures = structures
        self._paused = False
        self._resumed: defer.Deferred | None = None
        self._stopped = False
        self._open: list = []

    # IPushProducer, while a fetch runs.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiting, self._resumed = self._resumed, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        self.resumeProducing()

    async def _writable(self) -> None:
        if self._stopped or self._lines.closed:
            raise Gone()
        if self._paused:
            self._resumed = defer.Deferred()
            await self._resumed
            if self._stopped or self._lines.closed:
                raise Gone()

    # The fetch.

    def run(self, requests: list[FetchRequest], perform: Callable[[object], None]) -> defer.Deferred:
        """
        Answer the FETCH commands of a turn, in order: each one's responses,
        then C{perform} of its C{then} result.  Fires when all are answered
        (or the connection went).
        """
        return defer.ensureDeferred(self._run(requests, perform))

    async def _run(self, requests: list[FetchRequest], perform) -> None:
        lines = self._lines
        transport = lines.transport
        lines.flush()
        lines.stop_idle()  # a long download is not idleness
        lines.reads.hold(BUSY)
        lines.reads.detach()
        transport.registerProducer(self, True)
        try:
            await self._answer(requests, perform)
        except Gone:
            return
        finally:
            self._close_open()
            if not self._stopped and not lines.closed:
                transport.unregisterProducer()
                lines.reads.attach()
                lines.reads.release(BUSY)
                lines.restart_idle()

    async def _answer(self, requests: list[FetchRequest], perform) -> None:
        view = requests[0].view
        folder = view.folder
        # The messages of every request, gone ones left out.
        work = []
        expunged = [False] * len(requests)
        for index, request in enumerate(requests):
            for seq, uid in request.messages:
                if folder.key(uid) is None:
                    expunged[index] = True
                else:
                    work.append((index, seq, uid))
        # One job sets \Seen for all the turn's fetches, one learns sizes
        # and dates: a fetch of one message per command is not a job each.
        seen_now: set[int] = set()
        unseen = list(dict.fromkeys(
            uid for index, _, uid in work
            if requests[index].mark_seen and "\\Seen" not in folder.flags(uid)
        ))
        if unseen:
            seen_now = set(await folder.store(unseen, "+", ["\\Seen"], view))
        described = [
            uid for index, _, uid in work
            if "RFC822.SIZE" in requests[index].items or "INTERNALDATE" in requests[index].items
        ]
        if described:
            await folder.describe(described)
        items = [request.items for request in requests]
        with_flags = [i if "FLAGS" in i else [*i, "FLAGS"] for i in items]
        reads = [needs_text(i) or needs_structure(i) for i in items]
        structure = [needs_structure(i) for i in items]
        quick_items = [quick(i) for i in items]
        flag_lists: dict[tuple, bytes] = {}  # each set of flags written once
        position = done = 0
        while position < len(work):
            batch = self._batch(work, position, folder, reads)
            position += len(batch)
            wanted = [uid for index, _, uid in batch if reads[index]]
            prepared = await self._read(folder, wanted, any(structure[i] for i, _, _ in batch)) if wanted else {}
            for index, seq, uid in batch:
                while done < index:  # every message of the requests before is out
                    perform(requests[done].then(expunged[done]))
                    done += 1
                if quick_items[index]:
                    flags = tuple(view.flags(uid))
                    written = flag_lists.get(flags)
                    if written is None:
                        written = flag_lists[flags] = flag_list(flags)
                    chosen = with_flags[index] if uid in seen_now else items[index]
                    self._lines.send(render_quick(seq, uid, chosen, written))
                    continue
                wire = source = parsed = None
                if reads[index]:
                    wire, source, parsed = prepared.get(uid, (None, None, None))
                    if wire is None and source is None:
                        expunged[index] = True  # gone since the list was made
                        continue
                message = Message(
                    seq, uid, view.flags(uid), folder.size(uid), folder.internaldate(uid), parsed, wire,
                )
                for piece in render(message, with_flags[index] if uid in seen_now else items[index]):
                    if isinstance(piece, Stream):
                        await self._stream(source, piece)
                    elif isinstance(piece, memoryview) or len(piece) >= SEPARATE:
                        await self._send_view(memoryview(piece))
                    else:
                        self._lines.send(piece)
            self._close_open()
            self._lines.flush()
            await self._writable()
        while done < len(requests):
            perform(requests[done].then(expunged[done]))
            done += 1

    def _batch(self, work, position: int, folder, reads: list[bool]):
        batch = []
        octets = 0
        limit = PLAIN_BATCH
        for entry in work[position:]:
            if len(batch) >= limit:
                break
            batch.append(entry)
            if reads[entry[0]]:
                limit = TEXT_BATCH
                octets += max(folder.size(entry[2]), 0)
                if octets >= BATCH_OCTETS:
                    break
        return batch

    async def _read(self, folder, uids: list[int], structure: bool) -> dict:
        """
        The messages' CRLF text (small ones), open files (large ones) and
        structures (when asked for): one read in a worker thread, and a
        parse there only for structures not cached yet.
        """
        uids = list(dict.fromkeys(uids))
        contents = await folder.read(uids, WHOLE_MESSAGE)
        self._open = [c for _, c in contents if c is not None and not isinstance(c, bytes)]
        keys = {uid: folder.key(uid) for uid in uids}
        cached = {}
        if structure:
            for uid, key in keys.items():
                part = self._structures.get(key) if key is not None else None
                if part is not None:
                    cached[uid] = part
        if structure and len(cached) < len(contents):
            prepared = await self._run_blocking(_prepare, contents, cached, True)
            for uid, _, _, parsed in prepared:
                if parsed is not None and uid not in cached and keys.get(uid) is not None:
                    self._structures.put(keys[uid], parsed)
        else:
            prepared = _prepare(contents, cached, False)  # CRLF form only: quick
        return {uid: (wire, source, parsed) for uid, wire, source, parsed in prepared}

    async def _stream(self, source, stream: Stream) -> None:
        """
        Send a large message's section from its file.
        """
        lines = self._lines
        lines.flush()
        skip, left = stream.skip, stream.length
        start: int | None = stream.start_lf
        while left > 0:
            await self._writable()
            piece = await self._run_blocking(_read_piece, source, start, CHUNK)
            start = None
            if not piece:
                break
            if skip:
                taken = min(skip, len(piece))
                piece, skip = piece[taken:], skip - taken
            piece = piece[:left]
            left -= len(piece)
            if piece:
                lines.transport.write(piece)
        if left > 0:  # the file was shorter than its name said: keep the count right
            lines.transport.write(b" " * left)

    async def _send_view(self, view: memoryview) -> None:
        """
        Send a large section of a message held in memory, a chunk at a
        time as the client takes them.
        """
        lines = self._lines
        lines.flush()
        for start in range(0, len(view), CHUNK):
            await self._writable()
            lines.transport.write(bytes(view[start : start + CHUNK]))

    def _close_open(self) -> None:
        for source in self._open:
            source.close()
        self._open = []
