-- Rows that receivers insert into flux_webhook_notifications directly. Nylas delivers a webhook at least once, so
-- the same webhook may be inserted again: that insert is skipped (no row, no error, nothing queued twice). A row
-- without a webhook id or type, in its columns or its payload, cannot be processed: it is kept as 'rejected' with
-- the reason. 'queued' (or no status) as the initial status means 'pending'; rows inserted as processing,
-- processed, error or ignored are history and are stored as they are.
CREATE OR REPLACE FUNCTION flux_complete_webhook_notification() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.status := 'pending';
    NEW.webhook_id := coalesce(nullif(NEW.webhook_id, ''), NEW.payload ->> 'id');
    NEW.notification_type := coalesce(nullif(NEW.notification_type, ''), NEW.payload ->> 'type');
    IF NEW.webhook_id IS NULL OR NEW.notification_type IS NULL THEN
        NEW.status := 'rejected';
        NEW.error_message := coalesce(NEW.error_message,
            'no webhook id or type in the row or its payload: nothing to process');
        RETURN NEW;
    END IF;
    -- Concurrent inserts of one webhook take turns here, so the later one sees the earlier one's row.
    PERFORM pg_advisory_xact_lock(hashtextextended('flux_webhook_notifications ' || NEW.webhook_id, 0));
    IF EXISTS (SELECT 1 FROM flux_webhook_notifications n WHERE n.webhook_id = NEW.webhook_id) THEN
        RETURN NULL;
    END IF;
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
    'BEFORE INSERT trigger function for a new (pending, queued or status-less) webhook row: fills its id, type, '
    'grant and inbox from its payload; skips the insert when that webhook is already recorded; records a row '
    'without id or type as rejected.';

CREATE OR REPLACE TRIGGER flux_webhook_notifications_complete BEFORE INSERT ON flux_webhook_notifications
    FOR EACH ROW WHEN (NEW.status IS NULL OR NEW.status IN ('pending', 'queued'))
    EXECUTE FUNCTION flux_complete_webhook_notification();
