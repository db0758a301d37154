-- The PGMQ broker's hot path and its dead-letter store.
--
-- Every multi-step operation is one function, so it costs one round trip and runs in one transaction:
-- fetch (ack a batch + read a batch), resend (a retry replaces its original), dead_letter (record + delete).
-- Queue tables are reached through pgmq.format_table_name, exactly as PGMQ's own functions do.

create schema if not exists pgmq_broker;

-- Messages the broker gave up on. Never consumed: list, count, purge or replay them through PGMQBroker.
create table if not exists pgmq_broker.dead_letters (
    id bigint generated always as identity primary key,
    queue_name text not null,
    msg_id bigint,
    message_id text,
    actor_name text,
    message jsonb,
    reason text not null,
    error_type text,
    error_message text,
    traceback text,
    attempts integer not null default 1,
    enqueued_at timestamptz,
    dead_at timestamptz not null default now()
);
comment on table pgmq_broker.dead_letters is
    'Messages the Dramatiq PGMQ broker dead-lettered: the last envelope plus why. Never consumed.';
comment on column pgmq_broker.dead_letters.reason is
    'failed (the actor raised), undecodable, no_handler, max_deliveries, unknown_actor';

create index if not exists dead_letters_queue_name_idx on pgmq_broker.dead_letters (queue_name, id);
create index if not exists dead_letters_dead_at_idx on pgmq_broker.dead_letters (dead_at);

-- Delete (or archive) the acknowledged ids, then hide up to p_qty visible messages for p_vt_ms milliseconds
-- and return them. last_read_at doubles as the lease token: it is unique per delivery.
-- The consumer's bookkeeping (leases, acks, extensions, releases) may commit asynchronously: after a server
-- crash the last few hundred milliseconds of it can be lost, which only makes those messages run again
-- (at-least-once, as any lapse would). Enqueues and dead letters always commit durably.
-- set_config(..., true) lasts until the end of the calling transaction, so these functions must be called
-- in their own (autocommit) transaction when p_async_commit is true, as the broker does.
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

-- Milliseconds until the next message of the queue becomes visible (null when the queue is empty).
-- An idle consumer sleeps at most this long, which is what makes delayed messages punctual:
-- PGMQ's insert notification fires when a message is written, not when it becomes due.
create or replace function pgmq_broker.next_visible_in_ms(p_queue text) returns double precision
language plpgsql stable as $$
declare
    v_ms double precision;
begin
    execute format(
        'select extract(epoch from (min(vt) - clock_timestamp())) * 1000 from pgmq.%I',
        pgmq.format_table_name(p_queue, 'q')
    ) into v_ms;
    return v_ms;
end;
$$;

-- Push the visibility of the listed deliveries p_vt_ms into the future. A delivery is matched on
-- (msg_id, last_read_at), so a lease that lapsed and was re-read by another worker is never extended.
-- Returns the ids that were extended; the caller treats the others as lost.
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

-- Make the listed deliveries visible again after p_delay_ms. With p_uncount the delivery is not counted
-- towards max_deliveries (a message requeued at shutdown never ran). Returns how many were released.
-- Releasing also clears last_read_at, the lease token, so that a heartbeat already in flight for this
-- delivery cannot hide the message again.
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

-- Send a message visible after p_delay_ms; the visibility time is computed here, from the server's clock.
create or replace function pgmq_broker.send(p_queue text, p_message jsonb, p_delay_ms integer)
returns bigint
language sql volatile as $$
    select pgmq.send(p_queue, p_message, null::jsonb, clock_timestamp() + p_delay_ms * interval '1 millisecond');
$$;

-- Send many messages in one statement (fan-out).
create or replace function pgmq_broker.send_batch(p_queue text, p_messages jsonb[], p_delay_ms integer)
returns setof bigint
language sql volatile as $$
    select pgmq.send_batch(p_queue, p_messages, null::jsonb[], clock_timestamp() + p_delay_ms * interval '1 millisecond');
$$;

-- A retry: send the updated message and delete the delivery it replaces, atomically. When the original is
-- already gone (its lease lapsed and another worker settled it), nothing is sent, so nothing runs twice.
-- Returns the new msg_id, or null when nothing was sent.
create or replace function pgmq_broker.resend(
    p_old_queue text, p_old_msg_id bigint, p_queue text, p_message jsonb, p_delay_ms integer
) returns bigint
language plpgsql volatile as $$
declare
    v_deleted bigint;
begin
    execute format('delete from pgmq.%I where msg_id = $1 returning msg_id', pgmq.format_table_name(p_old_queue, 'q'))
        into v_deleted using p_old_msg_id;
    if v_deleted is null then
        return null;
    end if;
    return pgmq_broker.send(p_queue, p_message, p_delay_ms);
end;
$$;

-- Move one delivery to the dead letters: record it and delete it from its queue in one transaction.
-- Returns false (and records nothing) when the message is already gone.
create or replace function pgmq_broker.dead_letter(
    p_queue text, p_msg_id bigint, p_message jsonb, p_message_id text, p_actor_name text, p_reason text,
    p_error_type text, p_error_message text, p_traceback text, p_attempts integer
) returns boolean
language plpgsql volatile as $$
declare
    v_enqueued_at timestamptz;
    v_body jsonb;
begin
    execute format(
        'delete from pgmq.%I where msg_id = $1 returning enqueued_at, message',
        pgmq.format_table_name(p_queue, 'q')
    ) into v_enqueued_at, v_body using p_msg_id;
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

-- Send dead letters back to their queues (with a fresh retry budget) and remove them, in one transaction.
-- p_queue null means every queue; p_ids null means every matching dead letter. Returns how many were replayed.
create or replace function pgmq_broker.replay_dead_letters(p_queue text, p_ids bigint[], p_limit integer)
returns integer
language plpgsql volatile as $$
declare
    v_row record;
    v_count integer := 0;
    v_message jsonb;
begin
    for v_row in
        delete from pgmq_broker.dead_letters d
        where d.id in (
            select id from pgmq_broker.dead_letters
            where (p_queue is null or queue_name = p_queue) and (p_ids is null or id = any(p_ids))
            order by id
            limit p_limit
            for update skip locked
        )
        returning d.queue_name, d.message
    loop
        v_message := v_row.message;
        if jsonb_typeof(v_message -> 'options') = 'object' then
            v_message := jsonb_set(
                v_message, '{options}',
                (v_message -> 'options') - 'retries' - 'traceback' - 'requeue_timestamp'
            );
        end if;
        perform pgmq_broker.send(v_row.queue_name, v_message, 0);
        v_count := v_count + 1;
    end loop;
    return v_count;
end;
$$;

-- Build a complete Dramatiq message envelope, for SQL producers:
--   select pgmq.send('emails', pgmq_broker.dramatiq_message('emails', 'send_email', '["a@b.c"]'));
-- The message_id is a fresh UUID and message_timestamp the server's clock in milliseconds.
create or replace function pgmq_broker.dramatiq_message(
    p_queue text, p_actor text, p_args jsonb default '[]', p_kwargs jsonb default '{}', p_options jsonb default '{}'
) returns jsonb
language sql volatile as $$
    select jsonb_build_object(
        'queue_name', p_queue,
        'actor_name', p_actor,
        'args', coalesce(p_args, '[]'::jsonb),
        'kwargs', coalesce(p_kwargs, '{}'::jsonb),
        'options', coalesce(p_options, '{}'::jsonb),
        'message_id', gen_random_uuid()::text,
        'message_timestamp', (extract(epoch from clock_timestamp()) * 1000)::bigint
    );
$$;

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

-- Delete archived (acknowledged) messages older than p_older_than_s seconds; returns how many.
create or replace function pgmq_broker.purge_archive(p_queue text, p_older_than_s integer) returns bigint
language plpgsql volatile as $$
declare
    v_count bigint;
begin
    execute format(
        'delete from pgmq.%I where archived_at < clock_timestamp() - $1 * interval ''1 second''',
        pgmq.format_table_name(p_queue, 'a')
    ) using p_older_than_s;
    get diagnostics v_count = row_count;
    return v_count;
end;
$$;

-- Depth, delayed, in-flight, oldest age and dead letters of one queue, for PGMQBroker.metrics().
create or replace function pgmq_broker.queue_metrics(p_queue text)
returns table (queued bigint, delayed bigint, in_flight bigint, oldest_age_ms double precision, dead_lettered bigint)
language plpgsql stable as $$
begin
    return query execute format(
        $q$
        select count(*) filter (where vt <= clock_timestamp()),
               count(*) filter (where vt > clock_timestamp() and last_read_at is null),
               count(*) filter (where vt > clock_timestamp() and last_read_at is not null),
               coalesce(extract(epoch from clock_timestamp() - min(enqueued_at)
                   filter (where vt <= clock_timestamp())) * 1000, 0)::double precision,
               (select count(*) from pgmq_broker.dead_letters where queue_name = $1)
        from pgmq.%I
        $q$, pgmq.format_table_name(p_queue, 'q'))
    using p_queue;
end;
$$;

-- Drop every message of a queue with DELETE rather than PGMQ's purge_queue (TRUNCATE): it needs only the DML
-- privileges a least-privilege worker role has, and does not take an ACCESS EXCLUSIVE lock that would wait
-- for, and then block, every consumer and producer of the queue. Returns how many messages were dropped.
create or replace function pgmq_broker.flush(p_queue text) returns bigint
language plpgsql volatile as $$
declare
    v_count bigint;
begin
    execute format('delete from pgmq.%I', pgmq.format_table_name(p_queue, 'q'));
    get diagnostics v_count = row_count;
    return v_count;
end;
$$;
