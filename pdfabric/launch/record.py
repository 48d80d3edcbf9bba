"""``<log-dir>/launch.json``: how ``pdfabric status`` and a second launch find a running launch.

The record names the launcher's pid and that process's start time (``/proc/<pid>/stat``),
so a pid the kernel reused after a launch was killed is not taken for the launch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pdfabric.transports._procs import proc_start

__all__ = ["LAUNCH_RECORD", "LAUNCH_SECRET_FILE", "PROXY_STATE_FILE", "live_record", "write_record"]

LAUNCH_RECORD, LAUNCH_SECRET_FILE = "launch.json", "launch-secret"
PROXY_STATE_FILE = "proxy-state.json"  # the proxy's admin changes (``pdfabric proxy --state-file``)


def write_record(log_dir: Path, fields: dict[str, Any]) -> None:
    """Write ``fields`` plus this process's pid and start time, atomically."""
    pid = os.getpid()
    record = {**fields, "pid": pid, "pid_start": proc_start(pid)}
    tmp = log_dir / (LAUNCH_RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(log_dir / LAUNCH_RECORD)


def live_record(log_dir: Path) -> dict[str, Any] | None:
    """The record of a launch still running with ``log_dir``; None when there is none, or
    its launcher is gone (killed: the record stays behind), or its pid now names another
    process."""
    try:
        record = json.loads((log_dir / LAUNCH_RECORD).read_text())
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(record, dict) or pid <= 0:
        return None
    if proc_start(os.getpid()) is None:  # no /proc here: whether the pid exists is all we can ask
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return record
    start = proc_start(pid)
    if start is None:
        return None
    recorded = record.get("pid_start")
    if recorded is not None and recorded != start:
        return None  # the pid was reused
    return record
