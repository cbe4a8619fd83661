-- What the app may ask and who may ask it: stripe_has_access() and the stripe_user_billing view,
-- then row level security and the privileges of every table and function of the consumer (every
-- public.stripe_* one, whatever a release adds). Applied last by `db migrate`, after the files that
-- create the tables. Idempotent, and takes no lock when nothing changes (each change is guarded by
-- a catalog check). Users read their own customer row through row level security; the API roles
-- write nothing and call nothing but stripe_has_access(feature); the service role (BYPASSRLS) and
-- the consumer's own role do everything.

-- step: stripe_settings
-- The settings the functions below read (STRIPE_PAST_DUE_GRACE as 'past_due_grace', in seconds),
-- written by each `db migrate` and each start of the app, an unset variable deleting its row: a
-- table, not a session variable, which a transaction-mode pooler would lose, and one index lookup
-- per call, not a SET per statement.
CREATE TABLE IF NOT EXISTS public.stripe_settings (
  name text PRIMARY KEY,
  value text NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);

-- step: payment standing
-- Whether a customer's access path is cut under a grace (CONTRACT's payment standing): unpaid (a
-- subscription `unpaid`, or one that is neither canceled nor incomplete_expired with an invoice
-- marked uncollectible), or an open invoice failing to be paid (a failed attempt, or its due date
-- passed) for longer than the grace. Index lookups by customer, the invoices through their partial
-- indexes. plpgsql, not sql: a sql function whose body has subqueries is never inlined, and before
-- Postgres 18 it is planned again on every call; plpgsql keeps its plan for the session. Called by
-- stripe_has_access, which runs as its owner; the API roles may not call it. stripe_user_billing
-- writes the same rules out (a view's functions are called with the caller's rights).
CREATE OR REPLACE FUNCTION public.stripe_access_cut(p_customer text, p_grace interval) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN EXISTS (
      SELECT 1 FROM public.stripe_subscriptions s WHERE s.stripe_customer_id = p_customer
        AND (s.status = 'unpaid' OR (s.status NOT IN ('canceled', 'incomplete_expired') AND EXISTS (
          SELECT 1 FROM public.stripe_invoices i WHERE i.stripe_subscription_id = s.stripe_subscription_id
            AND i.status = 'uncollectible' AND i.stripe_customer_id = p_customer))))
    OR EXISTS (
      SELECT 1 FROM public.stripe_invoices i WHERE i.stripe_customer_id = p_customer AND i.status = 'open'
        AND i.amount_remaining > 0
        AND least(CASE WHEN i.attempt_count >= 1 THEN i.failing_since END,
                  CASE WHEN i.due_date < now() THEN i.due_date END) + p_grace < now());
END
$$;

-- step: access
-- Does this user have access to a feature? An active entitlement of their own customer, or of the
-- customer of an organization they are a member of (public.organization_members, when the app has
-- organizations: db/organizations.sql). SECURITY DEFINER so that a signed-in user may call it
-- (from the app or inside their own RLS policies) without reading the tables themselves; the
-- one-argument form only ever answers about auth.uid(), the two-argument form is the service
-- role's and the consumer's. Index lookups only: stripe_customers (user_id), stripe_entitlements
-- (pk), and for members organization_members (user_id), stripe_customers (organization_id).
-- Made for the database as migrate finds it (with organizations or without): a SQL function's or
-- a view's tables must exist when it is created.
DO $access$
DECLARE
  v_orgs boolean := public.stripe_organizations_on();
  -- The customers through which the user has the feature: their own, then (members) their
  -- organization's.
  v_paths text := $own$
        SELECT c.stripe_customer_id FROM public.stripe_customers c
        JOIN public.stripe_entitlements e ON e.stripe_customer_id = c.stripe_customer_id
        WHERE c.user_id = %1$s AND e.lookup_key = p_feature$own$;
  v_through_members text := $members$
        UNION ALL
        SELECT c.stripe_customer_id FROM public.organization_members m
        JOIN public.stripe_customers c ON c.organization_id = m.organization_id
        JOIN public.stripe_entitlements e ON e.stripe_customer_id = c.stripe_customer_id
        WHERE m.user_id = %1$s AND e.lookup_key = p_feature$members$;
  -- The view's part that reads organization_members: an array the customers' scan looks up, not a
  -- join, which the planner would weigh every way of running (a tenth of a millisecond each call).
  v_member_of text := $members$
          OR c.organization_id = ANY (ARRAY(SELECT m.organization_id FROM public.organization_members m
                                            WHERE m.user_id = u.user_id))$members$;
  v_version text := 'stripe_user_billing 9' || CASE WHEN v_orgs THEN ' organizations' ELSE '' END;
  -- STRIPE_PAST_DUE_GRACE, read once per call; unset (no row) cuts nothing.
  v_grace text := $grace$DECLARE v_grace interval := (SELECT make_interval(secs => s.value::double precision)
    FROM public.stripe_settings s WHERE s.name = 'past_due_grace'); $grace$;
  v_has_access text;
BEGIN
  IF NOT v_orgs THEN
    v_through_members := ''; v_member_of := '';
  END IF;
  -- Access: a path the grace does not cut, the first one found. Each is checked against the grace
  -- only once it has the feature: OFFSET 0 keeps the cut above the joins (else Postgres filters
  -- every customer it reads by it, feature or not).
  v_has_access := 'SELECT EXISTS (SELECT 1 FROM (' || v_paths || v_through_members || ' OFFSET 0) AS path'
    || ' WHERE v_grace IS NULL OR NOT public.stripe_access_cut(path.stripe_customer_id, v_grace))';
  -- plpgsql, not sql: a sql function with SET search_path is never inlined, and before Postgres 18
  -- it is planned again on every call (0.75 ms median on 15 at the size of docs/performance.md);
  -- plpgsql keeps its plans for the session, which a pooled connection keeps.
  EXECUTE format('CREATE OR REPLACE FUNCTION public.stripe_has_access(p_feature text) RETURNS boolean '
    'LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = %L AS %L', '',
    format(v_grace || 'BEGIN RETURN (' || v_has_access || '); END', 'auth.uid()'));
  EXECUTE format('CREATE OR REPLACE FUNCTION public.stripe_has_access(p_feature text, p_user_id uuid) RETURNS boolean '
    'LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = %L AS %L', '',
    format(v_grace || 'BEGIN RETURN (' || v_has_access || '); END', 'p_user_id'));

  -- stripe_user_billing: one row per user who has a customer or belongs to an organization that
  -- has one: the best subscription among all those customers' (active > trialing > past_due >
  -- unpaid > paused > incomplete > canceled > incomplete_expired, else 'none'; then the latest
  -- period end; then their own customer's, then by organization id), its period end, cancellation
  -- and tier (the first item's tier metadata, else the first item's lookup key, skipping items
  -- that name none: stripe_items_tier's rule, written out because the API roles may call no
  -- function but stripe_has_access; a jsonpath each, not a subquery the planner must plan), and
  -- the entitlements of them all. stripe_customer_id: their own customer, else the best
  -- subscription's; organization_id: the best subscription's customer's organization, else their
  -- first. A signed-in user (anon, authenticated) sees only their own row;
  -- the service role and the consumer see every row. Two branches of users, each gated by a
  -- condition Postgres checks once: a signed-in user's is one lookup; an OR of both would scan every
  -- user for every user. Kept small for the planner, whose time is most of a signed-in user's
  -- query. Replaced only when its version (the view's comment) differs: replacing locks the view.
  IF obj_description(to_regclass('public.stripe_user_billing'), 'pg_class') IS DISTINCT FROM v_version THEN
    EXECUTE format($view$
    CREATE OR REPLACE VIEW public.stripe_user_billing AS
    SELECT u.user_id, coalesce(b.own, best.stripe_customer_id, b.customers[1]) AS stripe_customer_id,
      coalesce(b.organizations[array_position(b.customers, best.stripe_customer_id)],
               (array_remove(b.organizations, NULL))[1]) AS organization_id,
      coalesce(best.status, 'none') AS plan_status, best.current_period_end, best.cancel_at_period_end,
      coalesce(jsonb_path_query_first(best.items, '$[*].tier ? (@ != null)'),
               jsonb_path_query_first(best.items, '$[*].lookup_key ? (@ != null)')) #>> '{}' AS tier,
      coalesce((SELECT array_agg(DISTINCT e.lookup_key ORDER BY e.lookup_key) FROM public.stripe_entitlements e
                WHERE e.stripe_customer_id = ANY (b.customers)), '{}') AS entitlements,
      -- Payment standing over all their customers, the worst first (stripe_access_cut's rules).
      CASE WHEN best.unpaid THEN 'unpaid' WHEN best.past_due THEN 'past_due' WHEN open_ones.failing THEN 'failing'
           WHEN open_ones.action_required THEN 'action_required' ELSE 'ok' END AS payment_state,
      open_ones.since AS payment_failing_since, coalesce(open_ones.owed, 0) AS amount_overdue,
      open_ones.currency AS overdue_currency, open_ones.pay_url,
      open_ones.since + (SELECT make_interval(secs => g.value::double precision) FROM public.stripe_settings g
                         WHERE g.name = 'past_due_grace') AS grace_ends_at
    FROM (
      SELECT auth.uid() AS user_id WHERE current_user IN ('anon', 'authenticated')
      UNION ALL
      -- The two length tests are always true (a uuid's text is 36 characters); Postgres, which
      -- cannot know that, estimates this branch at a handful of rows instead of every user. With
      -- every user counted, a signed-in user's one-row query was planned at a cost past
      -- jit_above_cost, and Postgres 15 with JIT (Debian's default) spent 0.4-0.8 s compiling it.
      SELECT a.id FROM auth.users a WHERE current_user NOT IN ('anon', 'authenticated')
        AND length(a.id::text) = 36 AND octet_length(a.id::text) = 36
    ) AS u
    CROSS JOIN LATERAL (
      -- Their customers, their own first, and each one's organization (NULL for none).
      SELECT (array_agg(x.stripe_customer_id) FILTER (WHERE x.own))[1] AS own,
        array_agg(x.stripe_customer_id ORDER BY x.own DESC, x.organization_id) AS customers,
        array_agg(x.organization_id ORDER BY x.own DESC, x.organization_id) AS organizations
      FROM (
        SELECT c.stripe_customer_id, c.organization_id, c.user_id IS NOT DISTINCT FROM u.user_id AS own
        FROM public.stripe_customers c
        WHERE c.user_id = u.user_id%s) AS x
    ) AS b
    LEFT JOIN LATERAL (
      -- The best subscription, and over all of them whether one is unpaid (stripe_access_cut's
      -- rule) or past_due.
      SELECT s.stripe_customer_id, s.status, s.current_period_end, s.cancel_at_period_end, s.items,
        bool_or(s.status = 'unpaid' OR (s.status NOT IN ('canceled', 'incomplete_expired') AND EXISTS (
          SELECT 1 FROM public.stripe_invoices i WHERE i.stripe_subscription_id = s.stripe_subscription_id
            AND i.status = 'uncollectible' AND i.stripe_customer_id = s.stripe_customer_id))) OVER () AS unpaid,
        bool_or(s.status = 'past_due') OVER () AS past_due
      FROM public.stripe_subscriptions s
      WHERE s.stripe_customer_id = ANY (b.customers)
      ORDER BY array_position(ARRAY['active', 'trialing', 'past_due', 'unpaid', 'paused', 'incomplete', 'canceled',
                                    'incomplete_expired'], s.status), s.current_period_end DESC NULLS LAST,
               array_position(b.customers, s.stripe_customer_id)
      LIMIT 1) AS best ON true
    LEFT JOIN LATERAL (
      -- Their open invoices: failing (a failed attempt, unless it waits for authentication), waiting
      -- for authentication; of those with something to pay that failed or passed their due date
      -- (since is not null): since when (the earliest), where to pay the oldest, and what they owe
      -- in the currency with the largest sum (minor units).
      SELECT bool_or(o.attempt_count >= 1 AND NOT o.action_required) AS failing,
        bool_or(o.action_required) AS action_required, min(o.since) AS since,
        (array_agg(o.hosted_invoice_url ORDER BY o.since) FILTER (WHERE o.since IS NOT NULL))[1] AS pay_url,
        max(o.owed) AS owed,
        (array_agg(o.currency ORDER BY o.owed DESC, o.currency) FILTER (WHERE o.owed IS NOT NULL))[1] AS currency
      FROM (
        SELECT d.*, sum(d.amount_remaining) FILTER (WHERE d.since IS NOT NULL) OVER (PARTITION BY d.currency) AS owed
        FROM (
          SELECT i.attempt_count, i.action_required, i.hosted_invoice_url, i.currency, i.amount_remaining,
            CASE WHEN i.amount_remaining > 0 THEN least(CASE WHEN i.attempt_count >= 1 THEN i.failing_since END,
                                                        CASE WHEN i.due_date < now() THEN i.due_date END) END AS since
          FROM public.stripe_invoices i WHERE i.stripe_customer_id = ANY (b.customers) AND i.status = 'open') AS d
      ) AS o
    ) AS open_ones ON true
    WHERE b.customers IS NOT NULL
    $view$, v_member_of);
    EXECUTE format('COMMENT ON VIEW public.stripe_user_billing IS %L', v_version);
  END IF;
END $access$;

-- step: row level security on every consumer table; the seed's two policies on stripe_customers
-- (a policy is created when missing: a changed one needs a new name)
DO $$
DECLARE
  v_table regclass;
BEGIN
  FOR v_table IN SELECT c.oid::regclass FROM pg_class c
      WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND c.relname LIKE 'stripe\_%'
        AND NOT c.relrowsecurity LOOP
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', v_table);
  END LOOP;
  IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'stripe_customers'
                 AND policyname = 'Users can view own customer data') THEN
    CREATE POLICY "Users can view own customer data" ON public.stripe_customers
      FOR SELECT USING (auth.uid() = user_id);
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'stripe_customers'
                 AND policyname = 'Service role only modifications') THEN
    CREATE POLICY "Service role only modifications" ON public.stripe_customers
      FOR ALL USING (auth.role() = 'service_role');
  END IF;
END $$;

-- step: what the API roles may not do
-- Supabase's default grants give the API roles every privilege on new tables and functions;
-- TRUNCATE ignores row level security and fires no row trigger (no audit, no tombstone), and
-- writes belong to the consumer alone. SELECT on stripe_customers stays: row level security decides.
DO $$
DECLARE
  v_table regclass;
  v_privilege text;
  v_function regprocedure;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
    RETURN;
  END IF;
  FOR v_table IN SELECT c.oid::regclass FROM pg_class c
      WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND c.relname LIKE 'stripe\_%' LOOP
    FOREACH v_privilege IN ARRAY ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER'] LOOP
      CONTINUE WHEN v_table = 'public.stripe_customers'::regclass AND v_privilege = 'SELECT';
      IF has_table_privilege('anon', v_table, v_privilege) OR has_table_privilege('authenticated', v_table, v_privilege) THEN
        EXECUTE format('REVOKE %s ON %s FROM anon, authenticated', v_privilege, v_table);
      END IF;
    END LOOP;
  END LOOP;
  -- Sequences too (Supabase's default privileges grant the API roles UPDATE on them): setval()
  -- would rewind an audit's identity and fail every later insert. Run at each migrate, so a
  -- sequence a later release creates is revoked by the migrate that creates it.
  FOR v_table IN SELECT c.oid::regclass FROM pg_class c
      WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'S' AND c.relname LIKE 'stripe\_%'
        AND (has_sequence_privilege('anon', c.oid, 'USAGE,SELECT,UPDATE')
             OR has_sequence_privilege('authenticated', c.oid, 'USAGE,SELECT,UPDATE')) LOOP
    EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM PUBLIC, anon, authenticated', v_table);
  END LOOP;
  FOR v_function IN SELECT p.oid::regprocedure FROM pg_proc p
      WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'stripe\_%'
        AND p.oid <> 'public.stripe_has_access(text)'::regprocedure
        AND (has_function_privilege('anon', p.oid, 'EXECUTE') OR has_function_privilege('authenticated', p.oid, 'EXECUTE'))
  LOOP
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC, anon, authenticated', v_function);
  END LOOP;
END $$;

-- step: what the app may ask: stripe_has_access(feature) about the signed-in user (anon gets
-- false), the two-argument form for the service role, and a user's own row of stripe_user_billing
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
    RETURN;
  END IF;
  IF NOT has_function_privilege('authenticated', 'public.stripe_has_access(text)', 'EXECUTE')
     OR NOT has_function_privilege('anon', 'public.stripe_has_access(text)', 'EXECUTE') THEN
    GRANT EXECUTE ON FUNCTION public.stripe_has_access(text) TO anon, authenticated, service_role;
  END IF;
  IF NOT has_function_privilege('service_role', 'public.stripe_has_access(text, uuid)', 'EXECUTE') THEN
    GRANT EXECUTE ON FUNCTION public.stripe_has_access(text, uuid) TO service_role;
  END IF;
  IF has_table_privilege('anon', 'public.stripe_user_billing', 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE')
     OR has_table_privilege('authenticated', 'public.stripe_user_billing', 'INSERT,UPDATE,DELETE,TRUNCATE') THEN
    REVOKE ALL ON public.stripe_user_billing FROM anon, authenticated;
  END IF;
  IF NOT has_table_privilege('authenticated', 'public.stripe_user_billing', 'SELECT') THEN
    GRANT SELECT ON public.stripe_user_billing TO authenticated, service_role;
  END IF;
END $$;
