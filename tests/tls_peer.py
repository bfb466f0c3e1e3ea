"""
TLS peers for the relay's TLS tests, on 127.0.0.1 with OS-chosen ports:

  - L{SMTPSink}: an SMTP server with STARTTLS (or TLS from the first byte)
    and AUTH PLAIN, with a given certificate, that records every line it
    receives, in the clear (C{"plain"}) or over TLS (C{"tls"});
  - L{policy_site}: an HTTPS server for MTA-STS policies
    (C{/.well-known/mta-sts.txt}) that records each request.

L{listen_smtp} and L{listen_https} run them in the calling process's reactor
(trial tests); L{SMTPSinkProcess} and L{PolicyServerProcess} run them as
child processes (end-to-end tests): this file as a script, C{python
tls_peer.py smtp|smtps|https <folder> <cert> <key>}, prints its port and
writes what it sees into the folder (C{lines.log}, C{N.json},
C{requests.log}; the policy served for a host is
C{<folder>/policy-<host>.txt}, read at each request).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.internet import ssl
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory


def server_options(cert: Path, key: Path) -> ssl.CertificateOptions:
    return ssl.PrivateCertificate.loadPEM(cert.read_bytes() + b"\n" + key.read_bytes()).options()


class SMTPSink(Factory):
    """
    @ivar lines: C{(state, line)} for every line received, C{state} being
        C{"plain"} or C{"tls"}.
    @ivar messages: C{(sender, recipients, data)} of each message taken.
    @ivar broken_tls: answer STARTTLS with 220 and the client's TLS hello
        with bytes that are not TLS, so the handshake fails.
    @ivar offer_starttls: whether EHLO offers STARTTLS.
    @ivar connections: connections accepted so far.
    @ivar rset_reply: the reply to RSET (C{None}: close the connection
        without one).
    """

    broken_tls = False
    offer_starttls = True
    rset_reply: str | None = "250 2.0.0 ok"
    # The reply to the next MAIL, once ("close": the connection closed
    # instead); None: accepted as usual.
    next_mail_reply: str | None = None

    def __init__(self, options, implicit: bool = False, folder: Path | None = None) -> None:
        self.options = options
        self.implicit = implicit
        self.folder = folder
        self.open = 0
        self.connections = 0
        self.protocols: list = []
        self.lines: list[tuple[str, str]] = []
        self.messages: list[tuple[str, list[str], bytes]] = []

    def buildProtocol(self, addr):
        return _SinkSMTP(self)

    def heard(self, state: str, line: str) -> None:
        self.lines.append((state, line))
        if self.folder is not None:
            with open(self.folder / "lines.log", "a", encoding="utf-8") as f:
                f.write(f"{state} {line}\n")

    def took(self, sender: str, recipients: list[str], data: bytes) -> None:
        self.messages.append((sender, recipients, data))
        if self.folder is not None:
            record = {"from": sender, "to": recipients, "data": base64.b64encode(data).decode()}
            tmp = self.folder / f"{len(self.messages)}.tmp"
            tmp.write_text(json.dumps(record))
            os.replace(tmp, tmp.with_suffix(".json"))


class _SinkSMTP(LineReceiver):
    delimiter = b"\r\n"

    def __init__(self, sink: SMTPSink) -> None:
        self.sink = sink
        self.tls = sink.implicit
        self.sender: str | None = None  # None: no transaction
        self.recipients: list[str] = []
        self.closing = False
        self.data: list[bytes] | None = None

    def reply(self, *lines: str) -> None:
        self.transport.write(b"".join(line.encode() + b"\r\n" for line in lines))

    def connectionMade(self) -> None:
        self.sink.open += 1
        self.sink.connections += 1
        self.sink.protocols.append(self)
        self.reply("220 sink.test ESMTP")

    def connectionLost(self, reason) -> None:
        self.sink.open -= 1

    def lineReceived(self, line: bytes) -> None:
        if self.closing:
            return  # what came after the connection was closed
        text = line.decode("utf-8", "replace")
        self.sink.heard("tls" if self.tls else "plain", text)
        if self.data is not None:
            if line != b".":
                self.data.append(line[1:] if line.startswith(b".") else line)
                return
            data, self.data = self.data, None
            self.sink.took(self.sender, self.recipients, b"".join(d + b"\r\n" for d in data))
            self.sender, self.recipients = None, []  # RFC 5321 4.1.1.4
            self.reply("250 2.0.0 taken")
            return
        verb = text[:4].upper()
        argument = text[5:]
        if verb == "EHLO":
            starttls = [] if self.tls or not self.sink.offer_starttls else ["250-STARTTLS"]
            self.reply("250-sink.test", "250-PIPELINING", *starttls, "250-AUTH PLAIN",
                       "250 8BITMIME")
        elif verb == "STAR" and self.sink.broken_tls:
            self.reply("220 2.0.0 go ahead")
            self.setRawMode()
        elif verb == "STAR":
            self.reply("220 2.0.0 go ahead")
            self.clearLineBuffer()
            self.transport.startTLS(self.sink.options)
            self.tls = True
        elif verb == "AUTH":
            self.reply("235 2.7.0 welcome")
        elif verb == "MAIL" and self.sink.next_mail_reply is not None:
            reply, self.sink.next_mail_reply = self.sink.next_mail_reply, None
            self.sender, self.recipients = None, []
            if reply != "close":
                self.reply(reply)
            if reply == "close" or reply.startswith("421"):
                self.closing = True
                self.transport.loseConnection()
        elif verb == "MAIL":
            self.sender = argument.partition("<")[2].partition(">")[0]
            self.recipients = []
            self.reply("250 2.1.0 ok")
        elif verb == "RCPT" and self.sender is None:
            self.reply("503 5.5.1 MAIL first")
        elif verb == "RCPT":
            self.recipients.append(argument.partition("<")[2].partition(">")[0])
            self.reply("250 2.1.5 ok")
        elif verb == "DATA" and not self.recipients:
            self.reply("554 5.5.1 no valid recipients")
        elif verb == "DATA":
            self.data = []
            self.reply("354 go ahead")
        elif verb == "RSET" and self.sink.rset_reply is None:
            self.transport.loseConnection()
        elif verb == "RSET":
            self.sender, self.recipients = None, []
            self.reply(self.sink.rset_reply)
            if self.sink.rset_reply.startswith("421"):
                self.transport.loseConnection()
        elif verb == "QUIT":
            self.reply("221 bye")
            self.transport.loseConnection()
        else:
            self.reply("250 ok")


    def rawDataReceived(self, data: bytes) -> None:
        # The client's hello, answered with what no TLS server would send.
        self.transport.write(b"this is not a TLS handshake\r\n")


def listen_smtp(reactor, cert: Path, key: Path, implicit: bool = False,
                folder: Path | None = None) -> tuple[int, SMTPSink, object]:
    """
    @return: C{(port, the L{SMTPSink}, the listening port to stop)}.
    """
    options = server_options(cert, key)
    sink = SMTPSink(options, implicit, folder)
    factory = TLSMemoryBIOFactory(options, False, sink) if implicit else sink
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return listening.getHost().port, sink, listening


def policy_site(policy, requests: list[str], folder: Path | None = None):
    """
    A site serving C{policy(host)} (bytes, or C{None} for a 404) at
    C{/.well-known/mta-sts.txt}, C{host} being the request's Host without
    a port.
    """
    from twisted.web import resource, server

    class Policy(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            host = (request.getHeader(b"host") or b"-").decode("ascii", "replace")
            requests.append(host)
            if folder is not None:
                with open(folder / "requests.log", "a", encoding="utf-8") as f:
                    f.write(host + "\n")
            body = policy(host.rpartition(":")[0] if ":" in host else host)
            if body is None:
                request.setResponseCode(404)
                return b"not here"
            request.setHeader(b"content-type", b"text/plain")
            return body

    root = resource.Resource()
    known = resource.Resource()
    root.putChild(b".well-known", known)
    known.putChild(b"mta-sts.txt", Policy())
    return server.Site(root)


def listen_https(reactor, cert: Path, key: Path, policy) -> tuple[int, list[str], object]:
    """
    @param policy: C{host -> bytes | None}.
    @return: C{(port, the hosts asked for, the listening port to stop)}.
    """
    requests: list[str] = []
    site = policy_site(policy, requests)
    listening = reactor.listenSSL(0, site, server_options(cert, key), interface="127.0.0.1")
    return listening.getHost().port, requests, listening


class _Child:
    def __init__(self, kind: str, folder: Path, cert: Path, key: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), kind, str(folder), str(cert),
             str(key)],
            stdout=subprocess.PIPE, text=True,
        )
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the {kind} peer did not start")
        self.port = int(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()


class SMTPSinkProcess(_Child):
    def __init__(self, folder: Path, cert: Path, key: Path, implicit: bool = False) -> None:
        super().__init__("smtps" if implicit else "smtp", folder, cert, key)

    @property
    def lines(self) -> list[tuple[str, str]]:
        log = self.folder / "lines.log"
        text = log.read_text(encoding="utf-8") if log.exists() else ""
        return [tuple(line.split(" ", 1)) for line in text.splitlines()]  # type: ignore[misc]

    @property
    def messages(self) -> list[tuple[str, list[str], bytes]]:
        out = []
        for path in sorted(self.folder.glob("*.json"), key=lambda p: int(p.stem)):
            record = json.loads(path.read_text())
            out.append((record["from"], record["to"], base64.b64decode(record["data"])))
        return out


class PolicyServerProcess(_Child):
    """
    Serves C{policies[host]} to requests for C{host} (written to
    C{<folder>/policy-<host>.txt}).
    """

    def __init__(self, folder: Path, cert: Path, key: Path, policies: dict[str, str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for host, text in policies.items():
            (folder / f"policy-{host}.txt").write_text(text)
        super().__init__("https", folder, cert, key)

    @property
    def requests(self) -> list[str]:
        log = self.folder / "requests.log"
        return log.read_text().split() if log.exists() else []


if __name__ == "__main__":
    from twisted.internet import reactor

    kind, folder, cert, key = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    if kind == "https":
        def policy(host: str) -> bytes | None:
            path = folder / f"policy-{host}.txt"
            return path.read_bytes() if "/" not in host and path.exists() else None

        site = policy_site(policy, [], folder)
        port = reactor.listenSSL(0, site, server_options(cert, key), interface="127.0.0.1")
    else:
        options = server_options(cert, key)
        sink = SMTPSink(options, kind == "smtps", folder)
        factory = TLSMemoryBIOFactory(options, False, sink) if kind == "smtps" else sink
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()
