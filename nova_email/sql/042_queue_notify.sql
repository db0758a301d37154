-- Insert notifications through the broker's statement-level trigger instead of PGMQ's throttled row trigger.
-- PGMQ's trigger updates one shared throttle row inside the producer's transaction, so a producer whose transaction
-- stays open (a transactional enqueue) blocks every other producer of the same queue until it commits. The broker's
-- trigger only calls pg_notify, once per statement (a batch send wakes consumers once). The completion monitor's
-- queue gets it too.
SELECT pgmq_broker.enable_notify(q)
FROM unnest(ARRAY['nylas_webhook_notifications', 'inbox_backfill_jobs', 'thread_sync_jobs', 'completion_monitor']) AS q;
