-- The service's three PGMQ queues, with insert notifications so consumers can LISTEN instead of polling hard.
-- Guarded because the broker may already have declared a queue of the same name.
DO $$
DECLARE
    q text;
BEGIN
    FOREACH q IN ARRAY ARRAY['nylas_webhook_notifications', 'inbox_backfill_jobs', 'thread_sync_jobs'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = q) THEN
            PERFORM pgmq.create(q);
        END IF;
        -- At most one NOTIFY per 250 ms per queue: enough to wake idle consumers without a storm under load.
        IF NOT EXISTS (SELECT 1 FROM pgmq.notify_insert_throttle t WHERE t.queue_name = q) THEN
            PERFORM pgmq.enable_notify_insert(q, 250);
        END IF;
    END LOOP;
END;
$$;
