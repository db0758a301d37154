-- Months of the original's history, in miniature: two inboxes (one in a status of the application's own), a
-- completed backfill with its stats and threads, a configuration never backfilled, and webhook audit rows.

INSERT INTO flux_inboxes (id, nylas_grant_id, email, provider, status, webhook_health_status, created_at, updated_at)
VALUES
    ('11111111-0000-4000-8000-000000000001', 'grant-adopt', 'ada@example.org', 'google', 'active', 'healthy',
     '2025-06-01 09:00+00', '2025-11-20 10:00+00'),
    ('11111111-0000-4000-8000-000000000002', 'grant-other', 'bob@example.org', 'microsoft', 'connected', 'unknown',
     '2025-07-01 09:00+00', '2025-07-01 09:00+00');

INSERT INTO flux_inbox_configurations (id, inbox_id, backfill_status, backfill_started_at, backfill_completed_at,
                                       backfill_progress, created_at, updated_at)
VALUES
    ('22222222-0000-4000-8000-000000000001', '11111111-0000-4000-8000-000000000001', 'completed',
     '2025-11-20 10:00+00', '2025-11-20 10:05+00', '{"threads_queued": 0, "current_page": 0}',
     '2025-06-01 09:00+00', '2025-11-20 10:05+00'),
    ('22222222-0000-4000-8000-000000000002', '11111111-0000-4000-8000-000000000002', NULL, NULL, NULL, '{}',
     '2025-07-01 09:00+00', '2025-07-01 09:00+00');

INSERT INTO inbox_sync_stats (config_id, threads_total, threads_queued, threads_processing, threads_completed,
                              threads_failed, messages_total, messages_synced, sync_started_at, last_thread_at,
                              sync_completed_at, created_at, updated_at)
VALUES ('22222222-0000-4000-8000-000000000001', 2, 2, 0, 2, 0, 3, 3, '2025-11-20 10:00+00', '2025-11-20 10:04+00',
        '2025-11-20 10:05+00', '2025-11-20 10:00+00', '2025-11-20 10:05+00');

INSERT INTO flux_email_threads (id, inbox_id, nylas_thread_id, subject, snippet, participants,
                                latest_message_received_date, unread, starred, created_at, updated_at)
VALUES
    ('33333333-0000-4000-8000-000000000001', '11111111-0000-4000-8000-000000000001', 'thr_orig_1', 'Quarterly plan',
     'See attached', '[{"name": "Bob", "email": "bob@example.org"}]', '2025-11-19 08:00+00', true, false,
     '2025-11-20 10:01+00', '2025-11-20 10:01+00'),
    ('33333333-0000-4000-8000-000000000002', '11111111-0000-4000-8000-000000000001', 'thr_orig_2', '(No Subject)',
     '', '[]', '2025-11-18 08:00+00', false, true, '2025-11-20 10:02+00', '2025-11-20 10:02+00');

INSERT INTO flux_email_messages (id, thread_id, nylas_message_id, subject, sender, body, received_date, to_recipients,
                                 cc_recipients, bcc_recipients, reply_to, attachments, folders, unread, starred,
                                 snippet, headers, created_at, updated_at)
VALUES
    ('44444444-0000-4000-8000-000000000001', '33333333-0000-4000-8000-000000000001', 'msg_orig_1', 'Quarterly plan',
     '{"name": "Bob", "email": "bob@example.org"}', '<p>Plan</p>', '2025-11-18 08:00+00',
     '[{"email": "ada@example.org"}]', '[]', '[]', '[]', '[]', '["INBOX"]', false, false, 'Plan', '[]',
     '2025-11-20 10:01+00', '2025-11-20 10:01+00'),
    ('44444444-0000-4000-8000-000000000002', '33333333-0000-4000-8000-000000000001', 'msg_orig_2', 'Re: Quarterly plan',
     '{"name": "Ada", "email": "ada@example.org"}', '<p>Thanks</p>', '2025-11-19 08:00+00',
     '[{"email": "bob@example.org"}]', '[]', '[]', '[]', '[]', '["SENT"]', true, false, 'Thanks', '[]',
     '2025-11-20 10:01+00', '2025-11-20 10:01+00'),
    ('44444444-0000-4000-8000-000000000003', '33333333-0000-4000-8000-000000000002', 'msg_orig_3', '(No Subject)',
     '{"email": "unknown@example.com"}', '', '2025-11-18 08:00+00', '[]', '[]', '[]', '[]', '[]', '[]', true, true,
     '', '[]', '2025-11-20 10:02+00', '2025-11-20 10:02+00');

INSERT INTO queued_threads (id, config_id, inbox_id, thread_id, nylas_thread_id, grant_id, status, queued_at,
                            started_at, processed_at, messages_synced, pgmq_queued_at)
VALUES
    ('55555555-0000-4000-8000-000000000001', '22222222-0000-4000-8000-000000000001',
     '11111111-0000-4000-8000-000000000001', 'thr_orig_1', 'thr_orig_1', 'grant-adopt', 'completed',
     '2025-11-20 10:00+00', '2025-11-20 10:01+00', '2025-11-20 10:01+00', 2, '2025-11-20 10:00+00'),
    ('55555555-0000-4000-8000-000000000002', '22222222-0000-4000-8000-000000000001',
     '11111111-0000-4000-8000-000000000001', 'thr_orig_2', 'thr_orig_2', NULL, 'completed',
     '2025-11-20 10:00+00', '2025-11-20 10:02+00', '2025-11-20 10:02+00', 1, '2025-11-20 10:00+00');

INSERT INTO flux_webhook_notifications (id, webhook_id, notification_type, grant_id, inbox_id, payload, status,
                                        error_message, received_at, processed_at, processing_duration_ms, created_at)
VALUES
    ('66666666-0000-4000-8000-000000000001', 'wh-orig-1', 'message.created', 'grant-adopt',
     '11111111-0000-4000-8000-000000000001',
     '{"id": "wh-orig-1", "type": "message.created", "data": {"object": {"id": "msg_orig_2"}}}', 'processed', NULL,
     '2025-11-19 08:00+00', '2025-11-19 08:00:01+00', 245, '2025-11-19 08:00+00'),
    ('66666666-0000-4000-8000-000000000002', 'wh-orig-2', 'thread.replied', 'grant-adopt',
     '11111111-0000-4000-8000-000000000001',
     '{"id": "wh-orig-2", "type": "thread.replied", "data": {"object": {"thread_id": "thr_orig_1"}}}', 'error',
     'Thread ID missing', '2025-11-19 08:00+00', '2025-11-19 08:03+00', 12, '2025-11-19 08:00+00');
