"""
A backup MX (relay.relay_domains), end to end: two real servers on
loopback, both on the same port as MX hosts are (the primary on 127.0.0.1,
the backup on 127.0.0.2), found through the loopback DNS server.

The backup takes mail for the primary's domain from anyone while the
primary is down, keeps it queued, and hands it over once the primary is up;
it never sends it to itself although it is an MX host of the domain, and
when it is the best MX it bounces the mail as Postfix does ("loops back to
myself") instead of looping.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import socket

import pytest

from harness import MailServer
from relay_fixtures import DNSServer, wait_until

ZONE = {
    "primary.test": {"MX": [[10, "mx1.primary.test"], [20, "mx2.primary.test"]]},
    "mx1.primary.test": {"A": ["127.0.0.1"]},
    "mx2.primary.test": {"A": ["127.0.0.2"]},
    # A domain whose only MX host is the backup.
    "lonely.test": {"MX": [[10, "mx2.primary.test"]]},
}


def port_free_on_both() -> int:
    """
    A port free on 127.0.0.1 and on 127.0.0.2, for the two MX hosts.
    """
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.2", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free on both loopback addresses")


@pytest.fixture
def dns_server():
    server = DNSServer(ZONE)
    yield server
    server.stop()


@pytest.fixture
def mx_pair(tmp_path, dns_server):
    port = port_free_on_both()
    (tmp_path / "backup").mkdir()
    (tmp_path / "primary").mkdir()
    relay = (f'[relay]\nresolver = "{dns_server.resolver}"\nport = {port}\n'
             'retry_schedule = ["1s"]\nmax_retry_interval = "2s"\nscan_interval = 0.2\n'
             'connect_timeout = 2.0\n')
    backup = MailServer(
        tmp_path / "backup", local_domains=("backup.test",),
        endpoints={"smtp": f"tcp:{port}:interface=127.0.0.2"},
        extra_toml=relay + 'relay_domains = ["primary.test", "lonely.test"]\n'
                           'own_addresses = ["127.0.0.2"]\n')
    primary = MailServer(
        tmp_path / "primary", local_domains=("primary.test",),
        endpoints={"smtp": f"tcp:{port}:interface=127.0.0.1"}, extra_toml=relay)
    yield backup, primary, port
    for server in (backup, primary):
        server.stop()


def send(address: str, port: int, sender: str, recipient: str, subject: str) -> None:
    with smtplib.SMTP(address, port, timeout=30) as client:
        client.sendmail(sender, [recipient],
                        f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n\r\n"
                        "Kept for you.\r\n".encode())


def test_the_backup_keeps_the_mail_while_the_primary_is_down_and_never_sends_it_to_itself(
        mx_pair):
    backup, primary, port = mx_pair
    backup.start()
    # Anyone may send mail for the relay domain to the backup, without AUTH.
    send("127.0.0.2", port, "someone@sender.example", "bob@primary.test", "while you were out")

    def tried_once():
        listing = backup.cli("queue", "list").stdout
        return "mx1.primary.test" in listing and listing
    listing = wait_until(tried_once)
    assert listing and "Connection refused" in listing, backup.log()
    # One message in the queue: it was not handed to the backup itself
    # (mx2, preference 20, is 127.0.0.2 at the same port).
    assert len([line for line in listing.splitlines() if "bob@primary.test" in line]) == 1
    assert "mx2.primary.test" not in backup.log()
    assert backup.log().count("[smtp.accepted#info]") == 1

    primary.add_user("bob@primary.test", "pw")
    primary.start()
    new = primary.maildir("bob@primary.test") / "new"
    files = wait_until(lambda: new.exists() and list(new.iterdir()), timeout=30)
    assert files, backup.cli("queue", "list").stdout + backup.log()
    message = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert message["Subject"] == "while you were out"
    assert message.get_content().strip() == "Kept for you."
    assert message["Return-Path"] == "<someone@sender.example>"
    assert wait_until(lambda: "empty" in backup.cli("queue", "list").stdout)
    assert backup.log().count("[smtp.accepted#info]") == 1


def test_when_the_backup_is_the_best_mx_it_bounces_instead_of_looping(mx_pair):
    backup, _, port = mx_pair
    backup.start()
    backup.add_user("alice@backup.test", "pw")
    send("127.0.0.2", port, "alice@backup.test", "anyone@lonely.test", "nowhere to go")
    new = backup.maildir("alice@backup.test") / "new"
    files = wait_until(lambda: new.exists() and list(new.iterdir()), timeout=30)
    assert files, backup.log()
    report = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    [block] = report.get_payload()[1].get_payload()[1:]
    assert block["Final-Recipient"] == "rfc822; anyone@lonely.test"
    assert block["Status"] == "5.4.6"
    assert "mail for lonely.test loops back to myself" in block["Diagnostic-Code"]
    assert backup.log().count("[smtp.accepted#info]") == 1  # no loop back into its own SMTP
    assert wait_until(lambda: "empty" in backup.cli("queue", "list").stdout)
