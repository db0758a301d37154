-- Narrow nova_worker to what the processes that run under it actually do.
--
-- 090_worker_role.sql granted DML on every table and EXECUTE on every function of public, pgmq and pgmq_broker,
-- plus the same default privileges in all three schemas: a worker could delete the inboxes or the mail copy, flush a
-- queue, replay or purge dead letters, and read and write any table another application creates later in public
-- (on Supabase, public is shared with everything else). 090 stays as it is, since databases have already applied
-- it; this migration takes those grants back and grants, object by object, what is needed by:
--   * the four processors (webhooks, backfill, thread sync, completion monitor) and the SQL functions they call,
--     which are SECURITY INVOKER and therefore run with the worker's own privileges;
--   * the broker: consume, ack, retry, dead-letter, lease extension, rate limits, periodic schedules, queue metrics;
--   * the webhook intake (`nova-email serve-webhooks`): queue_nylas_webhook_notification, record_rejected_webhook;
--   * what the operator commands do with the workers' DATABASE_URL: `nova-email status`, the metrics scrape, and
--     queueing a backfill (`nova-email backfill start/retry`, queue_inbox_backfill).
-- Owner-only from now on: deleting rows of the service's tables; pgmq_broker.flush, purge_archive and
-- replay_dead_letters; deleting dead letters (`nova-email dead-letters replay`, PGMQBroker.purge_dead_letters);
-- enable_notify and disable_notify; the migrations table; every table, sequence and function in public that the
-- service did not create, now and later. (A broker built with archive_on_ack=True, which nova_email does not use,
-- purges its archives from the workers and would need EXECUTE on pgmq_broker.purge_archive.)
--
-- Limits, on purpose: acknowledging a message deletes it from its queue table, so the role keeps SELECT, INSERT,
-- UPDATE and DELETE on PGMQ's queue and archive tables, existing (granted below from pgmq.meta) and future (the
-- default privileges in pgmq, kept). The functions of pgmq and public keep PostgreSQL's default EXECUTE for PUBLIC
-- (pgmq belongs to the extension, and other services call the SQL API in public); they are all SECURITY INVOKER, so
-- that gives nothing beyond the table privileges here. The grants of EXECUTE below still name what the workers call,
-- so they keep working where PUBLIC's EXECUTE has been revoked. In pgmq_broker, the service's own schema, EXECUTE is
-- revoked from PUBLIC and granted function by function.

-- 1. Take back everything 090 granted, and its default privileges except those on PGMQ's queue tables.
REVOKE ALL ON ALL TABLES IN SCHEMA public, pgmq, pgmq_broker FROM nova_worker;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public, pgmq, pgmq_broker FROM nova_worker;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public, pgmq, pgmq_broker FROM nova_worker;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgmq_broker FROM PUBLIC;

ALTER DEFAULT PRIVILEGES IN SCHEMA public, pgmq_broker REVOKE ALL ON TABLES FROM nova_worker;
ALTER DEFAULT PRIVILEGES IN SCHEMA public, pgmq_broker REVOKE ALL ON SEQUENCES FROM nova_worker;
ALTER DEFAULT PRIVILEGES IN SCHEMA public, pgmq, pgmq_broker REVOKE ALL ON FUNCTIONS FROM nova_worker;
-- A queue the owner creates later: its tables stay usable (090's SELECT, INSERT, UPDATE, DELETE), its msg_id sequence
-- readable (pgmq.metrics reads it) but never reset with setval.
ALTER DEFAULT PRIVILEGES IN SCHEMA pgmq REVOKE UPDATE ON SEQUENCES FROM nova_worker;

GRANT USAGE ON SCHEMA public, pgmq, pgmq_broker TO nova_worker;

-- 2. The service's tables. Nothing the workers run deletes a row of them, so no DELETE anywhere.
-- Inboxes are created by the application; workers read them and mark grants expired / webhooks received.
GRANT SELECT, UPDATE ON public.flux_inboxes TO nova_worker;
-- Configurations: INSERT only through queue_inbox_backfill (creates an inbox's configuration on first backfill).
-- Threads and messages: upserts. Webhook audit rows: intake inserts, processors acknowledge. queued_threads and
-- inbox_sync_stats: backfill bookkeeping (the stats trigger runs with the writer's privileges). Pacing buckets:
-- nylas_pacing_acquire.
GRANT SELECT, INSERT, UPDATE ON
    public.flux_inbox_configurations,
    public.flux_email_threads,
    public.flux_email_messages,
    public.flux_webhook_notifications,
    public.queued_threads,
    public.inbox_sync_stats,
    public.nylas_pacing_buckets
TO nova_worker;

-- 3. The service's SQL API (sql/003 to 041). Not the trigger functions: EXECUTE on those is checked when a trigger
-- is created, not when it fires.
GRANT EXECUTE ON FUNCTION
    -- queue wrappers
    public.flux_pgmq_assert_queue(text),
    public.flux_pgmq_send(text, jsonb, integer),
    public.flux_pgmq_read(text, integer, integer),
    public.flux_pgmq_delete(text, bigint),
    public.flux_pgmq_metrics(text),
    public.flux_pgmq_list_queues(),
    -- webhook intake and processing
    public.queue_nylas_webhook_notification(text, text, text, jsonb, uuid),
    public.record_rejected_webhook(text, text),
    public.acknowledge_webhook_notification(uuid, text, text, integer, integer),
    -- backfill
    public.queue_inbox_backfill(uuid, uuid, timestamptz, timestamptz),
    public.flux_require_config(uuid),
    public.start_backfill_run(uuid),
    public.insert_queued_thread_idempotent(uuid, uuid, text, text),
    public.update_backfill_orchestration_progress(uuid, integer, integer, text),
    public.transition_to_thread_sync(uuid, integer),
    public.queue_thread_sync(text, text, uuid, uuid),
    public.queue_unsent_thread_syncs(uuid, integer),
    public.clear_backfill_checkpoint(uuid),
    public.record_backfill_failure(uuid, text),
    public.complete_backfill_if_done(uuid),
    public.record_backfill_page(uuid, jsonb, text, integer),
    public.finish_backfill_listing(uuid),
    public.initialize_sync_stats(uuid, integer),
    -- progress and monitoring
    public.get_sync_progress(uuid),
    public.get_backfill_stats(uuid),
    public.get_webhook_metrics(interval),
    -- sync and pacing
    public.nylas_unix_to_timestamptz(jsonb),
    public.nylas_json_array(jsonb),
    public.upsert_nylas_thread(uuid, jsonb, timestamptz),
    public.upsert_nylas_messages(uuid, uuid, jsonb, timestamptz),
    public.nylas_pacing_acquire(text[], float8[], float8[], integer),
    public.nylas_pacing_acquire(text, float8, integer)
TO nova_worker;

-- 4. PGMQ. Its bookkeeping (pgmq.meta) is read-only; topic bindings and the notify throttle are not used (042 put
-- the broker's trigger on every service queue). Queue tables: DML, as above. Functions by name, since their
-- signatures differ between PGMQ versions. pgmq.create is among them because PostgreSQL checks EXECUTE when a
-- statement starts: the broker's CREATE_QUEUE ("select pgmq.create(q) where not exists (...)") needs it even for an
-- existing queue, and it can create nothing without CREATE on schema pgmq and INSERT on pgmq.meta.
GRANT SELECT ON pgmq.meta TO nova_worker;

DO $$
DECLARE
    v_queue text;
    v_table regclass;
    v_seq   text;
    v_func  regprocedure;
BEGIN
    FOR v_queue IN SELECT m.queue_name FROM pgmq.meta m ORDER BY 1 LOOP
        FOREACH v_table IN ARRAY ARRAY[
            to_regclass(format('pgmq.%I', pgmq.format_table_name(v_queue, 'q'))),
            to_regclass(format('pgmq.%I', pgmq.format_table_name(v_queue, 'a')))
        ] LOOP
            IF v_table IS NOT NULL THEN
                EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO nova_worker', v_table);
            END IF;
        END LOOP;
        v_seq := pg_get_serial_sequence(format('pgmq.%I', pgmq.format_table_name(v_queue, 'q')), 'msg_id');
        IF v_seq IS NOT NULL THEN
            EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO nova_worker', v_seq);
        END IF;
    END LOOP;

    FOR v_func IN
        SELECT p.oid::regprocedure
          FROM pg_proc p
         WHERE p.pronamespace = 'pgmq'::regnamespace
           AND p.proname IN ('create', 'format_table_name', 'send', 'send_batch', '_send_batch',
                             '_validate_batch_params', 'read', 'delete', 'archive', 'metrics')
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO nova_worker', v_func);
    END LOOP;
END;
$$;

-- 5. The broker's own tables: dead letters are written (dead_letter) and read (monitor, metrics), never deleted;
-- rate limits are swept (DELETE of expired rows); schedules are claimed and renewed.
GRANT SELECT, INSERT ON pgmq_broker.dead_letters TO nova_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON pgmq_broker.rate_limits TO nova_worker;
GRANT SELECT, INSERT, UPDATE ON pgmq_broker.schedules TO nova_worker;

GRANT EXECUTE ON FUNCTION
    -- hot path
    pgmq_broker.fetch(text, bigint[], boolean, integer, integer, boolean),
    pgmq_broker.next_visible_in_ms(text),
    pgmq_broker.extend(text, bigint[], timestamptz[], integer, boolean),
    pgmq_broker.release(text, bigint[], timestamptz[], integer, boolean),
    pgmq_broker.send(text, jsonb, integer),
    pgmq_broker.send_batch(text, jsonb[], integer),
    pgmq_broker.resend(text, bigint, text, jsonb, integer),
    pgmq_broker.dead_letter(text, bigint, jsonb, text, text, text, text, text, text, integer),
    pgmq_broker.dramatiq_message(text, text, jsonb, jsonb, jsonb),
    pgmq_broker.queue_metrics(text),
    -- rate limits
    pgmq_broker.rate_limit_lock(text[]),
    pgmq_broker.rate_limit_value(text),
    pgmq_broker.rate_limit_put(text, bigint, bigint),
    pgmq_broker.rate_limit_add(text, bigint, bigint),
    pgmq_broker.rate_limit_incr(text, bigint, bigint, bigint),
    pgmq_broker.rate_limit_decr(text, bigint, bigint, bigint),
    pgmq_broker.rate_limit_incr_and_sum(text, text[], bigint, bigint, bigint),
    pgmq_broker.rate_limit_notify(text, bigint),
    pgmq_broker.rate_limit_sweep(integer),
    -- periodic schedules
    pgmq_broker.periodic_slot(timestamptz, bigint),
    pgmq_broker.periodic_slot_time(bigint),
    pgmq_broker.schedule_upsert(text, text, text, bigint, bigint),
    pgmq_broker.schedule_claim_due(text[]),
    pgmq_broker.schedule_start(text, bigint),
    pgmq_broker.schedule_renew(text[], bigint[]),
    pgmq_broker.schedule_finish(text, bigint, text)
TO nova_worker;
