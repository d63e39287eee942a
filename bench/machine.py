"""Describe the machine a benchmark ran on: CPU, cores, kernel, Python, the disk under the journal,
and how busy the machine was during a run. Best effort: unknown facts read "?"."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cores: int
    usable_cores: int  # this process's CPU affinity
    kernel: str
    python: str
    disk: str  # filesystem and device under the journal's directory

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.cpu_model}, {self.cores} cores ({self.usable_cores} usable), "
            f"Linux {self.kernel}, Python {self.python}; journal on {self.disk}"
        )


def describe(journal_dir: str) -> Machine:
    """Describe this machine; `journal_dir` is where the benchmark puts its journals."""
    return Machine(
        cpu_model=_cpu_model(),
        cores=os.cpu_count() or 0,
        usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0,
        kernel=platform.release(),
        python=f"{platform.python_implementation()} {platform.python_version()}",
        disk=_disk(journal_dir),
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _disk(path: str) -> str:
    findmnt = shutil.which("findmnt")
    if findmnt is None:
        return "?"
    try:
        out = subprocess.run(
            [findmnt, "-n", "-o", "SOURCE,FSTYPE", "-T", path],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "?"
    if len(out) < 2:
        return "?"
    source, fstype = out[0], out[1]
    if fstype in ("tmpfs", "ramfs"):
        return f"{fstype} (RAM: fsync costs nothing, so intake numbers flatter webhookd)"
    device = source.removeprefix("/dev/")
    notes = []
    if device.startswith("vd"):
        notes.append("virtio")
    if device.startswith("nvme"):
        notes.append("NVMe")
    rotational = _rotational(device)
    if rotational is not None:
        notes.append("rotational" if rotational else "non-rotational")
    return f"{fstype} on {source}" + (f" ({', '.join(notes)})" if notes else "")


def _rotational(device: str) -> bool | None:
    """The kernel's rotational flag (virtio disks often report 1 whatever backs them)."""
    block = Path("/sys/class/block") / device
    for queue in (block / "queue", block.resolve().parent / "queue"):  # a partition's parent
        try:
            return (queue / "rotational").read_text().strip() == "1"
        except OSError:
            continue
    return None


@dataclass(frozen=True)
class CpuUse:
    """Machine-wide CPU use over a window, in CPU-seconds (from /proc/stat)."""

    wall_s: float
    busy_s: float  # user + nice + system + irq + softirq, summed over all CPUs
    steal_s: float  # time the hypervisor gave to someone else

    @property
    def steal_pct(self) -> float:
        total = self.busy_s + self.steal_s
        return 100 * self.steal_s / total if total > 0 else 0.0


class CpuMeter:
    """Measures machine-wide CPU use from construction to `read()`.

    Used to tell whether something besides the benchmark ran during a measurement: on a
    shared 2-core machine, another process on the server's core halves its throughput.
    """

    def __init__(self) -> None:
        self._start = _cpu_ticks()
        self._wall = time.monotonic()

    def read(self) -> CpuUse | None:
        end = _cpu_ticks()
        if self._start is None or end is None:
            return None
        delta = [b - a for a, b in zip(self._start, end, strict=True)]
        tick = os.sysconf("SC_CLK_TCK")
        # /proc/stat "cpu" columns: user nice system idle iowait irq softirq steal.
        busy = delta[0] + delta[1] + delta[2] + delta[5] + delta[6]
        return CpuUse(time.monotonic() - self._wall, busy / tick, delta[7] / tick)


def _cpu_ticks() -> list[int] | None:
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if first[0] != "cpu" or len(first) < 9:
        return None
    # Only the first eight columns: guest time is already counted in user.
    return [int(v) for v in first[1:9]]


_PF_KTHREAD = 0x00200000  # stat(5) flags: a kernel thread


class OtherProcesses:
    """CPU that processes outside the benchmark used over a window, in % of one CPU.

    Read per process from /proc, leaving out this process and everything it started (servers,
    generators, brokers), the processes ``also`` names with theirs (a server that daemonized,
    PostgreSQL's postmaster), and kernel threads. On a small VM the kernel threads mostly do the
    measured servers' own work, the ext4 journal and block I/O behind their fsyncs, which the
    machine-wide busy time of ``CpuMeter`` cannot tell from another tenant's: read that way, a
    fixed-rate run of the minimal durable server on an otherwise idle machine showed 63 % of a
    CPU "used by other processes".

    A process that ends within the window is counted through its parent: once waited for, its
    CPU is added to the parent's reaped children's time (stat(5)'s cutime and cstime), counted
    like a process's own by its growth over the window, less what the first reading saw the
    process use before it. A neighbour made of short-lived processes (a test suite, a build) is
    seen only that way. (A process of the benchmark's that daemonized and ends within the window
    would be charged to its reaper, init: the scenarios stop theirs after reading.)
    """

    def __init__(
        self,
        also: Callable[[], Iterable[int]] = tuple,
        *,
        root: int | None = None,
        read: Callable[[], dict[int, tuple[int, float, float]]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._also = also
        self._root = os.getpid() if root is None else root
        self._read = _user_processes if read is None else read
        self._clock = clock
        self._start = self._read()
        self._wall = clock()

    def pct(self) -> float | None:
        end = self._read()
        wall_s = self._clock() - self._wall
        if wall_s <= 0 or not end:
            return None
        roots = [self._root, *self._also()]
        ours = _tree(self._start, roots) | _tree(end, roots)
        used_s = 0.0
        for pid, (_, cpu_s, reaped_s) in end.items():
            if pid not in ours:
                _, cpu_before, reaped_before = self._start.get(pid, (0, 0.0, 0.0))
                used_s += max(0.0, cpu_s - cpu_before) + max(0.0, reaped_s - reaped_before)
        for pid, (_, cpu_before, reaped_before) in self._start.items():
            if pid not in end and pid not in ours:  # ended: its reaper has all of it
                used_s -= cpu_before + reaped_before
        return 100 * max(0.0, used_s) / wall_s


def _user_processes() -> dict[int, tuple[int, float, float]]:
    """Every process but kernel threads: pid → (parent pid, CPU seconds so far, CPU seconds of
    its children that it has waited for)."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[int, float, float]] = {}
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_bytes()
        except OSError:  # gone meanwhile
            continue
        # After "pid (comm) ": state, ppid, pgrp, session, tty, tpgid, flags, 4 fault counts,
        # utime, stime, cutime, cstime (stat(5) fields 3-17).
        fields = raw[raw.rfind(b")") + 2 :].split()
        if int(fields[6]) & _PF_KTHREAD:
            continue
        found[int(entry.name)] = (
            int(fields[1]),
            (int(fields[11]) + int(fields[12])) / tick,
            (int(fields[13]) + int(fields[14])) / tick,
        )
    return found


def _tree(processes: dict[int, tuple[int, float, float]], roots: Iterable[int]) -> set[int]:
    """``roots`` and all their descendants among ``processes``."""
    children: defaultdict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _, _) in processes.items():
        children[ppid].append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found
