"""
The admin HTTP API (health, metrics, relay queue) for C{service} to listen on.
"""

from mailserver.web.admin import (
    ListenerStates,
    QueueView,
    admin_listener_needs_token,
    make_admin_site,
)

__all__ = [
    "ListenerStates",
    "QueueView",
    "admin_listener_needs_token",
    "make_admin_site",
]
