-- Many inboxes at once: the three job queues are served fairly across grants. Each message is keyed by its
-- top-level grant_id (every producer of these queues writes one: docs/sql-api.md), so fetches rotate across the
-- grants that have work instead of taking one backfill's fan-out in order, and a new inbox's first jobs run within
-- one turn of the rotation. Producers change nothing; messages already queued are keyed here too.
-- See brokers/sql/060_fairness.sql for the mechanism.
SELECT pgmq_broker.enable_fairness(q, '{grant_id}')
FROM unnest(ARRAY['nylas_webhook_notifications', 'inbox_backfill_jobs', 'thread_sync_jobs']) AS q;

-- The workers' role: producers maintain the key table through a SECURITY DEFINER trigger, so only fetching needs
-- rights of its own.
GRANT SELECT ON pgmq_broker.fair_queues TO nova_worker;
GRANT SELECT, UPDATE, DELETE ON pgmq_broker.fair_keys TO nova_worker;
GRANT EXECUTE ON FUNCTION
    pgmq_broker.is_fair(text),
    pgmq_broker.fair_fetch(text, bigint[], timestamptz[], boolean, integer, integer, boolean),
    pgmq_broker.fair_read(text, integer, integer),
    pgmq_broker.fair_max_keys_per_read(integer),
    pgmq_broker.fair_recheck()
TO nova_worker;
-- Each fair queue's own fetch (pgmq_broker.fair_fetch_<queue>, created by enable_fairness above).
DO $$
DECLARE
    v_func regprocedure;
BEGIN
    FOR v_func IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'pgmq_broker'::regnamespace AND p.proname LIKE 'fair\_fetch\_%'
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO nova_worker', v_func);
    END LOOP;
END;
$$;
