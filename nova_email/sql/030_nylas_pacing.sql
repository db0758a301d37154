-- Shared pacing of Nylas API calls across every worker process: one GCRA token bucket per key.
--
-- Keys are 'grant:<grant_id>' (the per-grant limit) and 'app:<name>' (the per-application limit). A bucket is one
-- timestamp, the theoretical arrival time (TAT) of the next call: a call may go at TAT - tolerance, and each call
-- pushes TAT forward by the bucket's interval (1 / rate). The tolerance is (burst - 1) * interval, so a rested bucket
-- lets `burst` calls through at once and then one per interval. All clocks are the database's clock_timestamp(), so
-- processes on different hosts agree.
--
-- Callers reserve a slot instead of polling: nylas_pacing_acquire returns how long to wait for the reserved slot, and
-- the caller sleeps that long once. Waiters are therefore served in arrival order and no call costs more than one
-- round trip. When the wait would exceed p_max_wait_ms nothing is reserved and the caller hands the job back to the
-- queue with that delay instead of holding a worker thread.

-- Unlogged: pacing state is worth nothing after a crash (buckets simply start full again), so skip the WAL.
create unlogged table if not exists nylas_pacing_buckets (
    key        text primary key,
    tat        timestamptz not null,
    updated_at timestamptz not null default clock_timestamp()
);

comment on table nylas_pacing_buckets is
    'GCRA buckets pacing Nylas API calls per grant and per application; see nylas_pacing_acquire.';

-- Reserve one call on every bucket named in p_keys; returns the ms to wait before sending (0 = go now).
-- p_intervals_ms[i] = 1000 / rate of p_keys[i]; p_tolerances_ms[i] = (burst - 1) * interval (0 = strict spacing).
-- A return value above p_max_wait_ms means nothing was reserved.
create or replace function nylas_pacing_acquire(
    p_keys           text[],
    p_intervals_ms   float8[],
    p_tolerances_ms  float8[],
    p_max_wait_ms    int default 2147483647
) returns int
language plpgsql
as $$
declare
    v_now     timestamptz := clock_timestamp();
    v_slot    timestamptz := v_now;
    v_wait_ms int;
    r         record;
begin
    if coalesce(cardinality(p_keys), 0) = 0 then
        return 0;
    end if;
    if cardinality(p_intervals_ms) <> cardinality(p_keys) or cardinality(p_tolerances_ms) <> cardinality(p_keys) then
        raise exception 'nylas_pacing_acquire: p_keys, p_intervals_ms and p_tolerances_ms must have the same length'
            using errcode = '22023';
    end if;

    -- Keys are taken in sorted order, here and below, so two callers sharing two buckets cannot deadlock.
    insert into nylas_pacing_buckets (key, tat)
    select k, v_now from unnest(p_keys) as k order by k
    on conflict (key) do nothing;

    for r in
        select b.tat, x.tolerance_ms
        from nylas_pacing_buckets as b
        join unnest(p_keys, p_tolerances_ms) as x(key, tolerance_ms) on x.key = b.key
        order by b.key
        for update of b
    loop
        v_slot := greatest(v_slot, r.tat - make_interval(secs => r.tolerance_ms / 1000.0));
    end loop;

    v_wait_ms := ceil(extract(epoch from (v_slot - v_now)) * 1000)::int;
    if v_wait_ms > p_max_wait_ms then
        return v_wait_ms;
    end if;

    update nylas_pacing_buckets as b
    set tat = greatest(b.tat, v_slot) + make_interval(secs => x.interval_ms / 1000.0),
        updated_at = v_now
    from unnest(p_keys, p_intervals_ms) as x(key, interval_ms)
    where b.key = x.key;

    return v_wait_ms;
end;
$$;

-- One bucket by rate and burst: returns the ms to wait for the reserved call (0 = go now).
create or replace function nylas_pacing_acquire(p_key text, p_rate float8, p_burst int) returns int
language sql
as $$
    select nylas_pacing_acquire(
        array[p_key],
        array[1000.0 / p_rate],
        array[greatest(p_burst - 1, 0) * 1000.0 / p_rate]
    );
$$;
