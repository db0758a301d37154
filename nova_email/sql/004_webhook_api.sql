-- Webhook intake and acknowledgement: the audit row in flux_webhook_notifications and the job on
-- nylas_webhook_notifications are written together, so neither exists without the other.

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
    v_grant_id    text;
    v_inbox_id    uuid;
    v_id          uuid;
    v_received_at timestamptz;
    v_msg_id      bigint;
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

    v_grant_id := coalesce(
        nullif(p_grant_id, ''),
        nullif(p_payload #>> '{data,object,grant_id}', ''),
        nullif(p_payload #>> '{data,grant_id}', '')
    );
    v_inbox_id := coalesce(p_inbox_id, (SELECT i.id FROM flux_inboxes i WHERE i.nylas_grant_id = v_grant_id));

    -- ON CONFLICT DO NOTHING waits for a concurrent insert of the same id, so exactly one caller gets a row back.
    INSERT INTO flux_webhook_notifications AS n (webhook_id, notification_type, grant_id, inbox_id, payload, status)
    VALUES (p_webhook_id, p_notification_type, v_grant_id, v_inbox_id, p_payload, 'pending')
    ON CONFLICT (webhook_id) DO NOTHING
    RETURNING n.id, n.received_at INTO v_id, v_received_at;

    IF v_id IS NULL THEN
        RETURN QUERY
            SELECT n.id, n.msg_id, true FROM flux_webhook_notifications n WHERE n.webhook_id = p_webhook_id;
        RETURN;
    END IF;

    v_msg_id := flux_pgmq_send(
        'nylas_webhook_notifications',
        jsonb_build_object(
            'notification_id', v_id,
            'webhook_id', p_webhook_id,
            'inbox_id', v_inbox_id,
            'notification_type', p_notification_type,
            'grant_id', v_grant_id,
            'payload', p_payload,
            'received_at', v_received_at
        )
    );
    UPDATE flux_webhook_notifications n SET msg_id = v_msg_id WHERE n.id = v_id;
    RETURN QUERY SELECT v_id, v_msg_id, false;
END;
$$;
COMMENT ON FUNCTION queue_nylas_webhook_notification(text, text, text, jsonb, uuid) IS
    'Records a Nylas webhook in flux_webhook_notifications and queues it on nylas_webhook_notifications in one '
    'transaction. The same webhook_id again returns the first row with duplicate=true and queues nothing.';

CREATE OR REPLACE FUNCTION record_rejected_webhook(p_raw_body text, p_error text) RETURNS uuid
LANGUAGE sql AS $$
    -- Capped so that an oversized or hostile body cannot bloat the audit table.
    INSERT INTO flux_webhook_notifications (raw_body, status, error_message, processed_at)
    VALUES (left(p_raw_body, 1048576), 'rejected', coalesce(p_error, 'rejected without a reason'), now())
    RETURNING id;
$$;
COMMENT ON FUNCTION record_rejected_webhook(text, text) IS
    'Audits a webhook body that was refused (bad signature, not JSON, no id/type): status rejected, no queue message.';

CREATE OR REPLACE FUNCTION acknowledge_webhook_notification(
    p_notification_id        uuid,
    p_status                 text,
    p_error_message          text DEFAULT NULL,
    p_processing_duration_ms integer DEFAULT NULL,
    p_attempts               integer DEFAULT NULL
)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('processing', 'processed', 'error', 'ignored') THEN
        RAISE EXCEPTION 'Unknown webhook status %; expected processing, processed, error or ignored',
            quote_nullable(p_status)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_attempts < 0 OR p_processing_duration_ms < 0 THEN
        RAISE EXCEPTION 'attempts and processing_duration_ms must be >= 0, got % and %', p_attempts,
            p_processing_duration_ms
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF p_status = 'processing' THEN
        UPDATE flux_webhook_notifications n
           SET status = 'processing',
               attempts = coalesce(p_attempts, n.attempts + 1),
               error_message = coalesce(p_error_message, n.error_message)
         WHERE n.id = p_notification_id AND n.status <> 'rejected';
    ELSE
        UPDATE flux_webhook_notifications n
           SET status = p_status,
               error_message = p_error_message,
               processed_at = now(),
               processing_duration_ms = coalesce(p_processing_duration_ms, n.processing_duration_ms),
               attempts = coalesce(p_attempts, n.attempts)
         WHERE n.id = p_notification_id AND n.status <> 'rejected';
    END IF;
    RETURN FOUND;
END;
$$;
COMMENT ON FUNCTION acknowledge_webhook_notification(uuid, text, text, integer, integer) IS
    'Moves a webhook audit row to processing (counting an attempt) or to an outcome (processed, error, ignored; '
    'stamps processed_at). False when the row does not exist or was rejected.';
