"""
The connection caps every listener shares: per listener, per client (an
IPv6 client by its /64), a process's share of them, and the descriptors
each role may take.
"""

from mailserver.config import Limits
from mailserver.connection_limits import ConnectionLimits, Refusal


class Connection:
    def __init__(self) -> None:
        self.aborted = False
        self.transport = self

    def abortConnection(self) -> None:
        self.aborted = True


def limits(descriptors=10_000, reserve=0, processes=1, index=0, **caps) -> ConnectionLimits:
    return ConnectionLimits(
        Limits(**caps), descriptors=descriptors, reserve=reserve, processes=processes, index=index
    )


def admit(listener, address: str, count: int) -> list:
    return [listener.admit(Connection(), address) for _ in range(count)]


def test_caps_per_listener_and_per_client_with_ipv6_counted_by_its_64():
    process = limits(max_connections=5, max_connections_per_client=2)
    listener = process.listener("pop3")
    assert admit(listener, "2001:db8:1:2::1", 1) == [None]
    assert admit(listener, "2001:db8:1:2:ffff::9", 2) == [None, Refusal.CLIENT_FULL]
    assert admit(listener, "192.0.2.1", 3) == [None, None, Refusal.CLIENT_FULL]
    assert admit(listener, "192.0.2.2", 1) == [None]
    assert admit(listener, "192.0.2.3", 1) == [Refusal.LISTENER_FULL]
    # Another listener counts its own connections.
    assert admit(process.listener("pop3s"), "192.0.2.1", 2) == [None, None]


def test_a_released_connection_makes_room_and_a_refused_one_leaves_none_behind():
    listener = limits(max_connections_per_client=1).listener("smtp")
    first, second = Connection(), Connection()
    assert listener.admit(first, "192.0.2.1") is None
    assert listener.admit(second, "192.0.2.1") is Refusal.CLIENT_FULL
    listener.release(second)
    assert listener.admit(Connection(), "192.0.2.1") is Refusal.CLIENT_FULL
    listener.release(first)
    listener.release(first)  # twice is harmless
    assert listener.admit(Connection(), "192.0.2.1") is None


def test_each_process_enforces_its_share_of_the_caps():
    shares = [
        limits(processes=2, index=index, max_connections=5, max_connections_per_client=3)
        for index in range(2)
    ]
    assert [(p.max_connections, p.max_per_client) for p in shares] == [(3, 2), (2, 1)]
    assert admit(shares[1].listener("pop3"), "192.0.2.1", 2) == [None, Refusal.CLIENT_FULL]


def test_one_role_cannot_take_the_descriptors_promised_to_the_others():
    # 40 descriptors, 4 reserved: 12 sessions (each may hold a second file
    # and a refused one still open counts); each of two roles is promised 3.
    process = limits(descriptors=40, reserve=4, max_connections_per_client=1000)
    assert process.sessions == 12
    pop3, smtp = process.listener("pop3"), process.listener("smtp")
    flood = admit(pop3, "192.0.2.1", 12)
    assert flood == [None] * 9 + [Refusal.BUSY] * 3
    assert admit(smtp, "192.0.2.2", 4) == [None] * 3 + [Refusal.BUSY]


def test_with_no_room_to_answer_a_connection_is_dropped():
    process = limits(descriptors=12, reserve=0)  # 4 sessions, 8 open at most
    listener = process.listener("pop3")
    refused = admit(listener, "192.0.2.1", 8)
    assert refused.count(None) == 4 and refused.count(Refusal.BUSY) == 4
    dropped = Connection()
    assert listener.admit(dropped, "192.0.2.1") is Refusal.DROP and dropped.aborted
    listener.release(dropped)  # it was never counted
    assert listener.admit(Connection(), "192.0.2.1") is Refusal.DROP
