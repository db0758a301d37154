-- The service's three PGMQ queues, with insert notifications so consumers can LISTEN instead of polling hard.
-- Guarded because the broker may already have declared a queue of the same name, and because older PGMQ releases
-- (1.4.x, which a Supabase project may run) have no throttled insert notifications: the broker's own trigger (042) is the
-- one consumers rely on.
-- replaces: 3e62444f8bc07f70198a95232c15ca3fe29a7b652a83e4fd0eb4531ce73ccec4
DO $$
DECLARE
    q text;
BEGIN
    FOREACH q IN ARRAY ARRAY['nylas_webhook_notifications', 'inbox_backfill_jobs', 'thread_sync_jobs'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = q) THEN
            PERFORM pgmq.create(q);
        END IF;
        -- At most one NOTIFY per 250 ms per queue: enough to wake idle consumers without a storm under load.
        IF EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                    WHERE n.nspname = 'pgmq' AND p.proname = 'enable_notify_insert') THEN
            IF NOT EXISTS (SELECT 1 FROM pgmq.notify_insert_throttle t WHERE t.queue_name = q) THEN
                PERFORM pgmq.enable_notify_insert(q, 250);
            END IF;
        END IF;
    END LOOP;
END;
$$;
