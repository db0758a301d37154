-- The completion monitor looks every tick for jobs the broker dead-lettered before an actor could record them
-- (poison messages, undecodable bodies). Those are the dead letters whose reason is not 'failed', a small share of
-- a table that keeps every failed job until it is purged. This partial index keeps that look proportional to them.
CREATE INDEX IF NOT EXISTS dead_letters_unrecorded_idx
    ON pgmq_broker.dead_letters (queue_name, dead_at)
    WHERE reason <> 'failed';
