-- acknowledge_thread_job finds the thread of a job queued before adoption, whose queued_threads row has no msg_id,
-- by the thread id the job carries.
CREATE OR REPLACE FUNCTION acknowledge_thread_job(
    p_msg_id          bigint,
    p_config_id       uuid,
    p_messages_synced integer,
    p_success         boolean DEFAULT true
)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_thread_id text;
BEGIN
    PERFORM flux_require_config(p_config_id);
    SELECT coalesce(q.message ->> 'nylas_thread_id', q.message ->> 'thread_id') INTO v_thread_id
      FROM pgmq.q_thread_sync_jobs q WHERE q.msg_id = p_msg_id;
    UPDATE queued_threads t
       SET status = CASE WHEN p_success THEN 'completed' ELSE 'failed' END,
           messages_synced = greatest(coalesce(p_messages_synced, 0), 0),
           processed_at = now()
     WHERE t.config_id = p_config_id AND t.status IN ('queued', 'processing')
       AND (t.msg_id = p_msg_id OR (t.msg_id IS NULL AND t.nylas_thread_id = v_thread_id));
    PERFORM complete_backfill_if_done(p_config_id);
    RETURN pgmq.delete('thread_sync_jobs', p_msg_id);
END;
$$;
COMMENT ON FUNCTION acknowledge_thread_job(bigint, uuid, integer, boolean) IS
    'The original''s end of a thread job: marks the queued_threads row of job p_msg_id (by msg_id, or by the job''s '
    'thread id for a row that has none) completed (or failed), completes the backfill when no thread is left, and '
    'deletes the job; true when the job was still queued.';
