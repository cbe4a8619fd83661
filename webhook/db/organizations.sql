-- Organizations (when the app has them): a customer that bills an organization (its metadata, or
-- its checkout session's, names it) is linked by stripe_customers.organization_id, under the same
-- rules as a user link (db/functions.sql, stripe_apply_customer), and the organization's
-- subscription_tier follows the customer's best subscription. Membership is the app's
-- public.organization_members (organization_id, user_id), read by stripe_has_access and
-- stripe_user_billing (db/billing.sql). An app without public.organizations: every step here does
-- nothing and organization links stay off. Run `db migrate` again after adding organizations.
-- Applied by `db migrate` after db/billing.sql; idempotent; undone by db/rollback.sql.

-- step: an organizations table the consumer can keep the tier of
-- The app's own table: its rows are never touched here; a shape the links cannot work with is
-- refused with the reason (never half accepted).
DO $$
DECLARE
  v_problems text[] := '{}';
BEGIN
  IF to_regclass('public.organizations') IS NULL THEN
    RETURN;
  END IF;
  IF (SELECT format_type(atttypid, atttypmod) FROM pg_attribute
      WHERE attrelid = 'public.organizations'::regclass AND attname = 'id' AND NOT attisdropped) IS DISTINCT FROM 'uuid' THEN
    v_problems := v_problems || 'its id is not a uuid'::text;
  ELSIF NOT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = 'public.organizations'::regclass AND indisunique
                    AND indnkeyatts = 1 AND indpred IS NULL AND indexprs IS NULL
                    AND indkey[0] = (SELECT attnum FROM pg_attribute WHERE attrelid = 'public.organizations'::regclass
                                     AND attname = 'id')) THEN
    v_problems := v_problems || 'its id is not unique (a primary key)'::text;
  END IF;
  IF (SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'public.organizations'::regclass
      AND attname = 'subscription_tier' AND NOT attisdropped) IS DISTINCT FROM 'text' THEN
    v_problems := v_problems || 'it has no subscription_tier text column'::text;
  END IF;
  IF to_regclass('public.organization_members') IS NULL THEN
    v_problems := v_problems || 'there is no public.organization_members (organization_id, user_id) table or view'::text;
  END IF;
  IF cardinality(v_problems) > 0 THEN
    RAISE EXCEPTION 'public.organizations cannot be billed: %; fix it (or drop it, if the app has no organizations) and migrate again',
      array_to_string(v_problems, '; ');
  END IF;
END $$;

-- step: one customer an organization (no lock: built beside the traffic)
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS stripe_customers_organization_id_key
  ON public.stripe_customers (organization_id);

-- step: ... made the column's UNIQUE constraint (a moment's lock, once: the index is built)
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'public.stripe_customers'::regclass
                 AND conname = 'stripe_customers_organization_id_key') THEN
    ALTER TABLE public.stripe_customers ADD CONSTRAINT stripe_customers_organization_id_key
      UNIQUE USING INDEX stripe_customers_organization_id_key;
  END IF;
END $$;

-- step: a deleted organization lets go of its customer (ON DELETE SET NULL); added unchecked, so
-- the brief lock does not wait for a scan, and checked in the next step
DO $$
BEGIN
  IF to_regclass('public.organizations') IS NOT NULL AND NOT EXISTS (
      SELECT 1 FROM pg_constraint WHERE conrelid = 'public.stripe_customers'::regclass
        AND conname = 'stripe_customers_organization_id_fkey') THEN
    ALTER TABLE public.stripe_customers ADD CONSTRAINT stripe_customers_organization_id_fkey
      FOREIGN KEY (organization_id) REFERENCES public.organizations (id) ON DELETE SET NULL NOT VALID;
  END IF;
END $$;

-- step: the organization links checked (a scan that lets deliveries write); a link to an organization
-- deleted while no key guarded it is let go first
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'public.stripe_customers'::regclass
             AND conname = 'stripe_customers_organization_id_fkey' AND NOT convalidated) THEN
    UPDATE public.stripe_customers c SET organization_id = NULL
    WHERE c.organization_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM public.organizations o WHERE o.id = c.organization_id);
    ALTER TABLE public.stripe_customers VALIDATE CONSTRAINT stripe_customers_organization_id_fkey;
  END IF;
END $$;

-- step: members are looked up by user
-- stripe_has_access reads public.organization_members by user_id on every call: without an index
-- leading with user_id it scans the table. It is the app's table, so migrate says so rather than
-- building one on it.
DO $$
BEGIN
  IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('public.organization_members')) IN ('r', 'p')
     AND NOT EXISTS (SELECT 1 FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
                     WHERE x.indrelid = to_regclass('public.organization_members') AND a.attname = 'user_id') THEN
    RAISE WARNING 'public.organization_members has no index leading with user_id: stripe_has_access scans it; '
      'CREATE INDEX CONCURRENTLY ON public.organization_members (user_id)';
  END IF;
END $$;

-- step: the organization functions and triggers
-- The tier a list of subscriptions' items names (each subscription's items, in the order given):
-- the first price's tier metadata (items[].tier), else the first price's lookup key, else NULL. An
-- add-on price that names no tier never hides the plan's, wherever it stands.
CREATE OR REPLACE FUNCTION public.stripe_items_tier(p_items jsonb[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT coalesce(
    (SELECT x.item ->> 'tier' FROM unnest(p_items) WITH ORDINALITY AS s (items, m),
       jsonb_array_elements(s.items) WITH ORDINALITY AS x (item, n)
     WHERE x.item ->> 'tier' IS NOT NULL ORDER BY s.m, x.n LIMIT 1),
    (SELECT x.item ->> 'lookup_key' FROM unnest(p_items) WITH ORDINALITY AS s (items, m),
       jsonb_array_elements(s.items) WITH ORDINALITY AS x (item, n)
     WHERE x.item ->> 'lookup_key' IS NOT NULL ORDER BY s.m, x.n LIMIT 1))
$$;

-- An organization's subscription_tier, from its customer's active subscriptions (else its trialing
-- ones), oldest first (Stripe's created) and in item order, by stripe_items_tier; else the
-- free tier (STRIPE_FREE_TIER, which the consumer sets for each transaction; 'free' for a change
-- made by hand). Written only when it moves, audited with the event (or person) that moved it.
-- Serialised per organization and read after the lock, so that of two concurrent changes the later
-- one sees the earlier's subscriptions. SECURITY DEFINER: a deletion by hand (service_role) moves it too.
CREATE OR REPLACE FUNCTION public.stripe_organization_tier(p_org uuid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
  v_customer text;
  v_tier text;
  v_old text;
BEGIN
  IF p_org IS NULL OR to_regclass('public.organizations') IS NULL THEN
    RETURN;
  END IF;
  PERFORM pg_advisory_xact_lock(hashtextextended('stripe_organization:' || p_org, 0));
  SELECT o.subscription_tier INTO v_old FROM public.organizations o WHERE o.id = p_org FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RETURN;  -- deleted (its customer's link goes with it)
  END IF;
  SELECT c.stripe_customer_id INTO v_customer FROM public.stripe_customers c WHERE c.organization_id = p_org;
  SELECT public.stripe_items_tier(array_agg(s.items ORDER BY coalesce(s.started_at, s.created_at),
                                             s.stripe_subscription_id)) INTO v_tier
  FROM public.stripe_subscriptions s
  WHERE s.stripe_customer_id = v_customer AND s.status = (
    SELECT min(a.status) FROM public.stripe_subscriptions a  -- 'active' < 'trialing'
    WHERE a.stripe_customer_id = v_customer AND a.status IN ('active', 'trialing'));
  v_tier := coalesce(v_tier, nullif(current_setting('stripe_webhook.free_tier', true), ''), 'free');
  IF v_tier IS DISTINCT FROM v_old THEN
    UPDATE public.organizations o SET subscription_tier = v_tier WHERE o.id = p_org;
    INSERT INTO public.stripe_customers_audit
      (object, stripe_id, stripe_customer_id, operation, old_row, new_row, event_id, changed_by)
    VALUES ('organization', p_org::text, v_customer, 'UPDATE', jsonb_build_object('subscription_tier', v_old),
            jsonb_build_object('subscription_tier', v_tier), nullif(current_setting('stripe_webhook.event_id', true), ''),
            coalesce(nullif(current_setting('stripe_webhook.actor', true), ''), current_user));
  END IF;
END $$;

-- A customer's organization link made, moved or gone (an event, verify --fix, a deletion by hand, the
-- organization's own deletion): the organization it left is handed on to a customer that claims it,
-- and the tier of both organizations follows. A customer whose organization was deleted says so
-- (and is 'unlinked' when it bills nobody else).
CREATE OR REPLACE FUNCTION public.stripe_customers_organization() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = '' AS $$
DECLARE
  v_deleted boolean := false;
BEGIN
  IF TG_OP = 'UPDATE' AND NEW.organization_id IS NULL THEN
    IF to_regclass('public.organizations') IS NULL THEN
      v_deleted := true;
    ELSE
      v_deleted := NOT EXISTS (SELECT 1 FROM public.organizations o WHERE o.id = OLD.organization_id);
    END IF;
  END IF;
  IF v_deleted THEN
    UPDATE public.stripe_customers c SET customer_metadata = jsonb_set(c.customer_metadata, '{sync}',
      coalesce(c.customer_metadata -> 'sync', '{}') || jsonb_build_object(
        'status', CASE WHEN c.user_id IS NULL THEN 'unlinked' ELSE coalesce(c.customer_metadata #>> '{sync,status}', 'synced') END,
        'note', 'its organization ' || OLD.organization_id || ' was deleted'))
    WHERE c.id = NEW.id;
  END IF;
  IF TG_OP <> 'INSERT' THEN
    PERFORM public.stripe_hand_on('organization', OLD.organization_id,
      'linked to its organization when customer ' || OLD.stripe_customer_id
        || ', which billed the organization, ' || CASE WHEN TG_OP = 'DELETE' THEN 'was removed' ELSE 'let go of it' END);
    PERFORM public.stripe_organization_tier(OLD.organization_id);
  END IF;
  IF TG_OP <> 'DELETE' THEN
    PERFORM public.stripe_organization_tier(NEW.organization_id);
  END IF;
  RETURN NULL;
END $$;
SELECT public.stripe_create_trigger('stripe_customers_organization_made',
  'AFTER INSERT ON public.stripe_customers FOR EACH ROW WHEN (NEW.organization_id IS NOT NULL) '
  'EXECUTE FUNCTION public.stripe_customers_organization()');
SELECT public.stripe_create_trigger('stripe_customers_organization_moved',
  'AFTER UPDATE OF organization_id ON public.stripe_customers FOR EACH ROW '
  'WHEN (OLD.organization_id IS DISTINCT FROM NEW.organization_id) EXECUTE FUNCTION public.stripe_customers_organization()');
SELECT public.stripe_create_trigger('stripe_customers_organization_gone',
  'AFTER DELETE ON public.stripe_customers FOR EACH ROW WHEN (OLD.organization_id IS NOT NULL) '
  'EXECUTE FUNCTION public.stripe_customers_organization()');

-- A subscription written (or removed) moves its customer's organization's tier, if it bills one.
-- The customer's lock, shared, is taken first: a concurrent event linking that customer to an
-- organization then either finishes before this reads the link, or starts after this commits and
-- finds this subscription.
CREATE OR REPLACE FUNCTION public.stripe_subscriptions_tier() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = '' AS $$
DECLARE
  v_customer text := CASE WHEN TG_OP = 'DELETE' THEN OLD.stripe_customer_id ELSE NEW.stripe_customer_id END;
BEGIN
  PERFORM pg_advisory_xact_lock_shared(hashtextextended('stripe_customer:' || v_customer, 0));
  PERFORM public.stripe_organization_tier(c.organization_id) FROM public.stripe_customers c
  WHERE c.stripe_customer_id = v_customer AND c.organization_id IS NOT NULL;
  RETURN NULL;
END $$;
SELECT public.stripe_create_trigger('stripe_subscriptions_tier',
  'AFTER INSERT OR UPDATE OR DELETE ON public.stripe_subscriptions FOR EACH ROW '
  'EXECUTE FUNCTION public.stripe_subscriptions_tier()');
