"""
Hostile configuration files: random TOML documents built from the real key
names (walked from the model, each key's value of the TOML type its kind
reads) with values of every type, random bytes and mangled TOML.  C{load} either returns a L{Config} holding the file's
values or raises a L{ConfigError} of one line naming the file and a key,
never anything else; and C{mailserver check-config} says so in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import math
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailserver.config import Config, ConfigError, load
from mailserver.config.model import Setting

MAILSERVER = Path(sys.executable).with_name("mailserver")
REPO = Path(__file__).resolve().parents[2]  # this tree's code, not the installed one
FUZZ_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def toml_string(text: str) -> str:
    """
    A TOML basic string: quote, backslash and control characters escaped.
    """
    escaped = "".join(
        "\\" + c if c in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
        for c in text
    )
    return f'"{escaped}"'


def toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else toml_string(key)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # inf, nan, 1e+300, -0.0 are TOML too
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def same(a: object, b: object) -> bool:
    """
    Equal, where a nan equals a nan.
    """
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def toml_document(document: dict) -> str:
    """
    Top-level scalars, then each table as a C{[section]} or, for a table
    inside a table, inline.
    """
    lines = [
        f"{toml_key(k)} = {toml_value(v)}" for k, v in document.items() if not isinstance(v, dict)
    ]
    for key, value in document.items():
        if isinstance(value, dict):
            lines.append(f"[{toml_key(key)}]")
            lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
    return "\n".join(lines) + "\n"


# Values of every TOML type, hostile ones included.
SCALARS = st.one_of(
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 2**63 - 1, 2**63, 10**400]),
    st.floats(),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), -0.0, 1e308, 5e-324]),
    st.booleans(),
    st.text(max_size=20),
    st.datetimes(timezones=st.none() | st.just(datetime.timezone.utc)),
    st.dates(),
)
ANY = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=5,
)
# Strings some keys need to be valid, so validation is reached past them.
PLAUSIBLE = st.sampled_from(
    [
        "", "tcp:2525", "tcp:25:interface=127.0.0.1", "tcp6:25", "unix:/tmp/x.sock", "ssl:465",
        "systemd:domain=INET:index=0", "tcp:0", "tcp:99999", "tcp:", "bogus:1", "example.org",
        "Example.org", "mx.example.org", "5m", "4h", "0s", "90", "1.5d", "-1m", "host:25",
        "[::1]:25", "host:0", "a=b:25", "=x", "refuse", "answer", "tag", "reject", "starttls",
        "implicit", "opportunistic", "required", "none", "+", "++", "10.0.0.0/8", "::1/128",
        "300.0.0.1", "example.org:sel", "example.org:sel:/nonexistent/key", "from", "x y",
        "file:/nonexistent", "headers", "mailserver-data", "héllo", "a\nb", "a\0b", "\u2028",
        "NEVER", "30", "localhost=bob@localhost", "@localhost=x@example.org", "x=y",
        "0123456789abcdef", "tcp:25:interface=::1", "tcp:25:backlog=-1", "tcp:-1", "1e-300s",
        "127.0.0.1:53", "::1", "[::1]", "host:25:extra", "a" * 64 + ".example",
        "example.org=verify", ".example.org=may", "example.org=dane", "ca.pem",
    ]
)


WRONG = st.one_of(SCALARS, ANY)


FILE_VALUES = {
    list: st.lists(PLAUSIBLE | st.text(max_size=12), max_size=4),
    bool: st.booleans(),
    int: st.integers(-3, 10**6) | st.sampled_from([2**63 - 1, 2**63, 10**30]),
    float: st.floats() | st.integers(-3, 10**6),
    str: PLAUSIBLE | st.text(max_size=12),
}


def strategy_for(f: dataclasses.Field) -> st.SearchStrategy:
    """
    Values of the TOML type a field's kind reads (for a table, a table of
    its fields).
    """
    if "section" in f.metadata:
        return table_for(f.metadata["section"])
    if "setting" in f.metadata:
        return FILE_VALUES[f.metadata["setting"].kind.file_type]
    return ANY  # plugins.options: tables by name, written as [plugins.NAME]


@functools.cache
def table_for(cls: type) -> st.SearchStrategy[dict]:
    """
    A few of the table's keys, each with a value of its type or (one time
    in eight) of any type, and now and then a key the table does not have.
    """
    by_name = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    fields = list(by_name)

    @st.composite
    def table(draw):
        document = {}
        for name in draw(st.lists(st.sampled_from(fields), unique=True, max_size=5)):
            wrong = draw(st.integers(0, 7)) == 0
            document[name] = draw(WRONG if wrong else strategy_for(by_name[name]))
        if draw(st.integers(0, 7)) == 0:
            extra = draw(st.sampled_from(["headers", "webhook", "Hostname"]) | st.text(max_size=8))
            document.setdefault(extra, draw(ANY))
        return document

    return table()


DOCUMENTS = table_for(Config)
TOML_PUNCTUATION = st.sampled_from(list("[]{}=\"'.,\n#\\ 0x+-:"))


def leaf_paths(cls: type, prefix: str = "") -> set[str]:
    """
    Every dotted key the file format has: tables and their fields.
    """
    paths = set()
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            paths.add(prefix + f.name)
            paths |= leaf_paths(f.metadata["section"], prefix + f.name + ".")
        elif "setting" in f.metadata:
            paths.add(prefix + f.name)
    return paths


KNOWN_KEYS = leaf_paths(Config)


def document_paths(document: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in document.items():
        paths.add(prefix + key)
        if isinstance(value, dict):
            paths |= document_paths(value, prefix + key + ".")
    return paths


def check_loaded(cls: type, config: object, document: dict) -> None:
    """
    Every known key in the file has its value, parsed by its kind, in the
    configuration.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in document.items():
        if key not in fields:
            assert key in getattr(config, "options")  # a [plugins.NAME] table
            assert config.options[key] == value
            continue
        loaded = getattr(config, key)
        f = fields[key]
        if "section" in f.metadata:
            check_loaded(f.metadata["section"], loaded, value)
        else:
            setting: Setting = f.metadata["setting"]
            assert loaded == setting.kind.parse(value)
            assert type(loaded) is type(setting.kind.parse(value))


@contextlib.contextmanager
def scratch():
    """
    A folder to write files in and run from, so relative paths in a file
    (certificates, key files) point nowhere.
    """
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
        yield Path(folder)


def load_checked(path: Path) -> Config | ConfigError:
    """
    C{load}, which must return a Config or raise a one-line ConfigError
    rendered as C{file: key: problem}.
    """
    try:
        return load(path)
    except ConfigError as e:
        message = str(e)
        assert e.source == str(path)
        assert message.startswith(f"{path}: ")
        assert message.isprintable(), message
        assert e.problem
        return e


@FUZZ_SETTINGS
@given(DOCUMENTS)
def test_random_documents(document):
    text = toml_document(document)
    assert same(tomllib.loads(text), document)  # the document is the one meant
    with scratch() as folder:
        path = folder / "mailserver.toml"
        path.write_text(text, encoding="utf-8")
        result = load_checked(path)
    if isinstance(result, Config):
        check_loaded(Config, result, document)
        return
    # A valid TOML file: the problem is always about one key, which is a key
    # the format has, or a key the file has that it has not.
    assert result.key != "-"
    if result.problem == "unknown key":
        assert result.key in document_paths(document)
    else:
        assert result.key in KNOWN_KEYS or result.key.startswith("plugins."), result


@FUZZ_SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes(data):
    with scratch() as folder:
        path = folder / "mailserver.toml"
        path.write_bytes(data)
        result = load_checked(path)
    try:
        tomllib.loads(data.decode("utf-8"))
    except Exception:
        assert isinstance(result, ConfigError) and result.key == "-"
        assert result.problem.startswith("not valid TOML: ")


@FUZZ_SETTINGS
@given(
    DOCUMENTS,
    st.lists(
        st.tuples(st.integers(0, 10**6), TOML_PUNCTUATION | st.text(max_size=2)),
        min_size=1,
        max_size=4,
    ),
)
def test_mangled_documents(document, edits):
    """
    Valid documents with a few characters inserted: mostly invalid TOML
    that is nearly valid.
    """
    text = toml_document(document)
    for position, insert in edits:
        position %= len(text) + 1
        text = text[:position] + insert + text[position:]
    with scratch() as folder:
        path = folder / "mailserver.toml"
        path.write_text(text, encoding="utf-8")
        load_checked(path)


# What the fuzzing found: each of these escaped load() as another exception.
FOUND = {
    "invalid UTF-8": b'hostname = "\xff"\n',  # UnicodeDecodeError
    "deep nesting": b"a = " + b"[" * 3000 + b"]" * 3000 + b"\n",  # RecursionError
    "deep tables": b"a = " + b"{b=" * 3000 + b"1" + b"}" * 3000 + b"\n",  # RecursionError
    "4,300 digits": b"workers = " + b"9" * 5000 + b"\n",  # ValueError from int()
}


@pytest.mark.parametrize("data", FOUND.values(), ids=FOUND.keys())
def test_files_tomllib_fails_on_are_not_valid_toml(tmp_path, data):
    path = tmp_path / "mailserver.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert (e.value.key, e.value.problem.split(":")[0]) == ("-", "not valid TOML")


FINITE = "must be a finite number less than 2**63"
NO_NUL = "must not contain NUL characters"


@pytest.mark.parametrize(
    "text, key, problem",
    [
        # OverflowError from float(); and timeouts no reactor can wait for.
        ("[limits]\nshutdown_timeout = 1" + "0" * 400, "limits.shutdown_timeout", FINITE),
        ("[limits]\nauth_failure_delay = inf", "limits.auth_failure_delay", FINITE),
        ("[limits]\nauth_failure_delay = nan", "limits.auth_failure_delay", FINITE),
        ("[limits]\nsmtp_command_timeout = 9223372036854775808", "limits.smtp_command_timeout",
         "must be less than 2**63"),
        # ValueError ("embedded null byte") from reading the certificate, and
        # from the import system on a plugin path.
        ('[tls]\ncertificate = "a\\u0000b"\nkey = "k"', "tls.certificate", NO_NUL),
        ('[plugins]\npaths = ["/x\\u0000"]', "plugins.paths", NO_NUL),
    ],
    ids=["huge float", "inf", "nan", "2**63", "NUL in a path", "NUL in a list"],
)
def test_hostile_values_are_named(tmp_path, text, key, problem):
    path = tmp_path / "mailserver.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert (e.value.key, e.value.problem) == (key, problem)


def test_a_newline_in_a_key_stays_on_one_line(tmp_path):
    path = tmp_path / "mailserver.toml"
    path.write_text('"a\\nb" = 1\n')
    with pytest.raises(ConfigError) as e:
        load(path)
    assert e.value.key == "a\nb"
    assert str(e.value) == f"{path}: a\\nb: unknown key"


# check-config on the command line: one line on stderr, exit status 1.
BAD_FILES = {
    "invalid UTF-8": b'hostname = "\xff"\n',
    "deep nesting": b"a = " + b"[" * 3000 + b"]" * 3000 + b"\n",
    "newline in key": b'"a\\nb" = 1\n',
    "NUL in plugin path": b'[plugins]\npaths = ["/nonexistent\\u0000"]\nenabled = ["x"]\n',
    "huge float": b"[limits]\nshutdown_timeout = 1" + b"0" * 400 + b"\n",
    "wrong type": b'workers = "many"\n',
    "newline in an interface": b'[listeners]\nsmtp = ["tcp:25:interface=127.0.0.1\\nevil"]\n',
    "2 MB host name": b'hostname = "' + b"a." * 1_000_000 + b'a"\n',
}


@pytest.mark.parametrize("data", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_check_config_says_one_line(tmp_path, data):
    path = tmp_path / "bad.toml"
    path.write_bytes(data)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("MAILSERVER_CONFIG", None)
    result = subprocess.run(
        [str(MAILSERVER), "check-config", str(path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"mailserver: {path}: ")
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    assert result.stdout == ""
