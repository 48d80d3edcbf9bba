"""Same-host peer processes, shared by the agent-style transports (``nixl``, ``ucx``).

A peer on this host (same pid namespace) is watched with a pidfd; its identity is its pid
plus its start time (``proc_start``), so a reused pid is never mistaken for the peer.
"""

from __future__ import annotations

import os
import select

__all__ = ["PidWatch", "namespace", "proc_start", "why"]


class PidWatch:
    """pidfds of same-host peer processes; ``exited()`` lists the keys whose process ended.

    Only used within one pid namespace, and the process start time guards against a pid
    that was reused."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._keys: dict[int, object] = {}
        self.namespace = namespace("pid")

    def add(self, key: object, pid: int, start: int) -> int | None:
        """Watch ``pid``; None (nothing watched) when it is no longer that process."""
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            return None
        if proc_start(pid) != start:
            os.close(fd)
            return None
        self._poll.register(fd, select.POLLIN)
        self._keys[fd] = key
        return fd

    def remove(self, fd: int) -> None:
        if self._keys.pop(fd, None) is not None:
            self._poll.unregister(fd)
            os.close(fd)

    def exited(self) -> list[object]:
        if not self._keys:
            return []
        return [self._keys[fd] for fd, _ in self._poll.poll(0) if fd in self._keys]

    def close(self) -> None:
        for fd in list(self._keys):
            self.remove(fd)


def namespace(kind: str) -> str:
    """This process's namespace of ``kind`` ("pid", "net"), "" when /proc cannot tell."""
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return ""


def proc_start(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (None when it does not exist)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def why(e: BaseException) -> str:
    """An exception as one line: its type, and its message when it has one."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
