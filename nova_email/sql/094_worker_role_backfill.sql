-- The backfill functions of 050 and 055 for nova_worker.
--
-- 050 granted its functions only when nova_worker already existed, and 091 (which creates nothing but revokes every
-- function grant of the role first) did not name them: the workers could call them only through PUBLIC's default
-- EXECUTE, and stopped where that had been revoked. Numbered after 091 so that it runs after it on a fresh database
-- too; a database that already applied 091 applies 055 and this one in order.
GRANT EXECUTE ON FUNCTION
    public.flux_stored_thread_is_current(uuid, jsonb),
    public.record_backfill_page(uuid, jsonb, text, integer, timestamptz),
    public.continue_backfill_listing(uuid),
    public.continue_backfill_listing(uuid, integer),
    public.start_backfill_slice(uuid),
    public.flux_require_checkpoint(uuid, integer),
    public.record_listed_page(uuid, jsonb, text, integer, timestamptz)
TO nova_worker;
