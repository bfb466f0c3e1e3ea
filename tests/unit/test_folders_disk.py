"""
The IMAP folders on disk: mailbox names, Dovecot's uidlist, the scan that
gives UIDs, and the changes (flags, expunge, \\Recent, APPEND, COPY, MOVE).
"""

import os

import pytest

from mailserver.folders import names as N
from mailserver.folders import ops, tree, uidlist
from mailserver.folders.disk import FolderFiles
from mailserver.folders.state import FolderState, refresh
from mailserver.maildir import UniqueNames


def deliver(folder, name, data=b"Subject: x\n\nbody\n", subdir="new"):
    path = folder / subdir / name
    path.write_bytes(data)
    return path


def loaded(folder, root=None):
    """
    The folder's state; the data folder is the one holding the folder.
    """
    state = FolderState(str(folder.parent), str(folder), str(root or folder))
    state.apply(refresh(state))
    return state


def read_list(folder):
    with FolderFiles(str(folder), str(folder)) as files:
        return uidlist.read(files)


def account(maildir):
    """
    The data folder and the account's Maildir, as the tree's functions
    take them.
    """
    return str(maildir.parent), str(maildir)


@pytest.fixture
def maildir(tmp_path):
    root = tmp_path / "bob"
    tree.prepare(str(tmp_path), str(root))
    return root


# Names.


def test_modified_utf7_examples_of_rfc_3501():
    assert N.decode_utf7("~peter/mail/&U,BTFw-/&ZeVnLIqe-") == "~peter/mail/台北/日本語"
    assert N.encode_utf7("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert N.encode_utf7("Entwürfe & Co") == "Entw&APw-rfe &- Co"
    assert N.decode_utf7("Entw&APw-rfe &- Co") == "Entwürfe & Co"


@pytest.mark.parametrize("bad", ["&Jjo", "&AGE-", "&-&Jjo!-", "&2D0-"])
def test_invalid_modified_utf7_is_refused(bad):
    with pytest.raises(N.BadName):
        N.decode_utf7(bad)


def test_names_map_to_maildir_plus_plus_folders():
    assert N.directory("INBOX") == ""
    assert N.directory("Sent") == ".Sent"
    assert N.directory("Archive/2024") == ".Archive.2024"
    assert N.directory("Entwürfe") == ".Entw&APw-rfe"
    assert N.from_directory(".Archive.2024") == "Archive/2024"
    assert N.from_directory(".Entw&APw-rfe") == "Entwürfe"
    assert N.from_directory("..") is None
    assert N.from_directory(".INBOX") is None


@pytest.mark.parametrize(
    "bad", ["", "a.b", "a//b", "/a", "a/", "~x", "a*", "a%b", "INBOX/child", "a\x00b", "x" * 300]
)
def test_names_that_cannot_be_folders(bad):
    with pytest.raises(N.BadName):
        N.check(bad)


def test_inbox_in_any_case():
    assert N.check("inBoX") == "INBOX"


# The uidlist.


def test_uidlist_written_by_dovecot_is_read(tmp_path):
    (tmp_path / "dovecot-uidlist").write_text(
        "3 V1275660208 N25022 G3085f01b7f11094c501100008c4a11c1\n"
        "25006 :1276528487.M364837P9451.kurkku,S=1355,W=1394\n"
        "25017 W2481 :1276533073.M242911P3632.kurkku\n"
        "garbage line\n"
        "25020 :partial-last-line-without-newline"
    )
    read = read_list(tmp_path)
    assert read.uidvalidity == 1275660208
    assert read.next_uid == 25022
    assert read.guid == "3085f01b7f11094c501100008c4a11c1"
    assert read.uids == {
        "1276528487.M364837P9451.kurkku,S=1355,W=1394": 25006,
        "1276533073.M242911P3632.kurkku": 25017,
    }


def test_uidlist_next_uid_is_past_the_last_record(tmp_path):
    (tmp_path / "dovecot-uidlist").write_text("3 V7 N2\n5 :a\n")
    assert read_list(tmp_path).next_uid == 6


def test_uidlist_rewrite_and_append(tmp_path):
    ul = uidlist.UidList(uidvalidity=42, next_uid=3, guid="00" * 16, uids={"a": 1, "b": 2})
    with FolderFiles(str(tmp_path), str(tmp_path)) as files:
        uidlist.rewrite(files, ul)
        uidlist.append(files, ul, [("c", 3)])
    assert (tmp_path / "dovecot-uidlist").read_text() == (
        f"3 V42 N3 G{'00' * 16}\n1 :a\n2 :b\n3 :c\n"
    )
    assert read_list(tmp_path).uids == {"a": 1, "b": 2, "c": 3}


def test_a_stale_uidlist_lock_is_taken_over(tmp_path):
    lock = tmp_path / "dovecot-uidlist.lock"
    lock.write_text("1:elsewhere")
    os.utime(lock, (0, 0))
    with FolderFiles(str(tmp_path), str(tmp_path)) as files, uidlist.Lock(files, wait=0.1):
        assert lock.read_text().startswith(f"{os.getpid()}:")
    assert not lock.exists()


def test_a_live_uidlist_lock_is_waited_for(tmp_path):
    (tmp_path / "dovecot-uidlist.lock").write_text("1:elsewhere")
    with FolderFiles(str(tmp_path), str(tmp_path)) as files:
        with pytest.raises(uidlist.LockTimeout):
            with uidlist.Lock(files, wait=0.05):
                pass


def test_uidvalidity_grows_for_each_new_folder(tmp_path):
    first = uidlist.next_uidvalidity(str(tmp_path), str(tmp_path))
    assert uidlist.next_uidvalidity(str(tmp_path), str(tmp_path)) == first + 1


# The scan.


def test_new_files_get_uids_in_delivery_order_and_keep_them(maildir):
    deliver(maildir, "1700000002.M1P1Q1.host,S=17,W=20")
    deliver(maildir, "1700000001.M1P1Q1.host,S=17,W=20")
    state = loaded(maildir)
    assert list(state.uids) == [1, 2]
    assert state.entries[1].base == "1700000001.M1P1Q1.host,S=17,W=20"
    assert state.entries[1].size == 20
    assert state.uidnext == 3
    again = loaded(maildir)
    assert again.uidvalidity == state.uidvalidity
    assert {e.base: e.uid for e in again.entries.values()} == {
        e.base: e.uid for e in state.entries.values()
    }


def test_a_delivery_gets_the_next_uid_and_an_expunged_uid_is_not_reused(maildir):
    deliver(maildir, "1.M1P1Q1.h")
    state = loaded(maildir)
    os.unlink(maildir / "new" / "1.M1P1Q1.h")
    deliver(maildir, "2.M1P1Q1.h")
    delta = refresh(state, force=True)
    assert delta.removed == [1]
    assert [(e.uid, e.base) for e in delta.added] == [(2, "2.M1P1Q1.h")]
    state.apply(delta)
    assert list(state.uids) == [2]


def test_a_rename_by_another_program_is_a_flag_change(maildir):
    deliver(maildir, "1.M1P1Q1.h")
    state = loaded(maildir)
    os.rename(maildir / "new" / "1.M1P1Q1.h", maildir / "cur" / "1.M1P1Q1.h:2,RS")
    delta = refresh(state, force=True)
    assert not delta.removed and not delta.added
    (changed,) = delta.changed
    assert (changed.uid, changed.subdir, changed.flags) == (1, "cur", "RS")


def test_an_unchanged_folder_is_not_listed_again(maildir, monkeypatch):
    deliver(maildir, "1.M1P1Q1.h")
    state = loaded(maildir)
    past = 1_000_000_000
    for sub in ("new", "cur"):
        os.utime(maildir / sub, (past, past))
    state.apply(refresh(state, force=True))  # seen with old times: not racy
    listed = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: listed.append(p) or real(p))
    assert not refresh(state)
    assert listed == []


def test_another_process_s_uids_are_taken_from_the_uidlist(maildir):
    deliver(maildir, "1.M1P1Q1.h")
    mine = loaded(maildir)
    deliver(maildir, "2.M1P1Q1.h")
    theirs = loaded(maildir)  # gives 2.M... its UID first
    assert theirs.by_base["2.M1P1Q1.h"] == 2
    delta = refresh(mine, force=True)
    assert [(e.uid, e.base) for e in delta.added] == [(2, "2.M1P1Q1.h")]


def test_uidlist_of_gone_messages_is_compressed(maildir):
    for n in range(40):
        deliver(maildir, f"{n:02d}.M1P1Q1.h")
    state = loaded(maildir)
    for n in range(20):
        os.unlink(maildir / "new" / f"{n:02d}.M1P1Q1.h")
    state.apply(refresh(state, force=True))
    assert read_list(maildir).records == 20
    assert read_list(maildir).next_uid == 41


# Changes.


def test_store_renames_with_sorted_info_letters(maildir):
    deliver(maildir, "1.M1P1Q1.h")
    state = loaded(maildir)
    state.apply(ops.store(state, [1], "+", ["\\Seen", "\\Flagged"]))
    assert os.listdir(maildir / "cur") == ["1.M1P1Q1.h:2,FS"]
    state.apply(ops.store(state, [1], "-", ["\\seen"]))
    assert os.listdir(maildir / "cur") == ["1.M1P1Q1.h:2,F"]
    state.apply(ops.store(state, [1], "", ["\\Answered", "\\Deleted", "\\Draft"]))
    assert os.listdir(maildir / "cur") == ["1.M1P1Q1.h:2,DRT"]


def test_store_finds_a_file_renamed_meanwhile(maildir):
    deliver(maildir, "1.M1P1Q1.h")
    state = loaded(maildir)
    os.rename(maildir / "new" / "1.M1P1Q1.h", maildir / "cur" / "1.M1P1Q1.h:2,S")
    delta = ops.store(state, [1], "+", ["\\Flagged"])
    assert os.listdir(maildir / "cur") == ["1.M1P1Q1.h:2,FS"]
    assert delta.changed[0].flags == "FS"


def test_keywords_use_dovecot_s_letters(maildir):
    deliver(maildir, "1.M1P1Q1.h")
    state = loaded(maildir)
    delta = ops.store(state, [1], "+", ["$Forwarded", "Junk"])
    state.apply(delta)
    assert (maildir / "dovecot-keywords").read_text() == "0 $Forwarded\n1 Junk\n"
    assert os.listdir(maildir / "cur") == ["1.M1P1Q1.h:2,ab"]
    assert state.keywords == ["$Forwarded", "Junk"]


def test_expunge_unlinks(maildir):
    deliver(maildir, "1.M1P1Q1.h")
    deliver(maildir, "2.M1P1Q1.h")
    state = loaded(maildir)
    delta = ops.expunge(state, [1])
    state.apply(delta)
    assert delta.removed == [1]
    assert os.listdir(maildir / "new") == ["2.M1P1Q1.h"]
    assert list(state.uids) == [2]


def test_recent_is_taken_once(maildir):
    deliver(maildir, "1.M1P1Q1.h")
    first = loaded(maildir)
    second = loaded(maildir)
    delta, claimed = ops.claim_recent(first)
    assert claimed == [1]
    assert os.listdir(maildir / "cur") == ["1.M1P1Q1.h:2,"]
    assert ops.claim_recent(second)[1] == []


def test_append_is_stored_in_lf_form_with_both_sizes_and_a_uid(maildir):
    deliver(maildir, "1.M1P1Q1.h")
    state = loaded(maildir)
    message = b"Subject: hi\r\n\r\nline one\r\nline two\r\n"
    delta, uid = ops.append(state, UniqueNames("h"), message, ["\\Seen"], 86400.0)
    state.apply(delta)
    assert uid == 2
    (name,) = os.listdir(maildir / "cur")
    stored = (maildir / "cur" / name).read_bytes()
    assert stored == message.replace(b"\r\n", b"\n")
    assert name.endswith(f",S={len(stored)},W={len(message)}:2,S")
    assert os.stat(maildir / "cur" / name).st_mtime == 86400.0
    assert read_list(maildir).uids[name.partition(":")[0]] == 2
    assert state.entries[2].size == len(message)


def test_append_from_a_spooled_file_splits_crlf_anywhere(maildir, tmp_path):
    import io

    state = loaded(maildir)
    message = b"a\r\n" * 40000
    delta, uid = ops.append(state, UniqueNames("h"), io.BytesIO(message), [], None)
    (name,) = os.listdir(maildir / "new")
    assert (maildir / "new" / name).read_bytes() == b"a\n" * 40000


def test_copy_and_move_keep_flags_and_give_target_uids(maildir):
    deliver(maildir, "1.M1P1Q1.h:2,S", subdir="cur")
    deliver(maildir, "2.M1P1Q1.h")
    state = loaded(maildir)
    trash = maildir / ".Trash"
    delta, (validity, pairs) = ops.transfer(state, [1, 2], str(trash), UniqueNames("h"), move=False)
    assert pairs == [(1, 1), (2, 2)]
    assert validity == read_list(trash).uidvalidity
    assert sorted(os.listdir(trash / "cur")) == ["1.M1P1Q1.h:2,S", "2.M1P1Q1.h:2,"]
    assert not delta.removed
    # Copying again gives the copies names of their own.
    _, (_, again) = ops.transfer(state, [1], str(trash), UniqueNames("h"), move=False)
    assert again == [(1, 3)]
    delta, (_, moved) = ops.transfer(state, [2], str(trash), UniqueNames("h"), move=True)
    assert delta.removed == [2]
    assert os.listdir(maildir / "new") == []
    assert moved == [(2, 4)]


def test_read_gives_whole_small_messages_and_files_for_large_ones(maildir):
    deliver(maildir, "1.M1P1Q1.h", b"small\n")
    deliver(maildir, "2.M1P1Q1.h", b"x" * 1000)
    state = loaded(maildir)
    delta, results = ops.read(state, [1, 2, 99], whole_limit=100)
    assert results[0] == (1, b"small\n")
    uid, large = results[1]
    assert uid == 2 and large.read() == b"x" * 1000
    large.close()
    assert results[2] == (99, None)
    sizes = {entry.uid: entry.size for entry in delta.resolved}
    assert sizes == {1: 7, 2: 1000}


# The account's folders.


def test_first_login_makes_the_special_folders_subscribed(maildir):
    assert sorted(tree.list_names(*account(maildir))) == ["Drafts", "INBOX", "Junk", "Sent", "Trash"]
    assert (maildir / ".Sent" / "maildirfolder").exists()
    assert oct((maildir / ".Sent").stat().st_mode & 0o777) == "0o700"
    assert tree.read_subscriptions(*account(maildir)) == ["INBOX", "Sent", "Drafts", "Trash", "Junk"]
    assert (maildir / "subscriptions").read_text().startswith("V\t2\n\n")


def test_create_makes_missing_parents(maildir):
    tree.create(*account(maildir), "Archive/2024/Q1")
    names = tree.list_names(*account(maildir))
    assert {"Archive", "Archive/2024", "Archive/2024/Q1"} <= set(names)
    with pytest.raises(tree.FolderError) as caught:
        tree.create(*account(maildir), "Archive")
    assert caught.value.code == "ALREADYEXISTS"


def test_rename_moves_children_and_subscriptions(maildir):
    tree.create(*account(maildir), "Work/Old")
    tree.set_subscribed(*account(maildir), "Work/Old", True)
    tree.rename(*account(maildir), "Work", "Jobs")
    names = set(tree.list_names(*account(maildir)))
    assert {"Jobs", "Jobs/Old"} <= names and "Work" not in names
    assert "Jobs/Old" in tree.read_subscriptions(*account(maildir))
    assert (maildir / "subscriptions").read_text().endswith("Jobs\tOld\n")


def test_rename_inbox_moves_its_messages(maildir):
    deliver(maildir, "1.M1P1Q1.h")
    tree.rename(*account(maildir), "INBOX", "Old")
    assert os.listdir(maildir / "new") == []
    assert os.listdir(maildir / ".Old" / "new") == ["1.M1P1Q1.h"]


def test_delete_removes_the_folder_not_its_children(maildir):
    tree.create(*account(maildir), "A/B")
    tree.delete(*account(maildir), "A")
    assert "A/B" in tree.list_names(*account(maildir))
    assert "A" not in tree.list_names(*account(maildir))
    with pytest.raises(tree.FolderError):
        tree.delete(*account(maildir), "INBOX")


def test_a_symbolic_link_is_not_a_folder(maildir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    tree.prepare(str(tmp_path), str(elsewhere))
    os.symlink(elsewhere, maildir / ".Linked")
    assert "Linked" not in tree.list_names(*account(maildir))
