-- One Nylas call per thread, and backfills that repair the mirror.
--
-- The backfill's thread listing asks Nylas for every thread field the mirror stores and keeps each thread's copy on
-- its queued_threads row (listed_thread, with listed_at, when the page was read), so a thread job fetches only the
-- messages and uses the listed copy when the messages show it is still current (see nova_email/thread_sync.py).
--
-- Whether a thread needs a sync at all is decided by comparing the listed copy with the stored one, whatever an
-- earlier run recorded: a thread whose stored copy is missing, partial or older than Nylas's is queued again even
-- when its queued_threads row says completed; a current one is left alone.
--
-- A listing runs in slices (continue_backfill_listing) and each page must follow the checkpoint
-- (record_backfill_page refuses any other), so a listing of any length completes and two runs of one configuration
-- can never both record pages.

ALTER TABLE queued_threads ADD COLUMN IF NOT EXISTS listed_thread jsonb;
ALTER TABLE queued_threads ADD COLUMN IF NOT EXISTS listed_at timestamptz;
COMMENT ON COLUMN queued_threads.listed_thread IS
    'The thread as the backfill listing returned it (Nylas JSON of the stored fields), until its job completes; the '
    'thread job writes it instead of fetching the thread when the messages show it is current.';
COMMENT ON COLUMN queued_threads.listed_at IS 'When the listing page holding listed_thread was read (its version).';

-- PL/pgSQL rather than SQL: it runs once per listed thread, and PL/pgSQL keeps the plan between calls.
CREATE OR REPLACE FUNCTION flux_stored_thread_is_current(p_inbox_id uuid, p_thread jsonb) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (
        SELECT 1 FROM flux_email_threads t
         WHERE t.inbox_id = p_inbox_id AND t.nylas_thread_id = p_thread ->> 'id'
           -- Nothing received at Nylas after our copy.
           AND nylas_unix_to_timestamptz(p_thread -> 'latest_message_received_date') IS NOT NULL
           AND t.latest_message_received_date >= nylas_unix_to_timestamptz(p_thread -> 'latest_message_received_date')
           -- Whole: the thread row lists messages, and every one of them is stored.
           AND jsonb_array_length(t.message_ids) > 0
           AND NOT EXISTS (
               SELECT 1 FROM jsonb_array_elements_text(t.message_ids) AS held(message_id)
                WHERE NOT EXISTS (SELECT 1 FROM flux_email_messages m
                                   WHERE m.inbox_id = t.inbox_id AND m.nylas_message_id = held.message_id))
           -- Every field the listing carries agrees: the messages Nylas lists (all of them stored), the flags and the
           -- folders. A listing that carries only ids and dates is judged on those alone.
           AND (NOT p_thread ? 'message_ids' OR (
                   t.message_ids @> nylas_json_array(p_thread -> 'message_ids')
                   AND NOT EXISTS (
                       SELECT 1 FROM jsonb_array_elements_text(nylas_json_array(p_thread -> 'message_ids')) AS l(id)
                        WHERE NOT EXISTS (SELECT 1 FROM flux_email_messages m
                                           WHERE m.inbox_id = t.inbox_id AND m.nylas_message_id = l.id))))
           AND (NOT p_thread ? 'unread' OR t.unread = (p_thread ->> 'unread')::boolean)
           AND (NOT p_thread ? 'starred' OR t.starred = (p_thread ->> 'starred')::boolean)
           AND (NOT p_thread ? 'folders' OR (t.folders @> nylas_json_array(p_thread -> 'folders')
                                             AND nylas_json_array(p_thread -> 'folders') @> t.folders))
    );
END;
$$;
COMMENT ON FUNCTION flux_stored_thread_is_current(uuid, jsonb) IS
    'True when the mirror holds the listed thread whole (every message stored) and no older than the listing: '
    'latest_message_received_date not before Nylas''s, and message_ids, unread, starred and folders as listed.';

CREATE OR REPLACE FUNCTION record_backfill_page(
    p_config_id       uuid,
    p_threads         jsonb,
    p_next_page_token text,
    p_page            integer,
    p_listed_at       timestamptz
)
RETURNS TABLE (queued integer, skipped integer, threads_queued integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_config   flux_inbox_configurations%ROWTYPE;
    v_grant_id text;
    v_expected integer;
    v_queued   integer := 0;
    v_skipped  integer := 0;
    v_total    integer;
BEGIN
    v_config := flux_require_config(p_config_id);
    IF jsonb_typeof(p_threads) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'record_backfill_page needs a JSON array of threads, got %', jsonb_typeof(p_threads)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Pages are recorded in order, each right after the checkpoint: any other page comes from a second run of the
    -- same configuration (a duplicated or redelivered job), which must stop rather than record pages twice.
    v_expected := coalesce((v_config.backfill_progress ->> 'current_page')::integer, 0) + 1;
    IF p_page IS DISTINCT FROM v_expected THEN
        RAISE EXCEPTION 'Configuration % expects page %, not %: another run of this backfill is listing it',
            quote_literal(p_config_id), v_expected, quote_nullable(p_page)
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT i.nylas_grant_id INTO v_grant_id FROM flux_inboxes i WHERE i.id = v_config.inbox_id;
    -- One statement for the page, so the stats triggers fire once per page rather than once per thread.
    WITH listed AS (
        SELECT DISTINCT ON (l.thread ->> 'id') l.thread ->> 'id' AS thread_id, l.thread
          FROM jsonb_array_elements(p_threads) AS l(thread)
         WHERE jsonb_typeof(l.thread) = 'object' AND coalesce(l.thread ->> 'id', '') <> ''
         ORDER BY l.thread ->> 'id'
    ), needing AS (
        -- Webhooks keep a current thread current: no sync, whatever an earlier run recorded for it.
        SELECT l.thread_id, l.thread FROM listed l
         WHERE NOT flux_stored_thread_is_current(v_config.inbox_id, l.thread)
    ), earlier AS (
        -- The rows as they were before this statement (every part of it reads the same snapshot).
        SELECT q.nylas_thread_id, q.status FROM queued_threads q
          JOIN needing n ON q.config_id = p_config_id AND q.nylas_thread_id = n.thread_id
    ), written AS (
        -- A thread that needs a sync waits to be sent whatever an earlier run recorded: a completed or failed row
        -- starts over. A queued or running one keeps its job and only gets the newer listed copy.
        INSERT INTO queued_threads AS t (config_id, inbox_id, nylas_thread_id, grant_id, status, listed_thread,
                                         listed_at)
        SELECT p_config_id, v_config.inbox_id, n.thread_id, nullif(v_grant_id, ''), 'queued', n.thread, p_listed_at
          FROM needing n
         ORDER BY n.thread_id
        ON CONFLICT (config_id, nylas_thread_id) DO UPDATE SET
            listed_thread = CASE WHEN t.listed_at IS NULL OR excluded.listed_at >= t.listed_at
                                 THEN excluded.listed_thread ELSE t.listed_thread END,
            listed_at = greatest(t.listed_at, excluded.listed_at),
            grant_id = coalesce(t.grant_id, excluded.grant_id),
            status = CASE WHEN t.status IN ('completed', 'failed') THEN 'queued' ELSE t.status END,
            queued_at = CASE WHEN t.status IN ('completed', 'failed') THEN now() ELSE t.queued_at END,
            started_at = CASE WHEN t.status IN ('completed', 'failed') THEN NULL ELSE t.started_at END,
            processed_at = CASE WHEN t.status IN ('completed', 'failed') THEN NULL ELSE t.processed_at END,
            error_message = CASE WHEN t.status IN ('completed', 'failed') THEN NULL ELSE t.error_message END,
            note = CASE WHEN t.status IN ('completed', 'failed') THEN NULL ELSE t.note END,
            messages_synced = CASE WHEN t.status IN ('completed', 'failed') THEN 0 ELSE t.messages_synced END,
            pgmq_queued_at = CASE WHEN t.status IN ('completed', 'failed') THEN NULL ELSE t.pgmq_queued_at END,
            msg_id = CASE WHEN t.status IN ('completed', 'failed') THEN NULL ELSE t.msg_id END
        RETURNING t.nylas_thread_id
    )
    SELECT count(*) FILTER (WHERE e.status IS NULL OR e.status IN ('completed', 'failed'))
      INTO v_queued
      FROM written w LEFT JOIN earlier e ON e.nylas_thread_id = w.nylas_thread_id;
    v_skipped := jsonb_array_length(p_threads) - v_queued;
    v_total := coalesce((v_config.backfill_progress ->> 'threads_queued')::integer, 0) + v_queued;
    PERFORM update_backfill_orchestration_progress(p_config_id, v_total, p_page, p_next_page_token);
    UPDATE flux_inbox_configurations c
       SET backfill_progress = c.backfill_progress || jsonb_build_object('listing_complete', p_next_page_token IS NULL)
     WHERE c.id = p_config_id;
    RETURN QUERY SELECT v_queued, v_skipped, v_total;
END;
$$;
COMMENT ON FUNCTION record_backfill_page(uuid, jsonb, text, integer, timestamptz) IS
    'Records one listed page of Nylas thread objects, read at p_listed_at: threads whose stored copy is missing, '
    'partial or older than the listing are queued with their listed copy (completed rows of earlier runs too), '
    'current ones are skipped; saves the checkpoint in the same transaction. Refuses a page that does not follow the '
    'checkpoint (another run is listing). Returns (queued, skipped, threads_queued so far).';

-- The form without a read time (callers of 041's version): the page was read just now.
CREATE OR REPLACE FUNCTION record_backfill_page(
    p_config_id       uuid,
    p_threads         jsonb,
    p_next_page_token text,
    p_page            integer
)
RETURNS TABLE (queued integer, skipped integer, threads_queued integer)
LANGUAGE sql AS $$
    SELECT * FROM record_backfill_page(p_config_id, p_threads, p_next_page_token, p_page, now())
$$;
COMMENT ON FUNCTION record_backfill_page(uuid, jsonb, text, integer) IS
    'record_backfill_page(config, threads, next_page_token, page, now()).';

CREATE OR REPLACE FUNCTION continue_backfill_listing(p_config_id uuid) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations%ROWTYPE;
    v_msg_id bigint;
BEGIN
    v_config := flux_require_config(p_config_id);
    IF v_config.backfill_status <> 'backfill' THEN
        RAISE EXCEPTION 'Configuration % is %, not listing; nothing to continue',
            quote_literal(p_config_id), v_config.backfill_status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    v_msg_id := flux_pgmq_send(
        'inbox_backfill_jobs',
        jsonb_build_object(
            'inbox_id', v_config.inbox_id,
            'config_id', v_config.id,
            'grant_id', (SELECT i.nylas_grant_id FROM flux_inboxes i WHERE i.id = v_config.inbox_id),
            'start_date', v_config.backfill_start_date,
            'end_date', v_config.backfill_end_date
        )
    );
    UPDATE flux_inbox_configurations c SET backfill_msg_id = v_msg_id WHERE c.id = p_config_id;
    RETURN v_msg_id;
END;
$$;
COMMENT ON FUNCTION continue_backfill_listing(uuid) IS
    'Ends a slice of a long listing: sends the job that lists on from the checkpoint (same inbox, grant and window) '
    'and records it as the configuration''s backfill_msg_id; returns its msg_id.';

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nova_worker') THEN
        GRANT SELECT, INSERT, UPDATE ON queued_threads TO nova_worker;
        GRANT EXECUTE ON FUNCTION
            flux_stored_thread_is_current(uuid, jsonb),
            record_backfill_page(uuid, jsonb, text, integer, timestamptz),
            continue_backfill_listing(uuid)
        TO nova_worker;
    END IF;
END;
$$;
