-- Upserts of Nylas threads and messages, taking the objects as Nylas sends them (JSON, unix-second dates).
-- One round trip per thread: workers call upsert_nylas_thread then upsert_nylas_messages in one transaction.
-- Versions: nylas_updated_at is when the state was read from Nylas; an older read never overwrites a newer one.

CREATE OR REPLACE FUNCTION nylas_unix_to_timestamptz(p_value jsonb) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(p_value) = 'number' THEN to_timestamp((p_value)::text::double precision) END
$$;
COMMENT ON FUNCTION nylas_unix_to_timestamptz(jsonb) IS
    'Unix seconds as Nylas sends them (a JSON number) to timestamptz; NULL for anything else.';

CREATE OR REPLACE FUNCTION nylas_json_array(p_value jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(p_value) = 'array' THEN p_value ELSE '[]'::jsonb END
$$;
COMMENT ON FUNCTION nylas_json_array(jsonb) IS 'The value when it is a JSON array, else an empty array.';

CREATE OR REPLACE FUNCTION upsert_nylas_thread(p_inbox_id uuid, p_thread jsonb, p_fetched_at timestamptz DEFAULT now())
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    IF jsonb_typeof(p_thread) IS DISTINCT FROM 'object' OR coalesce(p_thread ->> 'id', '') = '' THEN
        RAISE EXCEPTION 'upsert_nylas_thread needs a Nylas thread object with an "id"; got %', left(p_thread::text, 200)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO flux_email_threads AS t (
        inbox_id, nylas_thread_id, subject, snippet, participants, folders, message_ids,
        latest_message_received_date, latest_message_sent_date, earliest_message_date,
        unread, starred, has_attachments, has_drafts, nylas_updated_at, synced_at
    ) VALUES (
        p_inbox_id,
        p_thread ->> 'id',
        p_thread ->> 'subject',
        p_thread ->> 'snippet',
        nylas_json_array(p_thread -> 'participants'),
        nylas_json_array(p_thread -> 'folders'),
        nylas_json_array(p_thread -> 'message_ids'),
        coalesce(nylas_unix_to_timestamptz(p_thread -> 'latest_message_received_date'),
                 nylas_unix_to_timestamptz(p_thread -> 'latest_draft_or_message' -> 'date')),
        nylas_unix_to_timestamptz(p_thread -> 'latest_message_sent_date'),
        nylas_unix_to_timestamptz(p_thread -> 'earliest_message_date'),
        coalesce((p_thread ->> 'unread')::boolean, false),
        coalesce((p_thread ->> 'starred')::boolean, false),
        coalesce((p_thread ->> 'has_attachments')::boolean, false),
        coalesce((p_thread ->> 'has_drafts')::boolean, false),
        p_fetched_at,
        now()
    )
    ON CONFLICT (inbox_id, nylas_thread_id) DO UPDATE SET
        subject = excluded.subject,
        snippet = excluded.snippet,
        participants = excluded.participants,
        folders = excluded.folders,
        message_ids = excluded.message_ids,
        latest_message_received_date = excluded.latest_message_received_date,
        latest_message_sent_date = excluded.latest_message_sent_date,
        earliest_message_date = excluded.earliest_message_date,
        unread = excluded.unread,
        starred = excluded.starred,
        has_attachments = excluded.has_attachments,
        has_drafts = excluded.has_drafts,
        nylas_updated_at = excluded.nylas_updated_at,
        synced_at = excluded.synced_at
    WHERE t.nylas_updated_at IS NULL OR excluded.nylas_updated_at >= t.nylas_updated_at
    RETURNING t.id INTO v_id;
    IF v_id IS NULL THEN
        -- A newer state is already stored; the row stays as it is.
        SELECT t.id INTO v_id FROM flux_email_threads t
        WHERE t.inbox_id = p_inbox_id AND t.nylas_thread_id = p_thread ->> 'id';
    END IF;
    RETURN v_id;
END;
$$;
COMMENT ON FUNCTION upsert_nylas_thread(uuid, jsonb, timestamptz) IS
    'Insert or update a thread from a Nylas thread object; keeps the newer state by nylas_updated_at; returns the row id.';

CREATE OR REPLACE FUNCTION upsert_nylas_messages(
    p_inbox_id uuid, p_thread_row_id uuid, p_messages jsonb, p_fetched_at timestamptz DEFAULT now()
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    IF jsonb_typeof(p_messages) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'upsert_nylas_messages needs a JSON array of Nylas messages; got %', jsonb_typeof(p_messages)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_messages) m
               WHERE jsonb_typeof(m) IS DISTINCT FROM 'object' OR coalesce(m ->> 'id', '') = '') THEN
        RAISE EXCEPTION 'upsert_nylas_messages: every message must be an object with an "id"'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO flux_email_messages AS e (
        thread_id, inbox_id, nylas_message_id, nylas_thread_id, subject, sender,
        to_recipients, cc_recipients, bcc_recipients, reply_to, body, snippet, received_date,
        attachments, folders, unread, starred, headers, in_reply_to, metadata, tracking_options,
        nylas_updated_at, synced_at
    )
    SELECT DISTINCT ON (m ->> 'id')
        p_thread_row_id,
        p_inbox_id,
        m ->> 'id',
        m ->> 'thread_id',
        m ->> 'subject',
        CASE WHEN jsonb_typeof(m -> 'from' -> 0) = 'object' THEN m -> 'from' -> 0 END,
        nylas_json_array(m -> 'to'),
        nylas_json_array(m -> 'cc'),
        nylas_json_array(m -> 'bcc'),
        nylas_json_array(m -> 'reply_to'),
        m ->> 'body',
        m ->> 'snippet',
        nylas_unix_to_timestamptz(m -> 'date'),
        nylas_json_array(m -> 'attachments'),
        nylas_json_array(m -> 'folders'),
        coalesce((m ->> 'unread')::boolean, false),
        coalesce((m ->> 'starred')::boolean, false),
        nylas_json_array(m -> 'headers'),
        (SELECT h ->> 'value' FROM jsonb_array_elements(nylas_json_array(m -> 'headers')) h
         WHERE lower(h ->> 'name') = 'in-reply-to' LIMIT 1),
        CASE WHEN jsonb_typeof(m -> 'metadata') = 'object' THEN m -> 'metadata' END,
        CASE WHEN jsonb_typeof(m -> 'tracking_options') = 'object' THEN m -> 'tracking_options' END,
        p_fetched_at,
        now()
    FROM jsonb_array_elements(p_messages) m
    ORDER BY m ->> 'id'
    ON CONFLICT (inbox_id, nylas_message_id) DO UPDATE SET
        thread_id = excluded.thread_id,
        nylas_thread_id = excluded.nylas_thread_id,
        subject = excluded.subject,
        sender = excluded.sender,
        to_recipients = excluded.to_recipients,
        cc_recipients = excluded.cc_recipients,
        bcc_recipients = excluded.bcc_recipients,
        reply_to = excluded.reply_to,
        -- A truncated or field-selected copy has no body; keep the one we have rather than erase it.
        body = coalesce(excluded.body, e.body),
        snippet = excluded.snippet,
        received_date = excluded.received_date,
        attachments = excluded.attachments,
        folders = excluded.folders,
        unread = excluded.unread,
        starred = excluded.starred,
        headers = CASE WHEN excluded.headers = '[]'::jsonb THEN e.headers ELSE excluded.headers END,
        in_reply_to = coalesce(excluded.in_reply_to, e.in_reply_to),
        metadata = excluded.metadata,
        tracking_options = coalesce(excluded.tracking_options, e.tracking_options),
        nylas_updated_at = excluded.nylas_updated_at,
        synced_at = excluded.synced_at
    WHERE e.nylas_updated_at IS NULL OR excluded.nylas_updated_at >= e.nylas_updated_at;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;
COMMENT ON FUNCTION upsert_nylas_messages(uuid, uuid, jsonb, timestamptz) IS
    'Insert or update Nylas message objects of one thread; older reads never overwrite newer ones; returns rows written.';
