-- The backfill window (how far back a backfill lists threads) has one definition in the database,
-- backfill_window(), which queue_inbox_backfill reads. The Nylas client caps listings with the same span
-- (nova_email.nylas.client.ONE_YEAR); tests/sql/test_backfill_api.py fails when the two differ.

CREATE OR REPLACE FUNCTION backfill_window() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT interval '365 days' $$;
COMMENT ON FUNCTION backfill_window() IS
    'How far back from its end a backfill lists threads: windows given longer are cut to their most recent part.';

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
    v_start := coalesce(p_start_date, v_end - backfill_window());
    IF v_start > v_end THEN
        RAISE EXCEPTION 'Backfill window starts after it ends (start %, end %); swap or fix the dates', v_start, v_end
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Nylas thread listing over more than a year is slow and rarely wanted: keep the most recent backfill_window().
    v_start := greatest(v_start, v_end - backfill_window());

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
    'Queues a backfill job for an inbox (creating its configuration if needed) over a window of at most backfill_window() '
    'ending at p_end_date (default now). Refuses while a backfill of that configuration is active.';
