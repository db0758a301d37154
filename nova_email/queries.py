"""Every SQL statement the service runs, named, each with a one-line purpose.

Multi-step work lives in SQL functions (``nova_email/sql/``, documented in ``docs/sql-api.md``); these are
the calls into them and the few plain reads and writes around them.
"""

from __future__ import annotations

import uuid
from typing import LiteralString

import attrs
from psycopg import sql as psycopg_sql

# -- sync ------------------------------------------------------------------------------------------------------------

#: Insert or update a thread from its Nylas JSON; returns the row id.
UPSERT_THREAD: LiteralString = "select upsert_nylas_thread(%(inbox_id)s, %(thread)s, %(fetched_at)s)"
#: Insert or update messages of one thread from their Nylas JSON; returns rows written.
UPSERT_MESSAGES: LiteralString = (
    "select upsert_nylas_messages(%(inbox_id)s, %(thread_row_id)s, %(messages)s, %(fetched_at)s)"
)

# -- inboxes ---------------------------------------------------------------------------------------------------------


@attrs.frozen
class Inbox:
    """A row of GET_INBOX and GET_INBOX_BY_GRANT."""

    id: uuid.UUID
    nylas_grant_id: str | None
    status: str


#: The inbox's grant and status (rows: ``Inbox``).
GET_INBOX: LiteralString = "select id, nylas_grant_id, status from flux_inboxes where id = %(inbox_id)s"
#: The inbox that owns a grant.
GET_INBOX_BY_GRANT: LiteralString = (
    "select id, nylas_grant_id, status from flux_inboxes where nylas_grant_id = %(grant_id)s"
)
#: Mark an inbox whose grant expired; no more API calls are made for it.
MARK_INBOX_AUTH_EXPIRED: LiteralString = """
update flux_inboxes set status = 'auth_expired', webhook_health_status = 'failing'
where (id = %(inbox_id)s or nylas_grant_id = %(grant_id)s) and status <> 'auth_expired'
returning id
"""

# -- thread sync -----------------------------------------------------------------------------------------------------

#: Claim a tracked thread for this attempt; returns its status before the claim and the copy the listing kept
#: (a completed row stays completed: its job runs again, as a redelivery or a ``queue_thread_sync()`` call asks).
START_THREAD: LiteralString = """
with previous as (
    select id, status from queued_threads
    where config_id = %(config_id)s and nylas_thread_id = %(thread_id)s
    for update
)
update queued_threads q
set status = case when previous.status = 'completed' then 'completed' else 'processing' end,
    started_at = case when previous.status = 'completed' then q.started_at else now() end,
    attempts = q.attempts + case when previous.status = 'completed' then 0 else 1 end
from previous
where q.id = previous.id
returning previous.status, q.listed_thread, q.listed_at
"""
#: A tracked thread is done: synced (with its message count) or gone at Nylas (with a note). Its listed copy has
#: served: a later job for it (a redelivery, a ``queue_thread_sync()`` call) fetches the thread as Nylas has it then.
COMPLETE_THREAD: LiteralString = """
update queued_threads
set status = 'completed', messages_synced = %(messages)s, processed_at = now(), note = %(note)s, error_message = null,
    listed_thread = null
where config_id = %(config_id)s and nylas_thread_id = %(thread_id)s
"""
#: A tracked thread failed for good; the error is kept so operators can see why.
FAIL_THREAD: LiteralString = """
update queued_threads
set status = 'failed', processed_at = now(), error_message = %(error)s
where config_id = %(config_id)s and nylas_thread_id = %(thread_id)s and status <> 'completed'
"""
#: Put a tracked thread back to queued while its job waits (rate limited, re-scheduled). The deferral does not use
#: one of the job's attempts, so the claim's count is given back.
REQUEUE_THREAD: LiteralString = """
update queued_threads set status = 'queued', attempts = greatest(attempts - 1, 0)
where config_id = %(config_id)s and nylas_thread_id = %(thread_id)s and status = 'processing'
"""

# -- backfill --------------------------------------------------------------------------------------------------------

#: Start a slice of a run and read the checkpoint to resume from: refuses a finished run (SQLSTATE NB001); the run's
#: clocks and progress counters start with its first slice only.
START_BACKFILL_SLICE: LiteralString = "select start_backfill_slice(%(config_id)s)"


@attrs.frozen
class PageRecorded:
    """The row of RECORD_BACKFILL_PAGE: threads of the page queued and skipped, threads queued by the run so far."""

    queued: int
    skipped: int
    threads_queued: int


#: Record one listed page (read at listed_at) and its checkpoint in one transaction (rows: ``PageRecorded``).
RECORD_BACKFILL_PAGE: LiteralString = (
    "select queued, skipped, threads_queued"
    " from record_listed_page(%(config_id)s, %(threads)s, %(next_page_token)s, %(page)s, %(listed_at)s)"
)
#: End a slice of a long listing after `page`: queue the job that lists on from the checkpoint, unless another run
#: recorded pages since (SQLSTATE NB002).
CONTINUE_BACKFILL_LISTING: LiteralString = "select continue_backfill_listing(%(config_id)s, %(page)s)"
#: Hand over to thread sync and send every thread job, atomically.
FINISH_BACKFILL_LISTING: LiteralString = "select finish_backfill_listing(%(config_id)s)"
#: Record a failed run (status failed, error appended, checkpoint kept).
RECORD_BACKFILL_FAILURE: LiteralString = "select record_backfill_failure(%(config_id)s, %(error)s)"

# -- webhooks --------------------------------------------------------------------------------------------------------

#: Record an attempt's start or outcome on the audit row.
ACKNOWLEDGE_WEBHOOK: LiteralString = (
    "select acknowledge_webhook_notification(%(notification_id)s, %(status)s, %(error)s, %(duration_ms)s, %(attempts)s)"
)
#: Is the thread already stored for this inbox?
THREAD_ROW_ID: LiteralString = (
    "select id from flux_email_threads where inbox_id = %(inbox_id)s and nylas_thread_id = %(thread_id)s"
)
#: A webhook arrived for this inbox.
TOUCH_INBOX_WEBHOOK: LiteralString = "update flux_inboxes set last_webhook_at = now() where id = %(inbox_id)s"

# -- completion monitor ----------------------------------------------------------------------------------------------

#: Progress of every active backfill (listing or syncing threads), with the direct counts to cross-check the triggers.
ACTIVE_PROGRESS: LiteralString = """
select p.config_id, p.backfill_status, p.threads_total, p.threads_queued, p.threads_processing,
       p.threads_completed, p.threads_failed, p.messages_synced, p.percent_complete, p.sync_started_at,
       d.total, d.queued, d.processing, d.completed, d.failed, d.messages_synced
from flux_inbox_configurations c
cross join lateral get_sync_progress(c.id) p
cross join lateral get_backfill_stats(c.id) d
where c.backfill_status in ('backfill', 'thread_sync', 'in_progress')
order by c.created_at
"""
#: Mark a configuration complete when every thread is terminal (checked again under the row lock).
COMPLETE_BACKFILL_IF_DONE: LiteralString = "select complete_backfill_if_done(%(config_id)s)"
#: Completed configurations that still have threads waiting: re-open them for thread sync.
REOPEN_PREMATURE_COMPLETIONS: LiteralString = """
with reopened as (
    update flux_inbox_configurations c
    set backfill_status = 'thread_sync', backfill_completed_at = null
    where c.backfill_status = 'completed' and c.backfill_started_at is not null
      and exists (select 1 from queued_threads t where t.config_id = c.id and t.status in ('queued', 'processing'))
    returning c.id
), stats as (
    update inbox_sync_stats s set sync_completed_at = null from reopened r where s.config_id = r.id
)
select r.id,
       (select count(*) from queued_threads t where t.config_id = r.id and t.status in ('queued', 'processing'))
from reopened r
"""
#: Send thread jobs for queued threads never put on the queue (crash recovery); returns how many were sent.
QUEUE_UNSENT_THREAD_SYNCS: LiteralString = "select queue_unsent_thread_syncs(%(config_id)s, 1000)"
#: Create the stats row if missing and lock it: deltas committed before the lock are then in any count taken after.
LOCK_SYNC_STATS: LiteralString = """
insert into inbox_sync_stats as s (config_id) values (%(config_id)s)
on conflict (config_id) do update set config_id = excluded.config_id
"""
#: Set the counters to a direct count of queued_threads, keeping the run's timestamps (after LOCK_SYNC_STATS).
RECOMPUTE_SYNC_STATS: LiteralString = """
update inbox_sync_stats s
set threads_total = d.total, threads_queued = d.queued, threads_processing = d.processing,
    threads_completed = d.completed, threads_failed = d.failed, messages_synced = d.messages_synced
from get_backfill_stats(%(config_id)s) d
where s.config_id = %(config_id)s
"""

# -- starting work ---------------------------------------------------------------------------------------------------

#: Queue a backfill through the SQL API (creates the configuration when needed).
QUEUE_INBOX_BACKFILL: LiteralString = (
    "select config_id, msg_id from queue_inbox_backfill(%(inbox_id)s, %(config_id)s, %(start_date)s, %(end_date)s)"
)

# -- demo ------------------------------------------------------------------------------------------------------------

#: Drop the demo database (it is created afresh on every run).
DROP_DATABASE = psycopg_sql.SQL("drop database if exists {name} with (force)")
#: Create the demo database.
CREATE_DATABASE = psycopg_sql.SQL("create database {name}")
#: The demo's inbox.
DEMO_CREATE_INBOX: LiteralString = (
    "insert into flux_inboxes (nylas_grant_id, email, provider) values (%(grant_id)s, %(grant_id)s || '@example.org',"
    " 'google') returning id"
)
#: Webhooks not yet processed (the demo waits for the ones it sent).
DEMO_OPEN_WEBHOOKS: LiteralString = (
    "select count(*) from flux_webhook_notifications where status in ('pending', 'processing')"
)
#: Threads, messages and processed webhooks of the demo inbox.
DEMO_TOTALS: LiteralString = """
select (select count(*) from flux_email_threads where inbox_id = %(inbox_id)s),
       (select count(*) from flux_email_messages where inbox_id = %(inbox_id)s),
       (select count(*) from flux_webhook_notifications where status = 'processed')
"""

# -- dead letters the actors never saw -------------------------------------------------------------------------------

#: Tracked threads whose job the broker dead-lettered without running it to the end (a poison message that killed
#: its worker max_deliveries times, or an undecodable body): mark them failed with the dead letter's reason, so the
#: backfill can complete. Only dead letters newer than the thread's queueing count (a re-queued thread starts over).
FAIL_DEAD_LETTERED_THREADS: LiteralString = """
with lost as (
    select coalesce(d.message -> 'args' -> 0, d.message) as payload, d.reason, d.error_message, d.dead_at
    from pgmq_broker.dead_letters d
    where d.queue_name = 'thread_sync_jobs' and d.reason <> 'failed'
), keyed as (
    -- Cast only what is a UUID: a dead letter's payload can be anything (an undecodable body, too).
    select case when payload ->> 'config_id' ~* '^[0-9a-f]{8}(-?[0-9a-f]{4}){3}-?[0-9a-f]{12}$'
                then (payload ->> 'config_id')::uuid end as config_id,
           payload ->> 'thread_id' as thread_id, reason, error_message, dead_at
    from lost
)
update queued_threads q
set status = 'failed', processed_at = now(),
    error_message = left('job dead-lettered (' || keyed.reason || '): ' || coalesce(keyed.error_message, ''), 2000)
from keyed
where q.config_id = keyed.config_id and q.nylas_thread_id = keyed.thread_id
  and q.status in ('queued', 'processing') and keyed.dead_at > q.queued_at
returning q.config_id, q.nylas_thread_id, keyed.reason
"""
#: Webhook audit rows whose job the broker dead-lettered without the actor recording an outcome.
FAIL_DEAD_LETTERED_WEBHOOKS: LiteralString = """
with lost as (
    select coalesce(d.message -> 'args' -> 0, d.message) as payload, d.reason, d.error_message
    from pgmq_broker.dead_letters d
    where d.queue_name = 'nylas_webhook_notifications' and d.reason <> 'failed'
), keyed as (
    select case when payload ->> 'notification_id' ~* '^[0-9a-f]{8}(-?[0-9a-f]{4}){3}-?[0-9a-f]{12}$'
                then (payload ->> 'notification_id')::uuid end as notification_id,
           reason, error_message
    from lost
)
update flux_webhook_notifications w
set status = 'error', processed_at = now(),
    error_message = left('job dead-lettered (' || keyed.reason || '): ' || coalesce(keyed.error_message, ''), 2000)
from keyed
where w.id = keyed.notification_id and w.status in ('pending', 'processing')
returning w.id, keyed.reason
"""
#: Backfills whose job the broker dead-lettered while the run was pending or listing: failed, so a new one may start.
#: Only dead letters newer than the oldest such run's request are read: older ones are recorded or moot, and with no
#: run pending or listing none is read at all.
FAIL_DEAD_LETTERED_BACKFILLS: LiteralString = """
with lost as (
    select coalesce(d.message -> 'args' -> 0, d.message) as payload, d.reason, d.error_message, d.dead_at
    from pgmq_broker.dead_letters d
    where d.queue_name = 'inbox_backfill_jobs' and d.reason <> 'failed'
      and d.dead_at > (select min(coalesce(c.backfill_requested_at, '-infinity')) from flux_inbox_configurations c
                       where c.backfill_status in ('pending', 'backfill'))
), keyed as (
    select case when payload ->> 'config_id' ~* '^[0-9a-f]{8}(-?[0-9a-f]{4}){3}-?[0-9a-f]{12}$'
                then (payload ->> 'config_id')::uuid end as config_id,
           reason, error_message, dead_at
    from lost
), stuck as (
    select distinct on (c.id) c.id, keyed.reason, keyed.error_message
    from keyed join flux_inbox_configurations c on c.id = keyed.config_id
    where c.backfill_status in ('pending', 'backfill') and keyed.dead_at > coalesce(c.backfill_requested_at, '-infinity')
    order by c.id, keyed.dead_at desc
)
select stuck.id, stuck.reason,
       record_backfill_failure(stuck.id,
           left('job dead-lettered (' || stuck.reason || '): ' || coalesce(stuck.error_message, ''), 2000))
from stuck
"""
