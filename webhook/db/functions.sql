-- The functions and triggers behind db/schema.sql's tables: one call per event, the ordering rules
-- and the opening every object's change goes through (stripe_open), the one audit and the one
-- tombstone writer, and the customer's write. Applied right after db/schema.sql by `db migrate`; idempotent;
-- undone by db/rollback.sql.

-- step: functions and triggers
-- A trigger is created only when missing: CREATE OR REPLACE TRIGGER would take a lock that makes
-- every delivery wait, on every release. One whose definition changes must get a new name.
CREATE OR REPLACE FUNCTION public.stripe_create_trigger(p_name text, p_definition text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  -- Trigger names are the consumer's own (stripe_…) whatever the table, so the name alone decides.
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = p_name AND NOT tgisinternal) THEN
    EXECUTE format('CREATE TRIGGER %I %s', p_name, p_definition);
  END IF;
END $$;

CREATE OR REPLACE FUNCTION public.stripe_customers_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.updated_at := now();
  RETURN NEW;
END $$;
SELECT public.stripe_create_trigger('stripe_customers_touch',
  'BEFORE UPDATE ON public.stripe_customers FOR EACH ROW EXECUTE FUNCTION public.stripe_customers_touch()');

-- A trigger, not the consumer, writes the audit so that changes made by hand are caught too; one
-- trigger function for every declared object's table. TG_ARGV: the object, its id column, its
-- metadata column. stripe_webhook.event_id is set transaction-locally by stripe_apply_event;
-- stripe_webhook.actor (support:<name>) by the console's actions, so the audit names the person who
-- acted. An update that only moves the row's sync stamp (which event or read it reflects, and when:
-- the thin and snapshot versions of one change, a Stripe read finding the row already right) is no
-- change to audit.
CREATE OR REPLACE FUNCTION public.stripe_restamped(p_old jsonb, p_new jsonb, p_metadata text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
  SELECT p_old - 'updated_at' - p_metadata = p_new - 'updated_at' - p_metadata
    AND (p_old -> p_metadata) - 'sync' = (p_new -> p_metadata) - 'sync'
    AND (p_old #> ARRAY[p_metadata, 'sync']) - '{event_id,event_created,synced_at,source}'::text[]
      = (p_new #> ARRAY[p_metadata, 'sync']) - '{event_id,event_created,synced_at,source}'::text[]
$$;

CREATE OR REPLACE FUNCTION public.stripe_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  v_old jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END;  -- each row image made once
  v_new jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
  v_row jsonb := coalesce(v_new, v_old);
BEGIN
  -- A move of what releases before 2026-12-07 kept elsewhere (db/one_shape.sql) changes nothing.
  IF (TG_OP = 'UPDATE' AND public.stripe_restamped(v_old, v_new, TG_ARGV[2]))
     OR current_setting('stripe_webhook.reshaping', true) = 'on' THEN
    RETURN NULL;
  END IF;
  INSERT INTO public.stripe_customers_audit
    (object, stripe_id, stripe_customer_id, user_id, operation, old_row, new_row, event_id, changed_by)
  VALUES (TG_ARGV[0], v_row ->> TG_ARGV[1], v_row ->> 'stripe_customer_id', (v_row ->> 'user_id')::uuid, TG_OP,
          v_old, v_new, nullif(current_setting('stripe_webhook.event_id', true), ''),
          coalesce(nullif(current_setting('stripe_webhook.actor', true), ''), current_user));
  RETURN NULL;
END $$;

-- The one writer of tombstones: an object's row is gone as of this event time, or stays gone as of
-- a newer one. SECURITY DEFINER: whoever deletes by hand (service_role from the dashboard) may not
-- write the tombstones; the API roles may not call it (db/access.sql).
CREATE OR REPLACE FUNCTION public.stripe_bury(p_object text, p_id text, p_event_id text, p_event_created bigint)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = '' AS $$
  INSERT INTO public.stripe_object_tombstones AS t (object, stripe_id, event_id, event_created)
  VALUES (p_object, p_id, p_event_id, p_event_created)
  ON CONFLICT (object, stripe_id) DO UPDATE SET event_id = EXCLUDED.event_id,
    event_created = EXCLUDED.event_created, deleted_at = now() WHERE t.event_created <= EXCLUDED.event_created
$$;

-- A deletion applied by the consumer (an event, a read of Stripe) buries the object with the
-- deletion's own time, also when it has no row here (a deletion delivered before its creation),
-- and tells the trigger below that this row is seen to.
CREATE OR REPLACE FUNCTION public.stripe_deleting(p_object text, p_id text, p_event_id text, p_event_created bigint)
RETURNS void LANGUAGE sql AS $$
  SELECT public.stripe_bury(p_object, p_id, p_event_id, p_event_created);
  SELECT set_config('stripe_webhook.buried', p_object || '/' || p_id, true);
$$;

-- However else a row leaves its table (verify's deletion of a row Stripe never had, the auth.users
-- cascade, a DELETE by hand): buried as of the newest event time it reflected. TG_ARGV as for the audit.
CREATE OR REPLACE FUNCTION public.stripe_tombstone() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  v_row jsonb := to_jsonb(OLD);
  v_sync jsonb := v_row #> ARRAY[TG_ARGV[2], 'sync'];
BEGIN
  IF current_setting('stripe_webhook.buried', true) IS DISTINCT FROM TG_ARGV[0] || '/' || (v_row ->> TG_ARGV[1]) THEN
    PERFORM public.stripe_bury(TG_ARGV[0], v_row ->> TG_ARGV[1], v_sync ->> 'event_id',
                               coalesce((v_sync ->> 'event_created')::bigint, 0));
  END IF;
  RETURN NULL;
END $$;

-- An object's table gets its audit and its tombstones by these two triggers (and updated_at by
-- stripe_customers_touch where it has one).
CREATE OR REPLACE FUNCTION public.stripe_object_triggers(p_table text, p_object text, p_id text, p_metadata text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  v_args text := format('(%L, %L, %L)', p_object, p_id, p_metadata);
BEGIN
  PERFORM public.stripe_create_trigger(p_table || '_audited', format('AFTER INSERT OR UPDATE OR DELETE ON public.%I '
    'FOR EACH ROW EXECUTE FUNCTION public.stripe_audit_row%s', p_table, v_args));
  PERFORM public.stripe_create_trigger(p_table || '_buried', format('AFTER DELETE ON public.%I '
    'FOR EACH ROW EXECUTE FUNCTION public.stripe_tombstone%s', p_table, v_args));
END $$;

-- Triggers of releases before 2026-12-07 (an audit and tombstones of their own per table), dropped
-- once the ones above are in place, in the same transaction: never a moment with two or none.
CREATE OR REPLACE FUNCTION public.stripe_drop_trigger(p_table text, p_name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = p_name AND tgrelid = to_regclass('public.' || p_table)) THEN
    EXECUTE format('DROP TRIGGER %I ON public.%I', p_name, p_table);
  END IF;
END $$;

SELECT public.stripe_object_triggers('stripe_customers', 'customer', 'stripe_customer_id', 'customer_metadata');
SELECT public.stripe_drop_trigger('stripe_customers', 'stripe_customers_audit');
DROP FUNCTION IF EXISTS public.stripe_customers_audit_row();

-- A link's tables: its holders' (auth.users, public.organizations: NULL when the app has none)
-- and the claims on them. The column is the link's name and _id in both stripe_customers and the claims.
CREATE OR REPLACE FUNCTION public.stripe_link_tables(p_link text, OUT holders regclass, OUT claims text)
LANGUAGE sql STABLE AS $$
  SELECT to_regclass(CASE p_link WHEN 'user' THEN 'auth.users' ELSE 'public.organizations' END),
         CASE p_link WHEN 'user' THEN 'public.stripe_customer_claims' ELSE 'public.stripe_organization_claims' END
$$;

-- A user is never left without a customer while one names them: when a customer lets go of its
-- user (its row leaves, or a newer event points it at another user), the newest other customer
-- whose metadata names that user and that could not be linked for it takes the user over. The
-- same for an organization (p_link 'organization'). Returns that customer, if any. Also
-- reconciliation's mend for a user or organization left unlinked (stripe_relink).
-- SECURITY DEFINER: whoever deletes (service_role from the dashboard or the API) may not read
-- auth.users, and once plpgsql caches a generic plan the check below is made as the deleter.
-- Dynamic SQL (the link names the columns): it runs only when a link is let go of.
CREATE OR REPLACE FUNCTION public.stripe_hand_on(p_link text, p_holder uuid, p_note text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
  v_tables record := public.stripe_link_tables(p_link);
  v_holders regclass := v_tables.holders;
  v_claims text := v_tables.claims;
  v_column text := p_link || '_id';  -- user_id | organization_id, in stripe_customers and the claims alike
  v_found boolean;
  v_heir text;
BEGIN
  IF p_holder IS NULL OR v_holders IS NULL THEN
    RETURN NULL;
  END IF;
  -- In the auth.users cascade (or an organization's deletion) the holder itself is gone: nobody to hand on.
  EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE id = $1)', v_holders) INTO v_found USING p_holder;
  IF NOT v_found THEN
    RETURN NULL;
  END IF;
  PERFORM pg_advisory_xact_lock(hashtextextended('stripe_' || p_link || ':' || p_holder, 0));
  EXECUTE format('SELECT EXISTS (SELECT 1 FROM public.stripe_customers WHERE %I = $1)', v_column) INTO v_found USING p_holder;
  IF v_found THEN
    RETURN NULL;
  END IF;
  -- A candidate locked by a transaction applying an event to it is left to that event, which
  -- takes the holder's lock after this transaction and then finds the holder free.
  EXECUTE format($sql$
    SELECT s.stripe_customer_id FROM %1$s c JOIN public.stripe_customers s USING (stripe_customer_id)
    WHERE c.%2$I = $1 AND s.%2$I IS NULL AND s.customer_metadata #>> '{sync,named_%2$s}' = $1::text
    ORDER BY (s.customer_metadata #>> '{sync,event_created}')::bigint DESC NULLS LAST
    LIMIT 1 FOR UPDATE OF s SKIP LOCKED$sql$, v_claims, v_column) INTO v_heir USING p_holder;
  IF v_heir IS NOT NULL THEN
    EXECUTE format('DELETE FROM %s WHERE stripe_customer_id = $1', v_claims) USING v_heir;
    EXECUTE format($sql$UPDATE public.stripe_customers SET %1$I = $1, customer_metadata = jsonb_set(customer_metadata,
      '{sync}', (customer_metadata -> 'sync') - 'named_%1$s' || jsonb_build_object('status', 'synced', 'note', $2))
      WHERE stripe_customer_id = $3$sql$, v_column) USING p_holder, p_note, v_heir;
  END IF;
  RETURN v_heir;
END $$;

-- However a row leaves (customer.deleted, verify --fix, the auth.users cascade, by hand): its claims
-- go, and its user is handed on (its tombstone is stripe_tombstone's).
CREATE OR REPLACE FUNCTION public.stripe_customers_gone() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = '' AS $$
BEGIN
  DELETE FROM public.stripe_customer_claims WHERE stripe_customer_id = OLD.stripe_customer_id;
  DELETE FROM public.stripe_organization_claims WHERE stripe_customer_id = OLD.stripe_customer_id;
  PERFORM public.stripe_hand_on('user', OLD.user_id,
    'linked to its user when customer ' || OLD.stripe_customer_id || ', which held the user, was removed');
  RETURN NULL;
END $$;
SELECT public.stripe_create_trigger('stripe_customers_gone',
  'AFTER DELETE ON public.stripe_customers FOR EACH ROW EXECUTE FUNCTION public.stripe_customers_gone()');

-- A link that moves (a newer event names another user) hands the user it left on, as a deletion does.
CREATE OR REPLACE FUNCTION public.stripe_customers_moved() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = '' AS $$
BEGIN
  PERFORM public.stripe_hand_on('user', OLD.user_id,
    'linked to its user when customer ' || OLD.stripe_customer_id || ', which held the user, moved to another user');
  RETURN NULL;
END $$;
SELECT public.stripe_create_trigger('stripe_customers_moved',
  'AFTER UPDATE OF user_id ON public.stripe_customers FOR EACH ROW '
  'WHEN (OLD.user_id IS NOT NULL AND OLD.user_id IS DISTINCT FROM NEW.user_id) '
  'EXECUTE FUNCTION public.stripe_customers_moved()');

-- Users (and organizations) that no customer holds while an unlinked customer names them (left so
-- by a change made outside the consumer, or before the triggers above): reconciliation lists them
-- and, with p_fix, links each to the newest such customer.
CREATE OR REPLACE FUNCTION public.stripe_relink(p_fix boolean)
RETURNS TABLE (link text, holder uuid, stripe_customer_id text) LANGUAGE plpgsql AS $$
DECLARE
  v_tables record;
BEGIN
  FOREACH link IN ARRAY CASE WHEN public.stripe_organizations_on() THEN ARRAY['user', 'organization']
                             ELSE ARRAY['user'] END LOOP
    v_tables := public.stripe_link_tables(link);
    FOR holder, stripe_customer_id IN EXECUTE format($sql$
      SELECT DISTINCT ON (c.%1$I) c.%1$I, c.stripe_customer_id
      FROM %2$s c JOIN public.stripe_customers s ON s.stripe_customer_id = c.stripe_customer_id
      WHERE s.%1$I IS NULL AND s.customer_metadata #>> '{sync,named_%1$s}' = c.%1$I::text
        AND NOT EXISTS (SELECT 1 FROM public.stripe_customers o WHERE o.%1$I = c.%1$I)
        AND EXISTS (SELECT 1 FROM %3$s h WHERE h.id = c.%1$I)
      ORDER BY c.%1$I, (s.customer_metadata #>> '{sync,event_created}')::bigint DESC NULLS LAST$sql$,
      link || '_id', v_tables.claims, v_tables.holders)
    LOOP
      IF p_fix THEN
        stripe_customer_id := public.stripe_hand_on(link, holder,
          format('linked to its %s by reconciliation: no customer held the %s', link, link));
        CONTINUE WHEN stripe_customer_id IS NULL;
      END IF;
      RETURN NEXT;
    END LOOP;
  END LOOP;
END $$;
-- The release before this one asks for users only.
CREATE OR REPLACE FUNCTION public.stripe_relink_users(p_fix boolean)
RETURNS TABLE (user_id uuid, stripe_customer_id text) LANGUAGE sql AS $$
  SELECT r.holder, r.stripe_customer_id FROM public.stripe_relink(p_fix) AS r WHERE r.link = 'user'
$$;

DROP FUNCTION IF EXISTS public.stripe_hand_on_user(uuid, text);  -- now stripe_hand_on('user', …)

-- Whether an update's data.previous_attributes equal another event's object on those fields
-- (nested objects such as metadata compared key by key; a missing key equals null).
CREATE OR REPLACE FUNCTION public.stripe_attrs_match(p_previous jsonb, p_object jsonb)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  v_key text;
  v_value jsonb;
BEGIN
  IF jsonb_typeof(p_previous) IS DISTINCT FROM 'object' OR p_previous = '{}' THEN
    RETURN false;
  END IF;
  FOR v_key, v_value IN SELECT * FROM jsonb_each(p_previous) LOOP
    IF jsonb_typeof(v_value) = 'object' AND jsonb_typeof(p_object -> v_key) = 'object' THEN
      IF NOT public.stripe_attrs_match(v_value, p_object -> v_key) AND v_value <> '{}' THEN
        RETURN false;
      END IF;
    ELSIF v_value <> coalesce(p_object -> v_key, 'null') THEN
      RETURN false;
    END IF;
  END LOOP;
  RETURN true;
END $$;

-- Stripe's `created` has one-second resolution and Stripe delivers in any order, so two events of
-- one object in one second need another rule (docs/reference.md, "Event semantics"): the type first, then the
-- updates' previous_attributes against the other event's payload from the log. Returns
-- 'newer:<rule>' or 'older:<rule>' for p_event against p_other_id, or NULL when neither decides.
CREATE OR REPLACE FUNCTION public.stripe_tie_order(p_event jsonb, p_other_id text)
RETURNS text LANGUAGE plpgsql STABLE AS $$
DECLARE
  v_other jsonb;
  v_after boolean;
  v_before boolean;
BEGIN
  IF p_event ->> 'type' LIKE '%.deleted' THEN RETURN 'newer:type'; END IF;
  IF p_event ->> 'type' LIKE '%.created' THEN RETURN 'older:type'; END IF;
  SELECT payload INTO v_other FROM public.stripe_webhook_events WHERE id = p_other_id;
  IF v_other ->> 'type' LIKE '%.created' THEN RETURN 'newer:type'; END IF;
  -- A deleted subscription stays (canceled): nothing of the same second comes after its deletion.
  IF v_other ->> 'type' LIKE '%.deleted' THEN RETURN 'older:type'; END IF;
  IF v_other IS NULL THEN RETURN NULL; END IF;
  v_after := public.stripe_attrs_match(p_event #> '{data,previous_attributes}', v_other #> '{data,object}');
  v_before := public.stripe_attrs_match(v_other #> '{data,previous_attributes}', p_event #> '{data,object}');
  IF v_after AND NOT v_before THEN RETURN 'newer:previous_attributes'; END IF;
  IF v_before AND NOT v_after THEN RETURN 'older:previous_attributes'; END IF;
  RETURN NULL;
END $$;

-- Applies one customer change (p_change: action upsert|delete|link, id, email, name,
-- default_payment_method, metadata, user_id, note; optionally as_of, the unix time of a Stripe
-- retrieve the state comes from, and tie = 'unsettled' to apply over an undecided tie).
-- status: processed | stale | tie (nothing written: the caller asks Stripe, or calls again with
-- tie = 'unsettled'); note: why a checkout could not link, for the log row; tie: how a tie was settled.
-- Stripe delivers out of order and retries, and several workers run at once, so each customer is
-- serialised by a transaction-scoped lock (safe behind a transaction-mode pooler), then checked
-- against its tombstone and the newest event it reflects.
-- Whether a state may be applied to an object's row: the ordering rules every Stripe object shares.
-- p_sync: the row's sync stamp (event_id, event_created), NULL when there is no row; p_gone: the
-- newest event time of a row that left the table (its tombstone); p_as_of: the event's created, or
-- the clock of a Stripe read (p_event_id NULL). verdict: apply | stale | tie (neither the type nor
-- previous_attributes could order two same-second events: the caller asks Stripe, or calls again
-- with p_unsettled, and the event delivered last is applied with tie_note saying so).
CREATE OR REPLACE FUNCTION public.stripe_order(
  p_sync jsonb, p_gone bigint, p_as_of bigint, p_event_id text, p_event jsonb, p_unsettled boolean,
  OUT verdict text, OUT tie text, OUT tie_note text
) LANGUAGE plpgsql STABLE AS $$
DECLARE
  v_row_created bigint := (p_sync ->> 'event_created')::bigint;
BEGIN
  verdict := 'apply';
  IF p_gone >= p_as_of OR v_row_created > p_as_of THEN
    verdict := 'stale';
  ELSIF v_row_created = p_as_of AND p_event_id IS NOT NULL AND p_event_id IS DISTINCT FROM p_sync ->> 'event_id' THEN
    IF p_unsettled THEN
      tie := 'newer:unsettled';
      tie_note := 'tie not settled: ' || coalesce(p_sync ->> 'event_id', 'a read from Stripe')
        || ' has the same second and their order could not be told; the event delivered last was applied';
    ELSE
      tie := public.stripe_tie_order(p_event, p_sync ->> 'event_id');
      verdict := CASE WHEN tie IS NULL THEN 'tie' WHEN tie LIKE 'older:%' THEN 'stale' ELSE 'apply' END;
    END IF;
  END IF;
END $$;

-- Whether organization links are on: `db migrate` found public.organizations and made
-- stripe_customers.organization_id refer to it (db/organizations.sql). Until then a customer's
-- organization is not looked at, and nothing fails.
CREATE OR REPLACE FUNCTION public.stripe_organizations_on() RETURNS boolean LANGUAGE sql STABLE AS $$
  SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint WHERE conrelid = 'public.stripe_customers'::regclass
                 AND conname = 'stripe_customers_organization_id_fkey')
$$;

-- The link part of a customer's sync stamp, from its user and organization as they end up and what
-- the change named: 'unlinked' when it links nothing, or when a link it named could not be taken
-- (then named_user_id / named_organization_id say which, for the claim); the note says why.
-- STABLE, as jsonb_build_object is: declared IMMUTABLE it would not be inlined into the caller's
-- statement, and a SQL function that is not is parsed and planned on every call, on the hot path.
CREATE OR REPLACE FUNCTION public.stripe_link_state(
  p_user uuid, p_named_user uuid, p_org uuid, p_named_org uuid, p_org_note text, p_note text
) RETURNS jsonb LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('status', CASE
      WHEN (p_user IS NULL AND p_org IS NULL) OR (p_user IS NULL AND p_named_user IS NOT NULL)
        OR (p_org IS NULL AND (p_named_org IS NOT NULL OR p_org_note IS NOT NULL)) THEN 'unlinked'
      ELSE 'synced' END)
    || CASE WHEN coalesce(p_note, '') = '' THEN '{}' ELSE jsonb_build_object('note', p_note) END
    || CASE WHEN p_user IS NULL AND p_named_user IS NOT NULL THEN jsonb_build_object('named_user_id', p_named_user)
       ELSE '{}' END
    || CASE WHEN p_org IS NULL AND p_named_org IS NOT NULL THEN jsonb_build_object('named_organization_id', p_named_org)
       ELSE '{}' END
$$;

-- A refused link's claim: the customer takes the user (or organization) over when its holder goes.
CREATE OR REPLACE FUNCTION public.stripe_claim(
  p_cus text, p_user uuid, p_named_user uuid, p_org uuid, p_named_org uuid
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  IF p_user IS NULL AND p_named_user IS NOT NULL THEN
    INSERT INTO public.stripe_customer_claims VALUES (p_named_user, p_cus) ON CONFLICT DO NOTHING;
  END IF;
  IF p_org IS NULL AND p_named_org IS NOT NULL THEN
    INSERT INTO public.stripe_organization_claims VALUES (p_named_org, p_cus) ON CONFLICT DO NOTHING;
  END IF;
END $$;

-- The sync stamp every object's row carries in <object>_metadata.sync: where its state came from
-- and which event (or read of Stripe, by its clock) it reflects. VOLATILE, as its body is
-- (clock_timestamp): a SQL function declared less volatile than its body is not inlined, and is
-- then parsed and planned again on every call.
CREATE OR REPLACE FUNCTION public.stripe_sync_stamp(p_source text, p_event_id text, p_as_of bigint, p_note text)
RETURNS jsonb LANGUAGE sql VOLATILE AS $$
  SELECT jsonb_build_object('status', 'synced', 'source', p_source, 'event_id', p_event_id, 'event_created', p_as_of,
    'synced_at', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
    || CASE WHEN coalesce(p_note, '') = '' THEN '{}' ELSE jsonb_build_object('note', p_note) END
$$;

-- The opening every change of a declared object goes through (stripe_apply_object): the object's
-- lock (transaction-scoped, so safe behind a transaction-mode pooler: deliveries of one object to
-- several workers queue here), the state's time (the event's created, or the clock of a read of
-- Stripe, p_change.as_of), the event it stamps, and stripe_order against the row's sync stamp and
-- the object's tombstone. A change that only links (a checkout) carries no state: it is ordered
-- against the tombstone alone, so it never goes stale and never brings a deleted object back.
CREATE OR REPLACE FUNCTION public.stripe_open(
  p_object text, p_id text, p_change jsonb, p_event_id text, p_event_created bigint, p_event jsonb,
  OUT verdict text, OUT tie text, OUT tie_note text, OUT as_of bigint, OUT event_id text
) LANGUAGE plpgsql AS $$
DECLARE
  v_gone bigint;
  v_sync jsonb;
  v_order record;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended('stripe_' || p_object || ':' || p_id, 0));
  as_of := coalesce((p_change ->> 'as_of')::bigint, p_event_created);
  event_id := CASE WHEN p_change ->> 'as_of' IS NULL THEN p_event_id END;
  SELECT t.event_created INTO v_gone FROM public.stripe_object_tombstones t WHERE t.object = p_object AND t.stripe_id = p_id;
  -- The row's stamp: the one place that knows each declared object's table, a line per object
  -- (static SQL, so each plan is kept). A change that only links carries no state: no stamp.
  IF p_change ->> 'action' = 'link' THEN NULL;
  ELSIF p_object = 'customer' THEN
    SELECT customer_metadata -> 'sync' INTO v_sync FROM public.stripe_customers WHERE stripe_customer_id = p_id;
  ELSIF p_object = 'subscription' THEN
    SELECT subscription_metadata -> 'sync' INTO v_sync FROM public.stripe_subscriptions WHERE stripe_subscription_id = p_id;
  ELSIF p_object = 'entitlements' THEN
    SELECT entitlements_metadata -> 'sync' INTO v_sync FROM public.stripe_entitlement_sets WHERE stripe_customer_id = p_id;
  ELSIF p_object = 'payment_method' THEN
    SELECT payment_method_metadata -> 'sync' INTO v_sync FROM public.stripe_payment_methods
    WHERE stripe_payment_method_id = p_id;
  ELSIF p_object = 'invoice' THEN
    SELECT invoice_metadata -> 'sync' INTO v_sync FROM public.stripe_invoices WHERE stripe_invoice_id = p_id;
  END IF;
  v_order := public.stripe_order(v_sync, v_gone, as_of, event_id, p_event, p_change ->> 'tie' = 'unsettled');
  verdict := v_order.verdict; tie := v_order.tie; tie_note := v_order.tie_note;
END $$;
DROP FUNCTION IF EXISTS public.stripe_stamp(text, text);

DROP FUNCTION IF EXISTS public.stripe_apply_customer(jsonb, text, text, bigint);  -- before it took p_event
-- Writes one customer change (p_change: action upsert|delete|link, id, email, name,
-- default_payment_method, metadata, user_id, note, organization_id, organization_note) once
-- stripe_apply_object's opening let it through; returns why a checkout could not link, if so.
-- A customer may bill a user (user_id), an organization (organization_id), or both: each link is
-- taken only when its holder exists and no other customer holds it, never stolen; a refused one
-- leaves the customer 'unlinked' with a note, and a claim that stripe_hand_on honours when the
-- holder's customer goes. Organizations are off (nothing named is looked at) when the app has no
-- public.organizations.
CREATE OR REPLACE FUNCTION public.stripe_apply_customer(
  p_change jsonb, p_source text, p_event_id text, p_as_of bigint, p_tie_note text DEFAULT NULL, OUT note text
) LANGUAGE plpgsql AS $$
DECLARE
  v_cus text := p_change ->> 'id';
  v_action text := p_change ->> 'action';
  v_named uuid := p_change ->> 'user_id';
  v_user uuid := v_named;
  v_note text := p_change ->> 'note';
  v_org_named uuid := p_change ->> 'organization_id';
  v_org uuid := v_org_named;
  v_org_note text := p_change ->> 'organization_note';
  v_as_of bigint := p_as_of;
  v_row public.stripe_customers;
  v_sync jsonb;
BEGIN
  IF v_action = 'delete' THEN
    DELETE FROM public.stripe_customers WHERE stripe_customer_id = v_cus;  -- stripe_customers_gone hands the user on
    RETURN;
  END IF;
  SELECT * INTO v_row FROM public.stripe_customers WHERE stripe_customer_id = v_cus;
  -- The user lock keeps two customers from claiming one user at once.
  IF v_user IS NOT NULL THEN
    PERFORM pg_advisory_xact_lock(hashtextextended('stripe_user:' || v_user, 0));
    IF NOT EXISTS (SELECT 1 FROM auth.users WHERE id = v_user) THEN
      v_note := 'no auth.users row has that user id'; v_user := NULL;
    ELSIF EXISTS (SELECT 1 FROM public.stripe_customers WHERE user_id = v_user AND stripe_customer_id <> v_cus) THEN
      v_note := 'that user is already linked to another customer'; v_user := NULL;
    END IF;
  END IF;
  -- The same for an organization, under a lock of its own.
  IF (v_org_named IS NOT NULL OR v_org_note IS NOT NULL) AND NOT public.stripe_organizations_on() THEN
    v_org_named := NULL; v_org := NULL; v_org_note := NULL;
  ELSIF v_org IS NOT NULL THEN
    PERFORM pg_advisory_xact_lock(hashtextextended('stripe_organization:' || v_org, 0));
    IF NOT EXISTS (SELECT 1 FROM public.organizations WHERE id = v_org) THEN
      v_org_note := 'no public.organizations row has that organization id'; v_org := NULL;
    ELSIF EXISTS (SELECT 1 FROM public.stripe_customers WHERE organization_id = v_org AND stripe_customer_id <> v_cus) THEN
      v_org_note := 'that organization is already billed by another customer'; v_org := NULL;
    END IF;
  END IF;
  IF v_action = 'link' THEN
    IF v_row.user_id IS NOT NULL AND v_user IS DISTINCT FROM v_row.user_id THEN
      v_note := 'this customer is already linked to another user';
    END IF;
    IF v_row.organization_id IS NOT NULL AND v_org_named IS NOT NULL AND v_org IS DISTINCT FROM v_row.organization_id THEN
      v_org_note := 'this customer already bills another organization';
    END IF;
    note := concat_ws('; ',
      CASE WHEN v_row.user_id IS NOT NULL OR v_user IS NULL THEN
        'checkout for user ' || coalesce(v_named::text, 'with no valid user id') || ' not linked: ' || v_note END,
      'checkout for organization ' || coalesce(v_org_named::text, 'with no valid organization id')
        || ' not linked: ' || v_org_note);
    note := nullif(note, '');
    IF v_row.id IS NOT NULL THEN
      v_user := coalesce(v_row.user_id, v_user);
      v_org := coalesce(v_row.organization_id, v_org);
      -- A claim named before stays until the link is taken.
      v_sync := coalesce(v_row.customer_metadata -> 'sync', '{}') - 'note'
        - CASE WHEN v_user IS NOT NULL THEN 'named_user_id' ELSE '' END
        - CASE WHEN v_org IS NOT NULL THEN 'named_organization_id' ELSE '' END;
      v_sync := v_sync || public.stripe_link_state(v_user, v_named, v_org, v_org_named, v_org_note, note);
      UPDATE public.stripe_customers SET user_id = v_user, organization_id = v_org,
        customer_metadata = jsonb_set(customer_metadata, '{sync}', v_sync)
      WHERE id = v_row.id;
      PERFORM public.stripe_claim(v_cus, v_user, v_named, v_org, v_org_named);
      RETURN;
    END IF;
    v_as_of := NULL;  -- a row made by a checkout is unstamped: every event of its customer applies
  END IF;
  v_user := coalesce(v_user, v_row.user_id);
  v_org := coalesce(v_org, v_row.organization_id);
  v_note := nullif(concat_ws('; ', p_tie_note, coalesce(note, v_note), CASE WHEN note IS NULL THEN v_org_note END), '');
  INSERT INTO public.stripe_customers AS c
    (stripe_customer_id, user_id, organization_id, customer_email, customer_name, default_payment_method, customer_metadata)
  VALUES (v_cus, v_user, v_org, p_change ->> 'email', p_change ->> 'name', p_change ->> 'default_payment_method',
    jsonb_build_object('stripe', coalesce(p_change -> 'metadata', '{}'), 'sync',
      public.stripe_sync_stamp(p_source, p_event_id, v_as_of, NULL)
      || public.stripe_link_state(v_user, v_named, v_org, v_org_named, v_org_note, v_note)))
  ON CONFLICT (stripe_customer_id) DO UPDATE SET user_id = EXCLUDED.user_id, organization_id = EXCLUDED.organization_id,
    customer_email = EXCLUDED.customer_email, customer_name = EXCLUDED.customer_name,
    default_payment_method = EXCLUDED.default_payment_method, customer_metadata = EXCLUDED.customer_metadata;
  PERFORM public.stripe_claim(v_cus, v_user, v_named, v_org, v_org_named);
END $$;

-- The customer an event concerns: the object itself when it is a customer (customer.created,
-- .updated, .deleted), else the object's `customer` (customer.subscription.*, customer.source.*,
-- customer.discount.*, checkout.session.*, …), an id or an expanded object.
CREATE OR REPLACE FUNCTION public.stripe_event_customer_id(p_event jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN p_event ->> 'object' = 'v2.core.event'  -- a thin notification: the customer it names, if any
    THEN CASE WHEN p_event #>> '{related_object,id}' ~ '^cus_' THEN p_event #>> '{related_object,id}' END
  WHEN p_event ->> 'type' LIKE 'customer.%'
               AND coalesce(p_event #>> '{data,object,object}', 'customer') = 'customer'
    THEN p_event #>> '{data,object,id}'
    ELSE coalesce(p_event #>> '{data,object,customer,id}', p_event #>> '{data,object,customer}') END
$$;

-- One call per verified event, in one transaction: log it, recognise a duplicate, apply it.
-- Returns processed | duplicate | ignored | stale, followed by '/<rule>' when a same-second tie
-- was settled, or 'tie' when it could not be (nothing written). p_change NULL: only logged.
-- `replay` (p_source 'replay') re-runs ignored and stale events too.
-- What one event came to, as the caller reads it: status processed | duplicate | ignored | stale |
-- tie (nothing written: the caller asks Stripe, or calls again with tie = 'unsettled'), and how a
-- same-second tie was settled; or, for an event that failed alone, its SQLSTATE and message.
DO $$
BEGIN
  IF to_regtype('public.stripe_outcome') IS NULL THEN
    CREATE TYPE public.stripe_outcome AS (status text, settled_by text, sqlstate text, message text);
  END IF;
  -- Releases before the type returned text from these two: replaced (same step, one transaction).
  IF (SELECT prorettype FROM pg_proc WHERE oid = to_regprocedure('public.stripe_apply_event(jsonb, jsonb, text)'))
     = 'text'::regtype THEN
    DROP FUNCTION public.stripe_apply_event(jsonb, jsonb, text);
  END IF;
  IF (SELECT prorettype FROM pg_proc
      WHERE oid = to_regprocedure('public.stripe_apply_caught(text, text, text, text, boolean)')) = 'text'::regtype THEN
    DROP FUNCTION public.stripe_apply_caught(text, text, text, text, boolean);
  END IF;
END $$;

CREATE OR REPLACE FUNCTION public.stripe_apply_event(p_event jsonb, p_change jsonb, p_source text)
RETURNS public.stripe_outcome LANGUAGE plpgsql AS $$
DECLARE
  v_id text := p_event ->> 'id';
  -- A snapshot event's created is unix seconds; a thin notification's an ISO 8601 time.
  v_created bigint := CASE WHEN jsonb_typeof(p_event -> 'created') = 'number' THEN (p_event ->> 'created')::bigint
                           ELSE extract(epoch FROM (p_event ->> 'created')::timestamptz)::bigint END;
  v_status text := 'ignored';
  v_note text;
  v_tie text;
  v_applied record;
BEGIN
  -- Deliveries of one event id queue here; the later one then finds it finished: a duplicate.
  PERFORM pg_advisory_xact_lock(hashtextextended('stripe_event:' || v_id, 0));
  IF EXISTS (SELECT 1 FROM public.stripe_webhook_events WHERE id = v_id AND status NOT IN ('received', 'failed')
             AND (p_source <> 'replay' OR status = 'processed')) THEN
    RETURN ROW('duplicate', NULL, NULL, NULL)::public.stripe_outcome;
  END IF;
  PERFORM set_config('stripe_webhook.event_id', v_id, true);
  IF p_change IS NOT NULL THEN
    -- Assigned, not SELECTed FROM: a function in FROM is run through a tuplestore (pg_stat_statements).
    v_applied := public.stripe_apply_object(p_change, p_source, v_id, v_created, p_event);
    v_status := v_applied.status; v_note := v_applied.note; v_tie := v_applied.tie;
    IF v_status = 'tie' THEN RETURN ROW('tie', NULL, NULL, NULL)::public.stripe_outcome; END IF;
  END IF;
  -- Written once, with its outcome: an insert, or the retry of a failed, received (or replayed) event.
  INSERT INTO public.stripe_webhook_events AS e (id, type, api_version, livemode, created, payload, status,
    attempts, last_error, processed_at, stripe_customer_id)
  VALUES (v_id, p_event ->> 'type', p_event ->> 'api_version', coalesce((p_event ->> 'livemode')::boolean, false),
          to_timestamp(v_created), p_event, v_status, 1, v_note, now(),
          coalesce(nullif(p_change ->> 'customer', ''),
                   CASE WHEN coalesce(p_change ->> 'object', 'customer') IN ('customer', 'entitlements') THEN p_change ->> 'id' END,
                   public.stripe_event_customer_id(p_event), p_event #>> '{data,previous_attributes,customer}'))
  ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, attempts = e.attempts + 1,
    last_error = EXCLUDED.last_error, processed_at = EXCLUDED.processed_at;
  RETURN ROW(v_status, nullif(split_part(v_tie, ':', 2), ''), NULL, NULL)::public.stripe_outcome;
END $$;

-- One event of a shared statement in a subtransaction of its own, so that its error (a fault, a
-- lock timeout, a payload jsonb cannot hold: cast here, not by the caller) fails it alone, with its
-- SQLSTATE and message; status 'wait' when p_defer and its lock is held elsewhere. A statement
-- timeout is not caught (query_canceled is not OTHERS): it ends the whole statement.
-- p_actor: the console's person ('' for nobody), NULL when nobody in the statement is acting.
CREATE OR REPLACE FUNCTION public.stripe_apply_caught(
  p_event text, p_change text, p_source text, p_actor text, p_defer boolean
) RETURNS public.stripe_outcome LANGUAGE plpgsql AS $$
BEGIN
  IF p_actor IS NOT NULL THEN
    PERFORM set_config('stripe_webhook.actor', p_actor, true);
  END IF;
  RETURN public.stripe_apply_event(p_event::jsonb, p_change::jsonb, p_source);
EXCEPTION WHEN OTHERS THEN
  IF p_defer AND SQLSTATE = '55P03' THEN RETURN ROW('wait', NULL, NULL, NULL)::public.stripe_outcome; END IF;
  RETURN ROW(NULL, NULL, SQLSTATE, SQLERRM)::public.stripe_outcome;
END $$;

-- Several events in one statement and one transaction (webhook/batch.py: the deliveries one worker
-- received while its previous statement ran), each in a subtransaction of its own; one outcome row
-- per event, in their order. A lock held elsewhere (a migration, a stuck transaction, another
-- worker's event of the same customer) must hold up only the events that need it: first every
-- event whose locks are free now, then those that found theirs held, sharing one lock timeout. So
-- an event that waits in vain fails alone (answered 503, Stripe retries), and the others of its
-- statement wait at most that long for their commit. All settings are transaction-local.
CREATE OR REPLACE FUNCTION public.stripe_apply_batch(
  p_events text[], p_changes text[], p_sources text[], p_actors text[]
) RETURNS SETOF public.stripe_outcome LANGUAGE plpgsql AS $$
DECLARE
  v_count int := coalesce(array_length(p_events, 1), 0);
  v_outcomes public.stripe_outcome[] := array_fill(NULL::public.stripe_outcome, ARRAY[v_count]);
  v_waiting int[] := '{}';
  v_deadline timestamptz := clock_timestamp() + interval '2 seconds';
  i int;
BEGIN
  PERFORM set_config('lock_timeout', '10ms', true);
  FOR i IN 1 .. v_count LOOP
    v_outcomes[i] := public.stripe_apply_caught(p_events[i], p_changes[i], p_sources[i],
      CASE WHEN p_actors IS NOT NULL THEN coalesce(p_actors[i], '') END, true);
    IF (v_outcomes[i]).status = 'wait' THEN v_waiting := v_waiting || i; END IF;
  END LOOP;
  FOREACH i IN ARRAY v_waiting LOOP
    PERFORM set_config('lock_timeout',
      greatest(1, ceil(extract(epoch FROM v_deadline - clock_timestamp()) * 1000))::int || 'ms', true);
    v_outcomes[i] := public.stripe_apply_caught(p_events[i], p_changes[i], p_sources[i],
      CASE WHEN p_actors IS NOT NULL THEN coalesce(p_actors[i], '') END, false);
  END LOOP;
  RETURN QUERY SELECT * FROM unnest(v_outcomes);
END $$;

-- The batch as the release before this one calls it (text outcomes: 'processed/type', 'tie',
-- 'error:<SQLSTATE>:<message>'), so that it keeps taking deliveries while this one is deployed.
CREATE OR REPLACE FUNCTION public.stripe_apply_events(
  p_events text[], p_changes text[], p_sources text[], p_actors text[]
) RETURNS text[] LANGUAGE sql AS $$
  SELECT coalesce(array_agg(CASE WHEN o.sqlstate IS NOT NULL THEN 'error:' || o.sqlstate || ':' || o.message
                                 ELSE o.status || coalesce('/' || o.settled_by, '') END ORDER BY o.n), '{}')
  FROM public.stripe_apply_batch(p_events, p_changes, p_sources, p_actors)
    WITH ORDINALITY AS o (status, settled_by, sqlstate, message, n)
$$;


-- step (repeat): events about a customer's subscription, card, discount or tax id were once filed
-- under that object's own id; file them under their customer, a batch a transaction
UPDATE public.stripe_webhook_events SET stripe_customer_id = public.stripe_event_customer_id(payload)
WHERE id IN (
  SELECT id FROM public.stripe_webhook_events
  WHERE type LIKE 'customer.%' AND stripe_customer_id !~ '^cus_'
    AND stripe_customer_id IS DISTINCT FROM public.stripe_event_customer_id(payload)
  LIMIT 5000);

-- step: lz4 for the large values
-- Every event writes a ~2-3 KB payload into the log and two row images into the audit, which
-- Postgres compresses once a row passes ~2 KB: lz4 does it for a fraction of pglz's CPU at about
-- the same size (docs/performance.md). New values only; a server built without lz4 keeps pglz.
-- Catalog only, but ACCESS EXCLUSIVE for a moment: taken once, when the setting differs.
DO $$
DECLARE
  v_column record;
BEGIN
  IF current_setting('server_version_num')::int < 140000 THEN RETURN; END IF;
  BEGIN
    -- Asked without a lock: the setting refuses lz4 when the server was built without it.
    PERFORM set_config('default_toast_compression', 'lz4', true);
  EXCEPTION WHEN invalid_parameter_value THEN
    RAISE NOTICE 'this server has no lz4: the log and the audit stay compressed with pglz';
    RETURN;
  END;
  FOR v_column IN SELECT attrelid::regclass AS tab, attname FROM pg_attribute
      WHERE (attrelid, attname) IN (('public.stripe_webhook_events'::regclass, 'payload'),
        ('public.stripe_customers_audit'::regclass, 'old_row'), ('public.stripe_customers_audit'::regclass, 'new_row'))
      AND attcompression IS DISTINCT FROM 'l' LOOP
    EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET COMPRESSION lz4', v_column.tab, v_column.attname);
  END LOOP;
END $$;
