-- Rate-limiter state shared by every worker process: Dramatiq's RateLimiterBackend on Postgres.
--
-- UNLOGGED because the values are short-lived counters (like Redis keys with a TTL): losing them in a crash
-- only resets the limits, and skipping the WAL keeps every acquire/release a cheap write.
-- A row whose expires_at has passed is treated as absent; pgmq_broker.rate_limit_sweep() deletes such rows.
create schema if not exists pgmq_broker;

create unlogged table if not exists pgmq_broker.rate_limits (
    key text primary key,
    value bigint not null,
    expires_at timestamptz not null
);

create index if not exists rate_limits_expires_at_idx on pgmq_broker.rate_limits (expires_at);

-- Serialise every operation on the same keys with transaction-level advisory locks in the two-int key space
-- (which never overlaps the single-bigint space used for migrations). Locks are taken in hash order so that
-- two callers locking overlapping key sets (the window limiter's keys) cannot deadlock. Rows need not exist.
create or replace function pgmq_broker.rate_limit_lock(p_keys text[]) returns void
language plpgsql volatile as $$
declare
    v_hash integer;
begin
    for v_hash in select distinct hashtext(k) from unnest(p_keys) as k order by 1 loop
        perform pg_advisory_xact_lock(hashtext('pgmq_broker.rate_limits'), v_hash);
    end loop;
end;
$$;

-- The live value of a key, or null when it is absent or expired.
create or replace function pgmq_broker.rate_limit_value(p_key text) returns bigint
language sql volatile as $$
    select value from pgmq_broker.rate_limits where key = p_key and expires_at > clock_timestamp();
$$;

create or replace function pgmq_broker.rate_limit_put(p_key text, p_value bigint, p_ttl_ms bigint) returns void
language sql volatile as $$
    insert into pgmq_broker.rate_limits (key, value, expires_at)
    values (p_key, p_value, clock_timestamp() + p_ttl_ms * interval '1 millisecond')
    on conflict (key) do update set value = excluded.value, expires_at = excluded.expires_at;
$$;

-- Set key to value unless a live value exists. True when the key was set.
create or replace function pgmq_broker.rate_limit_add(p_key text, p_value bigint, p_ttl_ms bigint) returns boolean
language plpgsql volatile as $$
begin
    perform pgmq_broker.rate_limit_lock(array[p_key]);
    if pgmq_broker.rate_limit_value(p_key) is not null then
        return false;
    end if;
    perform pgmq_broker.rate_limit_put(p_key, p_value, p_ttl_ms);
    return true;
end;
$$;

-- Add amount to key (absent counts as 0) unless the result would exceed maximum. True when incremented.
create or replace function pgmq_broker.rate_limit_incr(
    p_key text, p_amount bigint, p_maximum bigint, p_ttl_ms bigint
) returns boolean
language plpgsql volatile as $$
declare
    v_value bigint;
begin
    perform pgmq_broker.rate_limit_lock(array[p_key]);
    v_value := coalesce(pgmq_broker.rate_limit_value(p_key), 0) + p_amount;
    if v_value > p_maximum then
        return false;
    end if;
    perform pgmq_broker.rate_limit_put(p_key, v_value, p_ttl_ms);
    return true;
end;
$$;

-- Subtract amount from key (absent counts as 0) unless the result would go below minimum. True when decremented.
create or replace function pgmq_broker.rate_limit_decr(
    p_key text, p_amount bigint, p_minimum bigint, p_ttl_ms bigint
) returns boolean
language plpgsql volatile as $$
declare
    v_value bigint;
begin
    perform pgmq_broker.rate_limit_lock(array[p_key]);
    v_value := coalesce(pgmq_broker.rate_limit_value(p_key), 0) - p_amount;
    if v_value < p_minimum then
        return false;
    end if;
    perform pgmq_broker.rate_limit_put(p_key, v_value, p_ttl_ms);
    return true;
end;
$$;

-- Add amount to key unless key's new value, or amount plus the sum of the live values of p_keys, would exceed
-- maximum. Same semantics as Dramatiq's Redis and stub backends (p_keys normally includes p_key).
create or replace function pgmq_broker.rate_limit_incr_and_sum(
    p_key text, p_keys text[], p_amount bigint, p_maximum bigint, p_ttl_ms bigint
) returns boolean
language plpgsql volatile as $$
declare
    v_value bigint;
    v_total bigint;
begin
    perform pgmq_broker.rate_limit_lock(array_append(p_keys, p_key));
    v_value := coalesce(pgmq_broker.rate_limit_value(p_key), 0) + p_amount;
    if v_value > p_maximum then
        return false;
    end if;
    select p_amount + coalesce(sum(value), 0) into v_total
    from pgmq_broker.rate_limits
    where key = any(p_keys) and expires_at > clock_timestamp();
    if v_total > p_maximum then
        return false;
    end if;
    perform pgmq_broker.rate_limit_put(p_key, v_value, p_ttl_ms);
    return true;
end;
$$;

-- Publish an event on key for p_ttl_ms: wait()ers see the row, and LISTENers of the channel are woken at commit.
create or replace function pgmq_broker.rate_limit_notify(p_key text, p_ttl_ms bigint) returns void
language plpgsql volatile as $$
begin
    perform pgmq_broker.rate_limit_lock(array[p_key]);
    perform pgmq_broker.rate_limit_put(p_key, 1, p_ttl_ms);
    perform pg_notify('pgmq_broker_rate_limits', p_key);
end;
$$;

-- Delete up to p_limit expired rows; returns how many. Called now and then by the backend, never on the hot path.
create or replace function pgmq_broker.rate_limit_sweep(p_limit integer) returns integer
language sql volatile as $$
    with expired as (
        select key from pgmq_broker.rate_limits
        where expires_at <= clock_timestamp()
        limit p_limit
        for update skip locked
    ), deleted as (
        delete from pgmq_broker.rate_limits as r using expired
        where r.key = expired.key and r.expires_at <= clock_timestamp()
        returning 1
    )
    select count(*)::integer from deleted;
$$;
