-- The migrations table becomes readable (never writable) by every role that may use schema pgmq_broker: the
-- owner, and nova_worker, which the workers and the webhook receiver log in as. `nova-email healthcheck` and
-- `nova-email migrate --check` run with the workers' DATABASE_URL and compare it with the migrations the
-- installed package ships, to report a schema that is not current. It holds only file names and checksums.
-- Granted to PUBLIC rather than to nova_worker so that 091's narrowing, which revokes nova_worker's own grants,
-- leaves it in place; USAGE on pgmq_broker (granted to nova_worker only) still limits who can reach it.
GRANT SELECT ON pgmq_broker.schema_migrations TO PUBLIC;
