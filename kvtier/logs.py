"""Logging: one logfmt line per event, journald-friendly.

    level=warning logger=kvtier.server msg="arena ... NOT locked: ..." 

Under systemd (``$JOURNAL_STREAM`` set) each line starts with a syslog priority
prefix (``<4>``) so journald records the level, and carries no timestamp
(journald adds its own); on a terminal lines start with an ISO timestamp.
Messages never contain bearer tokens (only tenant names) nor block payloads;
keys appear only as hex in debug lines.
"""
from __future__ import annotations

import logging
import os
import sys
import time

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _quote(v: str) -> str:
    if v and all(c.isalnum() or c in "._-/:@" for c in v):
        return v
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    def __init__(self, journald: bool):
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        fields = f"level={record.levelname.lower()} logger={record.name} msg={_quote(msg)}"
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{fields}"
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"ts={ts}.{int(record.msecs):03d} {fields}"


def setup(level: str, stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LogfmtFormatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
