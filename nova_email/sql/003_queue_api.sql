-- Thin wrappers over pgmq.* with the original service's names. Queue names are checked against pgmq.meta first,
-- so text that is not an existing queue never reaches pgmq's dynamic SQL.

CREATE OR REPLACE FUNCTION flux_pgmq_assert_queue(p_queue_name text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_queue_name IS NULL OR NOT EXISTS (SELECT 1 FROM pgmq.meta m WHERE m.queue_name = p_queue_name) THEN
        RAISE EXCEPTION 'Unknown queue %; expected an existing PGMQ queue (%)', quote_nullable(p_queue_name),
            (SELECT coalesce(string_agg(m.queue_name, ', ' ORDER BY m.queue_name), 'none: run nova-email migrate')
               FROM pgmq.meta m)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END;
$$;
COMMENT ON FUNCTION flux_pgmq_assert_queue(text) IS
    'Raises invalid_parameter_value unless the name is a queue in pgmq.meta. Guard for every flux_pgmq_* wrapper.';

CREATE OR REPLACE FUNCTION flux_pgmq_send(queue_name text, message jsonb, delay_seconds integer DEFAULT 0)
RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM flux_pgmq_assert_queue(queue_name);
    IF message IS NULL OR jsonb_typeof(message) <> 'object' THEN
        RAISE EXCEPTION 'Queue messages must be JSON objects, got %', coalesce(jsonb_typeof(message), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF delay_seconds IS NULL OR delay_seconds < 0 THEN
        RAISE EXCEPTION 'delay_seconds must be >= 0, got %', quote_nullable(delay_seconds)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN (SELECT s FROM pgmq.send(queue_name, message, delay_seconds) AS s);
END;
$$;
COMMENT ON FUNCTION flux_pgmq_send(text, jsonb, integer) IS
    'Sends a JSON object to an existing PGMQ queue, visible after delay_seconds; returns its msg_id.';

CREATE OR REPLACE FUNCTION flux_pgmq_read(queue_name text, visibility_timeout integer, qty integer)
RETURNS TABLE (msg_id bigint, read_ct integer, enqueued_at timestamptz, vt timestamptz, message jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM flux_pgmq_assert_queue(queue_name);
    IF visibility_timeout IS NULL OR visibility_timeout < 0 THEN
        RAISE EXCEPTION 'visibility_timeout must be >= 0 seconds, got %', quote_nullable(visibility_timeout)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF qty IS NULL OR qty < 1 OR qty > 1000 THEN
        RAISE EXCEPTION 'qty must be between 1 and 1000, got %', quote_nullable(qty)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
        SELECT r.msg_id, r.read_ct, r.enqueued_at, r.vt, r.message
          FROM pgmq.read(queue_name, visibility_timeout, qty) AS r;
END;
$$;
COMMENT ON FUNCTION flux_pgmq_read(text, integer, integer) IS
    'Reads up to qty visible messages and hides them for visibility_timeout seconds (read_ct is 1 on first delivery).';

CREATE OR REPLACE FUNCTION flux_pgmq_delete(queue_name text, message_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM flux_pgmq_assert_queue(queue_name);
    RETURN pgmq.delete(queue_name, message_id);
END;
$$;
COMMENT ON FUNCTION flux_pgmq_delete(text, bigint) IS
    'Deletes one message; true when it was still on the queue.';

-- Returns pgmq's own composite: an OUT column named queue_name would clash with the original's argument name.
CREATE OR REPLACE FUNCTION flux_pgmq_metrics(queue_name text) RETURNS pgmq.metrics_result
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM flux_pgmq_assert_queue(queue_name);
    RETURN pgmq.metrics(queue_name);
END;
$$;
COMMENT ON FUNCTION flux_pgmq_metrics(text) IS
    'One row of queue metrics: length, visible length, newest/oldest message age, total messages ever sent.';

CREATE OR REPLACE FUNCTION flux_pgmq_list_queues()
RETURNS TABLE (queue_name text, is_partitioned boolean, is_unlogged boolean, created_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT m.queue_name::text, m.is_partitioned, m.is_unlogged, m.created_at FROM pgmq.meta AS m ORDER BY 1;
$$;
COMMENT ON FUNCTION flux_pgmq_list_queues() IS 'Every PGMQ queue in this database, by name.';
