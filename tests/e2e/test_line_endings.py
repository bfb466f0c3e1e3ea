"""
Mail with Unix line endings through the real server (issue 21, must show
1): Python's own C{smtplib.sendmail(msg.as_bytes())} and C{curl -T} of a
Unix text file are accepted; the Maildir holds the message with one line
end per line, and POP3 serves it in the CRLF form, byte for byte.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
from email.message import EmailMessage

import pytest

from test_core import without_trace


def retrieve_raw(server, user: str, password: str) -> bytes:
    """
    RETR 1 as the octets on the wire, un-stuffed, without the final dot:
    no client library's line handling in between.
    """
    with socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=30) as sock:
        sock.sendall(f"USER {user}\r\nPASS {password}\r\nRETR 1\r\nQUIT\r\n".encode())
        data = b""
        while not data.endswith(b"+OK Bye\r\n") and b"-ERR" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    start = 0
    for _ in range(4):  # the greeting, USER's, PASS's and RETR's replies
        assert data[start:start + 3] == b"+OK", data[:500]
        start = data.index(b"\r\n", start) + 2
    end = data.index(b"\r\n.\r\n", start - 2) + 2
    return data[start:end].replace(b"\r\n..", b"\r\n.")


def stored_files(server, address: str) -> list[bytes]:
    maildir = server.maildir(address)
    return [path.read_bytes() for folder in ("new", "cur")
            for path in sorted((maildir / folder).iterdir())]


@pytest.fixture
def bob(server):
    server.add_user("bob@localhost", "bob-pw")
    return server


def test_smtplib_sendmail_of_as_bytes_with_lf_line_ends(bob):
    message = EmailMessage()
    message["From"] = "alice@example.com"
    message["To"] = "bob@localhost"
    message["Subject"] = "written by the email package"
    message.set_content("First line.\n.\nA line that was a lone dot, and one that starts with one:\n"
                        ".hidden\nLast line.\n")
    data = message.as_bytes()
    assert b"\r" not in data and b"\n.\n" in data  # what smtplib sends as it is
    with smtplib.SMTP("127.0.0.1", bob.ports["smtp"], timeout=30) as client:
        refused = client.sendmail("alice@example.com", ["bob@localhost"], data)
    assert refused == {}
    [stored] = stored_files(bob, "bob@localhost")
    assert stored.endswith(b"\n\n" + data.split(b"\n\n", 1)[1] + b"\n") and b"\r" not in stored
    served = retrieve_raw(bob, "bob@localhost", "bob-pw")
    # smtplib ends the text with a CRLF of its own, as it does not end in one.
    assert without_trace(served) == data.replace(b"\n", b"\r\n") + b"\r\n"
    assert served == stored.replace(b"\n", b"\r\n")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_upload_of_a_unix_text_file(bob, tmp_path):
    note = tmp_path / "note.txt"
    text = (b"From: alice@example.com\nTo: bob@localhost\nSubject: a note\n\n"
            b"Written with an editor on Unix.\n.\nA lone dot above.\nEnd.\n")
    note.write_bytes(text)
    result = subprocess.run(
        ["curl", "--silent", "--show-error", f"smtp://127.0.0.1:{bob.ports['smtp']}",
         "--mail-from", "alice@example.com", "--mail-rcpt", "bob@localhost", "-T", str(note)],
        capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    served = retrieve_raw(bob, "bob@localhost", "bob-pw")
    # curl sends the file as it is (it stuffs dots only after a CRLF: the
    # lone dot goes out unstuffed, after a bare LF, so it is no end of
    # DATA) and ends it with a CRLF of its own.
    assert without_trace(served) == text.replace(b"\n", b"\r\n") + b"\r\n"
    [stored] = stored_files(bob, "bob@localhost")
    assert served == stored.replace(b"\n", b"\r\n") and b"\r" not in stored
