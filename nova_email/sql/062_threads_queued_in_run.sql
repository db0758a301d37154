-- inbox_sync_stats.threads_queued counts the threads queued in the run, as the original README's "Monitor Active
-- Syncs" reads it (threads_completed / threads_queued is the run's progress), and a run that has failed is over
-- (sync_completed_at set), like one that completed or found no threads. Readers that need the threads waiting right
-- now get them from get_sync_progress, which reports counters by status.

CREATE OR REPLACE FUNCTION flux_count_threads_queued_in_run() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.threads_queued := NEW.threads_total;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION flux_count_threads_queued_in_run() IS
    'Trigger function: inbox_sync_stats.threads_queued is the number of threads queued in the run (threads_total), '
    'whatever status they have reached, so threads_completed / threads_queued is the run''s progress.';

CREATE OR REPLACE TRIGGER inbox_sync_stats_threads_queued_in_run
    BEFORE INSERT OR UPDATE ON inbox_sync_stats
    FOR EACH ROW EXECUTE FUNCTION flux_count_threads_queued_in_run();

-- Rows of runs still open (adopted or ours) take the new meaning now; rows of finished runs keep the values their
-- run ended with.
UPDATE inbox_sync_stats s SET threads_queued = s.threads_total
 WHERE s.sync_completed_at IS NULL AND s.threads_queued IS DISTINCT FROM s.threads_total;

CREATE OR REPLACE FUNCTION flux_copy_backfill_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'inbox_sync_stats' THEN
        NEW.backfill_status := (SELECT c.backfill_status FROM flux_inbox_configurations c WHERE c.id = NEW.config_id);
        RETURN NEW;
    END IF;
    UPDATE inbox_sync_stats s
       SET backfill_status = NEW.backfill_status,
           sync_completed_at = CASE WHEN NEW.backfill_status IN ('completed', 'failed')
                                    THEN coalesce(s.sync_completed_at, now())
                                    ELSE s.sync_completed_at END
     WHERE s.config_id = NEW.id AND s.backfill_status IS DISTINCT FROM NEW.backfill_status;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION flux_copy_backfill_status() IS
    'Trigger function: keeps inbox_sync_stats.backfill_status equal to its configuration''s backfill_status, and '
    'ends the stats row''s run (sync_completed_at) when the backfill completes or fails.';

-- Failed runs left open before this migration are over too.
UPDATE inbox_sync_stats s SET sync_completed_at = coalesce(c.backfill_completed_at, s.updated_at, now())
  FROM flux_inbox_configurations c
 WHERE c.id = s.config_id AND c.backfill_status = 'failed' AND s.sync_completed_at IS NULL;

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
           coalesce(s.threads_total, 0),
           coalesce(greatest(s.threads_total - s.threads_processing - s.threads_completed - s.threads_failed, 0), 0),
           coalesce(s.threads_processing, 0),
           coalesce(s.threads_completed, 0), coalesce(s.threads_failed, 0), coalesce(s.messages_synced, 0),
           coalesce(round(100.0 * (s.threads_completed + s.threads_failed) / nullif(s.threads_total, 0), 2), 0),
           c.backfill_started_at, c.backfill_completed_at, s.sync_started_at, s.last_thread_at, s.sync_completed_at,
           c.backfill_progress
      FROM flux_inbox_configurations c
      LEFT JOIN inbox_sync_stats s ON s.config_id = c.id
     WHERE c.id = p_config_id;
$$;
COMMENT ON FUNCTION get_sync_progress(uuid) IS
    'Progress of one configuration''s backfill: status, thread counters by status (threads_queued: waiting now), '
    'messages synced, percent of threads finished (completed or failed), timestamps and backfill_progress. No row '
    'for an unknown config.';
