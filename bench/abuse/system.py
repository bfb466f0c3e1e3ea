"""
What the abuse bench reads of the machine and of the server process, from
/proc and getrusage: CPU, memory, files, threads, TCP sockets.
"""

from __future__ import annotations

import os
import resource

CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> tuple[int, int]:
    """
    Raise this process's open-file limit to its hard limit (each slow
    client is a socket); returns the (soft, hard) limits now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def system_busy_ticks() -> int:
    """
    Busy clock ticks of the whole machine so far (user nice system irq
    softirq), from /proc/stat.
    """
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return sum(values[i] for i in (0, 1, 2, 5, 6))


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def threads(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def dirty_kib() -> int:
    """
    Dirty page cache of the whole machine (/proc/meminfo): what a
    C{syncfs} of the root file system may have to write first.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Dirty:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
    "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}


def tcp_table(server_port: int) -> dict[tuple[int, int], tuple[str, int, int]]:
    """
    Both ends of every TCP connection to C{server_port}, from /proc/net/tcp:
    (local port, remote port) -> (state, tx_queue, rx_queue), the queues
    being octets that end's kernel holds unsent or unacknowledged / not yet
    read by its program.  The server's end of a connection from client
    port P is (server_port, P); the client's end is (P, server_port).
    """
    table: dict[tuple[int, int], tuple[str, int, int]] = {}
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                local = int(parts[1].rsplit(":", 1)[1], 16)
                remote = int(parts[2].rsplit(":", 1)[1], 16)
                if server_port not in (local, remote) or parts[3] == "0A":
                    continue
                tx, rx = (int(x, 16) for x in parts[4].split(":"))
                table[(local, remote)] = (TCP_STATES.get(parts[3], parts[3]), tx, rx)
    except OSError:
        pass
    return table


def server_sockets(server_port: int) -> dict[int, tuple[str, int, int]]:
    """
    The server's end of each connection: client port -> (state, tx, rx).
    """
    return {r: v for (l, r), v in tcp_table(server_port).items() if l == server_port}
