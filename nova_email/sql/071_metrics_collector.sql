-- Who collects the deployment's database gauges (nova_queue_*, nova_backfill*): one worker group's metrics process
-- at a time, elected by a lease in a one-row table rather than a session advisory lock, so the election also works
-- through a transaction-mode pooler (which hands each statement to any server session) and needs no connection held
-- open between scrapes. The holder renews its lease at each collection; when it stops (crashed, scaled away) the
-- lease runs out and the next group to scrape takes over. A closing holder gives its lease up at once.
--
-- The table is reachable only through the two functions, which run as their owner: the workers' role (nova_worker,
-- narrowed by 091) needs nothing but EXECUTE, which PUBLIC holds on functions of schema public.

CREATE TABLE IF NOT EXISTS nova_metrics_collector (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    holder text NOT NULL,
    lease_until timestamptz NOT NULL
);

-- Take or renew the lease for `p_lease_s` seconds if it is free, expired or already `p_holder`'s; true when
-- `p_holder` holds it afterwards. One statement: concurrent claims serialise on the row, and exactly one wins.
CREATE OR REPLACE FUNCTION nova_claim_metrics_collector(p_holder text, p_lease_s double precision)
RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
    WITH claimed AS (
        INSERT INTO public.nova_metrics_collector AS c (singleton, holder, lease_until)
        VALUES (true, p_holder, now() + make_interval(secs => p_lease_s))
        ON CONFLICT (singleton) DO UPDATE
            SET holder = excluded.holder, lease_until = excluded.lease_until
            WHERE c.holder = excluded.holder OR c.lease_until < now()
        RETURNING true AS ok
    )
    SELECT EXISTS (SELECT 1 FROM claimed)
$$;

-- Give the lease up if `p_holder` holds it (a metrics process shutting down), so another group takes over at once.
CREATE OR REPLACE FUNCTION nova_release_metrics_collector(p_holder text)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, public
AS $$
    UPDATE public.nova_metrics_collector SET lease_until = '-infinity' WHERE holder = p_holder
$$;
