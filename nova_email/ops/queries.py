"""Every statement the operator commands and the metrics collector run, named, each with its purpose.

They read through the service's SQL API (``get_sync_progress``, ``get_webhook_metrics``,
``queue_inbox_backfill``, ``record_backfill_failure``) and the broker's (``pgmq_broker.queue_metrics``,
``pgmq_broker.dead_letters``), so the numbers are the same ones the workers and the README's SQL see.
"""

from __future__ import annotations

from typing import LiteralString

#: Backfill statuses during which a configuration is being worked on (the SQL API's notion of "active").
ACTIVE_BACKFILL_STATUSES = ("pending", "backfill", "thread_sync", "in_progress")

# -- snapshots -----------------------------------------------------------------------------------------------------

#: First statement of a report's transaction: one consistent, read-only view of every table.
READ_ONLY_SNAPSHOT: LiteralString = "set transaction isolation level repeatable read, read only"
#: The database's clock (ages and rates are computed against it, not the client's).
NOW: LiteralString = "select now() as now"

# -- queues ----------------------------------------------------------------------------------------------------------

#: Every PGMQ queue with its depth, delayed and in-flight counts, oldest ready age and dead letters.
QUEUE_METRICS: LiteralString = """
select m.queue_name, q.queued, q.delayed, q.in_flight, q.oldest_age_ms, q.dead_lettered
  from pgmq.meta m
 cross join lateral pgmq_broker.queue_metrics(m.queue_name) q
 order by m.queue_name
"""

#: Which of the given queues exist (the health check's "queues present").
QUEUES_PRESENT: LiteralString = "select queue_name from pgmq.meta where queue_name = any(%(queues)s)"

# -- backfills -------------------------------------------------------------------------------------------------------

#: Progress of every active backfill (or of the given configs), with its inbox and the database's clock.
BACKFILL_PROGRESS: LiteralString = """
select p.config_id, p.inbox_id, i.email, p.backfill_status, p.threads_total, p.threads_queued,
       p.threads_processing, p.threads_completed, p.threads_failed, p.messages_synced, p.percent_complete,
       p.backfill_started_at, p.backfill_completed_at, p.sync_started_at, p.last_thread_at, p.sync_completed_at,
       c.backfill_requested_at, p.backfill_progress ->> 'error' as last_error, now() as observed_at
  from flux_inbox_configurations c
  join flux_inboxes i on i.id = c.inbox_id
 cross join lateral get_sync_progress(c.id) p
 where (%(config_ids)s::uuid[] is null and c.backfill_status = any(%(statuses)s::text[]))
    or c.id = any(%(config_ids)s::uuid[])
 order by c.backfill_requested_at nulls last, c.id
"""

#: Take the metrics collector's session advisory lock if no other session holds it; true when this session does.
TRY_COLLECTOR_LOCK: LiteralString = "select pg_try_advisory_lock(%(key)s)"
#: Give the metrics collector's lock up (on shutdown), so another process can take it at once.
RELEASE_COLLECTOR_LOCK: LiteralString = "select pg_advisory_unlock(%(key)s)"

#: How many configurations are in each backfill status (the metrics' overview of every inbox).
BACKFILL_STATUS_COUNTS: LiteralString = """
select backfill_status, count(*) from flux_inbox_configurations group by backfill_status order by backfill_status
"""

#: The inbox named by its id, e-mail address or Nylas grant id.
FIND_INBOX: LiteralString = """
select id, email, nylas_grant_id, status
  from flux_inboxes
 where id::text = %(ref)s or lower(email) = lower(%(ref)s) or nylas_grant_id = %(ref)s
 order by (id::text = %(ref)s) desc, (nylas_grant_id = %(ref)s) desc
"""

#: A configuration's inbox, status and window (what a retry re-queues), locked for the retry's transaction.
GET_CONFIG_FOR_RETRY: LiteralString = """
select id, inbox_id, backfill_status, backfill_start_date, backfill_end_date
  from flux_inbox_configurations
 where id = %(config_id)s
   for update
"""

#: Mark a stuck backfill failed, with the operator's reason in its error history (before forcing a retry).
RECORD_BACKFILL_FAILURE: LiteralString = "select record_backfill_failure(%(config_id)s, %(error)s)"

# -- webhooks --------------------------------------------------------------------------------------------------------

#: Webhook audit rows of the window, by type and status (the original README's "recent webhook activity").
WEBHOOK_ACTIVITY: LiteralString = """
select notification_type, status, count, avg_duration_ms, max_duration_ms, oldest_received_at, newest_received_at
  from get_webhook_metrics(%(window)s)
"""

# -- failures --------------------------------------------------------------------------------------------------------

#: The most recent failures of every kind, newest first: webhooks in error, failed threads, failed backfills and
#: dead letters, each with when, what it concerns and its error text.
RECENT_FAILURES: LiteralString = """
select kind, at, subject, error from (
    (select 'webhook' as kind, coalesce(n.processed_at, n.received_at) as at,
            coalesce(n.notification_type, '?') || ' ' || coalesce(n.webhook_id, n.id::text) as subject,
            n.error_message as error
       from flux_webhook_notifications n
      where n.status = 'error'
      order by n.received_at desc
      limit %(limit)s)
    union all
    (select 'thread', coalesce(t.processed_at, t.updated_at), 'thread ' || t.nylas_thread_id || ' (config '
            || t.config_id::text || ')', t.error_message
       from queued_threads t
      where t.status = 'failed'
      order by t.processed_at desc nulls last
      limit %(limit)s)
    union all
    (select 'backfill', coalesce((c.backfill_progress ->> 'failed_at')::timestamptz, c.updated_at),
            'config ' || c.id::text, c.backfill_progress ->> 'error'
       from flux_inbox_configurations c
      where c.backfill_status = 'failed'
      order by c.updated_at desc
      limit %(limit)s)
    union all
    (select 'dead_letter', d.dead_at, d.queue_name || ' #' || d.id::text || coalesce(' ' || d.actor_name, ''),
            d.reason || coalesce(': ' || d.error_type, '') || coalesce(': ' || d.error_message, '')
       from pgmq_broker.dead_letters d
      order by d.dead_at desc
      limit %(limit)s)
) f
order by at desc nulls last
limit %(limit)s
"""

# -- dead letters ----------------------------------------------------------------------------------------------------

#: One dead letter by id, every column.
GET_DEAD_LETTER: LiteralString = """
select id, queue_name, msg_id, message_id, actor_name, message, reason, error_type, error_message, traceback,
       attempts, enqueued_at, dead_at
  from pgmq_broker.dead_letters
 where id = %(id)s
"""

#: Dead letters per queue, with the oldest and newest.
DEAD_LETTER_COUNTS: LiteralString = """
select queue_name, count(*) as count, min(dead_at) as oldest, max(dead_at) as newest
  from pgmq_broker.dead_letters
 group by queue_name
 order by queue_name
"""

#: The newest `limit` dead letters (of one queue, or all), newest first.
LIST_DEAD_LETTERS: LiteralString = """
select id, queue_name, msg_id, message_id, actor_name, message, reason, error_type, error_message, traceback,
       attempts, enqueued_at, dead_at
  from pgmq_broker.dead_letters
 where %(queue)s::text is null or queue_name = %(queue)s
 order by id desc
 limit %(limit)s
"""
