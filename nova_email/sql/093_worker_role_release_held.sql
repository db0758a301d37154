-- The workers release deliveries with pgmq_broker.release_held (brokers/sql/053), which names what it released.
--
-- The unfenced fetch, resend and dead_letter of brokers/sql/001 and pgmq_broker.release stay granted: workers of the
-- previous release still call them while a rolling deploy replaces them; a later release revokes them.
GRANT EXECUTE ON FUNCTION
    pgmq_broker.release_held(text, bigint[], timestamptz[], integer, boolean)
TO nova_worker;
