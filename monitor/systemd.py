"""sd_notify without a dependency: READY, STOPPING, STATUS and WATCHDOG pings to systemd.

systemd passes a datagram socket in $NOTIFY_SOCKET (a path, or '@name' for the abstract namespace)
and, with WatchdogSec=, the interval in $WATCHDOG_USEC. Outside systemd both are unset and every
call is a no-op, so the daemon runs the same under a terminal, a test or a container.
"""

from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send 'KEY=VALUE' lines to systemd; False when not running under a notify-aware manager."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
        return True
    except OSError:
        return False  # a vanished manager must never take the daemon down


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec), or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 1e6 / 2, 0.5)
    except ValueError:
        return None
