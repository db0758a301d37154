"""Every statement the PGMQ broker runs, named. Multi-step work lives in SQL functions (``brokers/sql/001_broker.sql``)."""

from __future__ import annotations

from typing import LiteralString

from psycopg import sql

#: Create a PGMQ queue unless it exists (PGMQ serialises creators with an advisory lock). The existence check comes
#: first because pgmq.create() needs CREATE on schema pgmq even for an existing queue, which a least-privilege
#: worker role does not have.
CREATE_QUEUE: LiteralString = (
    "select pgmq.create(%(queue)s) where not exists (select from pgmq.meta where queue_name = %(queue)s)"
)

#: Send one message, visible after %(delay_ms)s milliseconds of the server's clock: the INSERT that ``pgmq.send``
#: runs, written straight into the queue's table (the hot path). pgmq.send builds that INSERT with EXECUTE format()
#: on every call, so it is parsed and planned every time; this one psycopg prepares once per connection. {table}
#: is ``q_<queue>``, as ``pgmq.format_table_name`` makes it from a valid (lower-case) queue name.
SEND_TO_TABLE = sql.SQL(
    "insert into pgmq.{table} (vt, message)"
    " values (clock_timestamp() + %(delay_ms)s * interval '1 millisecond', %(message)s::jsonb) returning msg_id"
)

#: Send many messages to one queue in one statement. %(messages)s is one JSON array of the envelopes: a single
#: text parameter is far cheaper to pass than a jsonb[] whose every element psycopg would have to escape.
SEND_BATCH: LiteralString = (
    "select msg_id from pgmq_broker.send_batch(%(queue)s,"
    " array(select jsonb_array_elements(%(messages)s::jsonb)), %(delay_ms)s) as msg_id"
)

#: Replace a delivery by its retry, atomically, if it still holds its lease (null when it does not: nothing sent).
RESEND: LiteralString = (
    "select pgmq_broker.resend(%(old_queue)s, %(old_msg_id)s, %(old_token)s, %(queue)s, %(message)s::jsonb,"
    " %(delay_ms)s)"
)

#: Delete the acknowledged deliveries still held, then lease up to %(qty)s visible messages, counting each lease in
#: ``read_ct``. Rows with ``stale`` are acknowledged deliveries that were no longer held (left alone). The columns
#: are those of ``FAIR_FETCH_OF_QUEUE``, whose ``fairness_key`` this queue has none of.
FETCH: LiteralString = (
    "select msg_id, read_ct, enqueued_at, last_read_at, message::text, stale, null::text as fairness_key"
    " from pgmq_broker.fetch(%(queue)s, %(ack_ids)s::bigint[], %(ack_tokens)s::timestamptz[], %(archive)s, %(qty)s,"
    " %(vt_ms)s, %(async_commit)s)"
)

#: Milliseconds until the queue's next message becomes visible.
NEXT_VISIBLE_IN_MS: LiteralString = "select pgmq_broker.next_visible_in_ms(%(queue)s)"

#: Push the leases of these deliveries forward; returns the ids still held.
EXTEND: LiteralString = (
    "select msg_id from pgmq_broker.extend(%(queue)s, %(ids)s::bigint[], %(tokens)s::timestamptz[], %(vt_ms)s,"
    " %(async_commit)s)"
    " as msg_id"
)

#: Make these deliveries visible again after %(delay_ms)s, if still held; returns the ids released.
RELEASE: LiteralString = (
    "select msg_id from pgmq_broker.release_held(%(queue)s, %(ids)s::bigint[], %(tokens)s::timestamptz[],"
    " %(delay_ms)s, %(uncount)s) as msg_id"
)

#: Record one delivery as a dead letter and delete it from its queue, if it still holds its lease (false if not).
DEAD_LETTER: LiteralString = (
    "select pgmq_broker.dead_letter(%(queue)s, %(msg_id)s, %(token)s, %(message)s::jsonb, %(message_id)s,"
    " %(actor_name)s, %(reason)s, %(error_type)s, %(error_message)s, %(traceback)s, %(attempts)s)"
)

#: Dead letters, newest last, optionally of one queue.
LIST_DEAD_LETTERS: LiteralString = (
    "select id, queue_name, msg_id, message_id, actor_name, message, reason, error_type, error_message,"
    " traceback, attempts, enqueued_at, dead_at from pgmq_broker.dead_letters"
    " where %(queue)s::text is null or queue_name = %(queue)s order by id limit %(limit)s"
)

#: How many dead letters there are, optionally of one queue.
COUNT_DEAD_LETTERS: LiteralString = (
    "select count(*) from pgmq_broker.dead_letters where %(queue)s::text is null or queue_name = %(queue)s"
)

#: Delete dead letters, optionally of one queue and older than %(older_than_s)s seconds.
PURGE_DEAD_LETTERS: LiteralString = (
    "delete from pgmq_broker.dead_letters where (%(queue)s::text is null or queue_name = %(queue)s)"
    " and (%(older_than_s)s::integer is null or dead_at < now() - %(older_than_s)s * interval '1 second')"
)

#: Send dead letters back to their queues and remove them.
REPLAY_DEAD_LETTERS: LiteralString = (
    "select pgmq_broker.replay_dead_letters(%(queue)s::text, %(ids)s::bigint[], %(limit)s::integer)"
)

#: Drop every message of a queue (DELETE: no TRUNCATE privilege or exclusive lock needed).
FLUSH_QUEUE: LiteralString = "select pgmq_broker.flush(%(queue)s)"

#: Messages still in a queue, visible or not (what join waits on).
QUEUE_SIZE: LiteralString = "select count(*) from pgmq.{table}"

#: Depth, delayed, in flight, oldest age and dead letters of a queue (the fields of ``brokers.queues.QueueMetrics``).
QUEUE_METRICS: LiteralString = (
    "select %(queue)s::text as queue_name, queued, delayed, in_flight, oldest_age_ms, dead_lettered"
    " from pgmq_broker.queue_metrics(%(queue)s)"
)

#: Delete archived messages older than the retention.
PURGE_ARCHIVE: LiteralString = "select pgmq_broker.purge_archive(%(queue)s, %(older_than_s)s)"

#: Turn on insert notifications for a queue (creates it when missing); for migrations, not workers.
ENABLE_NOTIFY: LiteralString = "select pgmq_broker.enable_notify(%(queue)s)"

#: Subscribe the listening connection to a queue's insert notifications.
LISTEN: LiteralString = "listen {channel}"

# -- fairness keys (brokers/fairness.py, brokers/sql/060_fairness.sql) -------------------------------------------------

#: Put a queue in fairness mode, or change its key path and limits (alters the queue's table: set-up code only).
ENABLE_FAIRNESS: LiteralString = (
    "select pgmq_broker.enable_fairness(%(queue)s, %(key_path)s::text[], %(max_in_flight)s::integer,"
    " %(rate_per_s)s::double precision, %(burst)s::integer)"
)
#: Take a queue out of fairness mode.
DISABLE_FAIRNESS: LiteralString = "select pgmq_broker.disable_fairness(%(queue)s)"
#: Give a key of a fair queue a weight (1: the default).
SET_FAIRNESS_WEIGHT: LiteralString = "select pgmq_broker.set_fairness_weight(%(queue)s, %(key)s, %(weight)s::integer)"
#: Whether a queue is in fairness mode.
IS_FAIR: LiteralString = "select pgmq_broker.is_fair(%(queue)s)"
#: ``FETCH`` for a queue in fairness mode, same parameters, on the queue's own function
#: ``pgmq_broker.fair_fetch_<queue>`` ({function}): leases rotate across the queue's keys, and each row has its key.
#: (SQL callers may use ``pgmq_broker.fair_fetch(queue, ...)``, which dispatches to it.)
FAIR_FETCH_OF_QUEUE = sql.SQL(
    "select msg_id, read_ct, enqueued_at, last_read_at, message::text, stale, fairness_key"
    " from pgmq_broker.{function}(%(ack_ids)s::bigint[], %(ack_tokens)s::timestamptz[], %(archive)s, %(qty)s,"
    " %(vt_ms)s, %(async_commit)s)"
)
#: A fair queue's key path and limits.
FAIR_QUEUE: LiteralString = (
    "select queue_name, key_path, max_in_flight, rate_per_s, burst from pgmq_broker.fair_queues"
    " where queue_name = %(queue)s"
)


# -- periodic schedules (brokers/periodic.py, brokers/sql/051_schedules.sql) -------------------------------------

#: Create or update one schedule.
SCHEDULE_UPSERT: LiteralString = (
    "select pgmq_broker.schedule_upsert(%(name)s, %(actor_name)s, %(queue_name)s, %(interval_ms)s, %(lease_ms)s)"
)
#: Take the due schedules among these names (call inside the enqueueing transaction).
SCHEDULE_CLAIM_DUE: LiteralString = (
    "select name, slot_ms, slots_missed, lost_state from pgmq_broker.schedule_claim_due(%(names)s)"
)
#: Start a tick; null when stale.
SCHEDULE_START: LiteralString = "select pgmq_broker.schedule_start(%(name)s, %(slot_ms)s)"
#: Renew the leases of the runs in this process.
SCHEDULE_RENEW: LiteralString = "select pgmq_broker.schedule_renew(%(names)s, %(tokens)s)"
#: End a run, recording its error if any.
SCHEDULE_FINISH: LiteralString = "select pgmq_broker.schedule_finish(%(name)s, %(token)s, %(error)s)"

# -- rate limits (brokers/rate_limits.py, brokers/sql/050_rate_limits.sql) ----------------------------------------

#: Set key iff absent or expired.
RATE_LIMIT_ADD: LiteralString = "select pgmq_broker.rate_limit_add(%(key)s, %(value)s, %(ttl)s)"
#: Increment key up to a maximum.
RATE_LIMIT_INCR: LiteralString = "select pgmq_broker.rate_limit_incr(%(key)s, %(amount)s, %(maximum)s, %(ttl)s)"
#: Decrement key down to a minimum.
RATE_LIMIT_DECR: LiteralString = "select pgmq_broker.rate_limit_decr(%(key)s, %(amount)s, %(minimum)s, %(ttl)s)"
#: Increment key unless the sum over keys would pass the maximum.
RATE_LIMIT_INCR_AND_SUM: LiteralString = (
    "select pgmq_broker.rate_limit_incr_and_sum(%(key)s, %(keys)s, %(amount)s, %(maximum)s, %(ttl)s)"
)
#: Is there a live event on key?
RATE_LIMIT_EVENT_EXISTS: LiteralString = "select pgmq_broker.rate_limit_value(%(key)s) is not null"
#: Publish an event on key for ttl ms and wake the listeners.
RATE_LIMIT_NOTIFY: LiteralString = "select pgmq_broker.rate_limit_notify(%(key)s, %(ttl)s)"
#: Delete a batch of expired rows.
RATE_LIMIT_SWEEP: LiteralString = "select pgmq_broker.rate_limit_sweep(%(limit)s)"
#: Start receiving wait_notify() events on this connection.
RATE_LIMIT_LISTEN: LiteralString = "listen pgmq_broker_rate_limits"
#: Stop receiving them.
RATE_LIMIT_UNLISTEN: LiteralString = "unlisten pgmq_broker_rate_limits"

# -- migrations (brokers/schema.py) ----------------------------------------------------------------------------

#: Create the bookkeeping table; runs under the advisory lock so concurrent first runs cannot race.
MIGRATIONS_CREATE_TABLE: LiteralString = """
create schema if not exists pgmq_broker;
create table if not exists pgmq_broker.schema_migrations (
    namespace text not null,
    version integer not null,
    name text not null,
    checksum text not null,
    applied_at timestamptz not null default now(),
    primary key (namespace, version)
)
"""
#: Serialise migrating processes for the length of one transaction.
MIGRATIONS_LOCK: LiteralString = "select pg_advisory_xact_lock(%(key)s)"
#: Does the bookkeeping table exist (it does once anything was applied)?
MIGRATIONS_TABLE_EXISTS: LiteralString = "select to_regclass('pgmq_broker.schema_migrations') is not null"
#: Run after `MIGRATIONS_LOCK`: locking a catalog table makes this backend take in the catalog changes of the process
#: it waited for. The advisory lock alone does not, so a schema this backend had looked up (and found missing) before
#: the wait would still look missing, and ``create schema if not exists`` would collide with the one just committed.
MIGRATIONS_SEE_COMMITTED_CATALOG: LiteralString = "select count(*) from pg_catalog.pg_namespace"
#: Version and checksum of every applied migration of a namespace.
MIGRATION_CHECKSUMS: LiteralString = (
    "select version, checksum from pgmq_broker.schema_migrations where namespace = %(namespace)s order by version"
)
#: Record an applied migration under its current text (its earlier text named by ``-- replaces:``).
MIGRATION_RERECORD: LiteralString = (
    "update pgmq_broker.schema_migrations set checksum = %(checksum)s, name = %(name)s"
    " where namespace = %(namespace)s and version = %(version)s"
)
#: Checksum of an applied migration, if any.
MIGRATION_CHECKSUM: LiteralString = (
    "select checksum from pgmq_broker.schema_migrations where namespace = %(namespace)s and version = %(version)s"
)
#: Record one applied migration.
MIGRATION_RECORD: LiteralString = (
    "insert into pgmq_broker.schema_migrations (namespace, version, name, checksum)"
    " values (%(namespace)s, %(version)s, %(name)s, %(checksum)s)"
)
#: Is PGMQ present, and how: as an extension, as plain SQL, or available to create.
PGMQ_STATE: LiteralString = """
select exists (select 1 from pg_extension where extname = 'pgmq') as extension,
       to_regclass('pgmq.meta') is not null as schema,
       exists (select 1 from pg_available_extensions where name = 'pgmq') as available
"""
#: Install PGMQ as the server's extension.
PGMQ_CREATE_EXTENSION: LiteralString = "create extension if not exists pgmq"
