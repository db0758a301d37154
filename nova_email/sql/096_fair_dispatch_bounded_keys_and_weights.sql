-- Fair dispatch with bounded keys and weights (brokers/sql/063). Every insert into a fair queue computes its key with
-- pgmq_broker.fair_key_of (and fair_key_digest for a long key), under the inserting role: the workers, the SQL API
-- (SECURITY INVOKER) and every other system that produces onto the queues (docs/sql-api.md). Both are pure
-- functions of their argument; 091 took PUBLIC's EXECUTE in pgmq_broker away, so it is given back for these two.
GRANT EXECUTE ON FUNCTION pgmq_broker.fair_key_of(text), pgmq_broker.fair_key_digest(text) TO PUBLIC, nova_worker;
-- The workers' fetches read a key's weight when its turn ends.
GRANT SELECT ON pgmq_broker.fair_weights TO nova_worker;
