-- The original service's SQL functions that other services may still call, with their documented signatures,
-- next to ours. Where ours differ, the old form is an overload that works the way ours do: counters follow
-- queued_threads through triggers (006_sync_stats.sql), so the old "increment" calls recount instead of adding.
-- replaces: 37504748a43f0cf5b7dc7f80c7b93feb2be7b0b80bc53f547aafe77137556e57
-- replaces: a1ce082b13e7cf248cab4a52d3ddb9b648507706284e0437307722168146531e

-- Recount one configuration's counters from queued_threads, under the stats row's lock (see initialize_sync_stats).
CREATE OR REPLACE FUNCTION flux_recount_sync_stats(p_config_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM flux_inbox_configurations c WHERE c.id = p_config_id) THEN
        RAISE EXCEPTION 'Configuration % does not exist; queue a backfill with queue_inbox_backfill first',
            quote_nullable(p_config_id)
            USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO inbox_sync_stats (config_id) VALUES (p_config_id) ON CONFLICT (config_id) DO NOTHING;
    PERFORM 1 FROM inbox_sync_stats s WHERE s.config_id = p_config_id FOR UPDATE;
    UPDATE inbox_sync_stats s
       SET threads_total = d.total,
           threads_queued = d.queued,
           threads_processing = d.processing,
           threads_completed = d.completed,
           threads_failed = d.failed,
           messages_synced = d.messages
      FROM (
          SELECT count(*)::int AS total,
                 count(*) FILTER (WHERE t.status = 'queued')::int AS queued,
                 count(*) FILTER (WHERE t.status = 'processing')::int AS processing,
                 count(*) FILTER (WHERE t.status = 'completed')::int AS completed,
                 count(*) FILTER (WHERE t.status = 'failed')::int AS failed,
                 coalesce(sum(t.messages_synced), 0)::int AS messages
            FROM queued_threads t
           WHERE t.config_id = p_config_id
      ) AS d
     WHERE s.config_id = p_config_id;
END;
$$;
COMMENT ON FUNCTION flux_recount_sync_stats(uuid) IS
    'Sets a configuration''s inbox_sync_stats counters to the counts in queued_threads (creating the row).';

CREATE OR REPLACE FUNCTION initialize_sync_stats(p_config_id uuid, p_threads_total integer DEFAULT 0) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_threads_total IS NULL OR p_threads_total < 0 THEN
        RAISE EXCEPTION 'threads_total must be >= 0, got %', quote_nullable(p_threads_total)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM flux_recount_sync_stats(p_config_id);
    UPDATE inbox_sync_stats s SET sync_started_at = now(), sync_completed_at = NULL WHERE s.config_id = p_config_id;
END;
$$;

CREATE OR REPLACE FUNCTION increment_threads_queued(p_config_id uuid) RETURNS void
LANGUAGE sql AS $$
    SELECT flux_recount_sync_stats(p_config_id);
$$;
COMMENT ON FUNCTION increment_threads_queued(uuid) IS
    'The original''s counter call, kept for its callers: counters follow queued_threads by trigger, so this recounts.';

CREATE OR REPLACE FUNCTION start_thread_processing(p_config_id uuid) RETURNS void
LANGUAGE sql AS $$
    SELECT flux_recount_sync_stats(p_config_id);
$$;
COMMENT ON FUNCTION start_thread_processing(uuid) IS
    'The original''s counter call, kept for its callers: counters follow queued_threads by trigger, so this recounts.';

CREATE OR REPLACE FUNCTION acknowledge_thread_job(
    p_msg_id          bigint,
    p_config_id       uuid,
    p_messages_synced integer,
    p_success         boolean DEFAULT true
)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM flux_require_config(p_config_id);
    UPDATE queued_threads t
       SET status = CASE WHEN p_success THEN 'completed' ELSE 'failed' END,
           messages_synced = greatest(coalesce(p_messages_synced, 0), 0),
           processed_at = now()
     WHERE t.config_id = p_config_id AND t.msg_id = p_msg_id AND t.status IN ('queued', 'processing');
    PERFORM complete_backfill_if_done(p_config_id);
    RETURN pgmq.delete('thread_sync_jobs', p_msg_id);
END;
$$;
COMMENT ON FUNCTION acknowledge_thread_job(bigint, uuid, integer, boolean) IS
    'The original''s end of a thread job: marks the queued_threads row sent as p_msg_id completed (or failed), '
    'completes the backfill when no thread is left, and deletes the job; true when the job was still queued.';

CREATE OR REPLACE FUNCTION acknowledge_backfill_job(p_msg_id bigint, p_config_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE flux_inbox_configurations c SET backfill_msg_id = NULL
     WHERE c.id = p_config_id AND c.backfill_msg_id = p_msg_id;
    RETURN pgmq.delete('inbox_backfill_jobs', p_msg_id);
END;
$$;
COMMENT ON FUNCTION acknowledge_backfill_job(bigint, uuid) IS
    'The original''s end of a backfill job: deletes it from inbox_backfill_jobs; true when it was still queued.';

CREATE OR REPLACE FUNCTION read_nylas_webhook_notifications(p_limit integer, p_visibility_timeout integer)
RETURNS TABLE (msg_id bigint, read_ct integer, enqueued_at timestamptz, vt timestamptz, message jsonb)
LANGUAGE sql AS $$
    SELECT * FROM flux_pgmq_read('nylas_webhook_notifications', p_visibility_timeout, p_limit);
$$;
COMMENT ON FUNCTION read_nylas_webhook_notifications(integer, integer) IS
    'The original''s reader: up to p_limit webhook jobs, hidden for p_visibility_timeout seconds. A caller that '
    'reads jobs takes them from the workers until it acknowledges or they become visible again.';

CREATE OR REPLACE FUNCTION acknowledge_webhook_notification(
    p_message_id      bigint,
    p_notification_id uuid,
    p_success         boolean,
    p_error_message   text DEFAULT NULL
)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_found boolean;
BEGIN
    v_found := acknowledge_webhook_notification(
        p_notification_id, CASE WHEN p_success THEN 'processed' ELSE 'error' END, p_error_message);
    -- A failed webhook is retried: its job stays on the queue and comes back after its visibility timeout.
    IF p_success THEN
        PERFORM pgmq.delete('nylas_webhook_notifications', p_message_id);
    END IF;
    RETURN v_found;
END;
$$;
COMMENT ON FUNCTION acknowledge_webhook_notification(bigint, uuid, boolean, text) IS
    'The original''s form: records processed (and deletes job p_message_id) or error (the job is retried after its '
    'visibility timeout). Same as acknowledge_webhook_notification(notification_id, status, error) otherwise.';

-- The original README's "Monitor Active Syncs" reads each backfill's status from its stats row.
ALTER TABLE inbox_sync_stats ADD COLUMN IF NOT EXISTS backfill_status text;
-- Filling the new column is not an update of the rows: their triggers (updated_at) stay quiet.
CREATE TEMPORARY TABLE flux_legacy_paused_triggers ON COMMIT DROP AS
SELECT * FROM flux_pause_triggers(ARRAY['inbox_sync_stats']);
UPDATE inbox_sync_stats s SET backfill_status = c.backfill_status
  FROM flux_inbox_configurations c
 WHERE c.id = s.config_id AND s.backfill_status IS DISTINCT FROM c.backfill_status;
SELECT flux_resume_trigger(table_name, trigger_name) FROM flux_legacy_paused_triggers;
DROP TABLE flux_legacy_paused_triggers;

CREATE OR REPLACE FUNCTION flux_copy_backfill_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'inbox_sync_stats' THEN
        NEW.backfill_status := (SELECT c.backfill_status FROM flux_inbox_configurations c WHERE c.id = NEW.config_id);
        RETURN NEW;
    END IF;
    UPDATE inbox_sync_stats s SET backfill_status = NEW.backfill_status
     WHERE s.config_id = NEW.id AND s.backfill_status IS DISTINCT FROM NEW.backfill_status;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION flux_copy_backfill_status() IS
    'Trigger function: keeps inbox_sync_stats.backfill_status equal to its configuration''s backfill_status.';

CREATE OR REPLACE TRIGGER inbox_sync_stats_backfill_status BEFORE INSERT ON inbox_sync_stats
    FOR EACH ROW EXECUTE FUNCTION flux_copy_backfill_status();
CREATE OR REPLACE TRIGGER flux_inbox_configurations_backfill_status
    AFTER UPDATE OF backfill_status ON flux_inbox_configurations
    FOR EACH ROW WHEN (OLD.backfill_status IS DISTINCT FROM NEW.backfill_status)
    EXECUTE FUNCTION flux_copy_backfill_status();
