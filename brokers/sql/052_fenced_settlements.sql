-- Settlements fenced by the lease.
--
-- A delivery is (msg_id, last_read_at): the token its fetch wrote. Extend and release already matched both; here
-- ack (inside fetch), resend and dead_letter do too, so a worker whose lease lapsed (frozen, its heartbeat failed)
-- and whose message another worker took since can no longer delete, retry or dead-letter that worker's copy: its
-- settlement matches no row and changes nothing.
--
-- read_ct counts leases, as pgmq.read does. A worker leases only as many messages as it has idle threads (see
-- brokers/consumer.py), so a leased message starts running at once: a job that kills its process cannot burn the
-- count of messages buffered behind it, since none are.

-- Delete (or archive) the acknowledged deliveries still held, then hide up to p_qty visible messages for p_vt_ms
-- milliseconds and return them (stale = false). An acknowledged delivery no longer held is left alone and
-- returned as a row with stale = true and only its msg_id. Leasing adds one to read_ct.
create or replace function pgmq_broker.fetch(
    p_queue text, p_ack_ids bigint[], p_ack_tokens timestamptz[], p_archive boolean, p_qty integer, p_vt_ms integer,
    p_async_commit boolean
) returns table (
    msg_id bigint, read_ct integer, enqueued_at timestamptz, last_read_at timestamptz, message jsonb, stale boolean
)
language plpgsql volatile as $$
declare
    v_qtable text := pgmq.format_table_name(p_queue, 'q');
    v_settled bigint[];
begin
    if p_async_commit then
        perform set_config('synchronous_commit', 'off', true);
    end if;
    if cardinality(p_ack_ids) > 0 then
        if p_archive then
            execute format(
                $q$
                select array(
                    select m.msg_id from pgmq.%I m join unnest($1, $2) as a(msg_id, token)
                    on m.msg_id = a.msg_id and m.last_read_at = a.token
                    for update of m
                )
                $q$, v_qtable)
            into v_settled using p_ack_ids, p_ack_tokens;
            perform pgmq.archive(p_queue, v_settled);
        else
            execute format(
                $q$
                with settled as (
                    delete from pgmq.%I m using unnest($1, $2) as a(msg_id, token)
                    where m.msg_id = a.msg_id and m.last_read_at = a.token
                    returning m.msg_id
                )
                select array(select settled.msg_id from settled)
                $q$, v_qtable)
            into v_settled using p_ack_ids, p_ack_tokens;
        end if;
        return query
            select a.msg_id, null::integer, null::timestamptz, null::timestamptz, null::jsonb, true
            from unnest(p_ack_ids) as a(msg_id)
            where a.msg_id <> all(v_settled);
    end if;
    if p_qty <= 0 then
        return;
    end if;
    return query execute format(
        $q$
        with cte as (
            select q.msg_id from pgmq.%1$I q
            where q.vt <= clock_timestamp()
            order by q.msg_id
            limit $1
            for update skip locked
        )
        update pgmq.%1$I m
        set last_read_at = clock_timestamp(),
            vt = clock_timestamp() + $2 * interval '1 millisecond',
            read_ct = m.read_ct + 1
        from cte
        where m.msg_id = cte.msg_id
        returning m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.message, false
        $q$, v_qtable)
    using p_qty, p_vt_ms;
end;
$$;

-- A retry: send the updated message and delete the delivery it replaces, atomically, if that delivery still holds
-- its lease. Otherwise nothing is sent, so a stale retry never runs the job again. Returns the new msg_id, or null.
create or replace function pgmq_broker.resend(
    p_old_queue text, p_old_msg_id bigint, p_old_token timestamptz, p_queue text, p_message jsonb, p_delay_ms integer
) returns bigint
language plpgsql volatile as $$
declare
    v_deleted bigint;
begin
    execute format(
        'delete from pgmq.%I where msg_id = $1 and last_read_at = $2 returning msg_id',
        pgmq.format_table_name(p_old_queue, 'q')
    ) into v_deleted using p_old_msg_id, p_old_token;
    if v_deleted is null then
        return null;
    end if;
    return pgmq_broker.send(p_queue, p_message, p_delay_ms);
end;
$$;

-- Move one delivery to the dead letters, if it still holds its lease: record it and delete it from its queue in one
-- transaction. Returns false (and records nothing) when the delivery is no longer held.
create or replace function pgmq_broker.dead_letter(
    p_queue text, p_msg_id bigint, p_token timestamptz, p_message jsonb, p_message_id text, p_actor_name text,
    p_reason text, p_error_type text, p_error_message text, p_traceback text, p_attempts integer
) returns boolean
language plpgsql volatile as $$
declare
    v_enqueued_at timestamptz;
    v_body jsonb;
begin
    execute format(
        'delete from pgmq.%I where msg_id = $1 and last_read_at = $2 returning enqueued_at, message',
        pgmq.format_table_name(p_queue, 'q')
    ) into v_enqueued_at, v_body using p_msg_id, p_token;
    if v_enqueued_at is null then
        return false;
    end if;
    insert into pgmq_broker.dead_letters (
        queue_name, msg_id, message_id, actor_name, message, reason, error_type, error_message, traceback,
        attempts, enqueued_at
    ) values (
        p_queue, p_msg_id, p_message_id, p_actor_name, coalesce(p_message, v_body), p_reason, p_error_type,
        p_error_message, p_traceback, p_attempts, v_enqueued_at
    );
    return true;
end;
$$;
