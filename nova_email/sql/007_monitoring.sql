-- Read-only views of progress for operators, the completion monitor and a frontend progress bar.

CREATE OR REPLACE FUNCTION get_sync_progress(p_config_id uuid)
RETURNS TABLE (
    config_id             uuid,
    inbox_id              uuid,
    backfill_status       text,
    threads_total         integer,
    threads_queued        integer,
    threads_processing    integer,
    threads_completed     integer,
    threads_failed        integer,
    messages_synced       integer,
    percent_complete      numeric,
    backfill_started_at   timestamptz,
    backfill_completed_at timestamptz,
    sync_started_at       timestamptz,
    last_thread_at        timestamptz,
    sync_completed_at     timestamptz,
    backfill_progress     jsonb
)
LANGUAGE sql STABLE AS $$
    SELECT c.id, c.inbox_id, c.backfill_status,
           coalesce(s.threads_total, 0), coalesce(s.threads_queued, 0), coalesce(s.threads_processing, 0),
           coalesce(s.threads_completed, 0), coalesce(s.threads_failed, 0), coalesce(s.messages_synced, 0),
           coalesce(round(100.0 * (s.threads_completed + s.threads_failed) / nullif(s.threads_total, 0), 2), 0),
           c.backfill_started_at, c.backfill_completed_at, s.sync_started_at, s.last_thread_at, s.sync_completed_at,
           c.backfill_progress
      FROM flux_inbox_configurations c
      LEFT JOIN inbox_sync_stats s ON s.config_id = c.id
     WHERE c.id = p_config_id;
$$;
COMMENT ON FUNCTION get_sync_progress(uuid) IS
    'Progress of one configuration''s backfill: status, thread counters by status, messages synced, percent of '
    'threads finished (completed or failed), timestamps and backfill_progress. No row for an unknown config.';

CREATE OR REPLACE FUNCTION get_backfill_stats(p_config_id uuid)
RETURNS TABLE (
    total           bigint,
    queued          bigint,
    processing      bigint,
    completed       bigint,
    failed          bigint,
    messages_synced bigint
)
LANGUAGE sql STABLE AS $$
    SELECT count(*),
           count(*) FILTER (WHERE t.status = 'queued'),
           count(*) FILTER (WHERE t.status = 'processing'),
           count(*) FILTER (WHERE t.status = 'completed'),
           count(*) FILTER (WHERE t.status = 'failed'),
           coalesce(sum(t.messages_synced), 0)::bigint
      FROM queued_threads t
     WHERE t.config_id = p_config_id;
$$;
COMMENT ON FUNCTION get_backfill_stats(uuid) IS
    'Thread counts by status and messages synced for one configuration, counted from queued_threads directly '
    '(independent of the stats triggers; use it to cross-check them).';

CREATE OR REPLACE FUNCTION get_webhook_metrics(p_time_window interval DEFAULT interval '1 hour')
RETURNS TABLE (
    notification_type  text,
    status             text,
    count              bigint,
    avg_duration_ms    numeric,
    max_duration_ms    integer,
    oldest_received_at timestamptz,
    newest_received_at timestamptz
)
LANGUAGE sql STABLE AS $$
    SELECT n.notification_type, n.status, count(*), round(avg(n.processing_duration_ms), 1),
           max(n.processing_duration_ms), min(n.received_at), max(n.received_at)
      FROM flux_webhook_notifications n
     WHERE n.received_at > now() - p_time_window
     GROUP BY n.notification_type, n.status
     ORDER BY n.notification_type NULLS LAST, n.status;
$$;
COMMENT ON FUNCTION get_webhook_metrics(interval) IS
    'Webhook audit rows received within the window, grouped by type and status, with counts and processing '
    'durations. Rejected bodies have a NULL notification_type.';
