-- Least-privilege role for the workers: nova_worker (NOLOGIN). Grant it to the login role the workers use:
--   CREATE ROLE nova_app LOGIN PASSWORD '...' IN ROLE nova_worker;   -- or: GRANT nova_worker TO nova_app;
-- The migrations themselves run as the owner (a superuser or the database owner); nova_worker cannot create,
-- alter or drop schema objects, truncate tables, or touch anything outside the three schemas below.
--
-- What the workers need, and why:
-- * public: read and write the service's tables (upserts, audit rows, queued_threads, stats) and call its SQL API.
-- * pgmq: send/read/archive/delete messages (DML on the queue and archive tables, their sequences) and call PGMQ's
--   functions. Queues are created by this migration (the three service queues come from 002_queues.sql, the
--   periodic completion_monitor queue is created below), so workers never need CREATE on schema pgmq. The broker
--   still calls pgmq.create() for each queue it uses; on an existing queue that is a no-op that needs no privilege
--   beyond those granted here. A queue added later must be created by a migration (as the owner), which then runs
--   the grants below again (they are idempotent), or be covered by the default privileges set at the end.
-- * pgmq_broker: dead letters, leases, rate limits and periodic schedules (DML and EXECUTE).
-- Roles are cluster-wide: the role may already exist (another database on the same server), so creating it
-- tolerates a concurrent or earlier CREATE.

DO $$
BEGIN
    CREATE ROLE nova_worker NOLOGIN;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN
        NULL;
END
$$;

SELECT pgmq.create('completion_monitor')
WHERE NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = 'completion_monitor');

GRANT USAGE ON SCHEMA public, pgmq, pgmq_broker TO nova_worker;

GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public, pgmq, pgmq_broker TO nova_worker;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public, pgmq, pgmq_broker TO nova_worker;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public, pgmq, pgmq_broker TO nova_worker;
-- Bookkeeping only migrations and queue creation write: readable where workers look things up, never writable.
REVOKE ALL ON pgmq_broker.schema_migrations FROM nova_worker;
REVOKE INSERT, UPDATE, DELETE ON pgmq.meta, pgmq.topic_bindings FROM nova_worker;

-- Objects the owner creates later in these schemas (a new queue's tables, a new SQL function) get the same grants.
ALTER DEFAULT PRIVILEGES IN SCHEMA public, pgmq, pgmq_broker
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO nova_worker;
ALTER DEFAULT PRIVILEGES IN SCHEMA public, pgmq, pgmq_broker
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO nova_worker;
ALTER DEFAULT PRIVILEGES IN SCHEMA public, pgmq, pgmq_broker
    GRANT EXECUTE ON FUNCTIONS TO nova_worker;
