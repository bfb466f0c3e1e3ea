"""
Maildir storage: durable delivery, names that carry sizes, listing, locking.
"""

import os
import subprocess
import sys
from pathlib import Path

from mailserver.maildir import Mailbox, SpoolFile, ensure_maildir, file_name_host
from mailserver.message_ids import MessageIDs, new_message_id


def deliver(tmp_path, data, maildirs):
    spool = tmp_path / "spool" / "tmp"
    spool.mkdir(parents=True, exist_ok=True)
    f = SpoolFile(tmp_path, spool, f"{new_message_id()}.{file_name_host('host/with:odd chars')}")
    f.write(data)
    return f.deliver(maildirs)


def test_delivery_links_one_copy_into_every_new(tmp_path):
    a, b = tmp_path / "mail" / "a", tmp_path / "mail" / "b"
    paths = deliver(tmp_path, b"Subject: hi\n\nbody\n", [a, b])
    assert [p.parent for p in paths] == [a / "new", b / "new"]
    assert paths[0].read_bytes() == b"Subject: hi\n\nbody\n"
    assert os.stat(paths[0]).st_ino == os.stat(paths[1]).st_ino
    assert os.listdir(tmp_path / "spool" / "tmp") == []
    name = paths[0].name
    assert name.endswith(",S=18,W=21")
    assert "/" not in name and ":" not in name


def test_listing_uses_names_and_marks_seen(tmp_path):
    box = tmp_path / "box"
    deliver(tmp_path, b"one\n", [box])
    deliver(tmp_path, b"two\nlines\n", [box])
    mailbox = Mailbox(box, tmp_path)
    first, second = mailbox.messages()
    assert (first.size, second.size) == (5, 12)
    assert not first.seen
    assert len(first.uid) <= 70 and first.uid.isprintable()
    mailbox.mark_seen(first)
    seen, unseen = mailbox.messages()
    assert seen.seen and Path(seen.path).parent.name == "cur" and seen.path.endswith(":2,S")
    assert (seen.uid, unseen) == (first.uid, second)
    with mailbox.open(seen) as f:
        assert f.read() == b"one\n"
    for info in (seen, second):
        mailbox.remove(info)
    mailbox.remove(second)  # already gone: no error
    mailbox.sync_removals([seen, second])
    assert mailbox.messages() == []


def test_marking_seen_keeps_other_flags(tmp_path):
    box = tmp_path / "box"
    ensure_maildir(tmp_path, box)
    (box / "cur" / "12345.foreign:2,FR").write_bytes(b"a\n")
    (info,) = Mailbox(box, tmp_path).messages()
    Mailbox(box, tmp_path).mark_seen(info)
    assert os.listdir(box / "cur") == ["12345.foreign:2,FRS"]


def test_a_locked_mailbox_renames_and_unlinks_in_its_folders_and_unlock_closes_them(tmp_path):
    box = tmp_path / "box"
    deliver(tmp_path, b"one\n", [box])
    deliver(tmp_path, b"two\n", [box])
    mailbox = Mailbox(box, tmp_path)
    open_before = len(os.listdir("/proc/self/fd"))
    assert mailbox.lock()
    assert len(os.listdir("/proc/self/fd")) == open_before + 3  # the lock, new/, cur/
    first, second = mailbox.messages()
    mailbox.mark_seen(first)
    mailbox.remove(second)
    (seen,) = mailbox.messages()
    assert seen.uid == first.uid and seen.seen and Path(seen.path).parent.name == "cur"
    mailbox.remove(seen)
    mailbox.unlock()
    assert len(os.listdir("/proc/self/fd")) == open_before
    assert os.listdir(box / "new") == [] and os.listdir(box / "cur") == []


def test_foreign_files_without_sizes_are_measured(tmp_path):
    box = tmp_path / "box"
    ensure_maildir(tmp_path, box)
    (box / "cur" / "12345.foreign:2,S").write_bytes(b"a\nb\n")
    (info,) = Mailbox(box, tmp_path).messages()
    assert info.size == 6 and info.seen and info.uid == "12345.foreign"


def test_lock_is_exclusive_across_processes_and_dies_with_them(tmp_path):
    box = tmp_path / "box"
    first = Mailbox(box, tmp_path)
    assert first.lock()
    assert not Mailbox(box, tmp_path).lock()
    first.unlock()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from pathlib import Path\nfrom mailserver.maildir import Mailbox\n"
         f"assert Mailbox(Path({str(box)!r}), Path({str(tmp_path)!r})).lock()\nprint('locked', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert not Mailbox(box, tmp_path).lock()
    finally:
        holder.kill()
        holder.wait()
    assert Mailbox(box, tmp_path).lock()


def test_start_up_removes_what_dead_writers_left_in_tmp(tmp_path):
    import time

    from mailserver.stale_tmp import remove_stale_tmp

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    live = subprocess.Popen(["sleep", "30"])
    try:
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        dead_file = tmp / f"{MessageIDs(pid=lambda: gone.pid).next()}.mx"
        live_file = tmp / f"{MessageIDs(pid=lambda: live.pid).next()}.mx"
        # Names of the version before message IDs.
        dead_old_name = tmp / f"1700000000.M000001P{gone.pid}Q1.mx"
        live_old_name = tmp / f"1700000000.M000002P{live.pid}Q1.mx"
        foreign_new = tmp / "written-by-another-mda"
        foreign_old = tmp / "old-foreign-file"
        for path in (dead_file, live_file, dead_old_name, live_old_name, foreign_new, foreign_old):
            path.write_bytes(b"partial")
        old = time.time() - 37 * 3600
        os.utime(foreign_old, (old, old))
        assert remove_stale_tmp(tmp_path, tmp, "mx") == 3
        assert sorted(p.name for p in tmp.iterdir()) == sorted(
            [live_file.name, live_old_name.name, foreign_new.name])
    finally:
        live.kill()
        live.wait()
    assert remove_stale_tmp(tmp_path, tmp_path / "missing", "mx") == 0


def test_start_up_keeps_another_nodes_files_in_a_shared_tmp(tmp_path):
    """
    Issue 22: servers on two machines share the data folder.  A file that
    another node is writing carries a process id of that machine, which
    says nothing here: it is left alone until it is 36 hours old.
    """
    import time

    from mailserver.stale_tmp import remove_stale_tmp

    gone = subprocess.Popen(["true"])
    gone.wait()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    ids = MessageIDs(pid=lambda: gone.pid)
    ours = tmp / f"{ids.next()}.mx1"
    theirs = tmp / f"{ids.next()}.mx2"
    theirs_with_size = tmp / f"{ids.next()}.mx2,S=7"
    # Names of the version before message IDs.
    ours_before = tmp / f"1700000000.M000001P{gone.pid}Q1.mx1"
    theirs_before = tmp / f"1700000000.M000001P{gone.pid}Q2.mx2"
    theirs_old = tmp / f"1700000000.M000001P{gone.pid}Q4.mx2"
    for path in (ours, theirs, theirs_with_size, ours_before, theirs_before, theirs_old):
        path.write_bytes(b"partial")
    old = time.time() - 37 * 3600
    os.utime(theirs_old, (old, old))
    assert remove_stale_tmp(tmp_path, tmp, "mx1") == 3
    assert sorted(p.name for p in tmp.iterdir()) == sorted(
        [theirs.name, theirs_with_size.name, theirs_before.name])


# Issue 19: links inside the data folder were followed.


def test_delivery_does_not_write_through_a_linked_new(tmp_path):
    import pytest

    from mailserver.safe_fs import SymlinkRefused

    outside = tmp_path / "outside"
    outside.mkdir()
    box = tmp_path / "mail" / "bob"
    ensure_maildir(tmp_path, box)
    (box / "new").rmdir()
    (box / "new").symlink_to(outside)
    for maildirs in ([box], [tmp_path / "mail" / "alice", box]):
        with pytest.raises(SymlinkRefused):
            deliver(tmp_path, b"Subject: hi\n\nbody\n", maildirs)
        assert os.listdir(outside) == []
        assert os.listdir(tmp_path / "spool" / "tmp") == []


def test_a_spool_file_is_not_made_through_a_linked_tmp(tmp_path):
    import pytest

    from mailserver.safe_fs import SymlinkRefused

    outside = tmp_path / "outside"
    outside.mkdir()
    box = tmp_path / "mail" / "bob"
    ensure_maildir(tmp_path, box)
    (box / "tmp").rmdir()
    (box / "tmp").symlink_to(outside)
    with pytest.raises(SymlinkRefused):
        SpoolFile(tmp_path, box / "tmp", f"{new_message_id()}.h", b"x\n")
    assert os.listdir(outside) == []


def test_start_up_clean_up_does_not_follow_a_linked_tmp(tmp_path):
    import pytest

    from mailserver.stale_tmp import maildir_tmp_folders, remove_stale_tmp
    from mailserver.safe_fs import SymlinkRefused

    outside = tmp_path / "outside"
    outside.mkdir()
    old = outside / "1700000000.M000001P1Q1.mx"
    old.write_bytes(b"precious")
    os.utime(old, (0, 0))
    mail = tmp_path / "mail"
    ensure_maildir(tmp_path, mail / "example.org" / "bob")
    (mail / "example.org" / "bob" / "tmp").rmdir()
    (mail / "example.org" / "bob" / "tmp").symlink_to(outside)
    (mail / "linked.example").symlink_to(mail / "example.org")
    ensure_maildir(tmp_path, mail / "example.org" / "carol")
    (mail / "example.org" / "dave").symlink_to(outside)
    folders, links = maildir_tmp_folders(mail)
    assert folders == [mail / "example.org" / "bob" / "tmp", mail / "example.org" / "carol" / "tmp"]
    assert sorted(links) == [mail / "example.org" / "dave", mail / "linked.example"]
    with pytest.raises(SymlinkRefused):
        remove_stale_tmp(tmp_path, folders[0], "mx")
    assert old.read_bytes() == b"precious"
    assert remove_stale_tmp(tmp_path, folders[1], "mx") == 0


def test_a_mailbox_refuses_linked_folders_lock_file_and_messages(tmp_path):
    import pytest

    from mailserver.safe_fs import SymlinkRefused

    secret = tmp_path / "secret"
    secret.write_bytes(b"not mail\n")
    box = tmp_path / "box"
    deliver(tmp_path, b"one\n", [box])
    (box / "new" / "1700000000.M1P1Q1.x,S=9,W=10").symlink_to(secret)
    mailbox = Mailbox(box, tmp_path)
    assert mailbox.lock()
    planted, real = mailbox.messages()
    with pytest.raises(SymlinkRefused):
        mailbox.open(planted)
    with pytest.raises(SymlinkRefused):
        mailbox.read_whole(planted, 100)
    assert mailbox.read_whole(real, 100) == b"one\n"
    mailbox.unlock()
    with pytest.raises(SymlinkRefused):
        Mailbox(box, tmp_path).open(planted)
    (box / "mailserver.lock").unlink()
    (box / "mailserver.lock").symlink_to(tmp_path / "elsewhere.lock")
    with pytest.raises(SymlinkRefused):
        Mailbox(box, tmp_path).lock()
    assert not (tmp_path / "elsewhere.lock").exists()
    (box / "mailserver.lock").unlink()
    (box / "cur").rename(tmp_path / "cur")
    (box / "cur").symlink_to(tmp_path / "cur")
    with pytest.raises(SymlinkRefused):
        Mailbox(box, tmp_path).lock()


def test_maildir_folders_are_private_whatever_the_umask(tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        deliver(tmp_path, b"one\n", [tmp_path / "mail" / "example.org" / "bob"])
    finally:
        os.umask(old)
    bob = tmp_path / "mail" / "example.org" / "bob"
    for folder in (tmp_path / "mail", bob.parent, bob, bob / "tmp", bob / "new", bob / "cur"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
    (message,) = os.listdir(bob / "new")
    assert stat.S_IMODE(os.stat(bob / "new" / message).st_mode) == 0o600


def test_a_message_renamed_after_listing_is_still_read_flagged_and_removed(tmp_path):
    """
    An IMAP session may rename a message a POP3 session listed (new flags,
    or moved to cur/ as \\Recent): POP3 finds it by its unique name.
    """
    mailbox = Mailbox(tmp_path / "bob", tmp_path)
    mailbox.lock()
    (tmp_path / "bob" / "new" / "1.M1P1Q1.h,S=5,W=6").write_bytes(b"body\n")
    (tmp_path / "bob" / "new" / "2.M1P1Q1.h,S=5,W=6").write_bytes(b"two!\n")
    first, second = mailbox.messages()
    os.rename(tmp_path / "bob" / "new" / "1.M1P1Q1.h,S=5,W=6", tmp_path / "bob" / "cur" / "1.M1P1Q1.h,S=5,W=6:2,F")
    os.rename(tmp_path / "bob" / "new" / "2.M1P1Q1.h,S=5,W=6", tmp_path / "bob" / "cur" / "2.M1P1Q1.h,S=5,W=6:2,")
    assert mailbox.read_whole(first, 1000) == b"body\n"
    with mailbox.open(first) as f:
        assert f.read() == b"body\n"
    mailbox.mark_seen(first)
    assert sorted(os.listdir(tmp_path / "bob" / "cur")) == ["1.M1P1Q1.h,S=5,W=6:2,FS", "2.M1P1Q1.h,S=5,W=6:2,"]
    mailbox.remove(second)
    mailbox.sync_removals([second])
    assert os.listdir(tmp_path / "bob" / "cur") == ["1.M1P1Q1.h,S=5,W=6:2,FS"]
    mailbox.unlock()


def test_start_up_clean_up_covers_imap_folders_and_follows_no_link(tmp_path):
    from mailserver.stale_tmp import maildir_tmp_folders

    mail = tmp_path / "mail"
    bob = mail / "example.org" / "bob"
    for folder in (bob, bob / ".Sent", bob / ".Archive.2024"):
        ensure_maildir(tmp_path, folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    (bob / ".Linked").symlink_to(outside)
    folders, links = maildir_tmp_folders(mail)
    assert folders == [bob / "tmp", bob / ".Archive.2024" / "tmp", bob / ".Sent" / "tmp"]
    assert links == [bob / ".Linked"]
