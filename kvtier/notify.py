"""systemd service notifications (sd_notify), without libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a path, or
``@name`` for an abstract socket) and, with ``WatchdogSec=``,
``$WATCHDOG_USEC``. The daemon sends ``READY=1`` once it serves,
``WATCHDOG=1`` at half the watchdog interval while its event loop is alive
(a wedged loop stops the pings and systemd restarts it), ``RELOADING=1`` /
``READY=1`` around a SIGHUP reload, and ``STOPPING=1`` when it begins to
drain. Outside systemd every call is a no-op.
"""
from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        on = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if on else 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.addr)

    def send(self, *fields: str) -> bool:
        if not self.addr:
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.sendto("\n".join(fields).encode(), self.addr)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", f"STATUS={status}" if status else "STATUS=serving", f"MAINPID={os.getpid()}")

    def reloading(self) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=draining")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")
