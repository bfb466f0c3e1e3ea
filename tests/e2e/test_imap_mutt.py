"""
mutt, driven in tmux, reads a message over IMAP and moves it to Trash.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import smtplib
import subprocess
import time

import pytest

from harness import MailServer

pytestmark = pytest.mark.skipif(
    shutil.which("mutt") is None or shutil.which("tmux") is None,
    reason="mutt and tmux are not both installed",
)


class Terminal:
    def __init__(self, socket: str, env: dict[str, str]) -> None:
        self._socket = socket
        self._env = env

    def tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-f", "/dev/null", "-S", self._socket, *args],
            capture_output=True, text=True, env=self._env, timeout=30,
        )
        return result.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "mutt")

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never showed:\n{self.screen()}")
            time.sleep(0.2)

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "mutt", *keys)


def test_mutt_reads_and_moves_a_message(tmp_path):
    server = MailServer(tmp_path, roles=("smtp", "imap", "admin"))
    server.start()
    terminal = None
    try:
        server.add_user("bob@localhost", "bob-pw")
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as smtp:
            smtp.sendmail("a@example.com", ["bob@localhost"], b"Subject: read me in mutt\r\n\r\nhello mutt\r\n")
        home = tmp_path / "home"
        home.mkdir()
        (home / "muttrc").write_text(
            f'set folder="imap://bob%40localhost:bob-pw@127.0.0.1:{server.ports["imap"]}/"\n'
            'set spoolfile="+INBOX"\n'
            "set ssl_starttls=no\nset ssl_force_tls=no\n"  # loopback: plaintext is allowed
            'set record=""\nset confirmappend=no\nset confirmcreate=no\n'
            "set delete=yes\nset move=no\nset sleep_time=0\nset wait_key=no\n"
        )
        env = dict(os.environ, HOME=str(home), TERM="xterm")
        terminal = Terminal(str(tmp_path / "tmux.socket"), env)
        terminal.tmux("new-session", "-d", "-s", "mutt", "-x", "120", "-y", "40",
                      f"mutt -n -F {home / 'muttrc'}")
        terminal.wait_for("read me in mutt")
        terminal.keys("Enter")
        terminal.wait_for("hello mutt")
        terminal.keys("q")
        terminal.wait_for("read me in mutt")
        terminal.keys("s")
        terminal.wait_for("Save to mailbox")
        terminal.keys("C-u", "=Trash", "Enter")
        terminal.keys("$")  # sync: the saved message is expunged from INBOX
        terminal.wait_for("Msgs:0")
        terminal.keys("q")
        client = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
        client.login("bob@localhost", "bob-pw")
        assert client.select("INBOX")[1] == [b"0"]
        assert client.select("Trash")[1] == [b"1"]
        typ, data = client.uid("FETCH", "1", "(FLAGS BODY.PEEK[TEXT])")
        assert b"\\Seen" in data[0][0] and data[0][1] == b"hello mutt\r\n"
        client.logout()
    finally:
        if terminal is not None:
            terminal.tmux("kill-server")
        server.stop()
