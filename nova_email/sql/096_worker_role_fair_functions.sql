-- nova_worker holds EXECUTE on the per-queue functions of fair queues whenever they are created.
--
-- A queue in fairness mode has functions of its own in pgmq_broker, named fair_<verb>_<queue> (fair_fetch_<queue>
-- from brokers/sql/060; later broker migrations may add others, such as fair_lease_<queue>). They are created when a
-- queue is put in fairness mode, and created anew when one is re-created (enable_fairness after disable_fairness, a
-- broker migration that rebuilds them), after 095 granted the ones that existed when it ran. A new one got nothing
-- for nova_worker: the workers could call it only through PUBLIC's default EXECUTE, and stopped where that had been
-- revoked, as 091 revokes it from every function of pgmq_broker that exists when it runs.
--
-- 1. Functions the migrating role creates in pgmq_broker from now on: EXECUTE for nova_worker. Default privileges
-- belong to the role that creates the objects; the migrations run as the owner, which is also the role that puts
-- queues in fairness mode (from a migration, as brokers/fairness.py says). PostgreSQL cannot narrow a default by
-- name, so it holds for every function created later in the schema: a later broker migration that adds one the
-- workers must not call revokes it from nova_worker in the service migration that follows, as 091 does for flush,
-- purge_archive and replay_dead_letters (tests/security/test_least_privilege.py lists the refused ones). PUBLIC's
-- default EXECUTE is left as PostgreSQL sets it: a schema's default privileges can only add to it, and these
-- functions are SECURITY INVOKER, so it gives nothing beyond a role's rights on the queue's tables.
ALTER DEFAULT PRIVILEGES IN SCHEMA pgmq_broker GRANT EXECUTE ON FUNCTIONS TO nova_worker;

-- 2. The per-queue functions that exist now, including those created after 095 ran: fair_<verb>_<queue> for each
-- queue in fairness mode, by name (the queue's name compared as text, never as a pattern). Not every function of
-- pgmq_broker: the admin and set-up functions stay the owner's.
DO $$
DECLARE
    v_func regprocedure;
BEGIN
    FOR v_func IN
        SELECT p.oid::regprocedure
          FROM pg_proc p
          JOIN pgmq_broker.fair_queues q ON regexp_replace(p.proname, '^fair_[a-z]+_', '') = lower(q.queue_name)
         WHERE p.pronamespace = 'pgmq_broker'::regnamespace AND p.proname ~ '^fair_[a-z]+_'
           AND p.proname NOT IN ('fair_create_fetch', 'fair_key_column', 'fair_keys_on_insert')
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO nova_worker', v_func);
    END LOOP;
END;
$$;
