-- A backfill run's slices belong to one run, and the database alone decides which run is current.
--
-- SQLSTATEs of the backfill (class NB, the service's own, so callers match the code and never the message text):
--   NB001  the run already handed over to thread sync (or completed): a stale job of it must do nothing;
--   NB002  another run of this backfill records the pages (a duplicated or redelivered job): this one must stop.
--
-- start_backfill_slice replaces the status check and start_backfill_run + initialize_sync_stats of each slice: under
-- the configuration's row lock it refuses a finished run and starts the run's clocks only when the run starts, so a
-- continuation keeps backfill_started_at and sync_started_at. continue_backfill_listing takes the page the slice
-- ended on and refuses unless it is still the checkpoint, so a superseded run cannot queue a second listing job;
-- record_listed_page is record_backfill_page refusing an out-of-order page with NB002.
-- flux_stored_thread_is_current compares a thread's message ids as sets (a message gone at Nylas makes the stored
-- thread row stale too) and has_drafts (a draft saved or discarded, whatever the provider does with folders).
--
-- Grants to nova_worker: 094_worker_role_backfill.sql (it runs after 091, which revokes everything first).

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
        PERFORM initialize_sync_stats(p_config_id, 0);
    END IF;
    RETURN (SELECT c.backfill_progress FROM flux_inbox_configurations c WHERE c.id = p_config_id);
END;
$$;
COMMENT ON FUNCTION start_backfill_slice(uuid) IS
    'Starts one slice of a backfill run and returns the checkpoint (backfill_progress). Refuses a finished run '
    '(SQLSTATE NB001). A run that is not listing yet (pending, failed) starts: status backfill, backfill_started_at '
    'and the stats'' sync_started_at now; a continuation keeps them.';

CREATE OR REPLACE FUNCTION continue_backfill_listing(p_config_id uuid, p_page integer) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM flux_require_checkpoint(p_config_id, p_page);
    RETURN continue_backfill_listing(p_config_id);
END;
$$;
COMMENT ON FUNCTION continue_backfill_listing(uuid, integer) IS
    'Ends a slice of a long listing that stopped after page p_page: sends the job that lists on from the checkpoint '
    '(same inbox, grant and window), records it as backfill_msg_id and returns its msg_id. Refuses (SQLSTATE NB002) '
    'unless the run is listing and p_page is still its checkpoint.';

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
           -- Every field the listing carries agrees: the thread's messages are exactly the ones Nylas lists (one
           -- deleted there makes the stored row stale), and the flags and folders. A listing that carries only ids
           -- and dates is judged on those alone.
           AND (NOT p_thread ? 'message_ids' OR (t.message_ids @> nylas_json_array(p_thread -> 'message_ids')
                                                 AND nylas_json_array(p_thread -> 'message_ids') @> t.message_ids))
           AND (NOT p_thread ? 'unread' OR t.unread = (p_thread ->> 'unread')::boolean)
           AND (NOT p_thread ? 'starred' OR t.starred = (p_thread ->> 'starred')::boolean)
           AND (NOT p_thread ? 'has_drafts' OR t.has_drafts = (p_thread ->> 'has_drafts')::boolean)
           AND (NOT p_thread ? 'folders' OR (t.folders @> nylas_json_array(p_thread -> 'folders')
                                             AND nylas_json_array(p_thread -> 'folders') @> t.folders))
    );
END;
$$;
COMMENT ON FUNCTION flux_stored_thread_is_current(uuid, jsonb) IS
    'True when the mirror holds the listed thread whole (every message stored) and no older than the listing: '
    'latest_message_received_date not before Nylas''s, message_ids the same set as listed, unread, starred, '
    'has_drafts and folders as listed.';

CREATE OR REPLACE FUNCTION flux_require_checkpoint(p_config_id uuid, p_page integer)
RETURNS flux_inbox_configurations
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations%ROWTYPE;
BEGIN
    v_config := flux_require_config(p_config_id);
    IF v_config.backfill_status IS DISTINCT FROM 'backfill'
       OR coalesce((v_config.backfill_progress ->> 'current_page')::integer, 0) IS DISTINCT FROM p_page THEN
        RAISE EXCEPTION 'Configuration % is % at page %, not at page %: another run of this backfill is listing it',
            quote_literal(p_config_id), v_config.backfill_status,
            coalesce(v_config.backfill_progress ->> 'current_page', '0'), quote_nullable(p_page)
            USING ERRCODE = 'NB002';
    END IF;
    RETURN v_config;
END;
$$;
COMMENT ON FUNCTION flux_require_checkpoint(uuid, integer) IS
    'Locks and returns a configuration that is listing with its checkpoint at page p_page, or raises NB002 (another '
    'run of the backfill is listing it). Internal helper of the backfill functions.';

CREATE OR REPLACE FUNCTION record_listed_page(
    p_config_id       uuid,
    p_threads         jsonb,
    p_next_page_token text,
    p_page            integer,
    p_listed_at       timestamptz
)
RETURNS TABLE (queued integer, skipped integer, threads_queued integer)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM flux_require_checkpoint(p_config_id, p_page - 1);
    RETURN QUERY SELECT * FROM record_backfill_page(p_config_id, p_threads, p_next_page_token, p_page, p_listed_at);
END;
$$;
COMMENT ON FUNCTION record_listed_page(uuid, jsonb, text, integer, timestamptz) IS
    'record_backfill_page for a run that is listing: refuses (SQLSTATE NB002) a page that does not follow the '
    'checkpoint, or a configuration no longer listing, before recording anything.';
