-- A database as the TypeScript original left it, rebuilt from its documents (docs: original-README.md and
-- original-system.md, sections a.1 to a.8): its seven tables with the columns and defaults it wrote, PGMQ's three
-- queues, the SQL functions it documents (with bodies inferred from their call sites) and the triggers that kept
-- inbox_sync_stats and updated_at current. Runs on a database that has PGMQ and nothing else.

CREATE OR REPLACE FUNCTION update_updated_at_column() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END;
$$;

CREATE TABLE flux_inboxes (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    nylas_grant_id        text,
    email                 text,
    provider              text,
    status                text DEFAULT 'active',
    webhook_health_status text DEFAULT 'healthy',
    created_at            timestamptz DEFAULT now(),
    updated_at            timestamptz DEFAULT now()
);

CREATE TABLE flux_inbox_configurations (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    inbox_id              uuid REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    backfill_status       text,
    backfill_started_at   timestamptz,
    backfill_completed_at timestamptz,
    backfill_progress     jsonb DEFAULT '{}'::jsonb,
    created_at            timestamptz DEFAULT now(),
    updated_at            timestamptz DEFAULT now()
);

CREATE TABLE flux_email_threads (
    id                           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    inbox_id                     uuid REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    nylas_thread_id              text UNIQUE,
    subject                      text DEFAULT '(No Subject)',
    snippet                      text DEFAULT '',
    participants                 jsonb DEFAULT '[]'::jsonb,
    latest_message_received_date timestamptz,
    unread                       boolean DEFAULT false,
    starred                      boolean DEFAULT false,
    created_at                   timestamptz DEFAULT now(),
    updated_at                   timestamptz DEFAULT now()
);

CREATE TABLE flux_email_messages (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    thread_id        uuid REFERENCES flux_email_threads (id) ON DELETE CASCADE,
    nylas_message_id text UNIQUE,
    subject          text DEFAULT '(No Subject)',
    sender           jsonb DEFAULT '{"email": "unknown@example.com"}'::jsonb,
    body             text,
    received_date    timestamptz,
    to_recipients    jsonb DEFAULT '[]'::jsonb,
    cc_recipients    jsonb DEFAULT '[]'::jsonb,
    bcc_recipients   jsonb DEFAULT '[]'::jsonb,
    reply_to         jsonb DEFAULT '[]'::jsonb,
    attachments      jsonb DEFAULT '[]'::jsonb,
    folders          jsonb DEFAULT '[]'::jsonb,
    unread           boolean DEFAULT true,
    starred          boolean DEFAULT false,
    snippet          text,
    headers          jsonb DEFAULT '[]'::jsonb,
    in_reply_to      text,
    metadata         jsonb,
    tracking_options jsonb,
    created_at       timestamptz DEFAULT now(),
    updated_at       timestamptz DEFAULT now()
);

CREATE TABLE flux_webhook_notifications (
    id                     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    webhook_id             text,
    notification_type      text,
    grant_id               text,
    inbox_id               uuid,
    payload                jsonb,
    status                 text DEFAULT 'pending',
    error_message          text,
    received_at            timestamptz DEFAULT now(),
    processed_at           timestamptz,
    processing_duration_ms integer,
    created_at             timestamptz DEFAULT now()
);

CREATE TABLE inbox_sync_stats (
    config_id          uuid PRIMARY KEY REFERENCES flux_inbox_configurations (id) ON DELETE CASCADE,
    threads_total      integer NOT NULL DEFAULT 0,
    threads_queued     integer NOT NULL DEFAULT 0,
    threads_processing integer NOT NULL DEFAULT 0,
    threads_completed  integer NOT NULL DEFAULT 0,
    threads_failed     integer NOT NULL DEFAULT 0,
    messages_total     integer NOT NULL DEFAULT 0,
    messages_synced    integer NOT NULL DEFAULT 0,
    sync_started_at    timestamptz,
    last_thread_at     timestamptz,
    sync_completed_at  timestamptz,
    created_at         timestamptz DEFAULT now(),
    updated_at         timestamptz DEFAULT now()
);
CREATE INDEX idx_inbox_sync_stats_processing ON inbox_sync_stats (config_id) WHERE threads_processing > 0;
CREATE INDEX idx_inbox_sync_stats_in_progress ON inbox_sync_stats (config_id) WHERE sync_completed_at IS NULL;
CREATE INDEX idx_inbox_sync_stats_completed ON inbox_sync_stats (config_id) WHERE sync_completed_at IS NOT NULL;

CREATE TABLE queued_threads (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    config_id       uuid REFERENCES flux_inbox_configurations (id) ON DELETE CASCADE,
    inbox_id        uuid REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    thread_id       text,
    nylas_thread_id text,
    grant_id        text,
    status          text DEFAULT 'queued',
    queued_at       timestamptz DEFAULT now(),
    started_at      timestamptz,
    processed_at    timestamptz,
    messages_synced integer DEFAULT 0,
    pgmq_queued_at  timestamptz,
    CONSTRAINT queued_threads_config_thread_unique UNIQUE (config_id, nylas_thread_id)
);

CREATE TRIGGER update_flux_inboxes_updated_at BEFORE UPDATE ON flux_inboxes
    FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();
CREATE TRIGGER update_inbox_sync_stats_updated_at BEFORE UPDATE ON inbox_sync_stats
    FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();

-- Stats followed queued_threads status changes row by row.
CREATE OR REPLACE FUNCTION update_sync_stats_on_thread_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE inbox_sync_stats SET threads_queued = threads_queued + 1 WHERE config_id = NEW.config_id;
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        UPDATE inbox_sync_stats
           SET threads_processing = threads_processing + (NEW.status = 'processing')::int
                                    - (OLD.status = 'processing')::int,
               threads_completed = threads_completed + (NEW.status = 'completed')::int,
               threads_failed = threads_failed + (NEW.status = 'failed')::int,
               messages_synced = messages_synced + coalesce(NEW.messages_synced, 0),
               last_thread_at = now()
         WHERE config_id = NEW.config_id;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER queued_threads_stats_trigger AFTER INSERT OR UPDATE ON queued_threads
    FOR EACH ROW EXECUTE FUNCTION update_sync_stats_on_thread_change();

SELECT pgmq.create('nylas_webhook_notifications');
SELECT pgmq.create('inbox_backfill_jobs');
SELECT pgmq.create('thread_sync_jobs');

-- Queue wrappers (a.0: thin wrappers of pgmq's shape).
CREATE OR REPLACE FUNCTION flux_pgmq_send(queue_name text, message jsonb, delay_seconds integer DEFAULT 0)
RETURNS SETOF bigint LANGUAGE sql AS $$ SELECT pgmq.send(queue_name, message, delay_seconds) $$;
CREATE OR REPLACE FUNCTION flux_pgmq_read(queue_name text, visibility_timeout integer, qty integer)
RETURNS SETOF pgmq.message_record LANGUAGE sql AS $$ SELECT * FROM pgmq.read(queue_name, visibility_timeout, qty) $$;
CREATE OR REPLACE FUNCTION flux_pgmq_delete(queue_name text, message_id bigint)
RETURNS boolean LANGUAGE sql AS $$ SELECT pgmq.delete(queue_name, message_id) $$;
CREATE OR REPLACE FUNCTION flux_pgmq_metrics(queue_name text)
RETURNS SETOF pgmq.metrics_result LANGUAGE sql AS $$ SELECT * FROM pgmq.metrics(queue_name) $$;
CREATE OR REPLACE FUNCTION flux_pgmq_list_queues()
RETURNS SETOF pgmq.queue_record LANGUAGE sql AS $$ SELECT * FROM pgmq.list_queues() $$;

-- Webhooks (old README signatures).
CREATE OR REPLACE FUNCTION queue_nylas_webhook_notification(
    p_webhook_id text, p_notification_type text, p_grant_id text, p_payload jsonb
) RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
    v_inbox uuid;
BEGIN
    SELECT id INTO v_inbox FROM flux_inboxes WHERE nylas_grant_id = p_grant_id;
    INSERT INTO flux_webhook_notifications (webhook_id, notification_type, grant_id, inbox_id, payload)
    VALUES (p_webhook_id, p_notification_type, p_grant_id, v_inbox, p_payload) RETURNING id INTO v_id;
    PERFORM pgmq.send('nylas_webhook_notifications', jsonb_build_object(
        'notification_id', v_id, 'webhook_id', p_webhook_id, 'inbox_id', v_inbox,
        'notification_type', p_notification_type, 'grant_id', p_grant_id, 'payload', p_payload,
        'received_at', now()));
    RETURN v_id;
END;
$$;
CREATE OR REPLACE FUNCTION read_nylas_webhook_notifications(p_limit integer, p_visibility_timeout integer)
RETURNS SETOF pgmq.message_record LANGUAGE sql AS $$
    SELECT * FROM pgmq.read('nylas_webhook_notifications', p_visibility_timeout, p_limit)
$$;
CREATE OR REPLACE FUNCTION acknowledge_webhook_notification(
    p_message_id bigint, p_notification_id uuid, p_success boolean, p_error_message text DEFAULT NULL
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE flux_webhook_notifications
       SET status = CASE WHEN p_success THEN 'processed' ELSE 'error' END,
           error_message = p_error_message, processed_at = now()
     WHERE id = p_notification_id;
    IF p_success THEN
        PERFORM pgmq.delete('nylas_webhook_notifications', p_message_id);
    END IF;
END;
$$;

-- Backfill (a.4).
CREATE OR REPLACE FUNCTION queue_inbox_backfill(p_inbox_id uuid, p_config_id uuid) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_msg bigint;
BEGIN
    SELECT pgmq.send('inbox_backfill_jobs', jsonb_build_object(
        'inbox_id', p_inbox_id, 'config_id', p_config_id,
        'grant_id', (SELECT nylas_grant_id FROM flux_inboxes WHERE id = p_inbox_id),
        'start_date', now() - interval '1 year', 'end_date', now())) INTO v_msg;
    UPDATE flux_inbox_configurations SET backfill_status = 'backfill' WHERE id = p_config_id;
    RETURN v_msg;
END;
$$;
CREATE OR REPLACE FUNCTION insert_queued_thread_idempotent(
    p_config_id uuid, p_inbox_id uuid, p_thread_id text, p_grant_id text
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO queued_threads (config_id, inbox_id, thread_id, nylas_thread_id, grant_id, status)
    VALUES (p_config_id, p_inbox_id, p_thread_id, p_thread_id, p_grant_id, 'queued')
    ON CONFLICT (config_id, nylas_thread_id)
    DO UPDATE SET status = 'queued', queued_at = now(), grant_id = excluded.grant_id
$$;
CREATE OR REPLACE FUNCTION update_backfill_orchestration_progress(
    p_config_id uuid, p_threads_queued integer, p_current_page integer
) RETURNS void LANGUAGE sql AS $$
    UPDATE flux_inbox_configurations
       SET backfill_progress = coalesce(backfill_progress, '{}'::jsonb)
           || jsonb_build_object('threads_queued', p_threads_queued, 'current_page', p_current_page)
     WHERE id = p_config_id
$$;
CREATE OR REPLACE FUNCTION transition_to_thread_sync(p_config_id uuid, p_threads_queued integer) RETURNS void
LANGUAGE sql AS $$
    UPDATE flux_inbox_configurations SET backfill_status = 'thread_sync' WHERE id = p_config_id;
    UPDATE inbox_sync_stats SET threads_total = p_threads_queued WHERE config_id = p_config_id;
$$;
CREATE OR REPLACE FUNCTION acknowledge_backfill_job(p_msg_id bigint, p_config_id uuid) RETURNS boolean
LANGUAGE sql AS $$ SELECT pgmq.delete('inbox_backfill_jobs', p_msg_id) $$;
CREATE OR REPLACE FUNCTION queue_thread_sync(p_thread_id text, p_grant_id text, p_inbox_id uuid, p_config_id uuid)
RETURNS bigint LANGUAGE sql AS $$
    SELECT pgmq.send('thread_sync_jobs', jsonb_build_object(
        'thread_id', p_thread_id, 'grant_id', p_grant_id, 'inbox_id', p_inbox_id, 'config_id', p_config_id))
$$;

-- Stats (migration 003 of the original, a.8).
CREATE OR REPLACE FUNCTION initialize_sync_stats(p_config_id uuid, p_threads_total integer DEFAULT 0)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO inbox_sync_stats (config_id, threads_total, sync_started_at) VALUES (p_config_id, p_threads_total, now())
    ON CONFLICT (config_id) DO UPDATE SET threads_total = p_threads_total, threads_queued = 0,
        threads_processing = 0, threads_completed = 0, threads_failed = 0, messages_synced = 0,
        sync_started_at = now(), sync_completed_at = NULL
$$;
CREATE OR REPLACE FUNCTION increment_threads_queued(p_config_id uuid) RETURNS void LANGUAGE sql AS $$
    UPDATE inbox_sync_stats SET threads_queued = threads_queued + 1 WHERE config_id = p_config_id
$$;
CREATE OR REPLACE FUNCTION start_thread_processing(p_config_id uuid) RETURNS void LANGUAGE sql AS $$
    UPDATE inbox_sync_stats SET threads_processing = threads_processing + 1 WHERE config_id = p_config_id
$$;
CREATE OR REPLACE FUNCTION acknowledge_thread_job(
    p_msg_id bigint, p_config_id uuid, p_messages_synced integer, p_success boolean DEFAULT true
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgmq.delete('thread_sync_jobs', p_msg_id);
    UPDATE inbox_sync_stats
       SET threads_processing = greatest(threads_processing - 1, 0),
           threads_completed = threads_completed + p_success::int,
           threads_failed = threads_failed + (NOT p_success)::int,
           messages_synced = messages_synced + p_messages_synced
     WHERE config_id = p_config_id;
END;
$$;
CREATE OR REPLACE FUNCTION get_backfill_stats(p_config_id uuid)
RETURNS TABLE (total bigint, queued bigint, processing bigint, completed bigint, failed bigint, messages_synced bigint)
LANGUAGE sql STABLE AS $$
    SELECT count(*), count(*) FILTER (WHERE status = 'queued'), count(*) FILTER (WHERE status = 'processing'),
           count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed'),
           coalesce(sum(messages_synced), 0)
      FROM queued_threads WHERE config_id = p_config_id
$$;
CREATE OR REPLACE FUNCTION get_sync_progress(p_config_id uuid) RETURNS json LANGUAGE sql STABLE AS $$
    SELECT row_to_json(s) FROM inbox_sync_stats s WHERE s.config_id = p_config_id
$$;
CREATE OR REPLACE FUNCTION get_webhook_metrics(p_time_window interval DEFAULT interval '1 hour') RETURNS json
LANGUAGE sql STABLE AS $$
    SELECT json_agg(x) FROM (
        SELECT notification_type, status, count(*) FROM flux_webhook_notifications
         WHERE received_at > now() - p_time_window GROUP BY 1, 2) x
$$;
