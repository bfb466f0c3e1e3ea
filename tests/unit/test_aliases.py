"""
The aliases file: every line that cannot be used is reported (file, line,
problem) by the parser, the accounts (logged when the file is read again)
and C{mailserver check-config}; C{mailserver alias add/del/list} edit it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.logger import capturedLogs

from mailserver.aliases import AliasError, AliasesFile, parse_aliases
from mailserver.cli import main
from mailserver.config import Config
from mailserver.from_config import accounts_for

LOCAL = ("example.org", "lists.example.org")

BAD_FILE = """\
# a comment, then good and bad lines
postmaster@example.org: alice@example.org
@other.test: bob@example.org
no colon on this line
someone@elsewhere.test: alice@example.org
team@lists.example.org: alice@example.org, not an address, bob@example.org
postmaster@example.org: bob@example.org
pipe@example.org: |/usr/bin/procmail
empty@example.org:
files@example.org: /var/mail/x, :include:/etc/list
local only: alice@example.org
"""


def test_every_bad_line_is_reported_with_its_number_and_the_good_ones_still_count():
    path = Path("/etc/mail/aliases")
    aliases, problems = parse_aliases(BAD_FILE, path, LOCAL)
    assert aliases == {
        "postmaster@example.org": ("alice@example.org",),
        "team@lists.example.org": ("alice@example.org", "bob@example.org"),
    }
    assert [(p.path, p.line) for p in problems] == [
        (path, 3), (path, 4), (path, 5), (path, 6), (path, 7), (path, 8), (path, 9),
        (path, 10), (path, 10), (path, 11)]
    text = [str(p) for p in problems]
    assert text[0] == (
        "/etc/mail/aliases:3: '@other.test': a whole domain cannot be an alias "
        "(smtp.catch_all sends a local domain's unknown users to one account)")
    assert text[1].startswith("/etc/mail/aliases:4: no colon: 'no colon on this line'")
    assert text[2] == ("/etc/mail/aliases:5: 'someone@elsewhere.test': elsewhere.test is "
                       "not one of local_domains")
    assert text[3] == ("/etc/mail/aliases:6: team@lists.example.org: target "
                       "'not an address' is not an address (user@domain)")
    assert text[4] == ("/etc/mail/aliases:7: postmaster@example.org is an alias already, "
                       "on line 2 (that line counts)")
    assert "programs, files and :include: are not supported" in text[5]
    assert text[6] == "/etc/mail/aliases:9: empty@example.org has no targets"
    assert "'/var/mail/x'" in text[7] and "':include:/etc/list'" in text[8]
    assert text[9] == "/etc/mail/aliases:11: 'local only' is not an address (user@domain)"


def test_a_clean_file_has_no_problems():
    aliases, problems = parse_aliases(
        "Team@Lists.Example.org: Alice@Example.org, far@remote.test\n# end\n", Path("a"), LOCAL)
    assert problems == []
    assert aliases == {"team@lists.example.org": ("alice@example.org", "far@remote.test")}


@pytest.fixture
def config(tmp_path):
    return Config(hostname="mx.test", data_dir=str(tmp_path / "data"), local_domains=LOCAL)


def test_the_accounts_log_each_bad_line_when_they_read_the_file_and_again_after_a_change(config):
    config.aliases_path.parent.mkdir(parents=True)
    config.aliases_path.write_text("ok@example.org: alice@example.org\nbroken line\n")
    accounts = accounts_for(config)
    with capturedLogs() as events:
        problems = accounts.problems()
        accounts.problems()  # unchanged: read once, logged once
    assert [str(p) for p in problems] == [
        f"{config.aliases_path}:2: no colon: 'broken line' (write alias@domain: target[, target...])"]
    logged = [e for e in events if e.get("event") == "accounts.bad_line"]
    assert [(e["file"], e["line"], e["problem"]) for e in logged] == [
        (str(config.aliases_path), 2, problems[0].problem)]
    # Change detection: the next lookup reads the new file and logs it.
    config.aliases_path.write_text("ok@example.org: alice@example.org\n@x.test: a@b.test\n\n")
    with capturedLogs() as events:
        accounts.resolve("ok@example.org")
    assert [(e["line"], e["problem"][:13]) for e in events
            if e.get("event") == "accounts.bad_line"] == [(2, "'@x.test': a ")]
    # A reload (forget) reads it again even if it looks unchanged.
    accounts.forget()
    with capturedLogs() as events:
        assert len(accounts.problems()) == 1
    assert len([e for e in events if e.get("event") == "accounts.bad_line"]) == 1


def test_alias_add_del_list_keep_the_other_lines_and_write_atomically(config):
    path = config.aliases_path
    path.parent.mkdir(parents=True)
    path.write_text("# the team\nteam@example.org: alice@example.org\nbroken line\n")
    aliases = AliasesFile(path, LOCAL)
    assert aliases.add("Team@example.org", ["bob@example.org", "alice@example.org"]) == (
        "alice@example.org", "bob@example.org")
    assert aliases.add("sales@example.org", ["carol@remote.test"]) == ("carol@remote.test",)
    assert path.read_text() == (
        "# the team\nteam@example.org: alice@example.org, bob@example.org\nbroken line\n"
        "sales@example.org: carol@remote.test\n")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["aliases"]  # no temporary left
    assert aliases.listing() == [
        "sales@example.org: carol@remote.test",
        "team@example.org: alice@example.org, bob@example.org"]
    assert aliases.remove("team@example.org", ["alice@example.org"]) == ("bob@example.org",)
    assert aliases.remove("sales@example.org", []) == ()
    assert path.read_text() == "# the team\nteam@example.org: bob@example.org\nbroken line\n"
    # What the running server reads agrees.
    assert accounts_for(config).expand("team@example.org") == ("bob@example.org",)


@pytest.mark.parametrize("alias, targets, problem", [
    ("x@elsewhere.test", ["a@example.org"], "elsewhere.test is not one of local_domains"),
    ("@example.org", ["a@example.org"], "a whole domain cannot be an alias"),
    ("x@example.org", ["nobody"], "'nobody' is not an address"),
    ("x@example.org", ["|/bin/sh"], "programs, files and :include: are not supported"),
    ("team@example.org", ["alice@example.org"], "delivers to alice@example.org already"),
])
def test_alias_add_refuses_what_the_file_could_not_use(config, alias, targets, problem):
    config.aliases_path.parent.mkdir(parents=True)
    config.aliases_path.write_text("team@example.org: alice@example.org\n")
    with pytest.raises(AliasError, match=problem):
        AliasesFile(config.aliases_path, LOCAL).add(alias, targets)
    assert config.aliases_path.read_text() == "team@example.org: alice@example.org\n"


def test_alias_del_of_what_is_not_there(config):
    aliases = AliasesFile(config.aliases_path, LOCAL)
    with pytest.raises(AliasError, match="no such alias: x@example.org"):
        aliases.remove("x@example.org", [])
    aliases.add("x@example.org", ["a@example.org"])
    with pytest.raises(AliasError, match="does not deliver to b@example.org"):
        aliases.remove("x@example.org", ["b@example.org"])


def _toml(tmp_path, config) -> str:
    path = tmp_path / "mailserver.toml"
    path.write_text(f'hostname = "mx.test"\ndata_dir = "{config.data_dir}"\n'
                    'local_domains = ["example.org", "lists.example.org"]\n')
    return str(path)


def test_the_alias_commands(tmp_path, config, capsys):
    toml = _toml(tmp_path, config)
    assert main(["-c", toml, "alias", "add", "team@example.org", "a@example.org",
                 "b@example.org"]) == 0
    assert capsys.readouterr().out == "team@example.org: a@example.org, b@example.org\n"
    assert main(["-c", toml, "alias", "del", "team@example.org", "a@example.org"]) == 0
    assert capsys.readouterr().out == "team@example.org: b@example.org\n"
    assert main(["-c", toml, "alias", "list"]) == 0
    assert capsys.readouterr().out == "team@example.org: b@example.org\n"
    assert main(["-c", toml, "alias", "add", "x@other.test", "a@example.org"]) == 1
    assert capsys.readouterr().err == (
        "mailserver: 'x@other.test': other.test is not one of local_domains\n")
    assert main(["-c", toml, "alias", "del", "team@example.org"]) == 0
    assert capsys.readouterr().out == "removed team@example.org\n"
    assert config.aliases_path.read_text() == ""


def test_check_config_names_each_bad_line_and_fails(tmp_path, config, capsys):
    toml = _toml(tmp_path, config)
    config.aliases_path.parent.mkdir(parents=True)
    config.aliases_path.write_text("ok@example.org: a@example.org\n")
    assert main(["check-config", toml]) == 0
    assert capsys.readouterr().out == f"{toml}: OK\n"
    config.aliases_path.write_text(BAD_FILE)
    assert main(["check-config", toml]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 10 and captured.out == ""
    assert lines[0].startswith(f"mailserver: {config.aliases_path}:3: '@other.test': ")
    assert lines[-1] == (f"mailserver: {config.aliases_path}:11: 'local only' is not an "
                         "address (user@domain)")
