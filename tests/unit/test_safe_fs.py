"""
Folders and files inside the data folder: no link followed, made private.
"""

import errno
import os
import stat

import pytest

from mailserver.safe_fs import (
    SymlinkRefused,
    make_data_folder,
    open_file,
    open_folder,
    open_path,
    tighten,
)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_link_anywhere_below_the_data_folder_is_refused(tmp_path):
    base = tmp_path / "data"
    (base / "mail" / "real" / "bob").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "mail" / "linked").symlink_to(base / "mail" / "real")
    (base / "mail" / "real" / "out").symlink_to(outside)
    for folder in (base / "mail" / "linked" / "bob", base / "mail" / "real" / "out"):
        with pytest.raises(SymlinkRefused) as refused:
            os.close(open_folder(base, folder, create=True))
        assert refused.value.errno == errno.ELOOP
        assert "symbolic link" in str(refused.value)
    assert refused.value.filename == str(base / "mail" / "real" / "out")
    assert os.listdir(outside) == []
    # A file where a folder belongs is not a link: the usual error.
    (base / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        open_folder(base, base / "file")


def test_the_data_folder_itself_may_be_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "real")
    os.close(open_folder(tmp_path / "data", tmp_path / "data" / "spool" / "tmp", create=True))
    assert (tmp_path / "real" / "spool" / "tmp").is_dir()


def test_folders_are_made_0700_whatever_the_umask(tmp_path, umask_022):
    base = tmp_path / "data"
    make_data_folder(base)
    os.close(open_folder(base, base / "a" / "b", create=True))
    assert [mode(p) for p in (base, base / "a", base / "a" / "b")] == [0o700] * 3
    os.umask(0o277)  # even one that takes the owner's own bits
    os.close(open_folder(base, base / "c", create=True))
    assert mode(base / "c") == 0o700
    with pytest.raises(FileNotFoundError):
        open_folder(base, base / "d")


def test_files_that_are_links_are_refused(tmp_path):
    (tmp_path / "secret").write_text("secret")
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(SymlinkRefused):
            open_file(fd, "link", os.O_RDONLY)
        with pytest.raises(SymlinkRefused):
            open_file(fd, "link", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    finally:
        os.close(fd)
    with pytest.raises(SymlinkRefused):
        open_path(tmp_path / "link")
    assert (tmp_path / "secret").read_text() == "secret"


def test_tighten_takes_other_users_access_and_keeps_the_groups(tmp_path):
    base = tmp_path / "data"
    (base / "mail").mkdir(parents=True)
    os.chmod(base / "mail", 0o755)
    assert tighten(base, base / "mail") == 0o755
    assert mode(base / "mail") == 0o750
    assert tighten(base, base / "mail") is None
    assert tighten(base, base / "missing") is None
    (tmp_path / "elsewhere").mkdir(mode=0o755)
    (base / "queue").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SymlinkRefused):
        tighten(base, base / "queue")
    assert mode(tmp_path / "elsewhere") == 0o755
