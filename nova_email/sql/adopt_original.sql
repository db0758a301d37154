-- Adoption of a database written by the TypeScript original: its seven tables become ours in place, before the
-- numbered migrations run (they then find every table and create only what is missing).
--
-- `nova_email.migrate` runs this file in one transaction, only on a database that holds flux_inboxes but no
-- applied nova_email migration, with the setting nova.adopt_functions = the names of the functions our migrations
-- define. In order:
--   1. missing columns are added with our types and defaults;
--   2. rows our constraints would refuse are listed and the transaction stops, so nothing changes;
--   3. new columns are filled for old rows (a message's inbox and Nylas thread id from its thread), and a NULL where
--      we keep NOT NULL becomes the column's default;
--   4. our keys, checks and foreign keys are added where missing; unique keys on a Nylas id alone are dropped (ids
--      are unique per grant, so ours are per inbox);
--   5. the original's versions of our functions are dropped (a changed result type cannot be replaced in place, and
--      an old overload next to ours would make calls ambiguous), and so are its row triggers that kept
--      inbox_sync_stats, which our statement-level triggers replace (both would count every change twice).
-- Every existing row stays, with its values except the NULLs named in step 3. The tables' own triggers are off
-- while this runs: completing a row is not an update of it (its updated_at stays), nor a change to count.

-- flux_pause_triggers is defined by 059_paused_triggers.sql, which `nova_email.migrate` runs just before this file.
CREATE TEMPORARY TABLE flux_adopt_paused_triggers ON COMMIT DROP AS
SELECT * FROM flux_pause_triggers(ARRAY['flux_inboxes', 'flux_inbox_configurations', 'flux_email_threads',
                                        'flux_email_messages', 'flux_webhook_notifications', 'inbox_sync_stats',
                                        'queued_threads']);

-- 1. Columns, in the order of 001_tables.sql.
ALTER TABLE flux_inboxes
    ADD COLUMN IF NOT EXISTS email                 text,
    ADD COLUMN IF NOT EXISTS provider              text,
    ADD COLUMN IF NOT EXISTS status                text NOT NULL DEFAULT 'active',
    ADD COLUMN IF NOT EXISTS webhook_health_status text NOT NULL DEFAULT 'healthy',
    ADD COLUMN IF NOT EXISTS last_webhook_at       timestamptz,
    ADD COLUMN IF NOT EXISTS created_at            timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at            timestamptz NOT NULL DEFAULT now();

ALTER TABLE flux_inbox_configurations
    ADD COLUMN IF NOT EXISTS backfill_status       text NOT NULL DEFAULT 'pending',
    ADD COLUMN IF NOT EXISTS backfill_requested_at timestamptz,
    ADD COLUMN IF NOT EXISTS backfill_started_at   timestamptz,
    ADD COLUMN IF NOT EXISTS backfill_completed_at timestamptz,
    ADD COLUMN IF NOT EXISTS backfill_start_date   timestamptz,
    ADD COLUMN IF NOT EXISTS backfill_end_date     timestamptz,
    ADD COLUMN IF NOT EXISTS backfill_msg_id       bigint,
    ADD COLUMN IF NOT EXISTS backfill_progress     jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN IF NOT EXISTS created_at            timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at            timestamptz NOT NULL DEFAULT now();

ALTER TABLE flux_email_threads
    ADD COLUMN IF NOT EXISTS subject                      text,
    ADD COLUMN IF NOT EXISTS snippet                      text,
    ADD COLUMN IF NOT EXISTS participants                 jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN IF NOT EXISTS folders                      jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN IF NOT EXISTS message_ids                  jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN IF NOT EXISTS latest_message_received_date timestamptz,
    ADD COLUMN IF NOT EXISTS latest_message_sent_date     timestamptz,
    ADD COLUMN IF NOT EXISTS earliest_message_date        timestamptz,
    ADD COLUMN IF NOT EXISTS unread                       boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS starred                      boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS has_attachments              boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS has_drafts                   boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS nylas_updated_at             timestamptz,
    ADD COLUMN IF NOT EXISTS synced_at                    timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS created_at                   timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at                   timestamptz NOT NULL DEFAULT now();

ALTER TABLE flux_email_messages
    ADD COLUMN IF NOT EXISTS inbox_id         uuid,
    ADD COLUMN IF NOT EXISTS nylas_thread_id  text,
    ADD COLUMN IF NOT EXISTS subject          text,
    ADD COLUMN IF NOT EXISTS sender           jsonb,
    ADD COLUMN IF NOT EXISTS to_recipients    jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN IF NOT EXISTS cc_recipients    jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN IF NOT EXISTS bcc_recipients   jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN IF NOT EXISTS reply_to         jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN IF NOT EXISTS body             text,
    ADD COLUMN IF NOT EXISTS snippet          text,
    ADD COLUMN IF NOT EXISTS received_date    timestamptz,
    ADD COLUMN IF NOT EXISTS attachments      jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN IF NOT EXISTS folders          jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN IF NOT EXISTS unread           boolean NOT NULL DEFAULT true,
    ADD COLUMN IF NOT EXISTS starred          boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS headers          jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN IF NOT EXISTS in_reply_to      text,
    ADD COLUMN IF NOT EXISTS metadata         jsonb,
    ADD COLUMN IF NOT EXISTS tracking_options jsonb,
    ADD COLUMN IF NOT EXISTS nylas_updated_at timestamptz,
    ADD COLUMN IF NOT EXISTS synced_at        timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS created_at       timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at       timestamptz NOT NULL DEFAULT now();

ALTER TABLE flux_webhook_notifications
    ADD COLUMN IF NOT EXISTS webhook_id             text,
    ADD COLUMN IF NOT EXISTS notification_type      text,
    ADD COLUMN IF NOT EXISTS grant_id               text,
    ADD COLUMN IF NOT EXISTS inbox_id               uuid,
    ADD COLUMN IF NOT EXISTS payload                jsonb,
    ADD COLUMN IF NOT EXISTS raw_body               text,
    ADD COLUMN IF NOT EXISTS status                 text NOT NULL DEFAULT 'pending',
    ADD COLUMN IF NOT EXISTS attempts               integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS error_message          text,
    ADD COLUMN IF NOT EXISTS received_at            timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS processed_at           timestamptz,
    ADD COLUMN IF NOT EXISTS processing_duration_ms integer,
    ADD COLUMN IF NOT EXISTS msg_id                 bigint,
    ADD COLUMN IF NOT EXISTS created_at             timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at             timestamptz NOT NULL DEFAULT now();

ALTER TABLE inbox_sync_stats
    ADD COLUMN IF NOT EXISTS threads_total      integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS threads_queued     integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS threads_processing integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS threads_completed  integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS threads_failed     integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS messages_total     integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS messages_synced    integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS sync_started_at    timestamptz,
    ADD COLUMN IF NOT EXISTS last_thread_at     timestamptz,
    ADD COLUMN IF NOT EXISTS sync_completed_at  timestamptz,
    ADD COLUMN IF NOT EXISTS created_at         timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at         timestamptz NOT NULL DEFAULT now();

-- thread_id is a plain column kept equal to nylas_thread_id by a trigger (see 061_legacy_writers.sql).
ALTER TABLE queued_threads
    ADD COLUMN IF NOT EXISTS nylas_thread_id text,
    ADD COLUMN IF NOT EXISTS thread_id       text,
    ADD COLUMN IF NOT EXISTS grant_id        text,
    ADD COLUMN IF NOT EXISTS status          text NOT NULL DEFAULT 'queued',
    ADD COLUMN IF NOT EXISTS attempts        integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS error_message   text,
    ADD COLUMN IF NOT EXISTS note            text,
    ADD COLUMN IF NOT EXISTS messages_synced integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS queued_at       timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS started_at      timestamptz,
    ADD COLUMN IF NOT EXISTS processed_at    timestamptz,
    ADD COLUMN IF NOT EXISTS pgmq_queued_at  timestamptz,
    ADD COLUMN IF NOT EXISTS msg_id          bigint,
    ADD COLUMN IF NOT EXISTS created_at      timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at      timestamptz NOT NULL DEFAULT now();

-- 2. Rows our keys and checks would refuse (read once every column exists, so a column the original lacked
-- counts as empty): listed, and the transaction stops.
DO $$
DECLARE
    v_problems text[] := '{}';
    v_check    record;
    v_rows     text;
BEGIN
    FOR v_check IN
        SELECT * FROM (VALUES
            ('flux_inboxes rows without nylas_grant_id (set it or delete the row)',
             $q$SELECT id::text FROM flux_inboxes WHERE nylas_grant_id IS NULL$q$),
            ('flux_inboxes rows sharing a nylas_grant_id (keep one row per grant)',
             $q$SELECT id::text FROM flux_inboxes WHERE nylas_grant_id IN (
                    SELECT nylas_grant_id FROM flux_inboxes GROUP BY 1 HAVING count(*) > 1)$q$),
            ('flux_inbox_configurations rows without inbox_id (delete them)',
             $q$SELECT id::text FROM flux_inbox_configurations WHERE inbox_id IS NULL$q$),
            ('flux_inbox_configurations rows sharing an inbox (keep one configuration per inbox)',
             $q$SELECT id::text FROM flux_inbox_configurations WHERE inbox_id IN (
                    SELECT inbox_id FROM flux_inbox_configurations GROUP BY 1 HAVING count(*) > 1)$q$),
            ('flux_inbox_configurations rows with an unknown backfill_status (expected pending, backfill, '
             'thread_sync, completed, failed or in_progress)',
             $q$SELECT id::text || ' (' || backfill_status || ')' FROM flux_inbox_configurations
                 WHERE backfill_status NOT IN ('pending', 'backfill', 'thread_sync', 'completed', 'failed',
                                               'in_progress')$q$),
            ('flux_email_threads rows without inbox_id or nylas_thread_id (delete them)',
             $q$SELECT id::text FROM flux_email_threads WHERE inbox_id IS NULL OR nylas_thread_id IS NULL$q$),
            ('flux_email_messages rows without a thread or nylas_message_id (delete them: their inbox is unknown)',
             $q$SELECT id::text FROM flux_email_messages WHERE thread_id IS NULL OR nylas_message_id IS NULL$q$),
            ('flux_webhook_notifications rows with an unknown status (expected pending, processing, processed, '
             'error, ignored or rejected)',
             $q$SELECT id::text || ' (' || coalesce(status, 'NULL') || ')' FROM flux_webhook_notifications
                 WHERE status IS NULL OR status NOT IN ('pending', 'processing', 'processed', 'error', 'ignored',
                                                        'rejected')$q$),
            ('flux_webhook_notifications rows sharing a webhook_id (keep the first of each)',
             $q$SELECT id::text FROM flux_webhook_notifications WHERE webhook_id IN (
                    SELECT webhook_id FROM flux_webhook_notifications GROUP BY 1 HAVING count(*) > 1)$q$),
            ('flux_webhook_notifications rows without webhook_id or notification_type (set them from the payload, '
             'or set status to rejected)',
             $q$SELECT id::text FROM flux_webhook_notifications
                 WHERE status IS DISTINCT FROM 'rejected' AND (webhook_id IS NULL OR notification_type IS NULL)$q$),
            ('flux_webhook_notifications rows naming an inbox that does not exist (set inbox_id to NULL)',
             $q$SELECT n.id::text FROM flux_webhook_notifications n
                 WHERE n.inbox_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM flux_inboxes i WHERE i.id = n.inbox_id)$q$),
            ('queued_threads rows without config_id or inbox_id (delete them)',
             $q$SELECT id::text FROM queued_threads WHERE config_id IS NULL OR inbox_id IS NULL$q$),
            ('queued_threads rows whose thread_id and nylas_thread_id differ or are both missing',
             $q$SELECT id::text FROM queued_threads
                 WHERE coalesce(nylas_thread_id, thread_id) IS NULL
                    OR thread_id IS DISTINCT FROM coalesce(nylas_thread_id, thread_id)$q$),
            ('queued_threads rows with an unknown status (expected queued, processing, completed or failed)',
             $q$SELECT id::text || ' (' || coalesce(status, 'NULL') || ')' FROM queued_threads
                 WHERE status IS NULL OR status NOT IN ('queued', 'processing', 'completed', 'failed')$q$)
        ) AS c(problem, query)
    LOOP
        EXECUTE format('SELECT count(*) || '' row(s): '' || string_agg(r, '', '') FROM (%s) AS x(r)', v_check.query)
            INTO v_rows;
        IF v_rows IS NOT NULL THEN
            v_problems := v_problems || format('%s, %s', v_check.problem, v_rows);
        END IF;
    END LOOP;
    IF cardinality(v_problems) > 0 THEN
        RAISE EXCEPTION 'The database cannot be adopted as it is. Fix these rows, then run nova-email migrate '
            'again:%', E'\n- ' || array_to_string(v_problems, E'\n- ')
            USING ERRCODE = 'check_violation';
    END IF;
END;
$$;

-- 3. Values for old rows: what the new columns mean is known from the rows they belong to.
UPDATE flux_email_messages m
   SET inbox_id = coalesce(m.inbox_id, t.inbox_id), nylas_thread_id = coalesce(m.nylas_thread_id, t.nylas_thread_id)
  FROM flux_email_threads t
 WHERE t.id = m.thread_id AND (m.inbox_id IS NULL OR m.nylas_thread_id IS NULL);
UPDATE queued_threads q
   SET nylas_thread_id = coalesce(q.nylas_thread_id, q.thread_id), thread_id = coalesce(q.nylas_thread_id, q.thread_id)
 WHERE q.nylas_thread_id IS NULL OR q.thread_id IS NULL;

-- Columns that existed but allowed NULL: NULL becomes our default, then NOT NULL holds.
DO $$
DECLARE
    v_column record;
BEGIN
    FOR v_column IN
        SELECT c.table_name, c.column_name, ours.column_default
          FROM information_schema.columns c
          JOIN (VALUES
              ('flux_inboxes', 'nylas_grant_id', NULL), ('flux_inboxes', 'status', $d$'active'::text$d$),
              ('flux_inboxes', 'webhook_health_status', $d$'healthy'::text$d$),
              ('flux_inboxes', 'created_at', 'now()'), ('flux_inboxes', 'updated_at', 'now()'),
              ('flux_inbox_configurations', 'inbox_id', NULL),
              ('flux_inbox_configurations', 'backfill_status', $d$'pending'::text$d$),
              ('flux_inbox_configurations', 'backfill_progress', $d$'{}'::jsonb$d$),
              ('flux_inbox_configurations', 'created_at', 'now()'), ('flux_inbox_configurations', 'updated_at', 'now()'),
              ('flux_email_threads', 'inbox_id', NULL), ('flux_email_threads', 'nylas_thread_id', NULL),
              ('flux_email_threads', 'participants', $d$'[]'::jsonb$d$),
              ('flux_email_threads', 'unread', 'false'), ('flux_email_threads', 'starred', 'false'),
              ('flux_email_threads', 'created_at', 'now()'), ('flux_email_threads', 'updated_at', 'now()'),
              ('flux_email_messages', 'thread_id', NULL), ('flux_email_messages', 'inbox_id', NULL),
              ('flux_email_messages', 'nylas_message_id', NULL),
              ('flux_email_messages', 'to_recipients', $d$'[]'::jsonb$d$),
              ('flux_email_messages', 'cc_recipients', $d$'[]'::jsonb$d$),
              ('flux_email_messages', 'bcc_recipients', $d$'[]'::jsonb$d$),
              ('flux_email_messages', 'reply_to', $d$'[]'::jsonb$d$),
              ('flux_email_messages', 'attachments', $d$'[]'::jsonb$d$),
              ('flux_email_messages', 'folders', $d$'[]'::jsonb$d$),
              ('flux_email_messages', 'unread', 'true'), ('flux_email_messages', 'starred', 'false'),
              ('flux_email_messages', 'headers', $d$'[]'::jsonb$d$),
              ('flux_email_messages', 'created_at', 'now()'), ('flux_email_messages', 'updated_at', 'now()'),
              ('flux_webhook_notifications', 'status', $d$'pending'::text$d$),
              ('flux_webhook_notifications', 'received_at', 'now()'),
              ('flux_webhook_notifications', 'created_at', 'now()'),
              ('flux_webhook_notifications', 'updated_at', 'now()'),
              ('inbox_sync_stats', 'created_at', 'now()'), ('inbox_sync_stats', 'updated_at', 'now()'),
              ('queued_threads', 'config_id', NULL), ('queued_threads', 'inbox_id', NULL),
              ('queued_threads', 'nylas_thread_id', NULL), ('queued_threads', 'status', $d$'queued'::text$d$),
              ('queued_threads', 'messages_synced', '0'), ('queued_threads', 'queued_at', 'now()'),
              ('queued_threads', 'created_at', 'now()'), ('queued_threads', 'updated_at', 'now()')
          ) AS ours(table_name, column_name, column_default)
            ON ours.table_name = c.table_name AND ours.column_name = c.column_name
         WHERE c.table_schema = 'public' AND c.is_nullable = 'YES'
         ORDER BY 1, 2
    LOOP
        IF v_column.column_default IS NOT NULL THEN
            EXECUTE format('ALTER TABLE %I ALTER COLUMN %I SET DEFAULT %s', v_column.table_name,
                           v_column.column_name, v_column.column_default);
            EXECUTE format('UPDATE %I SET %I = DEFAULT WHERE %I IS NULL', v_column.table_name, v_column.column_name,
                           v_column.column_name);
        END IF;
        EXECUTE format('ALTER TABLE %I ALTER COLUMN %I SET NOT NULL', v_column.table_name, v_column.column_name);
    END LOOP;
END;
$$;

-- 4. Keys and checks, by name, where missing. A unique key on a Nylas id alone goes: ids are unique per grant.
DO $$
DECLARE
    v_constraint record;
    v_name       name;
BEGIN
    FOR v_constraint IN
        SELECT c.conrelid::regclass AS table_name, c.conname
          FROM pg_constraint c
         WHERE c.contype = 'u'
           AND ((c.conrelid = 'flux_email_threads'::regclass
                 AND c.conkey = ARRAY[(SELECT attnum FROM pg_attribute
                                        WHERE attrelid = c.conrelid AND attname = 'nylas_thread_id')])
             OR (c.conrelid = 'flux_email_messages'::regclass
                 AND c.conkey = ARRAY[(SELECT attnum FROM pg_attribute
                                        WHERE attrelid = c.conrelid AND attname = 'nylas_message_id')]))
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', v_constraint.table_name, v_constraint.conname);
    END LOOP;

    -- Foreign keys are declared again whatever the original named them: their ON DELETE rules are ours.
    FOR v_constraint IN
        SELECT * FROM (VALUES
            ('flux_inbox_configurations', 'inbox_id', 'flux_inboxes (id) ON DELETE CASCADE'),
            ('flux_email_threads', 'inbox_id', 'flux_inboxes (id) ON DELETE CASCADE'),
            ('flux_email_messages', 'thread_id', 'flux_email_threads (id) ON DELETE CASCADE'),
            ('flux_email_messages', 'inbox_id', 'flux_inboxes (id) ON DELETE CASCADE'),
            ('flux_webhook_notifications', 'inbox_id', 'flux_inboxes (id) ON DELETE SET NULL'),
            ('inbox_sync_stats', 'config_id', 'flux_inbox_configurations (id) ON DELETE CASCADE'),
            ('queued_threads', 'config_id', 'flux_inbox_configurations (id) ON DELETE CASCADE'),
            ('queued_threads', 'inbox_id', 'flux_inboxes (id) ON DELETE CASCADE')
        ) AS ours(table_name, column_name, target)
    LOOP
        FOR v_name IN
            SELECT c.conname FROM pg_constraint c
             WHERE c.contype = 'f' AND c.conrelid = v_constraint.table_name::regclass
               AND c.conkey = ARRAY[(SELECT a.attnum FROM pg_attribute a
                                      WHERE a.attrelid = c.conrelid AND a.attname = v_constraint.column_name)]
        LOOP
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', v_constraint.table_name, v_name);
        END LOOP;
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I FOREIGN KEY (%I) REFERENCES %s', v_constraint.table_name,
                       v_constraint.table_name || '_' || v_constraint.column_name || '_fkey',
                       v_constraint.column_name, v_constraint.target);
    END LOOP;

    FOR v_constraint IN
        SELECT * FROM (VALUES
            ('flux_inboxes', 'flux_inboxes_nylas_grant_id_key', 'UNIQUE (nylas_grant_id)'),
            ('flux_inbox_configurations', 'flux_inbox_configurations_inbox_id_key', 'UNIQUE (inbox_id)'),
            ('flux_inbox_configurations', 'flux_inbox_configurations_backfill_status_check',
             $c$CHECK (backfill_status IN ('pending', 'backfill', 'thread_sync', 'completed', 'failed', 'in_progress'))$c$),
            ('flux_inbox_configurations', 'flux_inbox_configurations_backfill_progress_check',
             $c$CHECK (jsonb_typeof(backfill_progress) = 'object')$c$),
            ('flux_inbox_configurations', 'flux_inbox_configurations_backfill_window_check',
             'CHECK (backfill_start_date IS NULL OR backfill_end_date IS NULL OR backfill_start_date <= backfill_end_date)'),
            ('flux_email_threads', 'flux_email_threads_inbox_id_nylas_thread_id_key', 'UNIQUE (inbox_id, nylas_thread_id)'),
            ('flux_email_messages', 'flux_email_messages_inbox_id_nylas_message_id_key',
             'UNIQUE (inbox_id, nylas_message_id)'),
            ('flux_webhook_notifications', 'flux_webhook_notifications_webhook_id_key', 'UNIQUE (webhook_id)'),
            ('flux_webhook_notifications', 'flux_webhook_notifications_status_check',
             $c$CHECK (status IN ('pending', 'processing', 'processed', 'error', 'ignored', 'rejected'))$c$),
            ('flux_webhook_notifications', 'flux_webhook_notifications_identity_check',
             $c$CHECK (status = 'rejected' OR (webhook_id IS NOT NULL AND notification_type IS NOT NULL))$c$),
            ('flux_webhook_notifications', 'flux_webhook_notifications_attempts_check', 'CHECK (attempts >= 0)'),
            ('queued_threads', 'queued_threads_config_id_nylas_thread_id_key', 'UNIQUE (config_id, nylas_thread_id)'),
            ('queued_threads', 'queued_threads_status_check',
             $c$CHECK (status IN ('queued', 'processing', 'completed', 'failed'))$c$),
            ('queued_threads', 'queued_threads_attempts_check', 'CHECK (attempts >= 0)'),
            ('queued_threads', 'queued_threads_messages_synced_check', 'CHECK (messages_synced >= 0)')
        ) AS ours(table_name, name, definition)
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_constraint c
                        WHERE c.conrelid = v_constraint.table_name::regclass AND c.conname = v_constraint.name) THEN
            EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I %s', v_constraint.table_name, v_constraint.name,
                           v_constraint.definition);
        END IF;
    END LOOP;
END;
$$;

-- 5. The original's versions of our functions, and its row triggers on queued_threads that wrote the stats.
DO $$
DECLARE
    v_object record;
BEGIN
    FOR v_object IN
        SELECT p.oid::regprocedure AS signature
          FROM pg_proc p
         WHERE p.pronamespace = 'public'::regnamespace
           AND p.proname = ANY (string_to_array(current_setting('nova.adopt_functions'), ','))
    LOOP
        EXECUTE format('DROP FUNCTION %s', v_object.signature);
    END LOOP;

    FOR v_object IN
        SELECT t.tgname
          FROM pg_trigger t
          JOIN pg_proc p ON p.oid = t.tgfoid
         WHERE t.tgrelid = 'queued_threads'::regclass AND NOT t.tgisinternal
           AND p.prosrc ILIKE '%inbox_sync_stats%'
    LOOP
        EXECUTE format('DROP TRIGGER %I ON queued_threads', v_object.tgname);
    END LOOP;
END;
$$;

-- The tables' triggers that survive step 5 are on again.
SELECT flux_resume_trigger(table_name, trigger_name) FROM flux_adopt_paused_triggers;
