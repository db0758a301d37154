-- Every insert into a fair queue computes its key with pgmq_broker.fair_key_of (brokers/sql/063), under the
-- inserting role: the workers (and the SQL API they call) need EXECUTE on it, which 091 keeps from PUBLIC.
GRANT EXECUTE ON FUNCTION pgmq_broker.fair_key_of(text), pgmq_broker.fair_key_digest(text) TO nova_worker;
