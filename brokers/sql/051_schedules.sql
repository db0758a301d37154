-- Periodic actors: one row per schedule, shared by every worker process (see brokers/periodic.py).
--
-- Time is cut into slots of interval_ms aligned on the Unix epoch. A scheduler sends at most one tick per slot: it
-- advances next_run_at to the start of the following slot in the same transaction that enqueues the tick, so a
-- backlog of missed slots collapses into one tick. A tick holds a lease (state 'sent' then 'running', lease_until)
-- that the scheduler renews while the tick runs; no new tick is sent while a lease is held, so ticks never overlap,
-- and a killed worker only delays the schedule until its lease runs out.
create schema if not exists pgmq_broker;

create table if not exists pgmq_broker.schedules (
    name text primary key,
    actor_name text not null,
    queue_name text not null,
    interval_ms bigint not null check (interval_ms > 0),
    lease_ms bigint not null check (lease_ms > 0),
    next_run_at timestamptz not null,
    state text not null default 'idle' check (state in ('idle', 'sent', 'running')),
    slot_ms bigint,                 -- slot (epoch ms) of the latest tick sent
    run_token bigint not null default 0, -- increases at each start; identifies the run that may renew and finish
    lease_until timestamptz,        -- while 'sent' or 'running': when the tick is presumed lost
    sent_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    ticks_sent bigint not null default 0,
    slots_missed bigint not null default 0, -- slots that got no tick (previous tick still running, or no scheduler)
    last_error text
);

-- Start (epoch ms) of the slot of p_interval_ms that contains p_at.
create or replace function pgmq_broker.periodic_slot(p_at timestamptz, p_interval_ms bigint) returns bigint
language sql immutable strict as $$
    select (floor(extract(epoch from p_at) * 1000 / p_interval_ms) * p_interval_ms)::bigint;
$$;

create or replace function pgmq_broker.periodic_slot_time(p_slot_ms bigint) returns timestamptz
language sql immutable strict as $$
    select timestamptz 'epoch' + p_slot_ms * interval '1 millisecond';
$$;

-- Create or update a schedule. A new schedule is due at once (its current slot); a changed interval takes effect
-- at the new interval's next slot, or earlier if the old schedule was due earlier.
create or replace function pgmq_broker.schedule_upsert(
    p_name text, p_actor_name text, p_queue_name text, p_interval_ms bigint, p_lease_ms bigint
) returns void
language plpgsql volatile as $$
begin
    if p_interval_ms is null or p_interval_ms <= 0 or p_lease_ms is null or p_lease_ms <= 0 then
        raise exception using
            errcode = 'invalid_parameter_value',
            message = format('Schedule %L: interval_ms (%s) and lease_ms (%s) must be positive milliseconds',
                             p_name, p_interval_ms, p_lease_ms),
            hint = 'Give the periodic actor a positive periodic_ms.';
    end if;
    insert into pgmq_broker.schedules as s (name, actor_name, queue_name, interval_ms, lease_ms, next_run_at)
    values (
        p_name, p_actor_name, p_queue_name, p_interval_ms, p_lease_ms,
        pgmq_broker.periodic_slot_time(pgmq_broker.periodic_slot(clock_timestamp(), p_interval_ms))
    )
    on conflict (name) do update set
        actor_name = excluded.actor_name,
        queue_name = excluded.queue_name,
        lease_ms = excluded.lease_ms,
        interval_ms = excluded.interval_ms,
        next_run_at = case
            when s.interval_ms = excluded.interval_ms then s.next_run_at
            else least(
                s.next_run_at,
                pgmq_broker.periodic_slot_time(
                    pgmq_broker.periodic_slot(clock_timestamp(), excluded.interval_ms) + excluded.interval_ms
                )
            )
        end;
end;
$$;

-- Claim every due schedule among p_names whose previous tick is finished or lost: advance it to the next slot and
-- mark its tick sent. Call it in the transaction that enqueues the ticks, so a tick is sent iff its slot is taken.
-- Rows another scheduler is claiming are skipped, not waited for.
create or replace function pgmq_broker.schedule_claim_due(p_names text[])
returns table (name text, slot_ms bigint, slots_missed bigint, lost_state text)
language sql volatile as $$
    with clock as (
        select clock_timestamp() as now
    ), due as (
        select s.name, s.state,
               pgmq_broker.periodic_slot(clock.now, s.interval_ms) as slot_ms,
               greatest(
                   0,
                   (pgmq_broker.periodic_slot(clock.now, s.interval_ms)
                    - pgmq_broker.periodic_slot(s.next_run_at, s.interval_ms)) / s.interval_ms
               ) as missed
        from pgmq_broker.schedules as s, clock
        where s.name = any(p_names)
          and s.next_run_at <= clock.now
          and (s.state = 'idle' or s.lease_until <= clock.now)
        for update of s skip locked
    )
    update pgmq_broker.schedules as s set
        state = 'sent',
        slot_ms = due.slot_ms,
        next_run_at = pgmq_broker.periodic_slot_time(due.slot_ms + s.interval_ms),
        lease_until = clock.now + s.lease_ms * interval '1 millisecond',
        sent_at = clock.now,
        ticks_sent = s.ticks_sent + 1,
        slots_missed = s.slots_missed + due.missed
    from due, clock
    where s.name = due.name
    returning s.name, s.slot_ms, due.missed, nullif(due.state, 'idle');
$$;

-- Start the tick of p_slot_ms if it is still the schedule's latest and no other run of it holds a lease.
-- Returns the run token to renew and finish with, or null when the tick is stale and must be skipped.
create or replace function pgmq_broker.schedule_start(p_name text, p_slot_ms bigint) returns bigint
language sql volatile as $$
    update pgmq_broker.schedules set
        state = 'running',
        run_token = run_token + 1,
        started_at = clock_timestamp(),
        lease_until = clock_timestamp() + lease_ms * interval '1 millisecond'
    where name = p_name
      and slot_ms = p_slot_ms
      and (state = 'sent' or (state = 'running' and lease_until <= clock_timestamp()))
    returning run_token;
$$;

-- Extend the leases of the given runs (parallel arrays); returns how many were still held.
create or replace function pgmq_broker.schedule_renew(p_names text[], p_tokens bigint[]) returns integer
language sql volatile as $$
    with renewed as (
        update pgmq_broker.schedules as s set
            lease_until = clock_timestamp() + s.lease_ms * interval '1 millisecond'
        from unnest(p_names, p_tokens) as runs(name, token)
        where s.name = runs.name and s.run_token = runs.token and s.state = 'running'
        returning 1
    )
    select count(*)::integer from renewed;
$$;

-- End a run (p_error null on success) so the next slot can be sent. False when the run had lost its lease.
create or replace function pgmq_broker.schedule_finish(p_name text, p_token bigint, p_error text) returns boolean
language sql volatile as $$
    update pgmq_broker.schedules set
        state = 'idle',
        lease_until = null,
        finished_at = clock_timestamp(),
        last_error = p_error
    where name = p_name and run_token = p_token and state = 'running'
    returning true;
$$;
