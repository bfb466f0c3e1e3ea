"""
Fuzz the configuration loader: the fuzzer's bytes are written to a file and
loaded, as C{twistd} and C{mailserver check-config} load one.

The oracle is the property test's (tests/unit/test_config_fuzz.py,
L{load_checked}): C{load} returns a C{Config} or raises a C{ConfigError}
of one printable line C{file: key: problem}; any other exception is a crash.
The run starts from a document holding every key with its default value,
and the dictionary holds every key name, so mutations reach the checks
behind the TOML parser.

    .venv/bin/python fuzz/config_loader.py -max_total_time=300 fuzz/corpus/config
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

import _common

with atheris.instrument_imports(include=["mailserver", "tomllib"]):
    import tomllib  # noqa: F401  (the parser is fuzzed too)

    import mailserver.config
    import mailserver.config.endpoints  # noqa: F401  (the endpoint checks import Twisted lazily)
    import mailserver.names  # noqa: F401

from tests.unit.test_config_fuzz import (  # noqa: E402
    KNOWN_KEYS,
    PLAUSIBLE,
    load_checked,
    toml_document,
)

FOLDER = Path(tempfile.mkdtemp(prefix="config-fuzz-"))
PATH = FOLDER / "mailserver.toml"


def TestOneInput(data: bytes) -> None:
    PATH.write_bytes(data)
    load_checked(PATH)


def defaults() -> dict:
    """
    The document that spells out every key with its default.
    """
    document: dict = {"hostname": "mx.example.org"}
    for key, setting in mailserver.config.file_keys():
        *tables, name = key.split(".")
        table = document
        for part in tables:
            table = table.setdefault(part, {})
        table.setdefault(name, setting.default)
    return document


def main() -> None:
    os.chdir(FOLDER)  # relative paths in a document point into the scratch folder
    every_key = toml_document(defaults())
    names = {part for key in KNOWN_KEYS for part in key.split(".")}
    tokens = [n.encode() for n in sorted(names)] + [
        f"[{table}]".encode() for table in sorted(k for k in KNOWN_KEYS if "." not in k)
    ] + [s.encode() for s in PLAUSIBLE.elements if s] + [
        b" = ", b'"', b"'''", b'"""', b"[", b"]", b"{", b"}", b",", b"\\u0000", b"inf", b"nan",
        b"true", b"false", b"1979-05-27T07:32:00Z", b"0x", b"1e400", b"9" * 30,
    ]
    seeds = [
        every_key.encode(),
        b'hostname = "mx.example.org"\n[limits]\nmax_command_line = 1000\n',
        b'[plugins]\nenabled = ["headers"]\n[plugins.headers]\nadd = "X-A: b"\n',
    ]
    atheris.Setup(_common.prepare(sys.argv, "config", tokens, seeds), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
