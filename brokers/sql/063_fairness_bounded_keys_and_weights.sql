-- Fairness keys of any length, and optional weights per key (see 060_fairness.sql for the mechanism).
--
-- Bounded keys. A key is stored in two btree indexes (the queue's (fairness_key, vt, msg_id) and fair_keys' primary
-- key), whose rows may not exceed 2,704 bytes: a longer key made every insert into the queue fail, whoever the
-- producer. pgmq_broker.fair_key_of keeps a key of up to 1,024 bytes as it is and replaces a longer one by its digest
-- 'sha256:<64 hex digits>' (71 bytes, so applying it again changes nothing). It is the one definition: the queues'
-- generated column and set_fairness_weight call it. Existing fair queues get the new column, index and key rows here.
--
-- Weights. A key's weight w (default 1) shapes two things, the same in every process: the order of keys across
-- consecutive fetches (a key keeps its place at the front of the line for w messages served, which fair_keys.served
-- counts, before it goes to the back), and the shares within one fetch's batch (each key it serves gets a room in
-- proportion to its weight). So while both have visible messages, successive fetches serve a key of weight 3 about
-- three times as often as a key of weight 1, whether they take one message each or batches. Fetches that run at the
-- same time are different: a key one fetch is serving is locked, and the others skip it (SKIP LOCKED), so concurrent
-- fetches that each take one message spread over distinct keys. With few keys and many concurrent single-message
-- fetches the shares even out (two such fetchers interleaved served keys of weight 3 and 1 equally).
-- Weights are declared per queue and key in fair_weights (kept while the key has no messages). A key's row takes its
-- weight from there when the row is created and again whenever the key's turn ends (one primary-key lookup per key
-- whose turn ends), so a weight declared while a producer is still creating the key's row applies from the key's next
-- turn; set_fairness_weight also updates an existing row at once. Fetching roles need SELECT on fair_weights: it is
-- granted below to the roles that may update fair_keys.

-- The digest of a long key. The database's encoding never changes, so converting to it is as immutable as the rest.
create or replace function pgmq_broker.fair_key_digest(p_key text) returns text
language sql immutable parallel safe as $$
    select 'sha256:' || encode(sha256(convert_to(p_key, 'UTF8')), 'hex')
$$;

-- Its body calls immutable functions only, so PostgreSQL inlines it into the generated column (no call per row). The
-- body is SQL-standard (parsed here, once): inlining a body kept as a string would parse it again under the role
-- that inserts, which then needed USAGE on this schema to name fair_key_digest.
create or replace function pgmq_broker.fair_key_of(p_key text) returns text
language sql immutable parallel safe
return case when octet_length(p_key) <= 1024 then p_key else pgmq_broker.fair_key_digest(p_key) end;

-- Every insert into a fair queue calls them, under the role that inserts, whoever it is: both are pure functions of
-- their argument, so every role may call them. A deployment that revokes EXECUTE in this schema from PUBLIC after
-- this migration grants them back (as nova_email/sql/096 does).
grant execute on function pgmq_broker.fair_key_of(text), pgmq_broker.fair_key_digest(text) to public;

create table if not exists pgmq_broker.fair_weights (
    queue_name text not null,
    key        text not null,
    weight     integer not null check (weight > 0),
    primary key (queue_name, key)
);
comment on table pgmq_broker.fair_weights is
    'Fairness weights other than 1, per queue and (stored) key: kept whether or not the key has messages.';
-- A fetch reads a key's weight here when the key's turn ends: the roles that may update fair_keys (those that fetch)
-- may read it.
do $$
declare
    v_grantee text;
begin
    for v_grantee in
        select distinct case when a.grantee = 0 then 'public' else a.grantee::regrole::text end
        from pg_class c, aclexplode(c.relacl) a
        where c.oid = 'pgmq_broker.fair_keys'::regclass and a.privilege_type = 'UPDATE' and a.grantee <> c.relowner
    loop
        execute format('grant select on pgmq_broker.fair_weights to %s', v_grantee);
    end loop;
end;
$$;

alter table pgmq_broker.fair_keys
    add column if not exists weight integer not null default 1 check (weight > 0),
    add column if not exists served integer not null default 0;
comment on column pgmq_broker.fair_keys.weight is
    'The key''s weight (fair_weights), copied when the row is created and whenever the key''s turn ends.';
comment on column pgmq_broker.fair_keys.served is 'Messages served in the key''s current turn (weights above 1).';

-- Declare the weight of a key on a queue in fairness mode (1: the default). Takes effect at the key's next turn.
create or replace function pgmq_broker.set_fairness_weight(p_queue text, p_key text, p_weight integer)
returns void
language plpgsql volatile as $$
declare
    v_key text := pgmq_broker.fair_key_of(coalesce(p_key, ''));
begin
    if p_weight is null or p_weight < 1 then
        raise exception 'fairness weight % of key % on queue % refused: a weight is a whole number of at least 1',
            coalesce(p_weight::text, 'null'), quote_literal(left(p_key, 100)), quote_literal(p_queue)
            using errcode = 'invalid_parameter_value';
    end if;
    if not exists (select from pgmq_broker.fair_queues where queue_name = p_queue) then
        raise exception 'queue % is not in fairness mode; call pgmq_broker.enable_fairness first',
            quote_literal(p_queue) using errcode = 'undefined_object';
    end if;
    if p_weight = 1 then
        delete from pgmq_broker.fair_weights w where w.queue_name = p_queue and w.key = v_key;
    else
        insert into pgmq_broker.fair_weights as w (queue_name, key, weight) values (p_queue, v_key, p_weight)
        on conflict (queue_name, key) do update set weight = excluded.weight;
    end if;
    update pgmq_broker.fair_keys k set weight = p_weight, served = least(k.served, p_weight - 1)
    where k.queue_name = p_queue and k.key = v_key;
end;
$$;

-- Leave fairness mode: as in 060, and the queue's weights go too.
create or replace function pgmq_broker.disable_fairness(p_queue text) returns void
language plpgsql volatile as $$
declare
    v_qtable text := pgmq.format_table_name(p_queue, 'q');
begin
    delete from pgmq_broker.fair_queues where queue_name = p_queue;
    delete from pgmq_broker.fair_keys where queue_name = p_queue;
    delete from pgmq_broker.fair_weights where queue_name = p_queue;
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

-- As in 060; a new key row gets the key's declared weight.
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
    insert into pgmq_broker.fair_keys as k (queue_name, key, due_at, weight)
    select v_queue, n.fairness_key, min(n.vt),
           coalesce((select w.weight from pgmq_broker.fair_weights w
                     where w.queue_name = v_queue and w.key = n.fairness_key), 1)
    from new_rows n group by n.fairness_key order by n.fairness_key
    on conflict (queue_name, key) do nothing;
    update pgmq_broker.fair_keys k
    set due_at = n.due_at
    from (select n.fairness_key, min(n.vt) as due_at from new_rows n group by n.fairness_key) n
    where k.queue_name = v_queue and k.key = n.fairness_key and k.due_at > n.due_at;
    return null;
end;
$$;

-- As in 060, with weights: rooms in proportion to the keys' weights, and a weighted key keeps its turn until it has
-- served its weight's worth of messages.
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
    v_weights integer[];
    v_weight_sum integer;
    v_rooms integer[];
    v_tried text[] := '{}';
    v_served text[] := '{}';
    v_pass_served text[];
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
        -- rate, keys of weight 1 go to the back of the line at once (in the same statement); weighted keys after
        -- step 3, once they have served their weight; step 5 puts those that serve nothing where they belong.
        -- Wherever a key's turn ends, its weight is read again from fair_weights (one primary-key lookup), so a
        -- weight set while a producer was creating the key's row takes effect by the key's next turn.
        if v_interval_ms is null then
            with s as (
                select k.key, k.due_at, k.tat, k.weight from pgmq_broker.fair_keys k
                where k.queue_name = %3$L and k.due_at <= v_now and k.key <> all(v_tried)
                order by k.due_at
                limit v_want
                for no key update skip locked
            ), moved as (
                update pgmq_broker.fair_keys k set due_at = clock_timestamp(), weight = %4$s
                from s where k.queue_name = %3$L and k.key = s.key and s.weight = 1
            )
            select array_agg(s.key order by s.due_at, s.key), array_agg(s.tat order by s.due_at, s.key),
                   array_agg(s.weight order by s.due_at, s.key), sum(s.weight)
            into v_keys, v_tats, v_weights, v_weight_sum
            from s;
        else
            select array_agg(s.key order by s.due_at, s.key), array_agg(s.tat order by s.due_at, s.key),
                   array_agg(s.weight order by s.due_at, s.key), sum(s.weight)
            into v_keys, v_tats, v_weights, v_weight_sum
            from (
                select k.key, k.due_at, k.tat, k.weight from pgmq_broker.fair_keys k
                where k.queue_name = %3$L and k.due_at <= v_now and k.key <> all(v_tried)
                order by k.due_at
                limit v_want
                for no key update skip locked
            ) s;
        end if;
        exit when v_keys is null;
        v_tried := v_tried || v_keys;
        -- 2. Each key's room: its share of the batch by weight, within its rate (the tokens of its GCRA bucket).
        v_rooms := array_fill(ceil(v_want::numeric / cardinality(v_keys))::integer, array[cardinality(v_keys)]);
        if v_weight_sum > cardinality(v_keys) or v_interval_ms is not null then
            for i in 1 .. cardinality(v_keys) loop
                v_rooms[i] := ceil(v_want::numeric * v_weights[i] / v_weight_sum);
                if v_interval_ms is not null then
                    v_rooms[i] := least(v_rooms[i], greatest(0, floor(
                        (v_tolerance_ms - extract(epoch from greatest(coalesce(v_tats[i], v_now), v_now) - v_now)
                                          * 1000) / v_interval_ms
                    )::integer + 1));
                end if;
            end loop;
        end if;
        -- 3. Lease. A new statement, so its snapshot includes every lease committed before the key locks were
        -- granted: the in-flight count below is exact for the keys this fetch holds. When the rooms add up to more
        -- than is wanted, each key's n-th message ranks at (n - 1) / weight.
        v_pass_served := '{}';
        -- Leasing counts the delivery, as pgmq_broker.fetch does.
        for msg_id, read_ct, enqueued_at, last_read_at, message, fairness_key in
            with keys as (
                select u.key, u.room, u.weight, u.ord
                from unnest(v_keys, v_rooms, v_weights) with ordinality as u(key, room, weight, ord)
            ),
            rooms as (
                select keys.key, keys.ord, keys.weight,
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
                select m.msg_id, m.vt, rooms.key, rooms.ord, rooms.weight
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
                    select p.msg_id, p.ord, p.weight,
                           row_number() over (partition by p.key order by p.vt, p.msg_id) as rn
                    from picked p
                ) p
                order by (p.rn - 1)::double precision / p.weight, p.ord
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
        -- 4. Served keys of a rate-limited queue go to the back of the line until their next token, unless a
        -- weighted key has turn and tokens left. Without a rate, served weighted keys count what they served and go
        -- to the back once it reaches their weight.
        if v_interval_ms is not null then
            for v_key, i in select u.key, count(*) from unnest(v_pass_served) as u(key) group by u.key loop
                update pgmq_broker.fair_keys k
                set tat = greatest(coalesce(k.tat, v_now), v_now) + i * v_interval_ms * interval '1 millisecond',
                    served = case when k.served + i < k.weight then k.served + i else 0 end,
                    weight = case when k.served + i < k.weight then k.weight else %4$s end,
                    due_at = case
                        when k.served + i < k.weight
                             and greatest(coalesce(k.tat, v_now), v_now)
                                 + (i * v_interval_ms - v_tolerance_ms) * interval '1 millisecond' <= clock_timestamp()
                        then k.due_at
                        else greatest(clock_timestamp(), greatest(coalesce(k.tat, v_now), v_now)
                                      + (i * v_interval_ms - v_tolerance_ms) * interval '1 millisecond')
                    end
                where k.queue_name = %3$L and k.key = v_key;
            end loop;
        elsif v_weight_sum > cardinality(v_keys) then
            update pgmq_broker.fair_keys k
            set served = case when k.served + c.n < k.weight then k.served + c.n else 0 end,
                due_at = case when k.served + c.n < k.weight then k.due_at else clock_timestamp() end,
                weight = case when k.served + c.n < k.weight then k.weight else %4$s end
            from (select u.key, count(*)::integer as n from unnest(v_pass_served) as u(key) group by u.key) c
            -- The keys weighted when this pass took them (step 1 may have just given a weight-1 key a new weight).
            join unnest(v_keys, v_weights) as t(key, weight) on t.key = c.key and t.weight > 1
            where k.queue_name = %3$L and k.key = c.key;
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
                                      - coalesce(v_tolerance_ms, 0) * interval '1 millisecond'),
                    served = 0, weight = %4$s
                where k.queue_name = %3$L and k.key = v_key;
            else
                update pgmq_broker.fair_keys k
                set due_at = least(v_next, clock_timestamp() + pgmq_broker.fair_recheck()), served = 0,
                    weight = %4$s
                where k.queue_name = %3$L and k.key = v_key;
            end if;
        end loop;
    end loop;
end;
$fetch$
$template$,
        pgmq.format_table_name(p_queue, 'q'), pgmq.format_table_name(p_queue, 'fair_fetch'), p_queue,
        -- The weight of the key row k as declared now.
        format(
            'coalesce((select w.weight from pgmq_broker.fair_weights w where w.queue_name = %L and w.key = k.key), 1)',
            p_queue
        )
    );
    -- Whoever may call pgmq_broker.fetch may call the queue's own fetch (see 060).
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

-- As in 060, with the key bounded by fair_key_of and the key rows rebuilt with their weights.
create or replace function pgmq_broker.fair_key_column(p_queue text, p_key_path text[]) returns void
language plpgsql volatile as $$
declare
    v_qtable text := pgmq.format_table_name(p_queue, 'q');
begin
    execute format('drop trigger if exists pgmq_broker_fair_keys on pgmq.%I', v_qtable);
    execute format('alter table pgmq.%I drop column if exists fairness_key cascade', v_qtable);
    execute format(
        'alter table pgmq.%I add column fairness_key text not null generated always as'
        ' (pgmq_broker.fair_key_of(coalesce(message #>> ''{options,fairness_key}'', %s, ''''))) stored',
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
        'insert into pgmq_broker.fair_keys (queue_name, key, due_at, weight)'
        ' select $1, q.fairness_key, min(q.vt), coalesce(min(w.weight), 1) from pgmq.%I q'
        ' left join pgmq_broker.fair_weights w on w.queue_name = $1 and w.key = q.fairness_key'
        ' group by q.fairness_key',
        v_qtable
    ) using p_queue;
end;
$$;

-- The queues already in fairness mode: bounded keys (a new column, its index and key rows) and the new fetch. The
-- column's drop takes the in-flight cap's index with it; it is made again as enable_fairness makes it. A queue
-- dropped with pgmq.drop_queue while in fairness mode left its rows here (and its fetch): it leaves fairness mode.
do $$
declare
    v_queue pgmq_broker.fair_queues;
begin
    for v_queue in select * from pgmq_broker.fair_queues order by queue_name loop
        if to_regclass(format('pgmq.%I', pgmq.format_table_name(v_queue.queue_name, 'q'))) is null then
            perform pgmq_broker.disable_fairness(v_queue.queue_name);
            continue;
        end if;
        perform pgmq_broker.fair_key_column(v_queue.queue_name, v_queue.key_path);
        if v_queue.max_in_flight is not null then
            execute format(
                'create index if not exists %I on pgmq.%I (fairness_key, vt) where last_read_at is not null',
                pgmq.format_table_name(v_queue.queue_name, 'q') || '_fair_leased_idx',
                pgmq.format_table_name(v_queue.queue_name, 'q')
            );
        end if;
    end loop;
end;
$$;
