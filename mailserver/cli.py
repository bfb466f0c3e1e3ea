"""
The C{mailserver} console script: accounts, aliases and configuration checks.

It works on the same files as the running server, which notices changes by
itself, so nothing here needs the server to be stopped or signalled.  Run
as root on a data folder that belongs to another user (the server's), it
does its work as that user, so every file it makes is the server's (see
L{mailserver.ownership}); it says so when it makes the data folder itself.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import warnings
from collections.abc import Sequence

from mailserver.accounts import AccountError
from mailserver.aliases import AliasError
from mailserver.config import Config, ConfigError, load
from mailserver.from_config import accounts_for, aliases_file_for, certificate_files
from mailserver.hooks import PluginContext
from mailserver.ownership import become_owner_of
from mailserver.mailauth import add_dkim_commands, load_signing_keys
from mailserver.plugin_loading import load_plugins
from mailserver.relay.admin import add_queue_commands
from mailserver.relay.queue import QueueError


class CommandError(Exception):
    """
    A problem with what the user asked for, printed as one line.
    """


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif not sys.stdin.isatty():
        # getpass would prompt on the terminal (or warn and read this input
        # with echo), leaving what was piped in unused.
        raise CommandError(
            "standard input is not a terminal: give the password on it with --password-stdin"
        )
    else:
        password = _prompt("Password: ")
        if _prompt("Again: ") != password:
            raise CommandError("the passwords differ")
    if not password:
        raise CommandError("the password is empty")
    return password


def _prompt(text: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", getpass.GetPassWarning)
            return getpass.getpass(text)
    except EOFError:
        raise CommandError("no password given (end of input at the prompt)") from None
    except getpass.GetPassWarning:
        raise CommandError(
            "cannot turn off echo to read the password: use --password-stdin"
        ) from None


def _user_add(config: Config, args: argparse.Namespace) -> str:
    accounts_for(config).add_user(args.address, _read_password(args))
    return f"added {args.address} to {config.users_path.resolve()}"


def _user_passwd(config: Config, args: argparse.Namespace) -> str:
    accounts_for(config).set_password(args.address, _read_password(args))
    return f"password changed for {args.address} in {config.users_path.resolve()}"


def _user_del(config: Config, args: argparse.Namespace) -> str:
    accounts_for(config).remove_user(args.address)
    return (
        f"removed {args.address} from {config.users_path.resolve()} "
        "(its mail stays in the Maildir)"
    )


def _user_list(config: Config, args: argparse.Namespace) -> str:
    return "\n".join(accounts_for(config).users())


def _alias_add(config: Config, args: argparse.Namespace) -> str:
    targets = aliases_file_for(config).add(args.alias, args.targets)
    return f"{args.alias.lower()}: {', '.join(targets)}"


def _alias_del(config: Config, args: argparse.Namespace) -> str:
    left = aliases_file_for(config).remove(args.alias, args.targets)
    if left:
        return f"{args.alias.lower()}: {', '.join(left)}"
    return f"removed {args.alias.lower()}"


def _alias_list(config: Config, args: argparse.Namespace) -> str:
    return "\n".join(aliases_file_for(config).listing())


def _check_config(config: Config, args: argparse.Namespace) -> str:
    from mailserver.tls import server_options

    from twisted.internet import reactor

    checked = load(args.file) if args.file else config
    if checked.tls.certificate:  # else a self-signed pair is made at start
        server_options(certificate_files(checked))
    load_signing_keys(checked.dkim, checked.dkim_key_path, checked.source)
    context = PluginContext(
        reactor=reactor, hostname=checked.hostname, data_path=checked.data_path
    )
    load_plugins(checked.plugins, context, checked.source)
    problems = accounts_for(checked).problems()
    if problems:
        raise CommandError("\n".join(map(str, problems)))
    return f"{checked.source}: OK"


def _reload(config: Config, args: argparse.Namespace) -> str:
    import signal

    pid_path = config.pid_path
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        raise CommandError(f"no running server found ({pid_path} is missing)") from None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise CommandError(f"no running server with pid {pid} (stale {pid_path})") from None
    return f"asked process {pid} to reload"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailserver", description="Manage the mail server's accounts and configuration."
    )
    parser.add_argument(
        "--config",
        "-c",
        default=os.environ.get("MAILSERVER_CONFIG"),
        help="the TOML configuration file (default: $MAILSERVER_CONFIG, "
        "else the embedded default with ./mailserver-data)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    user = commands.add_parser("user", help="manage accounts").add_subparsers(
        dest="action", required=True
    )
    for name, handler, helptext in (
        ("add", _user_add, "add an account"),
        ("passwd", _user_passwd, "change an account's password"),
    ):
        sub = user.add_parser(name, help=helptext)
        sub.add_argument("address")
        sub.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of standard input",
        )
        sub.set_defaults(handler=handler)
    sub = user.add_parser("del", help="remove an account")
    sub.add_argument("address")
    sub.set_defaults(handler=_user_del)
    user.add_parser("list", help="list the accounts").set_defaults(handler=_user_list)

    alias = commands.add_parser("alias", help="manage aliases and mailing lists").add_subparsers(
        dest="action", required=True
    )
    sub = alias.add_parser("add", help="make an alias deliver to these targets (too)")
    sub.add_argument("alias")
    sub.add_argument("targets", nargs="+", metavar="target")
    sub.set_defaults(handler=_alias_add)
    sub = alias.add_parser("del", help="remove an alias, or only some of its targets")
    sub.add_argument("alias")
    sub.add_argument("targets", nargs="*", metavar="target")
    sub.set_defaults(handler=_alias_del)
    alias.add_parser("list", help="list the aliases").set_defaults(handler=_alias_list)

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file", nargs="?", help="the file (default: --config)")
    check.set_defaults(handler=_check_config)

    commands.add_parser(
        "reload", help="make the running server re-read accounts, aliases and TLS files"
    ).set_defaults(handler=_reload)
    add_queue_commands(commands)
    add_dkim_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load(args.config)
        data_path = config.data_path
        existed = data_path.exists()
        if args.handler is not _check_config:  # it reads as twistd would, and writes nothing
            become_owner_of(data_path)
        try:
            output = args.handler(config, args)
        finally:
            if not existed and data_path.exists():
                print(f"mailserver: made the data folder {data_path.resolve()}", file=sys.stderr)
    except (ConfigError, AccountError, AliasError, CommandError, QueueError) as e:
        for line in str(e).splitlines():
            print(f"mailserver: {line}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mailserver: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if output:
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
