"""
The small pieces behind running the server for an operator: the worker's
command line, the self-signed certificate's names, the start-up block's
advice, and who owns the data folder.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import stat
from pathlib import Path

import pytest
from cryptography import x509

from mailserver.config import Config
from mailserver.ownership import DataFolderError, Owner, prepare_data_folder, server_owner
from mailserver.safe_fs import SymlinkRefused
from mailserver.startup import ListenerLine, add_account_command, startup_lines
from mailserver.tls import ensure_self_signed, self_signed_names
from mailserver.workers import worker_argv


def test_a_worker_runs_without_twistds_privilege_and_pid_options(monkeypatch):
    monkeypatch.setattr(sys, "argv", [
        "/venv/bin/twistd", "-n", "--uid", "nobody", "--gid=nogroup", "-u", "1", "-g", "2",
        "--uid=3", "--pidfile", "x.pid", "--logfile=log", "mailserver", "--config", "m.toml",
    ])
    assert worker_argv() == [
        sys.executable, "/venv/bin/twistd", "--nodaemon", "--pidfile=",
        "mailserver", "--config", "m.toml",
    ]


LOCALHOST = x509.DNSName("localhost")
V4 = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
V6 = x509.IPAddress(ipaddress.ip_address("::1"))


@pytest.mark.parametrize(
    "hostname, names",
    [
        ("mx.example.org", [x509.DNSName("mx.example.org"), LOCALHOST, V4, V6]),
        ("localhost", [LOCALHOST, V4, V6]),
        ("127.0.0.1", [V4, LOCALHOST, V6]),
        ("Mail.Example.ORG", [x509.DNSName("mail.example.org"), LOCALHOST, V4, V6]),
    ],
)
def test_the_self_signed_certificate_names_each_name_once(hostname, names):
    assert self_signed_names(hostname) == names


def test_the_generated_certificate_carries_those_names(tmp_path):
    ensure_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", "mx.test")
    certificate = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(names) == self_signed_names("mx.test")
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600


def test_the_command_to_add_an_account_works_from_anywhere_it_can(tmp_path):
    default = Config(hostname="mx.test")
    assert add_account_command(default, "mailserver", tmp_path) == (
        f"cd {tmp_path} && mailserver user add postmaster@localhost"
    )
    configured = Config(
        hostname="mx.test", data_dir=str(tmp_path / "data"), local_domains=("example.org",),
        source="conf/m.toml",
    )
    assert add_account_command(configured, "/opt/ms/bin/mailserver", tmp_path) == (
        f"/opt/ms/bin/mailserver --config {Path('conf/m.toml').resolve()} "
        "user add postmaster@example.org"
    )


def test_the_block_counts_accounts_or_says_how_to_add_one(tmp_path):
    config = Config(hostname="mx.test", data_dir=str(tmp_path), node_name="mx1")
    listeners = [ListenerLine("smtp", "127.0.0.1:25", "tcp:25"), ListenerLine("pop3s", "[::1]:995", "tcp6:995")]
    lines = startup_lines(config, listeners, 0, user="mail (uid 8, gid 8)", add_command="ADD")
    assert lines[1:6] == [
        "  configuration:   embedded default (no --config given)",
        f"  data folder:     {tmp_path}",
        f"  node:            mx1 ({tmp_path}/nodes/mx1)",
        "  local domains:   localhost",
        f"  TLS certificate: {tmp_path}/tls/cert.pem (self-signed, made by the server)",
    ]
    assert "    smtp   127.0.0.1:25  MX: mail for the local domains; STARTTLS" in lines
    assert "    pop3s  [::1]:995     POP3; implicit TLS" in lines
    assert lines[-1] == "  accounts:        none yet; add one with: ADD"
    assert startup_lines(config, listeners, 3, user="u", add_command="ADD")[-1] == "  accounts:        3"


def test_nobody_to_switch_to_unless_root_is_told_to():
    assert server_owner(None, None) is None
    assert server_owner(0, 0) is None
    if os.geteuid() == 0:
        assert server_owner(65534, 12) == Owner(65534, 12)
    else:
        assert server_owner(65534, 12) is None


def test_the_data_folder_is_made_and_an_existing_one_kept(tmp_path):
    folder = tmp_path / "a" / "data"
    prepare_data_folder(folder, None)
    assert folder.is_dir()
    prepare_data_folder(folder, None)  # again: nothing to do


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_the_data_folder_is_made_for_the_server_user_and_another_users_refused(tmp_path):
    made = tmp_path / "made"
    prepare_data_folder(made, Owner(65534, 65534))
    assert (made.stat().st_uid, made.stat().st_gid) == (65534, 65534)
    prepare_data_folder(made, Owner(65534, 65534))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    with pytest.raises(DataFolderError, match=r"belongs to root, but the server runs as .*: chown -R "):
        prepare_data_folder(theirs, Owner(65534, 65534))


def test_the_data_folder_is_made_private_whatever_the_umask(tmp_path):
    old_mask = os.umask(0o022)
    try:
        prepare_data_folder(tmp_path / "a" / "data", None)
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE((tmp_path / "a" / "data").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755  # a parent: the operator's


def test_the_data_folders_own_folders_are_tightened_and_never_links(tmp_path):
    data = tmp_path / "data"
    (data / "queue").mkdir(parents=True)
    (data / "queue").chmod(0o755)
    prepare_data_folder(data, None)
    assert stat.S_IMODE((data / "queue").stat().st_mode) == 0o750
    (tmp_path / "elsewhere").mkdir()
    (data / "mta-sts").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SymlinkRefused):
        prepare_data_folder(data, None)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_data_folder_made_with_its_parents_is_the_server_users(tmp_path):
    made = tmp_path / "parent" / "data"
    prepare_data_folder(made, Owner(65534, 65534))
    assert (made.stat().st_uid, made.stat().st_gid) == (65534, 65534)
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert made.parent.stat().st_uid == os.geteuid()
