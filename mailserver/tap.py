"""
The C{twistd mailserver} entry point: options, then the service.

Options only parse; every check of the configuration happens in
L{mailserver.config.load}, and a problem ends start-up with one line.
"""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver
from twisted.python import usage

from mailserver.config import ConfigError, load, override
from mailserver.nodes import NodeInUse
from mailserver.ownership import DataFolderError, Owner, server_owner
from mailserver.text_log import TextLogObserver, twistd_observer


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the mail server: SMTP in, submission, Maildir, POP3 out. "
        "Without --config it serves on loopback (SMTP 2525, submission 2587, "
        "POP3 2110, and the admin HTTP API on 127.0.0.1:2080) with its state "
        "in ./mailserver-data. Started as root with twistd's --uid/--gid, it "
        "binds its ports first, then runs as that user, who owns the data folder."
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
        observer = twistd_observer(getattr(options, "parent", None), config.log.rotate_size,
                                   config.log.keep_rotated)
        server = make_service(config, reactor, _twistd_owner(options),
                              worker_output=None if observer is None else observer.write_lines)
        return server if observer is None else _LoggingTo(server, observer)
    except (ConfigError, DataFolderError, NodeInUse) as e:
        raise SystemExit(f"mailserver: {e}") from None
    except OSError as e:
        raise SystemExit(f"mailserver: cannot prepare {e.filename}: {e.strerror}") from None


def _twistd_owner(options: Options) -> Owner | None:
    """
    The user twistd's own C{--uid}/C{--gid} (parsed by twistd, our parent
    options) will make this process once the listeners are bound.
    """
    twistd = getattr(options, "parent", None)
    if twistd is None:
        return None
    return server_owner(twistd.get("uid"), twistd.get("gid"))


class _LoggingTo(MultiService):
    """
    The server, and the log observer twistd is to use (L{TextLogObserver}).
    twistd takes an C{ILogObserver} component of its application in place
    of its own observer; it makes that application only after
    C{makeService}, so the component is set when the server joins it.
    """

    def __init__(self, server: IService, observer: TextLogObserver) -> None:
        super().__init__()
        self._observer = observer
        server.setServiceParent(self)

    def setServiceParent(self, parent) -> None:
        if getattr(parent, "getComponent", None) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, self._observer)
        super().setServiceParent(parent)
