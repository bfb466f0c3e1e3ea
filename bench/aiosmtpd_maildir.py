"""
The durable aiosmtpd peer: an aiosmtpd SMTP server whose handler writes each
message into a Maildir and makes it durable before answering 250.

Per message: write the LF-form message to C{tmp/<unique>} (O_EXCL), fsync
the file, rename it into C{new/<unique>,S=<lf size>,W=<crlf size>}, fsync
C{new/}.  By default that work runs in the event loop's default thread pool
(C{--deliver thread}) so fsyncs of concurrent messages overlap, as a
competent aiosmtpd deployment would do; C{--deliver inline} blocks the loop
instead (one fsync at a time).

Run by L{bench.peers.AiosmtpdPeer}; stand-alone::

    .venv/bin/python bench/aiosmtpd_maildir.py --maildir /tmp/m --port-file /tmp/m.port
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
import time

from aiosmtpd.smtp import SMTP


class MaildirHandler:
    def __init__(self, maildir: str, deliver: str) -> None:
        self.maildir = maildir
        self.deliver_mode = deliver
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)
        self._counter = itertools.count(1)
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")
        self._new_dir = os.path.join(maildir, "new")

    def _unique(self) -> str:
        now = time.time()
        return f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{next(self._counter)}.{self._host}"

    def deliver(self, content: bytes) -> None:
        data = content.replace(b"\r\n", b"\n")
        crlf_size = len(data) + data.count(b"\n")
        name = self._unique()
        tmp = os.path.join(self.maildir, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self._new_dir, f"{name},S={len(data)},W={crlf_size}"))
        dfd = os.open(self._new_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    async def handle_DATA(self, server, session, envelope) -> str:
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        try:
            if self.deliver_mode == "thread":
                await asyncio.get_running_loop().run_in_executor(None, self.deliver, content)
            else:
                self.deliver(content)
        except OSError as e:
            return f"451 4.3.0 delivery failed: {e}"
        return "250 2.0.0 OK"


async def serve(maildir: str, port_file: str, deliver: str) -> None:
    loop = asyncio.get_running_loop()
    handler = MaildirHandler(maildir, deliver)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.bench", decode_data=False),
        host="127.0.0.1",
        port=0,
        backlog=1024,
    )
    port = server.sockets[0].getsockname()[1]
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:  # noqa: ASYNC230 - once, at start-up
        f.write(str(port))
    os.replace(tmp, port_file)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--maildir", required=True)
    p.add_argument("--port-file", required=True)
    p.add_argument("--deliver", choices=["thread", "inline"], default="thread")
    args = p.parse_args()
    asyncio.run(serve(args.maildir, args.port_file, args.deliver))


if __name__ == "__main__":
    main()
