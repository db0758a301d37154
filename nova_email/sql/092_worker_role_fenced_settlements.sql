-- The workers call the broker's fenced settlements (brokers/sql/052_fenced_settlements.sql): the lease-checked fetch,
-- resend and dead_letter. 091 revoked EXECUTE by default, so each is granted here, by signature.
GRANT EXECUTE ON FUNCTION
    pgmq_broker.fetch(text, bigint[], timestamptz[], boolean, integer, integer, boolean),
    pgmq_broker.resend(text, bigint, timestamptz, text, jsonb, integer),
    pgmq_broker.dead_letter(text, bigint, timestamptz, jsonb, text, text, text, text, text, text, integer)
TO nova_worker;
