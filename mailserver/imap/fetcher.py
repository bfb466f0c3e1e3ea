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
from mailserver.imap.fetch import Message, Stream, needs_structure, needs_text, render
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
            out.append((uid, content.replace(b"\n", b"\r\n"), None, structure))
        else:
            if want_structure and structure is None:
                structure = mime.parse(content)
            out.append((uid, None, content, structure))
    return out


def _read_piece(source, start_lf: int | None, size: int) -> bytes:
    if start_lf is not None:
        source.seek(start_lf)
    return source.read(size).replace(b"\n", b"\r\n")


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

    def run(self, request: FetchRequest) -> defer.Deferred:
        """
        Answer the request; fires with C{then}'s result, or C{None} if the
        connection went.
        """
        return defer.ensureDeferred(self._run(request))

    async def _run(self, request: FetchRequest):
        lines = self._lines
        transport = lines.transport
        lines.flush()
        lines.stop_idle()  # a long download is not idleness
        lines.reads.hold(BUSY)
        lines.reads.detach()
        transport.registerProducer(self, True)
        try:
            expunged = await self._answer(request)
        except Gone:
            return None
        finally:
            self._close_open()
            if not self._stopped and not lines.closed:
                transport.unregisterProducer()
                lines.reads.attach()
                lines.reads.release(BUSY)
                lines.restart_idle()
        return request.then(expunged)

    async def _answer(self, request: FetchRequest) -> bool:
        view = request.view
        folder = view.folder
        items = list(request.items)
        present = [(seq, uid) for seq, uid in request.messages if folder.key(uid) is not None]
        expunged = len(present) < len(request.messages)
        uids = [uid for _, uid in present]
        seen_now: set[int] = set()
        if request.mark_seen:
            unseen = [uid for uid in uids if "\\Seen" not in folder.flags(uid)]
            if unseen:
                seen_now = set(await folder.store(unseen, "+", ["\\Seen"], view))
        if "RFC822.SIZE" in items or "INTERNALDATE" in items:
            await folder.describe(uids)
        text, structure = needs_text(items), needs_structure(items)
        with_flags = items if "FLAGS" in items else [*items, "FLAGS"]
        position = 0
        while position < len(present):
            batch = self._batch(present, position, folder, text or structure)
            position += len(batch)
            prepared = await self._read(folder, batch, text or structure, structure)
            for (seq, uid), (_, wire, source, parsed) in zip(batch, prepared):
                if wire is None and source is None and (text or structure):
                    expunged = True  # gone since the list was made
                    continue
                message = Message(
                    seq, uid, view.flags(uid), folder.size(uid), folder.internaldate(uid),
                    parsed, wire,
                )
                for piece in render(message, with_flags if uid in seen_now else items):
                    if isinstance(piece, Stream):
                        await self._stream(source, piece)
                    else:
                        self._lines.send(piece)
            self._close_open()
            self._lines.flush()
            await self._writable()
        return expunged

    def _batch(self, present, position: int, folder, reads: bool):
        if not reads:
            return present[position : position + PLAIN_BATCH]
        batch = []
        octets = 0
        for seq, uid in present[position : position + TEXT_BATCH]:
            batch.append((seq, uid))
            octets += max(folder.size(uid), 0)
            if octets >= BATCH_OCTETS:
                break
        return batch

    async def _read(self, folder, batch, reads: bool, structure: bool) -> list:
        if not reads:
            return [(uid, None, None, None) for _, uid in batch]
        uids = [uid for _, uid in batch]
        contents = await folder.read(uids, WHOLE_MESSAGE)
        self._open = [content for _, content in contents if content is not None and not isinstance(content, bytes)]
        keys = {uid: folder.key(uid) for uid in uids}
        cached = {uid: self._structures.get(key) for uid, key in keys.items() if key is not None}
        cached = {uid: part for uid, part in cached.items() if part is not None}
        prepared = await self._run_blocking(_prepare, contents, cached, structure)
        if structure:
            for uid, _, _, parsed in prepared:
                if parsed is not None and uid not in cached and keys.get(uid) is not None:
                    self._structures.put(keys[uid], parsed)
        return prepared

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

    def _close_open(self) -> None:
        for source in self._open:
            source.close()
        self._open = []
