-- Insert notifications without PGMQ's throttle row.
--
-- PGMQ's own trigger (pgmq.enable_notify_insert) is FOR EACH ROW and updates one shared throttle row per
-- notification: a batch of 500 messages runs it 500 times, and concurrent producers queue on that row.
-- This trigger runs once per INSERT statement and only calls pg_notify on PGMQ's channel
-- ('pgmq.q_<queue>.INSERT'). Postgres folds identical notifications of one transaction into one and delivers
-- them at commit, so a transaction that enqueues 10,000 messages wakes listeners once, after it commits.

create or replace function pgmq_broker.notify_insert() returns trigger
language plpgsql as $$
begin
    perform pg_notify('pgmq.' || TG_TABLE_NAME || '.' || TG_OP, null);
    return null;
end;
$$;

-- Create the queue when missing and wake idle workers on its inserts. Call it from a migration, once per
-- queue (workers never do it). Idempotent. Replaces PGMQ's row trigger if pgmq.enable_notify_insert set one.
drop function if exists pgmq_broker.enable_notify(text, integer);
create or replace function pgmq_broker.enable_notify(p_queue text) returns void
language plpgsql volatile as $$
declare
    v_qtable text := pgmq.format_table_name(p_queue, 'q');
begin
    perform pgmq.create(p_queue);
    perform pgmq.disable_notify_insert(p_queue);
    execute format('drop trigger if exists pgmq_broker_notify_insert on pgmq.%I', v_qtable);
    execute format(
        'create trigger pgmq_broker_notify_insert after insert on pgmq.%I
         for each statement execute function pgmq_broker.notify_insert()',
        v_qtable
    );
end;
$$;

-- Stop waking workers on the queue's inserts (they still poll).
create or replace function pgmq_broker.disable_notify(p_queue text) returns void
language plpgsql volatile as $$
begin
    execute format('drop trigger if exists pgmq_broker_notify_insert on pgmq.%I', pgmq.format_table_name(p_queue, 'q'));
    perform pgmq.disable_notify_insert(p_queue);
end;
$$;

-- The consumer's bookkeeping (leases, acks, extensions, releases) may commit asynchronously: after a server
-- crash the last few hundred milliseconds of it can be lost, which only makes those messages run again
-- (at-least-once, as any lapse would). Enqueues and dead letters always commit durably.
-- set_config(..., true) lasts until the end of the calling transaction, so these functions must be called
-- in their own (autocommit) transaction when p_async_commit is true, as the broker does.
drop function if exists pgmq_broker.fetch(text, bigint[], boolean, integer, integer);
create or replace function pgmq_broker.fetch(
    p_queue text, p_ack_ids bigint[], p_archive boolean, p_qty integer, p_vt_ms integer, p_async_commit boolean
) returns table (msg_id bigint, read_ct integer, enqueued_at timestamptz, last_read_at timestamptz, message jsonb)
language plpgsql volatile as $$
declare
    v_qtable text := pgmq.format_table_name(p_queue, 'q');
begin
    if p_async_commit then
        perform set_config('synchronous_commit', 'off', true);
    end if;
    if cardinality(p_ack_ids) > 0 then
        if p_archive then
            perform pgmq.archive(p_queue, p_ack_ids);
        else
            execute format('delete from pgmq.%I where msg_id = any($1)', v_qtable) using p_ack_ids;
        end if;
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
        returning m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.message
        $q$, v_qtable)
    using p_qty, p_vt_ms;
end;
$$;

drop function if exists pgmq_broker.extend(text, bigint[], timestamptz[], integer);
create or replace function pgmq_broker.extend(
    p_queue text, p_ids bigint[], p_tokens timestamptz[], p_vt_ms integer, p_async_commit boolean
) returns setof bigint
language plpgsql volatile as $$
begin
    if p_async_commit then
        perform set_config('synchronous_commit', 'off', true);
    end if;
    return query execute format(
        $q$
        update pgmq.%I m
        set vt = clock_timestamp() + $3 * interval '1 millisecond'
        from unnest($1, $2) as l(msg_id, token)
        where m.msg_id = l.msg_id and m.last_read_at = l.token
        returning m.msg_id
        $q$, pgmq.format_table_name(p_queue, 'q'))
    using p_ids, p_tokens, p_vt_ms;
end;
$$;

-- Releasing also clears last_read_at, the lease token, so that a heartbeat already in flight for this
-- delivery cannot hide the message again.
drop function if exists pgmq_broker.release(text, bigint[], timestamptz[], integer, boolean);
create or replace function pgmq_broker.release(
    p_queue text, p_ids bigint[], p_tokens timestamptz[], p_delay_ms integer, p_uncount boolean
) returns integer
language plpgsql volatile as $$
declare
    v_count integer;
begin
    execute format(
        $q$
        update pgmq.%I m
        set vt = clock_timestamp() + $3 * interval '1 millisecond',
            read_ct = case when $4 then greatest(m.read_ct - 1, 0) else m.read_ct end,
            last_read_at = null
        from unnest($1, $2) as l(msg_id, token)
        where m.msg_id = l.msg_id and m.last_read_at = l.token
        $q$, pgmq.format_table_name(p_queue, 'q'))
    using p_ids, p_tokens, p_delay_ms, p_uncount;
    get diagnostics v_count = row_count;
    return v_count;
end;
$$;
