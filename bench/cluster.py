"""Several ``webhookd serve`` nodes on one throwaway PostgreSQL, for the two-node scenarios.

`postgres()` starts a server the way the tests do (``.ci/postgres.sh``: Debian's ``postgresql``
package, installed with apt-get when missing and the bench runs as root; data in a temp dir,
127.0.0.1 only, fsync on) and removes it afterwards, whatever happened. `running_nodes()` starts
n daemons with the same config on it; meanwhile their database's URL is in this process's
environment too, so the CLI verbs (pause, resume) run by the scenarios reach the same database.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.machine import OtherProcesses
from bench.servers import JOURNAL_URL_ENV, Server, ServerFailed, running_webhookd

_SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "postgres.sh"
_EXPORT = re.compile(r"^export (\w+)=(\S+)$", re.M)
START_TIMEOUT_S = 300  # the first run may install the package


@dataclass(frozen=True)
class Postgres:
    url: str  # the ``postgres`` database, empty
    data_dir: Path

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cpu_s(self) -> float:
        """CPU time the server has used so far: the postmaster, the backends it has reaped,
        and the ones still running (its children only: other servers on the machine are not
        counted)."""
        postmaster = self.postmaster_pid()
        if postmaster is None:
            return 0.0
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, ppid = int(stat.parent.name), int(fields[1])
            if pid == postmaster:  # utime, stime, cutime, cstime
                total += sum(int(v) for v in fields[11:15]) / tick
            elif ppid == postmaster:
                total += (int(fields[11]) + int(fields[12])) / tick
        return total


@contextmanager
def postgres(start_timeout_s: float = START_TIMEOUT_S) -> Iterator[Postgres]:
    """A throwaway PostgreSQL server, removed on exit."""
    started = subprocess.run(
        ["bash", str(_SCRIPT), "start"],
        capture_output=True,
        text=True,
        timeout=start_timeout_s,
        check=False,
    )
    exports = dict(_EXPORT.findall(started.stdout))
    if started.returncode != 0 or "WEBHOOKD_TEST_PG_URL" not in exports:
        raise ServerFailed(f"PostgreSQL did not start: {started.stderr.strip()[-500:]}")
    url, where = exports["WEBHOOKD_TEST_PG_URL"], exports.get("WEBHOOKD_TEST_PG_DIR", "")
    try:
        yield Postgres(url, Path(where) / "data")
    finally:
        subprocess.run(
            ["bash", str(_SCRIPT), "stop", where], capture_output=True, timeout=120, check=False
        )


@contextmanager
def journal_env(url: str) -> Iterator[None]:
    """`url` in this process's environment meanwhile, for the CLI verbs a scenario runs."""
    before = os.environ.get(JOURNAL_URL_ENV)
    os.environ[JOURNAL_URL_ENV] = url
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(JOURNAL_URL_ENV, None)
        else:
            os.environ[JOURNAL_URL_ENV] = before


@contextmanager
def running_nodes(
    body: str,
    *,
    nodes: int,
    journal_url: str,
    cpu: int | None,
    env: dict[str, str] | None = None,
    before_start: Callable[[Path], None] | None = None,
) -> Iterator[list[Server]]:
    """`nodes` daemons with `body` as their config, all on `journal_url`, all on `cpu`;
    `before_start` runs once, before the first starts."""
    with ExitStack() as stack:
        stack.enter_context(journal_env(journal_url))
        servers = [
            stack.enter_context(
                running_webhookd(
                    body,
                    cpu=cpu,
                    probe=False,
                    env=env,
                    journal_url=journal_url,
                    before_start=before_start if i == 0 else None,
                )
            )
            for i in range(nodes)
        ]
        yield servers


class ClusterBusy:
    """As ``harness.Busy`` for several nodes and their PostgreSQL: the CPU processes other
    than those and the benchmark's own used meanwhile, in % of one CPU."""

    def __init__(self, servers: list[Server], pg: Postgres | None) -> None:
        def ours() -> list[int]:
            postmaster = pg.postmaster_pid() if pg is not None else None
            return [s.proc.pid for s in servers] + ([postmaster] if postmaster else [])

        self._others = OtherProcesses(also=ours)

    def other_pct(self) -> float | None:
        return self._others.pct()
