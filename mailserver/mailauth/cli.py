"""
The C{mailserver dkim} commands: C{keygen} makes a key and says what to
publish and configure; C{record} prints the DNS record of an existing key.
"""

from __future__ import annotations

import argparse
import errno

from mailserver.config.values import default_key_file
from mailserver.names import is_domain, is_selector


def _domain(text: str) -> str:
    domain = text.strip().lower().rstrip(".")
    if not is_domain(domain):
        raise argparse.ArgumentTypeError(f"{text!r} is not a domain name")
    return domain


def _selector(text: str) -> str:
    if not is_selector(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a selector (DNS labels)")
    return text.lower()


def _default_selector(algorithm: str) -> str:
    import time

    return f"{algorithm}-{time.strftime('%Y%m')}"


def _publish(domain: str, selector: str, key) -> list[str]:
    from mailserver.mailauth.keys import txt_record, zone_entry

    return [
        "Publish this DNS record:",
        f"  {zone_entry(domain, selector, key)}",
        "(as one string, for DNS web forms:",
        f"  {txt_record(key)} )",
    ]


def _keygen(config, args: argparse.Namespace) -> str:
    from mailserver.mailauth.keys import generate, parse_key, write_key

    selector = args.selector or _default_selector(args.algorithm)
    path = default_key_file(config.dkim_key_path, args.domain, selector)
    pem = generate(args.algorithm)
    try:
        write_key(path, pem, force=args.force)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "a key exists there (--force replaces it)",
                              str(path)) from None
    key = parse_key(pem)
    entries = [str(key) for key in config.dkim.keys]
    if not any(key.file(config.dkim_key_path) == path for key in config.dkim.keys):
        entries.append(f"{args.domain}:{selector}")
    lines = [f"wrote the {args.algorithm} private key to {path} (mode 0600)", ""]
    lines += _publish(args.domain, selector, key)
    lines += ["", "Then sign with it: in the configuration file,",
              "  [dkim]", "  keys = [" + ", ".join(f'"{e}"' for e in entries) + "]"]
    if not config.is_local_domain(args.domain):
        lines += ["", f"note: {args.domain} is not in local_domains"]
    return "\n".join(lines)


def _record(config, args: argparse.Namespace) -> str:
    from mailserver.mailauth.keys import load_key

    path = default_key_file(config.dkim_key_path, args.domain, args.selector)
    for key in config.dkim.keys:
        if (key.domain, key.selector) == (args.domain, args.selector):
            path = key.file(config.dkim_key_path)
    try:
        key = load_key(path)
    except ValueError as e:
        raise OSError(errno.ENOENT, str(e), str(path)) from None
    return "\n".join(_publish(args.domain, args.selector, key))


def add_dkim_commands(commands) -> None:
    """
    Add C{dkim keygen} and C{dkim record} to the C{mailserver} parser's
    subcommands.
    """
    dkim = commands.add_parser("dkim", help="DKIM signing keys").add_subparsers(
        dest="action", required=True
    )
    keygen = dkim.add_parser(
        "keygen", help="make a signing key in <data_dir>/dkim/ and print its DNS record"
    )
    keygen.add_argument("domain", type=_domain)
    keygen.add_argument("--selector", "-s", type=_selector,
                        help="the selector (default: ALGORITHM-YYYYMM)")
    keygen.add_argument("--algorithm", "-a", choices=("rsa", "ed25519"), default="rsa",
                        help="rsa (2048 bits, rsa-sha256) or ed25519 (RFC 8463)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    keygen.set_defaults(handler=_keygen)
    record = dkim.add_parser("record", help="print the DNS record of an existing key")
    record.add_argument("domain", type=_domain)
    record.add_argument("selector", type=_selector)
    record.set_defaults(handler=_record)
