"""
The console script as a person uses it: passwords from a pipe or a
terminal, run from whatever folder, and a clone that stays clean.
"""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness import BIN, REPO, environment


def cli(cwd: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mailserver"), *args],
        cwd=cwd,
        env=environment(),
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # no controlling terminal, as under cron or in CI
    )


def test_a_piped_password_without_password_stdin_is_one_clear_line(tmp_path):
    result = cli(tmp_path, "user", "add", "bob@localhost", input="secret\n")
    assert result.returncode == 1
    assert result.stderr == (
        "mailserver: standard input is not a terminal: "
        "give the password on it with --password-stdin\n"
    )
    assert not (tmp_path / "mailserver-data" / "users").exists()


def _run_on_a_terminal(cwd: Path, argv: list[str], keys: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """
    Run C{argv} on a new pseudo-terminal; each time its output ends with
    a prompt of C{keys}, type what goes with it.  Returns the exit status
    and everything it showed.
    """
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        try:
            os.chdir(cwd)
            os.execve(argv[0], argv, environment())
        finally:
            os._exit(127)
    shown = b""
    pending = list(keys)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            shown += data
            if pending and shown.rstrip().endswith(pending[0][0]):
                os.write(fd, pending.pop(0)[1])
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), shown


def test_ctrl_d_at_the_password_prompt_is_one_clear_line(tmp_path):
    code, shown = _run_on_a_terminal(
        tmp_path, [str(BIN / "mailserver"), "user", "add", "bob@localhost"], [(b"Password:", b"\x04")]
    )
    assert code == 1, shown
    assert b"Traceback" not in shown and b"Warning" not in shown, shown
    assert shown.strip().endswith(b"mailserver: no password given (end of input at the prompt)"), shown


def test_a_password_typed_twice_at_the_prompt_adds_the_account(tmp_path):
    code, shown = _run_on_a_terminal(
        tmp_path,
        [str(BIN / "mailserver"), "user", "add", "bob@localhost"],
        [(b"Password:", b"s3cret\n"), (b"Again:", b"s3cret\n")],
    )
    assert code == 0, shown
    assert b"added bob@localhost" in shown
    assert b"s3cret" not in shown  # not echoed
    assert "bob@localhost:scrypt$" in (tmp_path / "mailserver-data" / "users").read_text()


def test_the_cli_says_which_data_folder_it_made_and_used(tmp_path):
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    data = elsewhere / "mailserver-data"
    first = cli(elsewhere, "user", "add", "bob@localhost", "--password-stdin", input="pw\n")
    assert first.returncode == 0, first.stderr
    assert first.stderr == f"mailserver: made the data folder {data}\n"
    assert first.stdout == f"added bob@localhost to {data / 'users'}\n"
    second = cli(elsewhere, "user", "add", "carol@localhost", "--password-stdin", input="pw\n")
    assert second.returncode == 0 and second.stderr == ""  # it exists now: nothing to say
    assert second.stdout == f"added carol@localhost to {data / 'users'}\n"
    # Commands that only read make nothing.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert cli(fresh, "user", "list").stderr == ""
    assert not (fresh / "mailserver-data").exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_twistds_pid_file_is_ignored_by_git():
    """
    Plain C{twistd -n mailserver} writes C{twistd.pid} in the working folder
    (twistd's default; the server keeps its own in the data folder).
    """
    result = subprocess.run(
        ["git", "check-ignore", "--quiet", "--no-index", "twistd.pid"], cwd=REPO, capture_output=True
    )
    if result.returncode == 128:
        pytest.skip("not a git checkout")
    assert result.returncode == 0
