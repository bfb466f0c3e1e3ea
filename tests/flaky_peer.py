"""
A real SMTP server on 127.0.0.1, written on Twisted, that misbehaves as
scripted, for the relay's fault tests.  Connection I{n} gets the I{n}-th
behaviour of the script, the last one repeating; C{["drop-in-data", "ok"]}
breaks the first attempt and takes the second:

  - C{ok}: a plain ESMTP server with PIPELINING;
  - C{silent}: accepts the connection and never says a word;
  - C{stall-after-dot}: takes the whole message, never answers the final dot;
  - C{drop-in-data}: resets the connection at the first line of the body;
  - C{421}: answers MAIL with C{421} and closes the connection;
  - C{garbage}: answers EHLO with a line that is not an SMTP reply.

Only messages answered with 250 are kept.  L{listen} runs it in the calling
process's reactor; L{PeerProcess} runs it as a child (this file as a
script: C{python flaky_peer.py '<script json>' <folder>}), which prints its
port and writes each message it takes into the folder.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

BEHAVIOURS = ("ok", "silent", "stall-after-dot", "drop-in-data", "421", "garbage")


class Peer(Factory):
    """
    @ivar messages: C{(sender, recipients, data)} of each message taken
        (data with CRLF line ends, dots unstuffed).
    @ivar connections: the behaviour each connection got, in order.
    """

    def __init__(self, script: list[str], folder: Path | None = None) -> None:
        assert script and all(b in BEHAVIOURS for b in script), script
        self.script = list(script)
        self.folder = folder
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.connections: list[str] = []

    def buildProtocol(self, addr):
        behaviour = self.script[min(len(self.connections), len(self.script) - 1)]
        self.connections.append(behaviour)
        self._note("connections.log", behaviour + "\n")
        return ScriptedSMTP(self, behaviour)

    def took(self, sender: str, recipients: list[str], data: bytes) -> None:
        self.messages.append((sender, recipients, data))
        if self.folder is not None:
            record = {"from": sender, "to": recipients, "data": base64.b64encode(data).decode()}
            tmp = self.folder / f"{len(self.messages)}.tmp"
            tmp.write_text(json.dumps(record))
            os.replace(tmp, tmp.with_suffix(".json"))  # whole, for the reading test

    def _note(self, name: str, text: str) -> None:
        if self.folder is not None:
            with open(self.folder / name, "a", encoding="utf-8") as f:
                f.write(text)


class ScriptedSMTP(LineReceiver):
    delimiter = b"\r\n"

    def __init__(self, peer: Peer, behaviour: str) -> None:
        self.peer = peer
        self.behaviour = behaviour
        self.sender = ""
        self.recipients: list[str] = []
        self.data: list[bytes] | None = None

    def reply(self, *lines: str) -> None:
        self.transport.write(b"".join(line.encode() + b"\r\n" for line in lines))

    def connectionMade(self) -> None:
        if self.behaviour != "silent":
            self.reply("220 peer.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self.behaviour == "silent":
            return
        if self.data is not None:
            self.body_line(line)
            return
        verb = line[:4].upper()
        argument = line[5:].decode("utf-8", "replace")
        if verb == b"EHLO":
            if self.behaviour == "garbage":
                self.transport.write(b"Hello!  I am not a mail server.\r\n")
                return
            self.reply("250-peer.test", "250-PIPELINING", "250 8BITMIME")
        elif verb == b"HELO":
            self.reply("250 peer.test")
        elif verb == b"MAIL":
            if self.behaviour == "421":
                self.reply("421 4.3.2 peer.test shutting down")
                self.transport.loseConnection()
                return
            self.sender = argument.partition("<")[2].partition(">")[0]
            self.recipients = []
            self.reply("250 2.1.0 ok")
        elif verb == b"RCPT":
            self.recipients.append(argument.partition("<")[2].partition(">")[0])
            self.reply("250 2.1.5 ok")
        elif verb == b"DATA":
            if not self.recipients:
                self.reply("503 5.5.1 no recipients")
                return
            self.data = []
            self.reply("354 go ahead")
        elif verb in (b"RSET", b"NOOP"):
            self.reply("250 ok")
        elif verb == b"QUIT":
            self.reply("221 bye")
            self.transport.loseConnection()
        else:
            self.reply("500 5.5.2 what?")

    def body_line(self, line: bytes) -> None:
        if self.behaviour == "drop-in-data":
            self.transport.abortConnection()
            return
        if line != b".":
            self.data.append(line[1:] if line.startswith(b".") else line)
            return
        data, self.data = self.data, None
        if self.behaviour == "stall-after-dot":
            return
        self.peer.took(self.sender, self.recipients, b"".join(d + b"\r\n" for d in data))
        self.reply("250 2.0.0 taken")


def listen(reactor, script: list[str], folder: Path | None = None) -> tuple[int, Peer, object]:
    """
    Serve on a free port of 127.0.0.1.

    @return: C{(port, the L{Peer}, the listening port to stop)}.
    """
    peer = Peer(script, folder)
    listening = reactor.listenTCP(0, peer, interface="127.0.0.1")
    return listening.getHost().port, peer, listening


class PeerProcess:
    """
    The peer as a child process; what it took is read back from C{folder}.
    """

    def __init__(self, script: list[str], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), json.dumps(script), str(folder)],
            stdout=subprocess.PIPE, text=True,
        )
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError("the SMTP peer did not start")
        self.port = int(line)

    @property
    def connections(self) -> list[str]:
        log = self.folder / "connections.log"
        return log.read_text().split() if log.exists() else []

    @property
    def messages(self) -> list[tuple[str, list[str], bytes]]:
        out = []
        for path in sorted(self.folder.glob("*.json"), key=lambda p: int(p.stem)):
            record = json.loads(path.read_text())
            out.append((record["from"], record["to"], base64.b64decode(record["data"])))
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()


if __name__ == "__main__":
    from twisted.internet import reactor

    port, _, _ = listen(reactor, json.loads(sys.argv[1]), Path(sys.argv[2]))
    print(port, flush=True)
    reactor.run()
