"""The PostgreSQL journal's schema: forward migrations recorded in ``webhookd_schema``.

Hazard: several nodes may start at once against a new database; migrations run under a
transaction-scoped advisory lock, so exactly one of them applies each step and the others then
see it done. A transaction-scoped lock (not a session one) also works behind PgBouncer.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg

from webhookd.errors import JournalError, JournalNewer
from webhookd.journal.base import migrating
from webhookd.journal.postgres.db import (
    DB_ERRORS,
    UNFINISHED_BY_ACTION_SQL,
    db_error,
    redact_url,
)
from webhookd.journal.records import Peeked, by_action

# A table the planner has never analysed (``reltuples`` -1: a database just restored from a
# dump, or one too small for autovacuum to have looked at it) has its rows counted, up to this
# many, for ``check``'s note; past it they are estimated from its size, as the planner does.
COUNTED_EVENTS = 100_000

# Any constant: the advisory lock key that serialises migrations across nodes.
_MIGRATION_LOCK = 0x77_68_6B_64  # "whkd"

# Forward migrations: index i brings the schema from version i to i + 1. Never change what one
# that has shipped leaves (how it gets there may be made faster); append a new one. Text
# columns compared for order use the "C" collation, so lane cursors and id ranges mean the same
# on every database whatever its default collation.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id          text COLLATE "C" NOT NULL UNIQUE,
        source      text COLLATE "C" NOT NULL,
        received_at double precision NOT NULL,
        dedup_key   text NOT NULL,
        tenant      text COLLATE "C" NOT NULL DEFAULT '',
        priority    integer NOT NULL,
        headers     text NOT NULL,
        body        bytea NOT NULL,
        verified    text
    );
    CREATE INDEX events_source ON events (source, seq);
    CREATE INDEX events_received ON events (received_at);
    CREATE TABLE dedup (
        key        text COLLATE "C" PRIMARY KEY,
        event_id   text NOT NULL,
        created_at double precision NOT NULL
    );
    CREATE INDEX dedup_created ON dedup (created_at);
    -- The queue itself: rows are updated several times each, so autovacuum is told to visit it
    -- after a fixed number of dead rows rather than a fraction of a table that may be large.
    CREATE TABLE jobs (
        seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id           text COLLATE "C" NOT NULL UNIQUE,
        event_id     text COLLATE "C" NOT NULL,
        source       text COLLATE "C" NOT NULL,
        action       text COLLATE "C" NOT NULL,
        type         text NOT NULL,
        state        text NOT NULL,
        priority     integer NOT NULL,
        tenant       text COLLATE "C" NOT NULL DEFAULT '',
        order_key    text COLLATE "C",
        run_at       double precision NOT NULL,
        attempts     integer NOT NULL DEFAULT 0,
        max_attempts integer NOT NULL,
        recoveries   integer NOT NULL DEFAULT 0,
        waits        integer NOT NULL DEFAULT 0,
        node_id      text,
        claim_token  text,
        lease_until  double precision,
        claimed_at   double precision,
        finished_at  double precision,
        last_error   text,
        result       text
    ) WITH (
        fillfactor = 80,
        autovacuum_vacuum_scale_factor = 0,
        autovacuum_vacuum_threshold = 1000,
        autovacuum_analyze_scale_factor = 0,
        autovacuum_analyze_threshold = 5000
    );
    CREATE INDEX jobs_event ON jobs (event_id);
    CREATE INDEX jobs_lane ON jobs (priority, source, tenant, seq) WHERE state = 'queued';
    CREATE INDEX jobs_due ON jobs (run_at) WHERE state = 'queued';
    CREATE INDEX jobs_order ON jobs (source, action, order_key, seq)
        WHERE order_key IS NOT NULL AND state IN ('queued', 'running');
    CREATE INDEX jobs_running ON jobs (node_id) WHERE state = 'running';
    CREATE INDEX jobs_finished ON jobs (state, finished_at)
        WHERE state IN ('done', 'dead', 'cancelled');
    CREATE TABLE attempts (
        seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id      text COLLATE "C" NOT NULL,
        n           integer NOT NULL,
        started_at  double precision NOT NULL,
        finished_at double precision,
        outcome     text NOT NULL,
        error       text,
        detail      text
    );
    CREATE INDEX attempts_job ON attempts (job_id, seq);
    CREATE INDEX attempts_finished ON attempts (finished_at);
    CREATE TABLE paused_sources (
        source    text PRIMARY KEY,
        paused_at double precision NOT NULL
    );
    -- One row per running process: its heartbeat is the lease on every job it claimed.
    CREATE TABLE nodes (
        node_id      text PRIMARY KEY,
        started_at   double precision NOT NULL,
        heartbeat_at double precision NOT NULL
    );
    """,
    # 1 → 2: the actions an event's ``when`` filters left without a job, as a JSON array; NULL
    # when none was filtered (most events). ``events_received`` already serves the dashboard's
    # per-minute series.
    """
    ALTER TABLE events ADD COLUMN filtered text;
    """,
    # 2 → 3: where each node runs, for ``/stats`` (NULL for a node started before this).
    """
    ALTER TABLE nodes ADD COLUMN host text, ADD COLUMN pid integer;
    """,
    # 3 → 4: the leader lease. One node at a time runs the cluster's maintenance (lease recovery,
    # retention); it holds the 'maintenance' row until ``expires_at`` and renews it, so a dead
    # leader is replaced once its lease has passed. The 'reindex' row's ``expires_at`` is when
    # the queue's partial indexes are next rebuilt, whichever node leads then.
    """
    CREATE TABLE leader (
        name       text PRIMARY KEY,
        node_id    text NOT NULL,
        expires_at double precision NOT NULL
    );
    INSERT INTO leader (name, node_id, expires_at)
        VALUES ('maintenance', '', 0), ('reindex', '', 0);
    """,
    # 4 → 5: lanes' RPM/TPM buckets shared by the nodes (postgres/lanes.py): each row is
    # updated about once a second per busy node, so it leaves room for HOT updates.
    """
    CREATE TABLE lanes (
        name          text PRIMARY KEY,
        requests      double precision NOT NULL,
        tokens        double precision NOT NULL,
        updated_at    double precision NOT NULL,
        log_at        double precision[] NOT NULL DEFAULT '{}',
        log_requests  double precision[] NOT NULL DEFAULT '{}',
        log_tokens    double precision[] NOT NULL DEFAULT '{}',
        cooling_until double precision NOT NULL DEFAULT 0,
        circuit       text,
        probe_at      double precision,
        queue_nodes   text[] NOT NULL DEFAULT '{}',
        queue_until   double precision[] NOT NULL DEFAULT '{}'
    ) WITH (fillfactor = 50);
    """,
    # 5 → 6: the keys of the caps (action, source, tenant concurrency) a running job holds;
    # NULL for most jobs. A capped claim counts them over the running jobs (``jobs_running``).
    """
    ALTER TABLE jobs ADD COLUMN caps text[];
    """,
    # 6 → 7: a lane's due jobs by run_at, then seq: jobs waiting out a retry's backoff sit first
    # in their lane by seq, and a refill walked past all of them to reach the due jobs behind.
    """
    DROP INDEX jobs_lane;
    CREATE INDEX jobs_lane ON jobs (priority, source, tenant, run_at, seq) WHERE state = 'queued';
    """,
    # 7 → 8: when a running job was cancelled; as in the SQLite journal's migration 9.
    """
    ALTER TABLE jobs ADD COLUMN IF NOT EXISTS cancel_requested_at double precision;
    """,
    # 8 → 9: ``behind`` and the triggers that keep it, as in the SQLite journal's migration 10,
    # made safe for concurrent writers (at READ COMMITTED, which ``_write`` asks for). A mark
    # set at insert share-locks the older unfinished job it stands on, the key's newest (so
    # rarely its head, which a claim would then skip), skipping one being written (it may be
    # finishing: then no mark), so that job cannot finish until the insert commits, and its
    # finish then sees the new row. A group commit writes its ingests last (``write_group``).
    # A finish locks the key's next unfinished job before clearing its mark, so two finishes
    # of one key at once (a cancel and an outcome) serialise, or deadlock and are retried
    # (``_write``), rather than both missing the job behind them. The marking joins each
    # queued job to its key's oldest unfinished one, all found in one pass, with ``jobs_lane``
    # (rebuilt anyway) out of the way: an EXISTS per job compared each job with every other
    # of its key, a time growing with the square of a key's queue (12 s for 200,000 queued
    # jobs over 1,000 keys, 5 minutes over 10 keys; 5 s either way since).
    """
    ALTER TABLE jobs ADD COLUMN behind smallint;
    DROP INDEX jobs_lane;
    UPDATE jobs j SET behind = 1
        FROM (SELECT source, action, order_key, min(seq) AS head FROM jobs
            WHERE order_key IS NOT NULL AND state IN ('queued', 'running')
            GROUP BY source, action, order_key) k
        WHERE j.state = 'queued' AND j.source = k.source AND j.action = k.action
        AND j.order_key = k.order_key AND j.seq > k.head;
    CREATE INDEX jobs_lane ON jobs (priority, source, tenant, behind, run_at, seq)
        WHERE state = 'queued';
    CREATE FUNCTION webhookd_job_behind() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM 1 FROM jobs o WHERE o.source = NEW.source AND o.action = NEW.action
            AND o.order_key = NEW.order_key AND o.seq < NEW.seq AND o.order_key IS NOT NULL
            AND o.state IN ('queued', 'running') ORDER BY o.seq DESC LIMIT 1
            FOR SHARE SKIP LOCKED;
        IF FOUND THEN
            NEW.behind := 1;
        END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER jobs_behind BEFORE INSERT ON jobs FOR EACH ROW
        WHEN (NEW.order_key IS NOT NULL AND NEW.state = 'queued')
        EXECUTE FUNCTION webhookd_job_behind();
    CREATE FUNCTION webhookd_job_unmark() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.behind := NULL;
        RETURN NEW;
    END $$;
    CREATE TRIGGER jobs_unmark BEFORE UPDATE OF state ON jobs FOR EACH ROW
        WHEN (OLD.behind IS NOT NULL AND NEW.state NOT IN ('queued', 'running'))
        EXECUTE FUNCTION webhookd_job_unmark();
    CREATE FUNCTION webhookd_key_moves_on() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        head bigint;
    BEGIN
        SELECT o.seq INTO head FROM jobs o WHERE o.source = OLD.source AND o.action = OLD.action
            AND o.order_key = OLD.order_key AND o.order_key IS NOT NULL
            AND o.state IN ('queued', 'running') ORDER BY o.seq LIMIT 1 FOR UPDATE;
        IF FOUND THEN
            UPDATE jobs SET behind = NULL WHERE seq = head AND behind IS NOT NULL;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER jobs_key_moves_on AFTER UPDATE OF state ON jobs FOR EACH ROW
        WHEN (OLD.order_key IS NOT NULL AND OLD.state IN ('queued', 'running')
            AND NEW.state NOT IN ('queued', 'running'))
        EXECUTE FUNCTION webhookd_key_moves_on();
    CREATE TRIGGER jobs_key_deleted AFTER DELETE ON jobs FOR EACH ROW
        WHEN (OLD.order_key IS NOT NULL AND OLD.state IN ('queued', 'running'))
        EXECUTE FUNCTION webhookd_key_moves_on();
    """,
    # 9 → 10: when a dead job was dismissed; as in the SQLite journal's migration 11.
    """
    ALTER TABLE jobs ADD COLUMN IF NOT EXISTS dismissed_at double precision;
    """,
    # 10 → 11: the URL's query as received; as in the SQLite journal's migration 12. A
    # constant default is kept in the catalog: no row is rewritten, whatever the table's size.
    """
    ALTER TABLE events ADD COLUMN IF NOT EXISTS query text NOT NULL DEFAULT '';
    """,
    # 11 → 12: each node's own journal.lease_s, which its heartbeat keeps within: the leader
    # judged every node by its own, and took the jobs of a node with a longer lease (heart-
    # beating every 5 s) for lost when its own was 3 s. And a digest of its sources, actions
    # and lanes (``config.cluster_digest``), so that nodes whose files differ say so. NULL
    # for a node of an older webhookd.
    """
    ALTER TABLE nodes ADD COLUMN IF NOT EXISTS lease_s double precision,
        ADD COLUMN IF NOT EXISTS config_digest text;
    """,
    # 12 → 13: the names of the sources and actions each node runs (``config.cluster_names``),
    # so that a node lacking a job's source or action leaves it to a live node that has it (a
    # config changed node by node). NULL for a node of an older webhookd: its jobs go dead.
    """
    ALTER TABLE nodes ADD COLUMN IF NOT EXISTS runs text;
    """,
    # 13 → 14: when a node stopped cleanly. Its row stays until its lease has passed, so that
    # what it ran still counts (a restart's jobs wait for it instead of going dead); it is
    # listed no more, and a job it left running is any node's to recover at once.
    """
    ALTER TABLE nodes ADD COLUMN IF NOT EXISTS stopped_at double precision;
    """,
)


async def migrate(conn: Any, where: str, *, upgrade: bool = True) -> int:
    """Bring the schema up to date on ``conn`` (an asyncpg connection); returns its version.
    ``where`` names the journal in the log line an upgrade writes (no password in it).

    ``upgrade=False`` (the CLI) refuses a database with no journal or an older schema instead:
    a verb would otherwise make a journal in a mistyped database and report it empty, or change
    the tables under running nodes of the older webhookd."""
    if await conn.fetchval("SELECT pg_is_in_recovery()"):
        # A hot standby: no write, the CLI's CREATE TABLE IF NOT EXISTS included. A node is
        # refused saying so; a verb reads it (a look at a replica before promoting it).
        if upgrade:
            raise JournalError(
                f"{where} is a standby (read-only, in recovery): point journal.url at the primary"
            )
        return await _standby_version(conn, where)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS webhookd_schema (version integer NOT NULL)")
        version = await conn.fetchval("SELECT max(version) FROM webhookd_schema")
        version = int(version or 0)
        if version > len(MIGRATIONS):
            raise JournalNewer(
                f"{where} has journal schema version {version}, newer than this webhookd"
                f" understands ({len(MIGRATIONS)}): run the newer webhookd, or restore a"
                " pg_dump you took before the upgrade"
            )
        if not upgrade and version == 0:
            raise JournalError(
                f"no webhookd journal in {where} yet: `webhookd serve` makes it at its first"
                " start (is journal.url the database the nodes use?)"
            )
        if not upgrade and version < len(MIGRATIONS):
            raise JournalError(
                f"{where} has journal schema version {version}, this webhookd's is"
                f" {len(MIGRATIONS)}: start the nodes on this webhookd (the first upgrades the"
                " schema as it starts), then run this again"
            )
        with migrating(where, version, len(MIGRATIONS)):
            for target in range(version, len(MIGRATIONS)):
                await conn.execute(MIGRATIONS[target])
                await conn.execute("INSERT INTO webhookd_schema (version) VALUES ($1)", target + 1)
    return len(MIGRATIONS)


async def _standby_version(conn: Any, where: str) -> int:
    """The schema version of the journal on a standby, which a verb may read as it is: only
    this webhookd's."""
    if await conn.fetchval("SELECT to_regclass('webhookd_schema') IS NULL"):
        raise JournalError(f"no webhookd journal in {where} (a standby) yet")
    version = int(await conn.fetchval("SELECT max(version) FROM webhookd_schema") or 0)
    if version > len(MIGRATIONS):
        raise JournalNewer(
            f"{where} has journal schema version {version}, newer than this webhookd"
            f" understands ({len(MIGRATIONS)}): run the newer webhookd"
        )
    if version < len(MIGRATIONS):
        raise JournalError(
            f"{where} (a standby) has journal schema version {version}, this webhookd's is"
            f" {len(MIGRATIONS)}: upgrade it on the primary"
        )
    return version


async def peek(url: str, statement_cache_size: int) -> Peeked:
    """``Peeked`` of the PostgreSQL journal at ``url``, read in a read-only transaction of a
    connection of its own: no schema upgrade, no node joined (``check``). Nothing when the
    journal has no tables yet; ``JournalError`` when it cannot be read within 5 s, or its
    schema is newer than this webhookd's."""
    where = redact_url(url)
    try:
        async with asyncio.timeout(5):
            conn = await asyncpg.connect(
                url,
                statement_cache_size=statement_cache_size,
                server_settings={"application_name": "webhookd check"},
            )
            try:
                async with conn.transaction(readonly=True):
                    if await conn.fetchval("SELECT to_regclass('webhookd_schema') IS NULL"):
                        return Peeked({}, 0)
                    version = int(
                        await conn.fetchval("SELECT max(version) FROM webhookd_schema") or 0
                    )
                    if version > len(MIGRATIONS):
                        raise JournalNewer(
                            f"{where} has journal schema version {version}, newer than this"
                            f" webhookd understands ({len(MIGRATIONS)})"
                        )
                    rows = await conn.fetch(UNFINISHED_BY_ACTION_SQL)
                    events = None
                    if 0 < version < len(MIGRATIONS):  # for the upgrade's note
                        events = await _events_estimate(conn)
            finally:
                conn.terminate()
    except DB_ERRORS as exc:
        raise JournalError(f"{where}: {db_error(exc)}") from None
    except ValueError:  # a URL the driver cannot read: its words may quote it
        raise JournalError(f"{where}: its URL cannot be read") from None
    return Peeked(by_action(rows), version, events)


async def _events_estimate(conn: Any) -> int:
    """About how many events the journal holds: the planner's estimate (an exact count of tens
    of millions of rows outlasted ``check``'s 5 s and lost every note), or, for a table never
    analysed, a count up to ``COUNTED_EVENTS`` and the planner's guess from its size past it."""
    estimate = await conn.fetchval("SELECT reltuples FROM pg_class WHERE oid = 'events'::regclass")
    if estimate is not None and estimate >= 0:
        return int(estimate)
    counted = int(
        await conn.fetchval(f"SELECT count(*) FROM (SELECT FROM events LIMIT {COUNTED_EVENTS}) e")
    )
    if counted < COUNTED_EVENTS:
        return counted
    plan = json.loads(await conn.fetchval("EXPLAIN (FORMAT JSON) SELECT FROM events"))
    return max(counted, int(plan[0]["Plan"]["Plan Rows"]))
