-- Writers of the original service's era keep working: rows they insert directly are completed, queued and kept
-- consistent here, and the columns they leave out get the original's defaults.

-- 1. Webhooks: the audit row is the queue's producer. Any insert of a pending row (a receiver of someone else's,
-- or queue_nylas_webhook_notification below) gets its missing fields from the Nylas envelope and one queue job;
-- an insert that does not happen (a duplicate webhook_id) queues nothing.
CREATE OR REPLACE FUNCTION flux_complete_webhook_notification() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.webhook_id := coalesce(nullif(NEW.webhook_id, ''), NEW.payload ->> 'id');
    NEW.notification_type := coalesce(nullif(NEW.notification_type, ''), NEW.payload ->> 'type');
    NEW.grant_id := coalesce(
        nullif(NEW.grant_id, ''),
        nullif(NEW.payload #>> '{data,object,grant_id}', ''),
        nullif(NEW.payload #>> '{data,grant_id}', '')
    );
    NEW.inbox_id := coalesce(NEW.inbox_id, (SELECT i.id FROM flux_inboxes i WHERE i.nylas_grant_id = NEW.grant_id));
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION flux_complete_webhook_notification() IS
    'BEFORE INSERT trigger function: fills a pending webhook row''s id, type, grant and inbox from its payload.';

CREATE OR REPLACE FUNCTION flux_queue_webhook_notification() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_msg_id bigint;
BEGIN
    v_msg_id := flux_pgmq_send(
        'nylas_webhook_notifications',
        jsonb_build_object(
            'notification_id', NEW.id,
            'webhook_id', NEW.webhook_id,
            'inbox_id', NEW.inbox_id,
            'notification_type', NEW.notification_type,
            'grant_id', NEW.grant_id,
            'payload', NEW.payload,
            'received_at', NEW.received_at
        )
    );
    UPDATE flux_webhook_notifications n SET msg_id = v_msg_id WHERE n.id = NEW.id;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION flux_queue_webhook_notification() IS
    'AFTER INSERT trigger function: sends a pending webhook row to nylas_webhook_notifications and records msg_id.';

CREATE OR REPLACE TRIGGER flux_webhook_notifications_complete BEFORE INSERT ON flux_webhook_notifications
    FOR EACH ROW WHEN (NEW.status = 'pending') EXECUTE FUNCTION flux_complete_webhook_notification();
CREATE OR REPLACE TRIGGER flux_webhook_notifications_queue AFTER INSERT ON flux_webhook_notifications
    FOR EACH ROW WHEN (NEW.status = 'pending' AND NEW.msg_id IS NULL)
    EXECUTE FUNCTION flux_queue_webhook_notification();

CREATE OR REPLACE FUNCTION queue_nylas_webhook_notification(
    p_webhook_id        text,
    p_notification_type text,
    p_grant_id          text,
    p_payload           jsonb,
    p_inbox_id          uuid DEFAULT NULL
)
RETURNS TABLE (notification_id uuid, msg_id bigint, duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    IF p_webhook_id IS NULL OR btrim(p_webhook_id) = '' THEN
        RAISE EXCEPTION 'webhook_id is empty; pass the Nylas envelope "id", or record the body with record_rejected_webhook'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_notification_type IS NULL OR btrim(p_notification_type) = '' THEN
        RAISE EXCEPTION 'notification_type is empty for webhook %; pass the Nylas envelope "type", or record the body with record_rejected_webhook',
            quote_literal(p_webhook_id)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- ON CONFLICT DO NOTHING waits for a concurrent insert of the same id, so exactly one caller gets a row back;
    -- the row's triggers complete it and queue it.
    INSERT INTO flux_webhook_notifications AS n (webhook_id, notification_type, grant_id, inbox_id, payload, status)
    VALUES (p_webhook_id, p_notification_type, p_grant_id, p_inbox_id, p_payload, 'pending')
    ON CONFLICT (webhook_id) DO NOTHING
    RETURNING n.id INTO v_id;

    RETURN QUERY
        SELECT n.id, n.msg_id, v_id IS NULL FROM flux_webhook_notifications n WHERE n.webhook_id = p_webhook_id;
END;
$$;

-- 2. queued_threads.thread_id: the original's writers set it themselves, which a generated column refuses. It is a
-- plain column now, kept equal to nylas_thread_id (either one may be given).
ALTER TABLE queued_threads ALTER COLUMN thread_id DROP EXPRESSION IF EXISTS;

CREATE OR REPLACE FUNCTION flux_match_queued_thread_ids() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.nylas_thread_id := coalesce(NEW.nylas_thread_id, NEW.thread_id);
    NEW.thread_id := NEW.nylas_thread_id;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION flux_match_queued_thread_ids() IS
    'BEFORE INSERT OR UPDATE trigger function: queued_threads.thread_id always equals nylas_thread_id.';

CREATE OR REPLACE TRIGGER queued_threads_match_thread_ids
    BEFORE INSERT OR UPDATE OF thread_id, nylas_thread_id ON queued_threads
    FOR EACH ROW EXECUTE FUNCTION flux_match_queued_thread_ids();

-- 3. Inbox statuses belong to the application that connects inboxes; the workers only set and read auth_expired and
-- failing, so other values (the original's writers used their own) are accepted.
ALTER TABLE flux_inboxes DROP CONSTRAINT IF EXISTS flux_inboxes_status_check;
ALTER TABLE flux_inboxes DROP CONSTRAINT IF EXISTS flux_inboxes_webhook_health_status_check;

-- 4. The original's defaults, which its readers rely on: a thread or message without a subject reads
-- '(No Subject)', a thread without a snippet '', a message without a sender unknown@example.com. Upserts pass NULL
-- explicitly, which a column default does not cover, so a trigger applies them too: on insert, which is also what an
-- upsert's update takes its values from, and only for a row that needs it (the WHEN costs next to nothing).
ALTER TABLE flux_email_threads
    ALTER COLUMN subject SET DEFAULT '(No Subject)',
    ALTER COLUMN snippet SET DEFAULT '';
ALTER TABLE flux_email_messages
    ALTER COLUMN subject SET DEFAULT '(No Subject)',
    ALTER COLUMN sender SET DEFAULT '{"email": "unknown@example.com"}'::jsonb;

CREATE OR REPLACE FUNCTION flux_apply_mail_defaults() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.subject := coalesce(NEW.subject, '(No Subject)');
    IF TG_TABLE_NAME = 'flux_email_threads' THEN
        NEW.snippet := coalesce(NEW.snippet, '');
    ELSE
        NEW.sender := coalesce(NEW.sender, '{"email": "unknown@example.com"}'::jsonb);
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION flux_apply_mail_defaults() IS
    'BEFORE INSERT trigger function: a NULL subject, thread snippet or message sender gets its default.';

CREATE OR REPLACE TRIGGER flux_email_threads_defaults BEFORE INSERT ON flux_email_threads
    FOR EACH ROW WHEN (NEW.subject IS NULL OR NEW.snippet IS NULL) EXECUTE FUNCTION flux_apply_mail_defaults();
CREATE OR REPLACE TRIGGER flux_email_messages_defaults BEFORE INSERT ON flux_email_messages
    FOR EACH ROW WHEN (NEW.subject IS NULL OR NEW.sender IS NULL) EXECUTE FUNCTION flux_apply_mail_defaults();
