-- An open inbox_sync_stats row (sync_completed_at NULL) always has threads, so the original README's "Monitor Active
-- Syncs" (threads_completed / threads_queued) never divides by zero: a run without threads yet has no stats row.
-- start_backfill_slice opens the row at the run's start only when the configuration has threads already (a run again);
-- a first run's row is created by queued_threads' trigger with its first recorded threads, and starts its clock then
-- (a row left without threads, closed, reopens then). A run that ends without threads (finish_backfill_listing) never
-- had a row. Readers of a run without a row (get_sync_progress, nova-email status) see zero counters and the
-- configuration's backfill_started_at.

CREATE OR REPLACE FUNCTION flux_open_sync_stats_with_threads() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.sync_started_at := coalesce(NEW.sync_started_at, now());
    ELSIF OLD.threads_total = 0 AND NEW.threads_total > 0 AND NEW.sync_completed_at IS NOT NULL
          AND NEW.backfill_status = 'backfill' THEN
        NEW.sync_started_at := now();
        NEW.sync_completed_at := NULL;
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION flux_open_sync_stats_with_threads() IS
    'Trigger function: a stats row created without sync_started_at (by a run''s first recorded threads) starts now; '
    'a closed row without threads that a listing run records threads into opens again, starting now.';

CREATE OR REPLACE TRIGGER inbox_sync_stats_opens_with_threads BEFORE INSERT OR UPDATE ON inbox_sync_stats
    FOR EACH ROW EXECUTE FUNCTION flux_open_sync_stats_with_threads();

CREATE OR REPLACE FUNCTION start_backfill_slice(p_config_id uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations%ROWTYPE;
BEGIN
    v_config := flux_require_config(p_config_id);
    IF v_config.backfill_status IN ('thread_sync', 'completed') THEN
        RAISE EXCEPTION 'Configuration % is %: its listing is over, nothing to list',
            quote_literal(p_config_id), v_config.backfill_status
            USING ERRCODE = 'NB001';
    END IF;
    -- 'backfill': a continuation of the run (or its job delivered again) keeps the run's clocks.
    IF v_config.backfill_status IS DISTINCT FROM 'backfill' THEN
        UPDATE flux_inbox_configurations c
           SET backfill_status = 'backfill', backfill_started_at = now(), backfill_completed_at = NULL
         WHERE c.id = p_config_id;
        IF EXISTS (SELECT 1 FROM queued_threads t WHERE t.config_id = p_config_id) THEN
            PERFORM initialize_sync_stats(p_config_id, 0);
        ELSE
            -- No threads yet: the stats row opens with the run's first recorded threads (queued_threads' trigger
            -- creates it, or reopens one an earlier caller left without threads).
            UPDATE inbox_sync_stats s SET sync_completed_at = now()
             WHERE s.config_id = p_config_id AND s.sync_completed_at IS NULL AND s.threads_total = 0;
        END IF;
    END IF;
    RETURN (SELECT c.backfill_progress FROM flux_inbox_configurations c WHERE c.id = p_config_id);
END;
$$;
COMMENT ON FUNCTION start_backfill_slice(uuid) IS
    'Starts one slice of a backfill run and returns the checkpoint (backfill_progress). Refuses a finished run '
    '(SQLSTATE NB001). A run that is not listing yet (pending, failed) starts: status backfill, backfill_started_at '
    'and the stats'' sync_started_at now (when the configuration has threads already; otherwise its stats row '
    'starts with its first recorded threads); a continuation keeps them.';

-- Rows open without threads when this migration runs (a first listing in progress) close now, and open again with
-- their run's first threads.
UPDATE inbox_sync_stats s SET sync_completed_at = now() WHERE s.sync_completed_at IS NULL AND s.threads_total = 0;
