-- The service's seven tables: inboxes, their configuration, the mail copy (threads, messages), the webhook audit
-- log, and the backfill bookkeeping (queued_threads, inbox_sync_stats). See docs/sql-api.md.
-- Every statement tolerates its object already existing: on a database adopted from the original service,
-- adopt_original.sql has already completed the tables, and only what is still missing is created here.
-- Its first text created the same objects without IF NOT EXISTS; a database that ran it needs nothing more:
-- replaces: 22c54bd76a3b0c1888ceb7060098a14b2d5a589381477036bb510bfad6ffa587

CREATE OR REPLACE FUNCTION flux_set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION flux_set_updated_at() IS
    'BEFORE UPDATE trigger function: stamps updated_at with the transaction time.';

CREATE TABLE IF NOT EXISTS flux_inboxes (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    nylas_grant_id        text NOT NULL,
    email                 text,
    provider              text,
    status                text NOT NULL DEFAULT 'active',
    webhook_health_status text NOT NULL DEFAULT 'healthy',
    last_webhook_at       timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT flux_inboxes_nylas_grant_id_key UNIQUE (nylas_grant_id),
    CONSTRAINT flux_inboxes_status_check CHECK (status IN ('active', 'auth_expired', 'disconnected')),
    CONSTRAINT flux_inboxes_webhook_health_status_check CHECK (webhook_health_status IN ('healthy', 'failing'))
);

-- One configuration per inbox: queue_inbox_backfill finds "the" config of an inbox without being told.
CREATE TABLE IF NOT EXISTS flux_inbox_configurations (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    inbox_id              uuid NOT NULL REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    backfill_status       text NOT NULL DEFAULT 'pending',
    backfill_requested_at timestamptz,
    backfill_started_at   timestamptz,
    backfill_completed_at timestamptz,
    backfill_start_date   timestamptz,
    backfill_end_date     timestamptz,
    backfill_msg_id       bigint,
    backfill_progress     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT flux_inbox_configurations_inbox_id_key UNIQUE (inbox_id),
    CONSTRAINT flux_inbox_configurations_backfill_status_check
        CHECK (backfill_status IN ('pending', 'backfill', 'thread_sync', 'completed', 'failed', 'in_progress')),
    CONSTRAINT flux_inbox_configurations_backfill_progress_check CHECK (jsonb_typeof(backfill_progress) = 'object'),
    CONSTRAINT flux_inbox_configurations_backfill_window_check
        CHECK (backfill_start_date IS NULL OR backfill_end_date IS NULL OR backfill_start_date <= backfill_end_date)
);
-- The completion monitor polls the active ones every few seconds.
CREATE INDEX IF NOT EXISTS flux_inbox_configurations_active_idx ON flux_inbox_configurations (backfill_status)
    WHERE backfill_status IN ('pending', 'backfill', 'thread_sync', 'in_progress');

-- Nylas thread ids are per grant, so uniqueness is per inbox (the original's global unique was a latent bug).
CREATE TABLE IF NOT EXISTS flux_email_threads (
    id                           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    inbox_id                     uuid NOT NULL REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    nylas_thread_id              text NOT NULL,
    subject                      text,
    snippet                      text,
    participants                 jsonb NOT NULL DEFAULT '[]'::jsonb,
    folders                      jsonb NOT NULL DEFAULT '[]'::jsonb,
    message_ids                  jsonb NOT NULL DEFAULT '[]'::jsonb,
    latest_message_received_date timestamptz,
    latest_message_sent_date     timestamptz,
    earliest_message_date        timestamptz,
    unread                       boolean NOT NULL DEFAULT false,
    starred                      boolean NOT NULL DEFAULT false,
    has_attachments              boolean NOT NULL DEFAULT false,
    has_drafts                   boolean NOT NULL DEFAULT false,
    nylas_updated_at             timestamptz,
    synced_at                    timestamptz NOT NULL DEFAULT now(),
    created_at                   timestamptz NOT NULL DEFAULT now(),
    updated_at                   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT flux_email_threads_inbox_id_nylas_thread_id_key UNIQUE (inbox_id, nylas_thread_id)
);
-- Backfill dedup asks "do we have this Nylas thread?" by id alone.
CREATE INDEX IF NOT EXISTS flux_email_threads_nylas_thread_id_idx ON flux_email_threads (nylas_thread_id);
CREATE INDEX IF NOT EXISTS flux_email_threads_inbox_latest_idx
    ON flux_email_threads (inbox_id, latest_message_received_date DESC);

CREATE TABLE IF NOT EXISTS flux_email_messages (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    thread_id        uuid NOT NULL REFERENCES flux_email_threads (id) ON DELETE CASCADE,
    inbox_id         uuid NOT NULL REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    nylas_message_id text NOT NULL,
    nylas_thread_id  text,
    subject          text,
    sender           jsonb,
    to_recipients    jsonb NOT NULL DEFAULT '[]'::jsonb,
    cc_recipients    jsonb NOT NULL DEFAULT '[]'::jsonb,
    bcc_recipients   jsonb NOT NULL DEFAULT '[]'::jsonb,
    reply_to         jsonb NOT NULL DEFAULT '[]'::jsonb,
    body             text,
    snippet          text,
    received_date    timestamptz,
    attachments      jsonb NOT NULL DEFAULT '[]'::jsonb,
    folders          jsonb NOT NULL DEFAULT '[]'::jsonb,
    unread           boolean NOT NULL DEFAULT true,
    starred          boolean NOT NULL DEFAULT false,
    headers          jsonb NOT NULL DEFAULT '[]'::jsonb,
    in_reply_to      text,
    metadata         jsonb,
    tracking_options jsonb,
    nylas_updated_at timestamptz,
    synced_at        timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT flux_email_messages_inbox_id_nylas_message_id_key UNIQUE (inbox_id, nylas_message_id)
);
CREATE INDEX IF NOT EXISTS flux_email_messages_thread_id_idx ON flux_email_messages (thread_id, received_date);
CREATE INDEX IF NOT EXISTS flux_email_messages_inbox_received_idx ON flux_email_messages (inbox_id, received_date DESC);

CREATE TABLE IF NOT EXISTS flux_webhook_notifications (
    id                     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    webhook_id             text,
    notification_type      text,
    grant_id               text,
    inbox_id               uuid REFERENCES flux_inboxes (id) ON DELETE SET NULL,
    payload                jsonb,
    raw_body               text,
    status                 text NOT NULL DEFAULT 'pending',
    attempts               integer NOT NULL DEFAULT 0,
    error_message          text,
    received_at            timestamptz NOT NULL DEFAULT now(),
    processed_at           timestamptz,
    processing_duration_ms integer,
    msg_id                 bigint,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    -- The Nylas envelope id is stable across redeliveries: the dedup key.
    CONSTRAINT flux_webhook_notifications_webhook_id_key UNIQUE (webhook_id),
    CONSTRAINT flux_webhook_notifications_status_check
        CHECK (status IN ('pending', 'processing', 'processed', 'error', 'ignored', 'rejected')),
    -- Only a rejected body may lack an id and a type; everything that was queued has both.
    CONSTRAINT flux_webhook_notifications_identity_check
        CHECK (status = 'rejected' OR (webhook_id IS NOT NULL AND notification_type IS NOT NULL)),
    CONSTRAINT flux_webhook_notifications_attempts_check CHECK (attempts >= 0)
);
CREATE INDEX IF NOT EXISTS flux_webhook_notifications_received_at_idx ON flux_webhook_notifications (received_at);
CREATE INDEX IF NOT EXISTS flux_webhook_notifications_status_idx ON flux_webhook_notifications (status, received_at DESC);
CREATE INDEX IF NOT EXISTS flux_webhook_notifications_inbox_id_idx ON flux_webhook_notifications (inbox_id);

CREATE TABLE IF NOT EXISTS inbox_sync_stats (
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
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS inbox_sync_stats_processing_idx ON inbox_sync_stats (config_id) WHERE threads_processing > 0;
CREATE INDEX IF NOT EXISTS inbox_sync_stats_in_progress_idx ON inbox_sync_stats (config_id) WHERE sync_completed_at IS NULL;

CREATE TABLE IF NOT EXISTS queued_threads (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    config_id       uuid NOT NULL REFERENCES flux_inbox_configurations (id) ON DELETE CASCADE,
    inbox_id        uuid NOT NULL REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    nylas_thread_id text NOT NULL,
    -- The original kept the Nylas id in two columns; generating one from the other keeps them from drifting.
    thread_id       text GENERATED ALWAYS AS (nylas_thread_id) STORED,
    grant_id        text,
    status          text NOT NULL DEFAULT 'queued',
    attempts        integer NOT NULL DEFAULT 0,
    error_message   text,
    note            text,
    messages_synced integer NOT NULL DEFAULT 0,
    queued_at       timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    processed_at    timestamptz,
    pgmq_queued_at  timestamptz,
    msg_id          bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT queued_threads_config_id_nylas_thread_id_key UNIQUE (config_id, nylas_thread_id),
    CONSTRAINT queued_threads_status_check CHECK (status IN ('queued', 'processing', 'completed', 'failed')),
    CONSTRAINT queued_threads_attempts_check CHECK (attempts >= 0),
    CONSTRAINT queued_threads_messages_synced_check CHECK (messages_synced >= 0)
);
CREATE INDEX IF NOT EXISTS queued_threads_config_status_idx ON queued_threads (config_id, status);
-- Bulk send and crash recovery look for rows recorded but never put on the queue.
CREATE INDEX IF NOT EXISTS queued_threads_unsent_idx ON queued_threads (config_id)
    WHERE status = 'queued' AND pgmq_queued_at IS NULL;
CREATE INDEX IF NOT EXISTS queued_threads_inbox_id_idx ON queued_threads (inbox_id);
CREATE INDEX IF NOT EXISTS queued_threads_failed_idx ON queued_threads (processed_at DESC) WHERE status = 'failed';

CREATE OR REPLACE TRIGGER flux_inboxes_set_updated_at BEFORE UPDATE ON flux_inboxes
    FOR EACH ROW EXECUTE FUNCTION flux_set_updated_at();
CREATE OR REPLACE TRIGGER flux_inbox_configurations_set_updated_at BEFORE UPDATE ON flux_inbox_configurations
    FOR EACH ROW EXECUTE FUNCTION flux_set_updated_at();
CREATE OR REPLACE TRIGGER flux_email_threads_set_updated_at BEFORE UPDATE ON flux_email_threads
    FOR EACH ROW EXECUTE FUNCTION flux_set_updated_at();
CREATE OR REPLACE TRIGGER flux_email_messages_set_updated_at BEFORE UPDATE ON flux_email_messages
    FOR EACH ROW EXECUTE FUNCTION flux_set_updated_at();
CREATE OR REPLACE TRIGGER flux_webhook_notifications_set_updated_at BEFORE UPDATE ON flux_webhook_notifications
    FOR EACH ROW EXECUTE FUNCTION flux_set_updated_at();
CREATE OR REPLACE TRIGGER inbox_sync_stats_set_updated_at BEFORE UPDATE ON inbox_sync_stats
    FOR EACH ROW EXECUTE FUNCTION flux_set_updated_at();
CREATE OR REPLACE TRIGGER queued_threads_set_updated_at BEFORE UPDATE ON queued_threads
    FOR EACH ROW EXECUTE FUNCTION flux_set_updated_at();
