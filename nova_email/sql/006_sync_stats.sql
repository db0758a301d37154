-- inbox_sync_stats counters follow queued_threads through statement-level triggers. Each statement folds its
-- changes into one delta per config and applies it with "counter = counter + delta" under the stats row's lock,
-- so concurrent workers serialise on that row and never lose an update; a bulk insert of 1,000 threads costs one
-- stats update, not 1,000.

CREATE OR REPLACE FUNCTION flux_apply_sync_stats_delta() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Each event has its own transition tables, so each branch computes its own per-config delta.
    IF TG_OP = 'INSERT' THEN
        INSERT INTO inbox_sync_stats AS s (config_id, threads_total, threads_queued, threads_processing,
                                           threads_completed, threads_failed, messages_synced, last_thread_at)
        SELECT d.config_id, d.total, d.queued, d.processing, d.completed, d.failed, d.messages, d.last_thread_at
          FROM (
              SELECT n.config_id,
                     count(*)::int AS total,
                     count(*) FILTER (WHERE n.status = 'queued')::int AS queued,
                     count(*) FILTER (WHERE n.status = 'processing')::int AS processing,
                     count(*) FILTER (WHERE n.status = 'completed')::int AS completed,
                     count(*) FILTER (WHERE n.status = 'failed')::int AS failed,
                     coalesce(sum(n.messages_synced), 0)::int AS messages,
                     CASE WHEN bool_or(n.status IN ('completed', 'failed')) THEN now() END AS last_thread_at
                FROM new_rows n
               GROUP BY n.config_id
          ) AS d
          -- ORDER BY keeps lock acquisition in one order across concurrent multi-config statements (no deadlock).
         ORDER BY d.config_id
        ON CONFLICT (config_id) DO UPDATE
           SET threads_total = s.threads_total + excluded.threads_total,
               threads_queued = s.threads_queued + excluded.threads_queued,
               threads_processing = s.threads_processing + excluded.threads_processing,
               threads_completed = s.threads_completed + excluded.threads_completed,
               threads_failed = s.threads_failed + excluded.threads_failed,
               messages_synced = s.messages_synced + excluded.messages_synced,
               last_thread_at = coalesce(excluded.last_thread_at, s.last_thread_at);
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO inbox_sync_stats AS s (config_id, threads_total, threads_queued, threads_processing,
                                           threads_completed, threads_failed, messages_synced, last_thread_at)
        SELECT d.config_id, d.total, d.queued, d.processing, d.completed, d.failed, d.messages, d.last_thread_at
          FROM (
              SELECT x.config_id,
                     sum(x.sign)::int AS total,
                     coalesce(sum(x.sign) FILTER (WHERE x.status = 'queued'), 0)::int AS queued,
                     coalesce(sum(x.sign) FILTER (WHERE x.status = 'processing'), 0)::int AS processing,
                     coalesce(sum(x.sign) FILTER (WHERE x.status = 'completed'), 0)::int AS completed,
                     coalesce(sum(x.sign) FILTER (WHERE x.status = 'failed'), 0)::int AS failed,
                     coalesce(sum(x.sign * x.messages_synced), 0)::int AS messages,
                     CASE WHEN bool_or(x.sign = 1 AND x.status IN ('completed', 'failed')
                                       AND x.status IS DISTINCT FROM x.old_status) THEN now() END
                         AS last_thread_at
                FROM (
                    SELECT n.config_id, n.status, n.messages_synced, 1 AS sign, o.status AS old_status
                      FROM new_rows n LEFT JOIN old_rows o ON o.id = n.id
                    UNION ALL
                    SELECT o.config_id, o.status, o.messages_synced, -1 AS sign, NULL
                      FROM old_rows o
                ) AS x
               GROUP BY x.config_id
          ) AS d
         -- Updates that touch neither status, config nor message counts (timestamps, msg_id) change nothing here.
         WHERE d.total <> 0 OR d.queued <> 0 OR d.processing <> 0 OR d.completed <> 0 OR d.failed <> 0
            OR d.messages <> 0
         ORDER BY d.config_id
        ON CONFLICT (config_id) DO UPDATE
           SET threads_total = s.threads_total + excluded.threads_total,
               threads_queued = s.threads_queued + excluded.threads_queued,
               threads_processing = s.threads_processing + excluded.threads_processing,
               threads_completed = s.threads_completed + excluded.threads_completed,
               threads_failed = s.threads_failed + excluded.threads_failed,
               messages_synced = s.messages_synced + excluded.messages_synced,
               last_thread_at = coalesce(excluded.last_thread_at, s.last_thread_at);
    ELSE
        -- Deletes only adjust an existing stats row: when a config is deleted its stats row goes with it
        -- (cascade), and re-creating it here would violate the foreign key.
        UPDATE inbox_sync_stats s
           SET threads_total = s.threads_total - d.total,
               threads_queued = s.threads_queued - d.queued,
               threads_processing = s.threads_processing - d.processing,
               threads_completed = s.threads_completed - d.completed,
               threads_failed = s.threads_failed - d.failed,
               messages_synced = s.messages_synced - d.messages
          FROM (
              SELECT o.config_id,
                     count(*)::int AS total,
                     count(*) FILTER (WHERE o.status = 'queued')::int AS queued,
                     count(*) FILTER (WHERE o.status = 'processing')::int AS processing,
                     count(*) FILTER (WHERE o.status = 'completed')::int AS completed,
                     count(*) FILTER (WHERE o.status = 'failed')::int AS failed,
                     coalesce(sum(o.messages_synced), 0)::int AS messages
                FROM old_rows o
               GROUP BY o.config_id
          ) AS d
         WHERE s.config_id = d.config_id;
    END IF;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION flux_apply_sync_stats_delta() IS
    'Statement-level trigger on queued_threads: applies the per-config change in row counts by status and in '
    'messages_synced to inbox_sync_stats.';

CREATE TRIGGER queued_threads_sync_stats_insert
    AFTER INSERT ON queued_threads REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION flux_apply_sync_stats_delta();
CREATE TRIGGER queued_threads_sync_stats_update
    AFTER UPDATE ON queued_threads REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION flux_apply_sync_stats_delta();
CREATE TRIGGER queued_threads_sync_stats_delete
    AFTER DELETE ON queued_threads REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION flux_apply_sync_stats_delta();

CREATE OR REPLACE FUNCTION initialize_sync_stats(p_config_id uuid, p_threads_total integer DEFAULT 0) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_threads_total IS NULL OR p_threads_total < 0 THEN
        RAISE EXCEPTION 'threads_total must be >= 0, got %', quote_nullable(p_threads_total)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM flux_inbox_configurations c WHERE c.id = p_config_id) THEN
        RAISE EXCEPTION 'Configuration % does not exist; queue a backfill with queue_inbox_backfill first',
            quote_nullable(p_config_id)
            USING ERRCODE = 'no_data_found';
    END IF;

    -- Take the stats row lock first, in its own statement. Every trigger that applied a delta holds this lock
    -- until it commits, so the count below (a new snapshot under READ COMMITTED) sees exactly the rows whose
    -- deltas are already in the counters, and later deltas land on top of the recomputed values.
    INSERT INTO inbox_sync_stats (config_id) VALUES (p_config_id) ON CONFLICT (config_id) DO NOTHING;
    PERFORM 1 FROM inbox_sync_stats s WHERE s.config_id = p_config_id FOR UPDATE;

    UPDATE inbox_sync_stats s
       SET threads_total = d.total,
           threads_queued = d.queued,
           threads_processing = d.processing,
           threads_completed = d.completed,
           threads_failed = d.failed,
           messages_synced = d.messages,
           sync_started_at = now(),
           sync_completed_at = NULL
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
COMMENT ON FUNCTION initialize_sync_stats(uuid, integer) IS
    'Creates or resets a configuration''s stats row for a new run (sync_started_at now, sync_completed_at NULL) '
    'with counters recomputed from queued_threads, so the triggers stay in step. p_threads_total is accepted for '
    'the original''s signature; totals always come from queued_threads.';
