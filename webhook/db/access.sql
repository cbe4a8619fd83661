-- Who may do what, for every table and function of the consumer (every public.stripe_* one,
-- whatever a release adds): applied last by `db migrate`, after the files that create them.
-- Idempotent, and takes no lock when nothing changes (each change is guarded by a catalog check).
-- Users read their own customer row through row level security; the API roles write nothing and
-- call nothing; the service role (BYPASSRLS) and the consumer's own role do everything.

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
