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
