"""
Deploying the real server as an operator would: C{twistd --uid/--gid} on
ports below 1024 with every file in the data folder the server user's,
systemd socket activation, the start-up block, and a self-signed
certificate that C{curl --cacert} verifies for 127.0.0.1.
"""

from __future__ import annotations

import grp
import os
import poplib
import pwd
import random
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import mailserver
from harness import BIN, REPO, MailServer, environment
from test_core import MESSAGE, without_trace

from mailserver.message_ids import writer_pid

LOW_PORTS = {"smtp": 25, "submissions": 465, "submission": 587, "pop3": 110, "pop3s": 995}
USER = "nobody"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="binds ports below 1024 and drops privileges: needs root (CI runs as root)"
)


def _free_loopback_address() -> str:
    """
    A 127.x.y.z address on which every port of L{LOW_PORTS} is free.
    """
    for _ in range(50):
        host = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(2, 254)}"
        try:
            for port in LOW_PORTS.values():
                with socket.socket() as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        return host
    pytest.skip("no loopback address with ports 25, 465, 587, 110 and 995 free")


def _server_user() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no user {USER!r} to run the server as")
    return entry.pw_uid, entry.pw_gid


def _python_for(uid: int, gid: int, world: Path) -> str:
    """
    An interpreter the server user can run the whole server with: the test's
    own, or the system's of the same version when the test's lives where
    that user cannot read (a Python built under /root, say), with the test
    environment's packages.  Modules the server imports late must be
    readable after the drop as well as before.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, f"/usr/bin/python{version}"]
    problems = []
    for python in candidates:
        if not Path(python).exists():
            continue
        try:
            result = subprocess.run(
                [python, "-s", "-c", "import mailserver.service, mailserver.cli,"
                 " twisted.scripts.twistd, treq, mimetypes, email.parser, OpenSSL.SSL"],
                env=_environment(), cwd=world, user=uid, group=gid, extra_groups=[],
                capture_output=True, text=True, timeout=60,
            )
        except OSError as e:
            problems.append(f"{python}: {e.strerror}")
            continue
        if result.returncode == 0:
            return python
        problems.append(f"{python}: {result.stderr.strip().splitlines()[-1:]}")
    pytest.skip(f"no Python that {USER} can run the server with ({'; '.join(problems)})")


def _environment() -> dict[str, str]:
    import site

    env = environment()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], *site.getsitepackages()])
    return env


def _owners(folder: Path) -> dict[str, int]:
    found = {str(folder): folder.lstat().st_uid}
    for path in folder.rglob("*"):
        found[str(path)] = path.lstat().st_uid
    return found


def _process_uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return int(line.split()[2])  # effective


@pytest.fixture
def world(tmp_path):
    """
    A folder the server user can reach (pytest's own are root's alone).
    """
    folder = Path(tempfile.mkdtemp(prefix="mailserver-uid-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _send_until_processes_deliver(host: str, mailbox: Path, processes: int) -> int:
    """
    Send messages on port 25 until C{processes} different processes have
    delivered one (Maildir names carry the writer's pid); how many were sent.
    """
    writers: set[int | None] = set()
    sent = 0
    deadline = time.monotonic() + 30
    while len(writers) < processes and time.monotonic() < deadline:
        with smtplib.SMTP(host, 25, timeout=30) as client:
            client.sendmail("alice@example.com", ["bob@localhost"], MESSAGE + f"n {sent}\r\n".encode())
        sent += 1
        writers = {writer_pid(p.name) for p in (mailbox / "new").iterdir()}
    assert len(writers) == processes, writers
    return sent


@needs_root
@pytest.mark.parametrize("workers", [1, 2])
def test_twistd_uid_gid_on_ports_below_1024_leaves_every_file_to_the_server_user(
    tmp_path, world, workers
):
    uid, gid = _server_user()
    python = _python_for(uid, gid, world)
    host = _free_loopback_address()
    launcher = world / "run_twistd.py"
    launcher.write_text("from twisted.scripts.twistd import run\nrun()\n")
    # Worker processes read the configuration as the server user.
    server = MailServer(
        world,
        data_path=world / "data",
        roles=("admin",),
        endpoints={role: f"tcp:{port}:interface={host}" for role, port in LOW_PORTS.items()},
        extra_toml=f"workers = {workers}\n",
        twistd=[python, "-s", str(launcher)],
        twistd_options=("--uid", str(uid), "--gid", str(gid)),
        cli=[python, "-s", "-m", "mailserver.cli"],
        env=_environment(),
    )
    server.start()
    try:
        # The operator adds an account as root: the CLI does it as the owner.
        server.add_user("bob@localhost", "bob-password")
        assert _process_uid(server.process.pid) == uid
        mailbox = server.maildir("bob@localhost")
        sent = _send_until_processes_deliver(host, mailbox, workers)

        context = _any_name(ssl.create_default_context(cafile=str(server.data_path / "tls" / "cert.pem")))
        with smtplib.SMTP(host, 587, timeout=30) as client:
            client.starttls(context=context)
            client.login("bob@localhost", "bob-password")
            client.sendmail("bob@localhost", ["bob@localhost"], b"Subject: by 587\r\n\r\nsubmitted\r\n")
        with smtplib.SMTP_SSL(host, 465, timeout=30, context=context) as client:
            client.login("bob@localhost", "bob-password")
            client.sendmail("bob@localhost", ["bob@localhost"], b"Subject: by 465\r\n\r\nsubmitted\r\n")

        pop3s = poplib.POP3_SSL(host, 995, timeout=30, context=context)
        pop3s.user("bob@localhost")
        pop3s.pass_("bob-password")
        assert pop3s.stat()[0] == sent + 2
        pop3s.quit()
        client = poplib.POP3(host, 110, timeout=30)
        client.user("bob@localhost")
        client.pass_("bob-password")
        fetched = [b"\r\n".join(client.retr(n)[1]) + b"\r\n" for n in range(1, sent + 3)]
        client.quit()
        assert sorted(without_trace(m) for m in fetched if b"submitted" not in m)[0] == MESSAGE + b"n 0\r\n"
        assert sum(b"submitted" in message for message in fetched) == 2

        running = _owners(server.data_path)
        assert {"listeners.json", "mailserver.pid", "users", "cert.pem", "key.pem"} <= {
            Path(p).name for p in running
        }
    finally:
        code = server.stop()
    assert code in (0, -signal.SIGTERM), server.log()
    stopped = _owners(server.data_path)
    assert any("/cur/" in p for p in stopped)  # POP3 moved what it read
    assert {p: owner for p, owner in {**running, **stopped}.items() if owner != uid} == {}
    assert "Traceback" not in server.log(), server.log()
    assert f"running as:      {USER} (uid {uid}" in server.log()


def _any_name(context: ssl.SSLContext) -> ssl.SSLContext:
    """
    The chain is verified; the name is the random 127.x address, which the
    self-signed certificate cannot know (127.0.0.1 is checked by curl below).
    """
    context.check_hostname = False
    return context


@needs_root
def test_a_data_folder_of_another_user_is_refused_with_the_command_that_fixes_it(tmp_path):
    uid, gid = _server_user()
    group = grp.getgrgid(gid).gr_name
    server = MailServer(tmp_path, twistd_options=("--uid", str(uid), "--gid", str(gid)))
    server.data_path.mkdir()  # root's, as a CLI run by root before the fix left it
    with pytest.raises(RuntimeError) as failure:
        server.start()
    message = str(failure.value)
    assert (
        f"mailserver: the data folder {server.data_path} belongs to root, but the server runs as "
        f"{USER}: chown -R {USER}:{group} {server.data_path}"
    ) in message
    assert "Traceback" not in message


# Does what systemd does for a socket-activated service: listening sockets
# on file descriptors 3 and 4, LISTEN_FDS and LISTEN_PID, then the service.
SOCKET_ACTIVATION = """
import fcntl, os, socket, sys
sockets = []
for _ in range(2):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(50)
    sockets.append(sock)
high = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 10) for sock in sockets]
for sock in sockets:
    sock.close()
for target, fd in zip((3, 4), high):
    os.dup2(fd, target)
    os.close(fd)
os.environ.update(LISTEN_FDS="2", LISTEN_FDNAMES="smtp:pop3", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_systemd_socket_activation_serves_the_inherited_sockets(tmp_path):
    wrapper = tmp_path / "activate.py"
    wrapper.write_text(SOCKET_ACTIVATION)
    server = MailServer(
        tmp_path,
        roles=("admin",),
        endpoints={"smtp": "systemd:domain=INET:index=0", "pop3": "systemd:domain=INET:name=pop3"},
        twistd=[sys.executable, str(wrapper), str(BIN / "twistd")],
    )
    server.start()
    try:
        server.add_user("bob@localhost", "pw")
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
            client.sendmail("a@example.com", ["bob@localhost"], MESSAGE)
        client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        client.user("bob@localhost")
        client.pass_("pw")
        assert client.stat()[0] == 1
        client.quit()
    finally:
        server.stop()


def test_the_start_up_block_tells_the_operator_what_runs(tmp_path):
    server = MailServer(
        tmp_path,
        local_domains=("example.org", "localhost"),
        roles=("smtp", "submission", "submissions", "pop3", "pop3s", "admin"),
    )
    server.start()
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as client:
            context = ssl.create_default_context(cafile=str(server.data_path / "tls" / "cert.pem"))
            client.starttls(context=context)  # the first STARTTLS: no warning
            client.noop()
    finally:
        server.stop()
    log = server.log()
    start = log.index(f"mailserver {mailserver.__version__} starting")
    block = log[start:].split("\n2", 1)[0]  # up to the next timestamped line
    lines = [line.strip() for line in block.splitlines()]
    assert lines[0].startswith(f"mailserver {mailserver.__version__} starting")
    assert f"configuration:   {server.config_path}" in lines
    assert f"data folder:     {server.data_path}" in lines
    assert "local domains:   example.org, localhost" in lines
    assert any(line.startswith(f"TLS certificate: {server.data_path}/tls/cert.pem") for line in lines)
    roles = {
        "smtp": "MX: mail for the local domains; STARTTLS",
        "submission": "submission: AUTH required, then relays; STARTTLS",
        "submissions": "submission: AUTH required, then relays; implicit TLS",
        "pop3": "POP3; STLS",
        "pop3s": "POP3; implicit TLS",
        "admin": "admin HTTP API (/health, /metrics, /api/queue), no token (loopback only)",
    }
    for role, description in roles.items():
        address = f"127.0.0.1:{server.ports[role]}"
        assert any(line.split()[:2] == [role, address] and line.endswith(description) for line in lines), (
            role, block
        )
    assert "plugins:         none" in lines
    command = (
        f"accounts:        none yet; add one with: {BIN / 'mailserver'} --config "
        f"{server.config_path} user add postmaster@example.org"
    )
    assert command in lines or command.replace(str(BIN / "mailserver"), "mailserver") in lines, block
    everything = log + server.output
    assert "Starting factory" not in everything
    assert " object at 0x" not in everything
    assert "LegacyContextFactoryWarning" not in everything


def test_the_start_up_block_counts_the_accounts(tmp_path):
    server = MailServer(tmp_path)
    server.add_user("bob@localhost", "pw")
    server.start()
    server.stop()
    assert "accounts:        1" in server.log()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_verifies_the_self_signed_certificate_for_127_0_0_1(tmp_path):
    server = MailServer(tmp_path, roles=("smtp", "submissions", "pop3s", "admin"))
    server.start()
    try:
        server.add_user("bob@localhost", "pw")
        cacert = str(server.data_path / "tls" / "cert.pem")
        for url, extra in (
            (f"smtps://127.0.0.1:{server.ports['submissions']}", ["-X", "NOOP"]),
            (f"pop3s://127.0.0.1:{server.ports['pop3s']}/", ["-u", "bob@localhost:pw"]),
            (f"smtps://localhost:{server.ports['submissions']}", ["-X", "NOOP"]),
        ):
            result = subprocess.run(
                ["curl", "-sS", "--max-time", "20", "--cacert", cacert, url, *extra],
                capture_output=True, text=True, timeout=30,
            )
            assert result.returncode == 0, (url, result.stderr)
    finally:
        server.stop()


def test_twistd_help_names_every_default_listener_and_the_privilege_drop():
    result = subprocess.run(
        [str(BIN / "twistd"), "mailserver", "--help"],
        env=environment(), capture_output=True, text=True, timeout=60,
    )
    text = " ".join(result.stdout.split())
    for listener in ("SMTP 2525", "submission 2587", "POP3 2110", "admin HTTP API on 127.0.0.1:2080"):
        assert listener in text, text
    assert "--uid/--gid" in text
