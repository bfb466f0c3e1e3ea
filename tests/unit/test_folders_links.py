"""
IMAP's folders follow the data folder's rules (issue 19): no symbolic link
inside the data folder is followed, whether it stands for an account's
folder, a folder's C{tmp/}, C{new/} or C{cur/}, a message or a folder's own
files; the folders made are 0700.  Driven through the folder store, as the
IMAP sessions use it.
"""

import os
import stat

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailserver.folders.store import MailStore
from mailserver.folders.watch import NoWatcher
from mailserver.interfaces import FolderError
from mailserver.safe_fs import SymlinkRefused

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], defer.Failure):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


@pytest.fixture
def data(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def account(data):
    store = MailStore(
        lambda address: data / "mail" / address, data, lambda f, *a: defer.maybeDeferred(f, *a),
        Clock(), NoWatcher(), "host",
    )
    account = store.account("bob")
    result_of(account.prepare())
    return account


def bob(data):
    return data / "mail" / "bob"


def everything_in(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def append(account, name):
    def store(folder):
        d = folder.append(MESSAGE, [], None)
        return d.addBoth(lambda result: (folder.release(), result)[1])

    return result_of(account.open(name).addCallback(store))


def test_a_linked_folder_is_no_folder_and_nothing_is_written_through_it(account, data, outside):
    os.symlink(outside, bob(data) / ".Linked")
    for sub in ("tmp", "new", "cur"):
        (outside / sub).mkdir()
    with pytest.raises(FolderError) as caught:
        append(account, "Linked")
    assert caught.value.code == "NONEXISTENT"
    assert "Linked" not in result_of(account.names())
    assert everything_in(outside) == ["cur", "new", "tmp"]


@pytest.mark.parametrize("sub", ["tmp", "new", "cur"])
def test_a_folder_s_linked_subfolder_is_refused(account, data, outside, sub):
    sent = bob(data) / ".Sent"
    (sent / sub).rmdir()
    os.symlink(outside, sent / sub)
    with pytest.raises(SymlinkRefused):
        append(account, "Sent")
    assert everything_in(outside) == []


def test_a_linked_message_file_is_not_read(account, data, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"not mail\n")
    inbox = bob(data)
    os.symlink(secret, inbox / "new" / "1700000000.M1P1Q1.host,S=9,W=10")
    (inbox / "new" / "1700000001.M1P1Q1.host,S=5,W=6").write_bytes(b"mail\n")
    folder = result_of(account.open("INBOX"))
    assert list(folder.uids) == [1, 2]
    assert result_of(folder.read([1, 2], 1000)) == [(1, None), (2, b"mail\n")]
    folder.release()


def test_copy_into_a_folder_whose_cur_is_a_link_is_refused(account, data, outside):
    append(account, "INBOX")
    trash = bob(data) / ".Trash"
    (trash / "cur").rmdir()
    os.symlink(outside, trash / "cur")
    folder = result_of(account.open("INBOX"))
    with pytest.raises(FolderError) as caught:
        result_of(folder.transfer([1], "Trash", False, None))
    assert caught.value.code == "TRYCREATE"  # a folder with a linked cur/ is none
    folder.release()
    assert everything_in(outside) == []


def test_linked_subscriptions_are_not_read(account, data, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("V\t2\n\nsecret\n")
    (bob(data) / "subscriptions").unlink()
    os.symlink(secret, bob(data) / "subscriptions")
    with pytest.raises(SymlinkRefused):
        result_of(account.subscriptions())
    with pytest.raises(SymlinkRefused):
        result_of(account.subscribe("Other", True))
    assert secret.read_text() == "V\t2\n\nsecret\n"


def test_a_linked_uidlist_is_not_read_nor_written_through(account, data, tmp_path):
    planted = tmp_path / "planted"
    planted.write_text("3 V7 N2\n1 :x\n")
    sent = bob(data) / ".Sent"
    os.symlink(planted, sent / "dovecot-uidlist")
    with pytest.raises(SymlinkRefused):
        append(account, "Sent")
    assert planted.read_text() == "3 V7 N2\n1 :x\n"


def test_folders_made_for_imap_are_private_whatever_the_umask(data, account):
    old = os.umask(0o022)
    try:
        result_of(account.create("Archive/2024"))
    finally:
        os.umask(old)
    root = bob(data)
    made = [root / ".Sent", root / ".Archive", root / ".Archive.2024"]
    for folder in made + [f / sub for f in made for sub in ("tmp", "new", "cur")]:
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
