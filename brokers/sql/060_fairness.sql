-- Fairness keys: fetches rotate across the keys (tenants) that have visible messages, instead of taking the queue's
-- oldest messages, so one tenant's backlog cannot hold every worker while other tenants wait.
--
-- Storage. PGMQ's queue table stays the storage. A queue put in fairness mode (pgmq_broker.enable_fairness) gets a
-- stored generated column, fairness_key, computed on insert from the message itself:
--     coalesce(message #>> '{options,fairness_key}', message #>> <the queue's key path>, '')
-- so a Dramatiq envelope carries its key as a message option (retries and delays keep it, since Dramatiq copies the
-- options), and plain JSON written by SQL producers (pgmq.send, functions of other services) is keyed by a field
-- declared once with the queue (for example the top-level 'grant_id'), with no change to those producers. Messages
-- without a key share the key '' (one group of their own). An index on (fairness_key, vt, msg_id) finds a key's next
-- visible message in O(log n).
--
-- Rotation. pgmq_broker.fair_keys holds one row per key that has messages, with due_at: when the key may next be
-- served. A fetch takes the keys whose due_at has passed, least recently served first (an index on
-- (queue_name, due_at)), locks them SKIP LOCKED (two fetchers never serve one key at once, so per-key caps hold
-- across processes and machines), takes each key's oldest visible messages and moves the key to the back of the line
-- (due_at = now). A key that turns out to have nothing visible is deleted when it has no message at all, and
-- otherwise sleeps until its next message is due (at most RECHECK, so released leases are seen soon). Sleeping keys
-- sit beyond now in the index and cost nothing. The cost of a fetch therefore depends on how many messages it
-- returns, never on the backlog or on the number of idle keys.
--
-- Keys and producers. A statement-level trigger adds the keys of inserted messages to fair_keys and wakes sleeping
-- keys whose new messages are visible sooner. It takes a KEY SHARE lock on each key row until the producer commits;
-- a fetch deletes or puts to sleep only keys it can lock FOR UPDATE SKIP LOCKED, which conflicts with that lock. So a
-- key whose message is still being committed is never lost: either the fetch sees the message, or it leaves the key
-- alone, or the producer's trigger runs after the fetch committed and re-creates or wakes the key.
--
-- Limits, optional and per key across every process: max_in_flight (messages leased and not yet settled) and
-- rate_per_s with burst (a GCRA bucket per key: tat is the theoretical arrival time of the key's next message).

create table if not exists pgmq_broker.fair_queues (
    queue_name    text primary key,
    key_path      text[],
    max_in_flight integer check (max_in_flight > 0),
    rate_per_s    double precision check (rate_per_s > 0),
    burst         integer not null default 1 check (burst > 0)
);
comment on table pgmq_broker.fair_queues is
    'Queues in fairness mode: where plain JSON messages keep their key, and the optional per-key limits.';

create table if not exists pgmq_broker.fair_keys (
    queue_name text not null,
    key        text not null,
    due_at     timestamptz not null,
    tat        timestamptz,
    primary key (queue_name, key)
);
comment on table pgmq_broker.fair_keys is
    'One row per fairness key with messages: fetches serve the keys whose due_at has passed, oldest due_at first.';
create index if not exists fair_keys_due_idx on pgmq_broker.fair_keys (queue_name, due_at);

-- The longest a key with messages but none visible sleeps before a fetch looks at it again: a lease released
-- without an insert (a requeue at shutdown) wakes nothing, so this bounds how long its message can wait.
create or replace function pgmq_broker.fair_recheck() returns interval
language sql immutable as $$ select interval '1 second' $$;

-- Keep fair_keys in step with the messages inserted by one statement (see "Keys and producers" above).
-- SECURITY DEFINER: every role allowed to send to the queue may maintain its keys, without rights on fair_keys.
create or replace function pgmq_broker.fair_keys_on_insert() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_queue text := substr(TG_TABLE_NAME, 3);
begin
    -- Lock the existing key rows first: from here until commit no fetch can delete them or put them to sleep.
    perform 1
    from pgmq_broker.fair_keys k
    where k.queue_name = v_queue and k.key in (select distinct n.fairness_key from new_rows n)
    order by k.key
    for key share of k;
    insert into pgmq_broker.fair_keys as k (queue_name, key, due_at)
    select v_queue, n.fairness_key, min(n.vt) from new_rows n group by n.fairness_key order by n.fairness_key
    on conflict (queue_name, key) do nothing;
    update pgmq_broker.fair_keys k
    set due_at = n.due_at
    from (select n.fairness_key, min(n.vt) as due_at from new_rows n group by n.fairness_key) n
    where k.queue_name = v_queue and k.key = n.fairness_key and k.due_at > n.due_at;
    return null;
end;
$$;

-- The fetch of one queue in fairness mode, created by enable_fairness as pgmq_broker.fair_fetch_<queue>: static SQL
-- on that queue's table, so each session plans it once (a generic function would re-plan its dynamic SQL on every
-- call). Called through pgmq_broker.fair_fetch; see there.
create or replace function pgmq_broker.fair_create_fetch(p_queue text) returns void
language plpgsql volatile as $create$
declare
    v_function text;
    v_grantee text;
begin
    execute format($template$
create or replace function pgmq_broker.%2$I(
    p_ack_ids bigint[], p_ack_tokens timestamptz[], p_archive boolean, p_qty integer, p_vt_ms integer,
    p_async_commit boolean
) returns table (
    msg_id bigint, read_ct integer, enqueued_at timestamptz, last_read_at timestamptz, message jsonb, stale boolean,
    fairness_key text
)
language plpgsql volatile
-- Its statements take arrays of keys: custom plans would be re-planned on every call, for the same plan.
set plan_cache_mode = force_generic_plan
as $fetch$
#variable_conflict use_column
declare
    v_conf pgmq_broker.fair_queues;
    v_now timestamptz := clock_timestamp();
    v_interval_ms double precision;
    v_tolerance_ms double precision;
    v_keys text[];
    v_tats timestamptz[];
    v_rooms integer[];
    v_tried text[] := '{}';
    v_served text[] := '{}';
    v_pass_served text[];
    v_share integer;
    v_want integer;
    v_key text;
    v_next timestamptz;
    i integer;
begin
    -- The acknowledged deliveries still held are settled as pgmq_broker.fetch settles them (fenced by the lease);
    -- the others come back as stale rows. Deleting is static SQL here, planned once per session.
    if p_async_commit then
        perform set_config('synchronous_commit', 'off', true);
    end if;
    if p_archive then
        return query select f.*, null::text from pgmq_broker.fetch(
            %3$L, p_ack_ids, p_ack_tokens, p_archive, 0, p_vt_ms, p_async_commit
        ) f;
    elsif cardinality(p_ack_ids) > 0 then
        return query
            with settled as (
                delete from pgmq.%1$I m using unnest(p_ack_ids, p_ack_tokens) as a(msg_id, token)
                where m.msg_id = a.msg_id and m.last_read_at = a.token
                returning m.msg_id
            )
            select a.msg_id, null::integer, null::timestamptz, null::timestamptz, null::jsonb, true, null::text
            from unnest(p_ack_ids) as a(msg_id)
            where not exists (select from settled where settled.msg_id = a.msg_id);
    end if;
    if p_qty <= 0 then
        return;
    end if;
    select * into v_conf from pgmq_broker.fair_queues f where f.queue_name = %3$L;
    if v_conf.rate_per_s is not null then
        v_interval_ms := 1000.0 / v_conf.rate_per_s;
        v_tolerance_ms := (v_conf.burst - 1) * v_interval_ms;
    end if;
    loop
        v_want := p_qty - cardinality(v_served);
        exit when v_want <= 0 or cardinality(v_tried) >= pgmq_broker.fair_max_keys_per_read(p_qty);
        -- 1. Whose turn it is. SKIP LOCKED: a key another fetch is serving waits for its next turn. Without a
        -- rate, the keys go to the back of the line at once (step 4's move, in the same statement); step 5 puts
        -- those that serve nothing where they belong.
        if v_interval_ms is null then
            with s as (
                select k.key, k.due_at, k.tat from pgmq_broker.fair_keys k
                where k.queue_name = %3$L and k.due_at <= v_now and k.key <> all(v_tried)
                order by k.due_at
                limit v_want
                for no key update skip locked
            ), moved as (
                update pgmq_broker.fair_keys k set due_at = clock_timestamp()
                from s where k.queue_name = %3$L and k.key = s.key
                returning s.key, s.due_at, s.tat
            )
            select array_agg(m.key order by m.due_at, m.key), array_agg(m.tat order by m.due_at, m.key)
            into v_keys, v_tats
            from moved m;
        else
            select array_agg(s.key order by s.due_at, s.key), array_agg(s.tat order by s.due_at, s.key)
            into v_keys, v_tats
            from (
                select k.key, k.due_at, k.tat from pgmq_broker.fair_keys k
                where k.queue_name = %3$L and k.due_at <= v_now and k.key <> all(v_tried)
                order by k.due_at
                limit v_want
                for no key update skip locked
            ) s;
        end if;
        exit when v_keys is null;
        v_tried := v_tried || v_keys;
        -- 2. Each key's room: its share of the batch, within its rate (the tokens of its GCRA bucket).
        v_share := ceil(v_want::numeric / cardinality(v_keys));
        v_rooms := array_fill(v_share, array[cardinality(v_keys)]);
        if v_interval_ms is not null then
            for i in 1 .. cardinality(v_keys) loop
                v_rooms[i] := least(v_share, greatest(0, floor(
                    (v_tolerance_ms - extract(epoch from greatest(coalesce(v_tats[i], v_now), v_now) - v_now) * 1000)
                    / v_interval_ms
                )::integer + 1));
            end loop;
        end if;
        -- 3. Lease. A new statement, so its snapshot includes every lease committed before the key locks were
        -- granted: the in-flight count below is exact for the keys this fetch holds.
        v_pass_served := '{}';
        -- Leasing counts the delivery, as pgmq_broker.fetch does.
        for msg_id, read_ct, enqueued_at, last_read_at, message, fairness_key in
            with keys as (
                select u.key, u.room, u.ord from unnest(v_keys, v_rooms) with ordinality as u(key, room, ord)
            ),
            rooms as (
                select keys.key, keys.ord,
                       case when v_conf.max_in_flight is null then keys.room
                            else least(keys.room, v_conf.max_in_flight - (
                                select count(*) from (
                                    select from pgmq.%1$I b
                                    where b.fairness_key = keys.key and b.last_read_at is not null
                                      and b.vt > clock_timestamp()
                                    limit v_conf.max_in_flight
                                ) c
                            )::integer)
                       end as room
                from keys
            ),
            picked as (
                select m.msg_id, m.vt, rooms.key, rooms.ord
                from rooms
                cross join lateral (
                    select q.msg_id, q.vt from pgmq.%1$I q
                    where q.fairness_key = rooms.key and q.vt <= clock_timestamp()
                    order by q.vt, q.msg_id
                    limit greatest(rooms.room, 0)
                    for update skip locked
                ) m
            ),
            chosen as (
                select p.msg_id from (
                    select p.msg_id, p.ord, row_number() over (partition by p.key order by p.vt, p.msg_id) as rn
                    from picked p
                ) p
                order by p.rn, p.ord
                limit v_want
            )
            update pgmq.%1$I m
            set last_read_at = clock_timestamp(),
                vt = clock_timestamp() + p_vt_ms * interval '1 millisecond',
                read_ct = m.read_ct + 1
            from chosen
            where m.msg_id = chosen.msg_id
            returning m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.message, m.fairness_key
        loop
            stale := false;
            v_pass_served := v_pass_served || fairness_key;
            return next;
        end loop;
        v_served := v_served || v_pass_served;
        -- 4. Served keys of a rate-limited queue go to the back of the line until their next token.
        if v_interval_ms is not null then
            for v_key, i in select u.key, count(*) from unnest(v_pass_served) as u(key) group by u.key loop
                update pgmq_broker.fair_keys k
                set tat = greatest(coalesce(k.tat, v_now), v_now) + i * v_interval_ms * interval '1 millisecond',
                    due_at = greatest(clock_timestamp(), greatest(coalesce(k.tat, v_now), v_now)
                                      + (i * v_interval_ms - v_tolerance_ms) * interval '1 millisecond')
                where k.queue_name = %3$L and k.key = v_key;
            end loop;
        end if;
        -- 5. Keys that served nothing: capped or out of tokens (their turn passes), or with nothing visible
        -- (deleted when empty, else asleep until their next message is due). Only keys that no producer is
        -- writing to right now are touched (FOR UPDATE conflicts with the producers' KEY SHARE).
        foreach v_key in array v_keys loop
            continue when v_key = any(v_pass_served);
            perform 1 from pgmq_broker.fair_keys k where k.queue_name = %3$L and k.key = v_key
            for update skip locked;
            continue when not found;
            select min(q.vt) into v_next from pgmq.%1$I q where q.fairness_key = v_key;
            if v_next is null then
                delete from pgmq_broker.fair_keys k where k.queue_name = %3$L and k.key = v_key;
            elsif v_next <= clock_timestamp() then
                -- Visible but not taken: the cap, the rate, or another fetch holds the message. Next turn.
                update pgmq_broker.fair_keys k
                set due_at = greatest(clock_timestamp(), coalesce(k.tat, v_now)
                                      - coalesce(v_tolerance_ms, 0) * interval '1 millisecond')
                where k.queue_name = %3$L and k.key = v_key;
            else
                update pgmq_broker.fair_keys k
                set due_at = least(v_next, clock_timestamp() + pgmq_broker.fair_recheck())
                where k.queue_name = %3$L and k.key = v_key;
            end if;
        end loop;
    end loop;
end;
$fetch$
$template$, pgmq.format_table_name(p_queue, 'q'), pgmq.format_table_name(p_queue, 'fair_fetch'), p_queue);
    -- Whoever may call pgmq_broker.fetch may call the queue's own fetch: the same EXECUTE grants, and none for
    -- PUBLIC where fetch has none (a deployment that grants the broker's functions one by one to its workers' role
    -- then needs nothing more when a queue is put in fairness mode later).
    v_function := format(
        'pgmq_broker.%I(bigint[], timestamptz[], boolean, integer, integer, boolean)',
        pgmq.format_table_name(p_queue, 'fair_fetch')
    );
    for v_grantee in
        select a.grantee::regrole::text
        from pg_proc p, aclexplode(p.proacl) a
        where p.oid = 'pgmq_broker.fetch(text, bigint[], timestamptz[], boolean, integer, integer, boolean)'::regprocedure
          and a.privilege_type = 'EXECUTE' and a.grantee <> 0 and a.grantee <> p.proowner
    loop
        execute format('grant execute on function %s to %s', v_function, v_grantee);
    end loop;
    if not has_function_privilege(
        'public', 'pgmq_broker.fetch(text, bigint[], timestamptz[], boolean, integer, integer, boolean)', 'execute'
    ) then
        execute format('revoke execute on function %s from public', v_function);
    end if;
end;
$create$;

-- (Re)create a queue's key column from p_key_path, with its index and trigger, and rebuild its key rows.
create or replace function pgmq_broker.fair_key_column(p_queue text, p_key_path text[]) returns void
language plpgsql volatile as $$
declare
    v_qtable text := pgmq.format_table_name(p_queue, 'q');
begin
    execute format('drop trigger if exists pgmq_broker_fair_keys on pgmq.%I', v_qtable);
    execute format('alter table pgmq.%I drop column if exists fairness_key cascade', v_qtable);
    execute format(
        'alter table pgmq.%I add column fairness_key text not null generated always as'
        ' (coalesce(message #>> ''{options,fairness_key}'', %s, '''')) stored',
        v_qtable, case when cardinality(p_key_path) > 0 then format('message #>> %L::text[]', p_key_path) else 'null' end
    );
    execute format('create index %I on pgmq.%I (fairness_key, vt, msg_id)', v_qtable || '_fair_idx', v_qtable);
    execute format(
        'create trigger pgmq_broker_fair_keys after insert on pgmq.%I referencing new table as new_rows'
        ' for each statement execute function pgmq_broker.fair_keys_on_insert()',
        v_qtable
    );
    perform pgmq_broker.fair_create_fetch(p_queue);
    delete from pgmq_broker.fair_keys k where k.queue_name = p_queue;
    execute format(
        'insert into pgmq_broker.fair_keys (queue_name, key, due_at)'
        ' select $1, fairness_key, min(vt) from pgmq.%I group by fairness_key',
        v_qtable
    ) using p_queue;
end;
$$;

-- Put a queue in fairness mode (creating it when missing), or change its key path and limits. Idempotent; call it
-- from a migration (it alters the queue's table). Existing messages get their key from the same expression.
--   p_key_path: where a plain JSON message keeps its key, e.g. '{grant_id}' (null: only the fairness_key option).
--   p_max_in_flight: per key, messages leased at once (null: no cap).
--   p_rate_per_s, p_burst: per key, messages served per second, and how many a rested key may take at once.
create or replace function pgmq_broker.enable_fairness(
    p_queue text, p_key_path text[] default null, p_max_in_flight integer default null,
    p_rate_per_s double precision default null, p_burst integer default 1
) returns void
language plpgsql volatile as $$
declare
    v_qtable text := pgmq.format_table_name(p_queue, 'q');
    v_old text[];
    v_had boolean;
begin
    perform pgmq.create(p_queue) where not exists (select from pgmq.meta where queue_name = p_queue);
    select f.key_path into v_old from pgmq_broker.fair_queues f where f.queue_name = p_queue;
    v_had := found and exists (
        select from pg_attribute
        where attrelid = format('pgmq.%I', v_qtable)::regclass and attname = 'fairness_key' and not attisdropped
    );
    insert into pgmq_broker.fair_queues as f (queue_name, key_path, max_in_flight, rate_per_s, burst)
    values (p_queue, p_key_path, p_max_in_flight, p_rate_per_s, p_burst)
    on conflict (queue_name) do update
    set key_path = excluded.key_path, max_in_flight = excluded.max_in_flight, rate_per_s = excluded.rate_per_s,
        burst = excluded.burst;
    if not v_had or v_old is distinct from p_key_path then
        perform pgmq_broker.fair_key_column(p_queue, p_key_path);
    end if;
    -- Leases per key, for the in-flight cap (leased: last_read_at set; the lease lapses at vt). Only with a cap:
    -- otherwise it would cost every lease an index entry for nothing.
    if p_max_in_flight is null then
        execute format('drop index if exists pgmq.%I', v_qtable || '_fair_leased_idx');
    else
        execute format(
            'create index if not exists %I on pgmq.%I (fairness_key, vt) where last_read_at is not null',
            v_qtable || '_fair_leased_idx', v_qtable
        );
    end if;
end;
$$;

-- Leave fairness mode: fetches take the oldest messages again. Idempotent.
create or replace function pgmq_broker.disable_fairness(p_queue text) returns void
language plpgsql volatile as $$
declare
    v_qtable text := pgmq.format_table_name(p_queue, 'q');
begin
    delete from pgmq_broker.fair_queues where queue_name = p_queue;
    delete from pgmq_broker.fair_keys where queue_name = p_queue;
    execute format(
        'drop function if exists pgmq_broker.%I(bigint[], timestamptz[], boolean, integer, integer, boolean)',
        pgmq.format_table_name(p_queue, 'fair_fetch')
    );
    if to_regclass(format('pgmq.%I', v_qtable)) is not null then
        execute format('drop trigger if exists pgmq_broker_fair_keys on pgmq.%I', v_qtable);
        execute format('alter table pgmq.%I drop column if exists fairness_key', v_qtable);
    end if;
end;
$$;

-- Whether a queue is in fairness mode (what a consumer asks once, to choose its fetch).
create or replace function pgmq_broker.is_fair(p_queue text) returns boolean
language sql stable as $$
    select exists (select from pgmq_broker.fair_queues where queue_name = p_queue);
$$;

-- The most keys one fetch of p_qty messages looks at: bounds its cost when many due keys have nothing to give.
create or replace function pgmq_broker.fair_max_keys_per_read(p_qty integer) returns integer
language sql immutable as $$ select greatest(4 * p_qty, 32) $$;

-- pgmq_broker.fetch for a queue in fairness mode, with the same arguments: delete (or archive) the acknowledged
-- deliveries still held, then lease up to p_qty visible messages for p_vt_ms milliseconds, rotating across keys: up to
-- p_qty keys whose turn it is (least recently served first), an equal share of the batch from each (so a lone key
-- still fills the batch), oldest visible first within a key, within each key's in-flight cap and rate. Keys that turn
-- out to have nothing to give are put aside and the next keys tried, so a fetch comes back empty only when no key can
-- give anything; it looks at no more than fair_max_keys_per_read(p_qty) keys. Returns pgmq_broker.fetch's columns
-- plus the key. Call it in its own transaction: the key locks, held until commit, keep two fetchers off one key.
create or replace function pgmq_broker.fair_fetch(
    p_queue text, p_ack_ids bigint[], p_ack_tokens timestamptz[], p_archive boolean, p_qty integer, p_vt_ms integer,
    p_async_commit boolean
) returns table (
    msg_id bigint, read_ct integer, enqueued_at timestamptz, last_read_at timestamptz, message jsonb, stale boolean,
    fairness_key text
)
language plpgsql volatile as $$
begin
    -- A queue not in fairness mode has no fair_fetch_<queue>: the call fails with undefined_function.
    return query execute format(
        'select * from pgmq_broker.%I($1, $2, $3, $4, $5, $6)', pgmq.format_table_name(p_queue, 'fair_fetch')
    ) using p_ack_ids, p_ack_tokens, p_archive, p_qty, p_vt_ms, p_async_commit;
end;
$$;

-- Lease up to p_qty messages of a queue in fairness mode, without acknowledging any (for SQL consumers).
create or replace function pgmq_broker.fair_read(p_queue text, p_qty integer, p_vt_ms integer)
returns table (
    msg_id bigint, read_ct integer, enqueued_at timestamptz, last_read_at timestamptz, message jsonb,
    fairness_key text
)
language sql volatile as $$
    select f.msg_id, f.read_ct, f.enqueued_at, f.last_read_at, f.message, f.fairness_key
    from pgmq_broker.fair_fetch(p_queue, '{}', '{}', false, p_qty, p_vt_ms, false) f;
$$;
