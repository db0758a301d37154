-- Backfill steps that must each be one transaction: recording a page of discovered threads together
-- with its checkpoint, and handing over to thread sync together with the fan-out of thread jobs.

CREATE OR REPLACE FUNCTION record_backfill_page(
    p_config_id       uuid,
    p_threads         jsonb,
    p_next_page_token text,
    p_page            integer
)
RETURNS TABLE (queued integer, skipped integer, threads_queued integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_config   flux_inbox_configurations%ROWTYPE;
    v_grant_id text;
    v_thread   jsonb;
    v_listed   timestamptz;
    v_queued   integer := 0;
    v_skipped  integer := 0;
    v_total    integer;
BEGIN
    v_config := flux_require_config(p_config_id);
    IF jsonb_typeof(p_threads) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'record_backfill_page needs a JSON array of threads, got %', jsonb_typeof(p_threads)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT i.nylas_grant_id INTO v_grant_id FROM flux_inboxes i WHERE i.id = v_config.inbox_id;
    FOR v_thread IN SELECT * FROM jsonb_array_elements(p_threads) LOOP
        IF coalesce(v_thread ->> 'id', '') = '' THEN
            v_skipped := v_skipped + 1;
            CONTINUE;
        END IF;
        v_listed := nylas_unix_to_timestamptz(v_thread -> 'latest_message_received_date');
        -- A thread we already hold in full (every message it lists is stored) with nothing newer at Nylas needs no
        -- sync: webhooks keep it current. A row written from thread metadata alone (thread.replied) is not enough.
        IF EXISTS (
            SELECT 1 FROM flux_email_threads t
             WHERE t.inbox_id = v_config.inbox_id AND t.nylas_thread_id = v_thread ->> 'id'
               AND v_listed IS NOT NULL AND t.latest_message_received_date >= v_listed
               AND jsonb_array_length(t.message_ids) > 0
               AND NOT EXISTS (
                   SELECT 1 FROM jsonb_array_elements_text(t.message_ids) AS listed(message_id)
                    WHERE NOT EXISTS (SELECT 1 FROM flux_email_messages m
                                       WHERE m.inbox_id = t.inbox_id AND m.nylas_message_id = listed.message_id))
        ) THEN
            v_skipped := v_skipped + 1;
        ELSIF insert_queued_thread_idempotent(p_config_id, v_config.inbox_id, v_thread ->> 'id', v_grant_id) THEN
            v_queued := v_queued + 1;
        ELSE
            v_skipped := v_skipped + 1;
        END IF;
    END LOOP;
    v_total := coalesce((v_config.backfill_progress ->> 'threads_queued')::integer, 0) + v_queued;
    PERFORM update_backfill_orchestration_progress(p_config_id, v_total, p_page, p_next_page_token);
    UPDATE flux_inbox_configurations c
       SET backfill_progress = c.backfill_progress || jsonb_build_object('listing_complete', p_next_page_token IS NULL)
     WHERE c.id = p_config_id;
    RETURN QUERY SELECT v_queued, v_skipped, v_total;
END;
$$;
COMMENT ON FUNCTION record_backfill_page(uuid, jsonb, text, integer) IS
    'Records one listed page of threads ([{id, latest_message_received_date}]) in queued_threads, skipping threads '
    'already stored and current, and saves the checkpoint (next page token, page, listing_complete) in the same '
    'transaction; returns (queued, skipped, threads_queued so far).';

CREATE OR REPLACE FUNCTION finish_backfill_listing(p_config_id uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_pending integer;
    v_sent    integer := 0;
    v_batch   integer;
BEGIN
    PERFORM flux_require_config(p_config_id);
    SELECT count(*) INTO v_pending FROM queued_threads t
     WHERE t.config_id = p_config_id AND t.status IN ('queued', 'processing');
    IF v_pending = 0 AND NOT EXISTS (SELECT 1 FROM queued_threads t WHERE t.config_id = p_config_id) THEN
        -- Nothing to sync at all: the run is complete as soon as the listing is.
        UPDATE flux_inbox_configurations c
           SET backfill_status = 'completed', backfill_completed_at = now()
         WHERE c.id = p_config_id;
        UPDATE inbox_sync_stats s SET sync_completed_at = now() WHERE s.config_id = p_config_id;
    ELSE
        PERFORM transition_to_thread_sync(p_config_id,
            (SELECT count(*)::integer FROM queued_threads t WHERE t.config_id = p_config_id));
        LOOP
            v_batch := queue_unsent_thread_syncs(p_config_id, 1000);
            v_sent := v_sent + v_batch;
            EXIT WHEN v_batch = 0;
        END LOOP;
    END IF;
    PERFORM clear_backfill_checkpoint(p_config_id);
    UPDATE flux_inbox_configurations c
       SET backfill_progress = c.backfill_progress - 'listing_complete'
     WHERE c.id = p_config_id;
    RETURN v_sent;
END;
$$;
COMMENT ON FUNCTION finish_backfill_listing(uuid) IS
    'Ends the listing phase atomically: transition_to_thread_sync, one thread job per unsent queued thread, and the '
    'checkpoint cleared (or the config completed when no thread was found); returns the number of jobs sent.';
