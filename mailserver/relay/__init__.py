"""
The relay: the durable outbound queue, MX routing, the SMTP client, retries
and delivery status notifications.

Wiring (see L{mailserver.service})::

    queue = QueueStore(config.queue_path)            # the intake's RelayQueue
    intake = Intake(accounts=accounts, reactor=reactor, queue=queue, ...)
    runner = RelayRunner(relay=config.relay, hostname=config.hostname,
                         mta_sts_path=config.mta_sts_path,
                         queue=queue, intake=intake, reactor=reactor,
                         accounts=accounts)
    runner.setServiceParent(root)
    runner.flush(domain)                             # ETRN

The queue commands of the console script are in L{mailserver.relay.admin}.
The names below are imported when first used, so that the console script's
queue commands (which need only L{mailserver.relay.queue}) do not load the
runner, the SMTP client and the DNS resolver.
"""

from importlib import import_module

__all__ = ["QueueError", "QueueStore", "RelayRunner"]

_HOMES = {"QueueError": "queue", "QueueStore": "queue", "RelayRunner": "runner"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
