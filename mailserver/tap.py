"""
The C{twistd mailserver} entry point: options, then the service.

Options only parse; every check of the configuration happens in
L{mailserver.config.load}, and a problem ends start-up with one line.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from mailserver.config import ConfigError, load, override


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the mail server: SMTP in, submission, Maildir, POP3 out. "
        "Without --config it serves on loopback (SMTP 2525, submission 2587, "
        "POP3 2110) with its state in ./mailserver-data."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file (default: embedded default)."],
        ["workers", "w", None, "Processes serving the TCP listeners (overrides `workers`).", int],
    ]


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from mailserver.service import make_service

    try:
        config = load(options["config"])
        if options["workers"] is not None:
            config = override(config, "workers", options["workers"], "--workers")
        return make_service(config, reactor)
    except ConfigError as e:
        raise SystemExit(f"mailserver: {e}") from None
    except OSError as e:
        raise SystemExit(f"mailserver: cannot prepare {e.filename}: {e.strerror}") from None
