"""``python -m bench.dedupcache``: what the dedup index would cost kept as a cache beside the
journal instead of inside it, in the writer's CPU µs per webhook.

Raw ``sqlite3``, one thread: per webhook a 16-byte random key and a 1 KB event row, 64 webhooks
per commit, into journals that already hold ``--keys`` keys (WAL, ``synchronous = FULL``). The
layouts are alternated batch by batch, so a slow spell of a shared machine hits each alike:

* ``today``: the journal's own ``UNIQUE`` index over the digests (what webhookd does);
* ``cache-wal``: the keys appended to the journal unindexed, the index in a second file in WAL
  mode without syncs (a killed process cannot tear it; an OS crash can);
* ``cache-off``: the same second file with no journal at all (a killed process can tear it);
* ``none``: no index at all (no dedup: the floor).

See docs/performance.md, "The dedup index on a fast hour".

    python -m bench.dedupcache [--keys N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

BATCH = 64
BATCHES_PER_ROUND = 50
LAYOUTS = ("today", "cache-wal", "cache-off", "none")


class Layout:
    def __init__(self, name: str, folder: Path, keys: int) -> None:
        self.name = name
        self.cached = name.startswith("cache-")
        self.conn = sqlite3.connect(folder / "journal.db", isolation_level=None)
        conn = self.conn
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE events (id TEXT PRIMARY KEY, body BLOB)")
        conn.execute(
            "CREATE TABLE dedup (n INTEGER PRIMARY KEY, digest BLOB NOT NULL, event_id TEXT)"
        )
        if name == "today":
            conn.execute("CREATE UNIQUE INDEX dedup_digest ON dedup(digest)")
        if self.cached:
            conn.execute("ATTACH ? AS cache", (str(folder / "cache.db"),))
            conn.execute(f"PRAGMA cache.journal_mode = {'WAL' if name == 'cache-wal' else 'OFF'}")
            conn.execute("PRAGMA cache.synchronous = OFF")
            conn.execute("CREATE TABLE cache.keys (digest BLOB PRIMARY KEY, n INT) WITHOUT ROWID")
        rows = [(n, os.urandom(16), f"evt_{n:022d}") for n in range(1, keys + 1)]
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO dedup VALUES (?, ?, ?)", rows)
        if self.cached:
            conn.executemany("INSERT INTO cache.keys VALUES (?, ?)", [(d, n) for n, d, _ in rows])
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.last = keys

    def batch(self) -> None:
        first = self.last + 1
        keys = [(first + i, os.urandom(16), f"evt_{os.urandom(11).hex()}") for i in range(BATCH)]
        body = os.urandom(1024)
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        if self.cached:
            conn.executemany(
                "INSERT OR IGNORE INTO cache.keys VALUES (?, ?)", [(d, n) for n, d, _ in keys]
            )
            conn.executemany("INSERT INTO dedup VALUES (?, ?, ?)", keys)
        else:
            conn.executemany(
                "INSERT OR IGNORE INTO dedup (digest, event_id) VALUES (?, ?)",
                [(d, e) for _, d, e in keys],
            )
        conn.executemany("INSERT INTO events VALUES (?, ?)", [(e, body) for _, _, e in keys])
        conn.execute("COMMIT")
        self.last += BATCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=200_000, help="keys already in each journal")
    parser.add_argument("--rounds", type=int, default=60, help="alternated rounds per layout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="webhookd-dedupcache-") as tmp:
        layouts = []
        for name in LAYOUTS:
            (Path(tmp) / name).mkdir()
            layouts.append(Layout(name, Path(tmp) / name, args.keys))
        spent: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        for _ in range(args.rounds):
            for layout in layouts:
                started = time.thread_time()
                for _ in range(BATCHES_PER_ROUND):
                    layout.batch()
                used = time.thread_time() - started
                spent[layout.name].append(used / (BATCHES_PER_ROUND * BATCH) * 1e6)
        for layout in layouts:
            layout.conn.close()
    today = statistics.median(spent["today"])
    print(f"{args.keys:,} keys in each journal, {BATCH} webhooks per commit, {args.rounds} rounds")
    print(f"{'dedup index':<10}  {'writer CPU µs/webhook':>21}  {'against today':>13}")
    for name in LAYOUTS:
        median = statistics.median(spent[name])
        against = "" if name == "today" else f"{median - today:+.1f}"
        print(f"{name:<10}  {median:21.1f}  {against:>13}")


if __name__ == "__main__":
    main()
