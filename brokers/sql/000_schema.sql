-- The broker keeps its own tables (dead letters, schedules, rate limits, migrations) in one schema,
-- apart from PGMQ's `pgmq` schema and from the application's tables.
create schema if not exists pgmq_broker;
comment on schema pgmq_broker is 'Tables of the Dramatiq PGMQ broker (package brokers).';
