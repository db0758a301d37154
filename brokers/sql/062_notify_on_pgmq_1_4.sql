-- enable_notify and disable_notify on every PGMQ release the broker runs on, including 1.4.x (which a Supabase
-- project may run): those releases have no throttled insert notifications, so there is no row trigger of PGMQ's to
-- replace, and pgmq.disable_notify_insert does not exist. The broker's statement-level trigger works the same on all.

create or replace function pgmq_broker.disable_pgmq_notify_insert(p_queue text) returns void
language plpgsql volatile as $$
begin
    if to_regprocedure('pgmq.disable_notify_insert(text)') is not null then
        perform pgmq.disable_notify_insert(p_queue);
    end if;
end;
$$;

-- Stop waking workers on the queue's inserts (they still poll): the broker's trigger and PGMQ's, where it has one.
create or replace function pgmq_broker.disable_notify(p_queue text) returns void
language plpgsql volatile as $$
begin
    execute format('drop trigger if exists pgmq_broker_notify_insert on pgmq.%I', pgmq.format_table_name(p_queue, 'q'));
    perform pgmq_broker.disable_pgmq_notify_insert(p_queue);
end;
$$;

-- Create the queue when missing and wake idle workers on its inserts, with the broker's trigger alone. Call it from
-- a migration, once per queue (workers never do it). Idempotent.
create or replace function pgmq_broker.enable_notify(p_queue text) returns void
language plpgsql volatile as $$
begin
    perform pgmq.create(p_queue);
    perform pgmq_broker.disable_notify(p_queue);
    execute format(
        'create trigger pgmq_broker_notify_insert after insert on pgmq.%I
         for each statement execute function pgmq_broker.notify_insert()',
        pgmq.format_table_name(p_queue, 'q')
    );
end;
$$;

-- Called only from disable_notify, by whoever may turn notifications on and off.
revoke execute on function pgmq_broker.disable_pgmq_notify_insert(text) from public;
