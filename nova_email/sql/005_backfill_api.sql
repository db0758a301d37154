-- Backfill orchestration: queue a backfill, record discovered threads, checkpoint pages, open the thread-sync
-- gate, send thread jobs, record failure and completion. backfill_progress is only ever merged into, so error
-- history survives checkpoints (the original overwrote it).

CREATE OR REPLACE FUNCTION queue_inbox_backfill(
    p_inbox_id   uuid,
    p_config_id  uuid DEFAULT NULL,
    p_start_date timestamptz DEFAULT NULL,
    p_end_date   timestamptz DEFAULT NULL
)
RETURNS TABLE (config_id uuid, msg_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_grant_id  text;
    v_config    flux_inbox_configurations%ROWTYPE;
    v_start     timestamptz;
    v_end       timestamptz;
    v_progress  jsonb;
    v_msg_id    bigint;
BEGIN
    SELECT i.nylas_grant_id INTO v_grant_id FROM flux_inboxes i WHERE i.id = p_inbox_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Inbox % does not exist; create the flux_inboxes row before queueing a backfill',
            quote_nullable(p_inbox_id)
            USING ERRCODE = 'no_data_found';
    END IF;

    v_end := coalesce(p_end_date, now());
    v_start := coalesce(p_start_date, v_end - interval '365 days');
    IF v_start > v_end THEN
        RAISE EXCEPTION 'Backfill window starts after it ends (start %, end %); swap or fix the dates', v_start, v_end
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Nylas thread listing over more than a year is slow and rarely wanted: keep the most recent 365 days.
    v_start := greatest(v_start, v_end - interval '365 days');

    IF p_config_id IS NULL THEN
        INSERT INTO flux_inbox_configurations AS c (inbox_id) VALUES (p_inbox_id)
        ON CONFLICT (inbox_id) DO NOTHING;
        SELECT * INTO v_config FROM flux_inbox_configurations c WHERE c.inbox_id = p_inbox_id FOR UPDATE;
    ELSE
        SELECT * INTO v_config FROM flux_inbox_configurations c WHERE c.id = p_config_id FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'Configuration % does not exist; pass NULL to use (or create) the inbox''s configuration',
                quote_literal(p_config_id)
                USING ERRCODE = 'no_data_found';
        END IF;
        IF v_config.inbox_id <> p_inbox_id THEN
            RAISE EXCEPTION 'Configuration % belongs to inbox %, not %; pass the matching inbox id',
                quote_literal(p_config_id), quote_literal(v_config.inbox_id), quote_literal(p_inbox_id)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;

    -- A pending config only counts as active while its job is still on the queue, so a lost job does not
    -- block the inbox forever.
    IF v_config.backfill_status IN ('backfill', 'thread_sync', 'in_progress')
       OR (v_config.backfill_status = 'pending' AND v_config.backfill_msg_id IS NOT NULL
           AND EXISTS (SELECT 1 FROM pgmq.q_inbox_backfill_jobs q WHERE q.msg_id = v_config.backfill_msg_id)) THEN
        RAISE EXCEPTION 'A backfill of configuration % is already active (status %); wait for it to finish or fail',
            quote_literal(v_config.id), v_config.backfill_status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;

    v_progress := v_config.backfill_progress;
    -- A page token only makes sense for the window it was issued for.
    IF v_config.backfill_start_date IS DISTINCT FROM v_start OR v_config.backfill_end_date IS DISTINCT FROM v_end THEN
        v_progress := v_progress - ARRAY['last_page_token', 'current_page', 'threads_queued', 'last_checkpoint_at'];
    END IF;
    v_progress := v_progress || jsonb_build_object('requested_at', now());

    v_msg_id := flux_pgmq_send(
        'inbox_backfill_jobs',
        jsonb_build_object(
            'inbox_id', p_inbox_id,
            'config_id', v_config.id,
            'grant_id', v_grant_id,
            'start_date', v_start,
            'end_date', v_end
        )
    );

    UPDATE flux_inbox_configurations c
       SET backfill_status = 'pending',
           backfill_requested_at = now(),
           backfill_started_at = NULL,
           backfill_completed_at = NULL,
           backfill_start_date = v_start,
           backfill_end_date = v_end,
           backfill_msg_id = v_msg_id,
           backfill_progress = v_progress
     WHERE c.id = v_config.id;

    RETURN QUERY SELECT v_config.id, v_msg_id;
END;
$$;
COMMENT ON FUNCTION queue_inbox_backfill(uuid, uuid, timestamptz, timestamptz) IS
    'Queues a backfill job for an inbox (creating its configuration if needed) over a window of at most 365 days '
    'ending at p_end_date (default now). Refuses while a backfill of that configuration is active.';

CREATE OR REPLACE FUNCTION flux_require_config(p_config_id uuid) RETURNS flux_inbox_configurations
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations%ROWTYPE;
BEGIN
    SELECT * INTO v_config FROM flux_inbox_configurations c WHERE c.id = p_config_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Configuration % does not exist; queue a backfill with queue_inbox_backfill first',
            quote_nullable(p_config_id)
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v_config;
END;
$$;
COMMENT ON FUNCTION flux_require_config(uuid) IS
    'Locks and returns a configuration row, or raises no_data_found. Internal helper of the backfill functions.';

CREATE OR REPLACE FUNCTION start_backfill_run(p_config_id uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM flux_require_config(p_config_id);
    UPDATE flux_inbox_configurations c
       SET backfill_status = 'backfill', backfill_started_at = now(), backfill_completed_at = NULL
     WHERE c.id = p_config_id;
    RETURN (SELECT c.backfill_progress FROM flux_inbox_configurations c WHERE c.id = p_config_id);
END;
$$;
COMMENT ON FUNCTION start_backfill_run(uuid) IS
    'Marks a configuration as orchestrating (status backfill, backfill_started_at now) and returns '
    'backfill_progress, the checkpoint to resume from.';

CREATE OR REPLACE FUNCTION insert_queued_thread_idempotent(
    p_config_id uuid,
    p_inbox_id  uuid,
    p_thread_id text,
    p_grant_id  text
)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    IF p_thread_id IS NULL OR btrim(p_thread_id) = '' THEN
        RAISE EXCEPTION 'thread id is empty; pass the Nylas thread id'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO queued_threads AS t (config_id, inbox_id, nylas_thread_id, grant_id, status)
    VALUES (p_config_id, p_inbox_id, p_thread_id, nullif(p_grant_id, ''), 'queued')
    ON CONFLICT (config_id, nylas_thread_id) DO NOTHING
    RETURNING t.id INTO v_id;
    IF v_id IS NOT NULL THEN
        RETURN true;
    END IF;

    -- Unlike the original, a completed (or in-flight) thread is never flipped back to queued: only a failed one
    -- gets another chance when a later run rediscovers it.
    UPDATE queued_threads t
       SET status = 'queued',
           queued_at = now(),
           started_at = NULL,
           processed_at = NULL,
           error_message = NULL,
           pgmq_queued_at = NULL,
           msg_id = NULL,
           grant_id = coalesce(nullif(p_grant_id, ''), t.grant_id)
     WHERE t.config_id = p_config_id AND t.nylas_thread_id = p_thread_id AND t.status = 'failed'
    RETURNING t.id INTO v_id;
    IF v_id IS NOT NULL THEN
        RETURN true;
    END IF;

    UPDATE queued_threads t
       SET grant_id = p_grant_id
     WHERE t.config_id = p_config_id AND t.nylas_thread_id = p_thread_id
       AND t.grant_id IS NULL AND nullif(p_grant_id, '') IS NOT NULL;
    RETURN false;
END;
$$;
COMMENT ON FUNCTION insert_queued_thread_idempotent(uuid, uuid, text, text) IS
    'Records a discovered thread for a backfill. True when it now waits to be sent (new, or failed and re-queued); '
    'false when it is already queued, processing or completed (never reset). Safe under concurrency.';

CREATE OR REPLACE FUNCTION update_backfill_orchestration_progress(
    p_config_id       uuid,
    p_threads_queued  integer,
    p_current_page    integer,
    p_last_page_token text DEFAULT NULL
)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM flux_require_config(p_config_id);
    UPDATE flux_inbox_configurations c
       SET backfill_progress = c.backfill_progress
           || jsonb_build_object(
                  'threads_queued', p_threads_queued,
                  'current_page', p_current_page,
                  'last_checkpoint_at', now())
           || CASE WHEN p_last_page_token IS NULL THEN '{}'::jsonb
                   ELSE jsonb_build_object('last_page_token', p_last_page_token) END
     WHERE c.id = p_config_id;
END;
$$;
COMMENT ON FUNCTION update_backfill_orchestration_progress(uuid, integer, integer, text) IS
    'Saves the backfill checkpoint after a page by merging threads_queued, current_page, last_checkpoint_at '
    '(and last_page_token when given) into backfill_progress; other keys such as error history are kept.';

CREATE OR REPLACE FUNCTION transition_to_thread_sync(p_config_id uuid, p_threads_queued integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations%ROWTYPE;
BEGIN
    v_config := flux_require_config(p_config_id);
    IF v_config.backfill_status = 'failed' THEN
        RAISE EXCEPTION 'Configuration % has failed; queue a new backfill instead of opening thread sync',
            quote_literal(p_config_id)
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE flux_inbox_configurations c
       SET backfill_status = 'thread_sync',
           backfill_completed_at = NULL,
           backfill_progress = c.backfill_progress
               || jsonb_build_object('threads_queued', p_threads_queued, 'transitioned_at', now())
     WHERE c.id = p_config_id;
    UPDATE inbox_sync_stats s SET sync_completed_at = NULL WHERE s.config_id = p_config_id;
END;
$$;
COMMENT ON FUNCTION transition_to_thread_sync(uuid, integer) IS
    'Opens the gate from orchestration to thread sync: status thread_sync, threads_queued recorded in '
    'backfill_progress. Refuses a failed configuration.';

CREATE OR REPLACE FUNCTION queue_thread_sync(
    p_thread_id text,
    p_grant_id  text,
    p_inbox_id  uuid,
    p_config_id uuid
)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_grant_id text;
    v_msg_id   bigint;
BEGIN
    IF p_thread_id IS NULL OR btrim(p_thread_id) = '' THEN
        RAISE EXCEPTION 'thread id is empty; pass the Nylas thread id'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_grant_id := coalesce(
        nullif(p_grant_id, ''),
        (SELECT t.grant_id FROM queued_threads t WHERE t.config_id = p_config_id AND t.nylas_thread_id = p_thread_id),
        (SELECT i.nylas_grant_id FROM flux_inboxes i WHERE i.id = p_inbox_id)
    );
    v_msg_id := flux_pgmq_send(
        'thread_sync_jobs',
        jsonb_build_object('thread_id', p_thread_id, 'grant_id', v_grant_id, 'inbox_id', p_inbox_id,
                           'config_id', p_config_id)
    );
    UPDATE queued_threads t
       SET pgmq_queued_at = now(), msg_id = v_msg_id, grant_id = coalesce(t.grant_id, v_grant_id)
     WHERE t.config_id = p_config_id AND t.nylas_thread_id = p_thread_id;
    RETURN v_msg_id;
END;
$$;
COMMENT ON FUNCTION queue_thread_sync(text, text, uuid, uuid) IS
    'Sends a thread job {thread_id, grant_id, inbox_id, config_id} to thread_sync_jobs and stamps the matching '
    'queued_threads row with pgmq_queued_at and msg_id.';

CREATE OR REPLACE FUNCTION queue_unsent_thread_syncs(p_config_id uuid DEFAULT NULL, p_limit integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_row   record;
    v_count integer := 0;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'limit must be >= 1, got %', quote_nullable(p_limit)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- SKIP LOCKED lets several recoverers run at once without sending the same thread twice.
    FOR v_row IN
        SELECT t.nylas_thread_id, t.grant_id, t.inbox_id, t.config_id
          FROM queued_threads t
         WHERE t.status = 'queued' AND t.pgmq_queued_at IS NULL
           AND (p_config_id IS NULL OR t.config_id = p_config_id)
         ORDER BY t.queued_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM queue_thread_sync(v_row.nylas_thread_id, v_row.grant_id, v_row.inbox_id, v_row.config_id);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END;
$$;
COMMENT ON FUNCTION queue_unsent_thread_syncs(uuid, integer) IS
    'Sends a thread job for up to p_limit queued threads never put on the queue (of one config, or all when NULL) '
    'and returns how many. The bulk send after transition_to_thread_sync and the crash recovery at start-up.';

CREATE OR REPLACE FUNCTION clear_backfill_checkpoint(p_config_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM flux_require_config(p_config_id);
    UPDATE flux_inbox_configurations c
       SET backfill_progress = (c.backfill_progress
               - ARRAY['last_page_token', 'current_page', 'threads_queued', 'last_checkpoint_at'])
           || jsonb_build_object('last_run', jsonb_build_object(
                  'threads_queued', c.backfill_progress -> 'threads_queued',
                  'current_page', c.backfill_progress -> 'current_page',
                  'cleared_at', now()))
     WHERE c.id = p_config_id;
END;
$$;
COMMENT ON FUNCTION clear_backfill_checkpoint(uuid) IS
    'Drops the resume checkpoint once a run has queued its threads, keeping a last_run summary and error history.';

CREATE OR REPLACE FUNCTION record_backfill_failure(p_config_id uuid, p_error text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_entry jsonb := jsonb_build_object('error', coalesce(p_error, 'unknown error'), 'failed_at', now());
BEGIN
    PERFORM flux_require_config(p_config_id);
    -- Keep the 20 most recent failures: enough to see a pattern, bounded so a flapping inbox cannot grow the row.
    UPDATE flux_inbox_configurations c
       SET backfill_status = 'failed',
           backfill_progress = c.backfill_progress || v_entry || jsonb_build_object('errors', (
               SELECT coalesce(jsonb_agg(e.value ORDER BY e.ord), '[]'::jsonb)
                 FROM (
                     SELECT x.value, x.ord
                       FROM jsonb_array_elements(
                                CASE WHEN jsonb_typeof(c.backfill_progress -> 'errors') = 'array'
                                     THEN c.backfill_progress -> 'errors' ELSE '[]'::jsonb END
                                || jsonb_build_array(v_entry)) WITH ORDINALITY AS x(value, ord)
                      ORDER BY x.ord DESC
                      LIMIT 20
                 ) AS e))
     WHERE c.id = p_config_id;
END;
$$;
COMMENT ON FUNCTION record_backfill_failure(uuid, text) IS
    'Marks a backfill failed and merges {error, failed_at} into backfill_progress, appending to errors (last 20); '
    'the checkpoint is kept so a retry resumes.';

CREATE OR REPLACE FUNCTION complete_backfill_if_done(p_config_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations%ROWTYPE;
BEGIN
    v_config := flux_require_config(p_config_id);
    -- Still listing pages ('backfill') means more threads may come: never complete then.
    IF v_config.backfill_status NOT IN ('thread_sync', 'in_progress') THEN
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM queued_threads t WHERE t.config_id = p_config_id)
       OR EXISTS (SELECT 1 FROM queued_threads t
                   WHERE t.config_id = p_config_id AND t.status IN ('queued', 'processing')) THEN
        RETURN false;
    END IF;
    UPDATE flux_inbox_configurations c
       SET backfill_status = 'completed', backfill_completed_at = now()
     WHERE c.id = p_config_id;
    UPDATE inbox_sync_stats s SET sync_completed_at = now() WHERE s.config_id = p_config_id;
    RETURN true;
END;
$$;
COMMENT ON FUNCTION complete_backfill_if_done(uuid) IS
    'Marks a thread_sync configuration completed when it tracks at least one thread and none is queued or '
    'processing; true when it did. For the completion monitor.';
