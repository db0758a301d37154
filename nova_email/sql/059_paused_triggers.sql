-- Pausing a table's triggers while a migration completes its rows: filling a new column, or an adopted row's missing
-- values, is not an update of the row (its updated_at stays) nor a change to count. Used by 060_legacy_api.sql and,
-- before any numbered migration ran, by adopt_original.sql (`nova_email.migrate` runs this file first there).

CREATE OR REPLACE FUNCTION flux_pause_triggers(p_tables text[])
RETURNS TABLE (table_name regclass, trigger_name name)
LANGUAGE plpgsql AS $$
BEGIN
    FOR table_name, trigger_name IN
        SELECT t.tgrelid::regclass, t.tgname
          FROM pg_trigger t
         WHERE t.tgrelid IN (SELECT to_regclass(n) FROM unnest(p_tables) AS n)
           AND NOT t.tgisinternal AND t.tgenabled <> 'D'
    LOOP
        EXECUTE format('ALTER TABLE %s DISABLE TRIGGER %I', table_name, trigger_name);
        RETURN NEXT;
    END LOOP;
END;
$$;
COMMENT ON FUNCTION flux_pause_triggers(text[]) IS
    'Disables the enabled triggers of the tables named (those that exist) and returns them, for flux_resume_trigger.';

CREATE OR REPLACE FUNCTION flux_resume_trigger(p_table regclass, p_trigger name) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = p_table AND t.tgname = p_trigger) THEN
        EXECUTE format('ALTER TABLE %s ENABLE TRIGGER %I', p_table, p_trigger);
    END IF;
END;
$$;
COMMENT ON FUNCTION flux_resume_trigger(regclass, name) IS
    'Enables a trigger that flux_pause_triggers paused, unless it was dropped since.';
