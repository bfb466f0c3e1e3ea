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
"""

from mailserver.relay.queue import QueueError, QueueStore
from mailserver.relay.runner import RelayRunner

__all__ = ["QueueError", "QueueStore", "RelayRunner"]
