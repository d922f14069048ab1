"""Which process owns a directory, and whether that process is still running (stdlib only).

A process id alone does not identify a process: ids are reused, and a directory on a shared
filesystem may have been written from another machine. The record therefore also holds the host
name, the kernel's boot id and the process's start time (Linux; elsewhere only the pid is
checked), and its pid namespace: containers on one machine share the host name (host networking)
and the boot id, but not their process ids. An owner is *dead* only when that can be told for
certain -- same host and pid namespace, and the machine rebooted since, or no process has the pid,
or the process with the pid started at another time -- and *unknown* when it ran on another host
or in another container.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .. import atomic_files

ALIVE, DEAD, UNKNOWN = "alive", "dead", "unknown"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def current_owner() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "pid_namespace": _pid_namespace(),
            "start_ticks": _start_ticks(pid), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def write_owner(path: Path) -> None:
    """Record the current process as the owner, in the file ``path`` (written whole, then renamed)."""
    atomic_files.replace_text(path, json.dumps(current_owner()))


def read_owner(path: Path) -> dict | None:
    """The record in ``path``; None if there is none or it cannot be read."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(owner, dict) and isinstance(owner.get("pid"), int) and owner["pid"] > 0
    return owner if ok else None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def owner_state(owner: dict) -> str:
    """ALIVE, DEAD, or UNKNOWN (another host or container): see the module docstring."""
    if owner.get("host") != socket.gethostname():
        return UNKNOWN
    boot = _boot_id()
    if owner.get("boot_id") and boot and owner["boot_id"] != boot:
        return DEAD
    if owner.get("pid_namespace") != _pid_namespace():
        return UNKNOWN
    pid = owner["pid"]
    if not _pid_exists(pid):
        return DEAD
    recorded, now = owner.get("start_ticks"), _start_ticks(pid)
    if recorded is not None and now is not None and recorded != now:
        return DEAD  # the pid was reused
    return ALIVE


def describe(owner: dict) -> str:
    return f"pid {owner['pid']} on {owner.get('host', '?')}, started {owner.get('started', '?')}"
