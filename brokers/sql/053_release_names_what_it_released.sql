-- Release returns the ids it released, so that a worker can name each delivery it no longer held (its stale
-- requeue, keep or release is logged with the message id, not just counted).
--
-- Make the deliveries still held (msg_id and token match) visible again after p_delay_ms; with p_uncount their
-- lease is not counted (they did not run, or ran without consequence). A delivery no longer held is left alone and not returned.
create or replace function pgmq_broker.release_held(
    p_queue text, p_ids bigint[], p_tokens timestamptz[], p_delay_ms integer, p_uncount boolean
) returns setof bigint
language plpgsql volatile as $$
begin
    return query execute format(
        $q$
        update pgmq.%I m
        set vt = clock_timestamp() + $3 * interval '1 millisecond',
            read_ct = case when $4 then greatest(m.read_ct - 1, 0) else m.read_ct end,
            last_read_at = null
        from unnest($1, $2) as l(msg_id, token)
        where m.msg_id = l.msg_id and m.last_read_at = l.token
        returning m.msg_id
        $q$, pgmq.format_table_name(p_queue, 'q'))
    using p_ids, p_tokens, p_delay_ms, p_uncount;
end;
$$;

-- The previous release's workers still call release (during a rolling deploy): one update serves both.
create or replace function pgmq_broker.release(
    p_queue text, p_ids bigint[], p_tokens timestamptz[], p_delay_ms integer, p_uncount boolean
) returns integer
language sql volatile as $$
    select count(*)::integer from pgmq_broker.release_held(p_queue, p_ids, p_tokens, p_delay_ms, p_uncount)
$$;
