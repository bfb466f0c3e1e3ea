"""
The admin HTTP API (health, metrics, relay queue) for C{service} to listen on.
"""

from mailserver.web.admin import (
    ListenerStates,
    QueueView,
    make_admin_site,
)

__all__ = [
    "ListenerStates",
    "QueueView",
    "make_admin_site",
]
