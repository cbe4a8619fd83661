-- Billing state that access is gated on: subscriptions, each customer's active entitlements and
-- payment methods, kept under the same rules as customers (one ordering function, stripe_order; a
-- transaction-scoped lock per object; tombstones; one audit). The two ways to ask "does this user
-- have access?" (stripe_has_access() and the stripe_user_billing view) are db/access.sql's. Applied by `db migrate` after
-- db/functions.sql; idempotent; undone by db/rollback.sql. Privileges: db/access.sql.

-- step: stripe_subscriptions
-- A customer's subscriptions as Stripe has them (a deleted one stays, canceled, as Stripe keeps it).
-- No foreign key to stripe_customers: a subscription's events may arrive before its customer's.
CREATE TABLE IF NOT EXISTS public.stripe_subscriptions (
  stripe_subscription_id text PRIMARY KEY CHECK (stripe_subscription_id ~ '^sub_[a-zA-Z0-9]+$'),
  stripe_customer_id text NOT NULL,
  status text NOT NULL CHECK (status IN ('incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due',
                                         'canceled', 'unpaid', 'paused')),
  items jsonb NOT NULL DEFAULT '[]',   -- per item: price, product, lookup_key, quantity, tier
  current_period_end timestamptz,      -- the subscription's, or (API 2025-03-31 on) the latest of its items'
  cancel_at_period_end boolean NOT NULL DEFAULT false,
  cancel_at timestamptz,
  canceled_at timestamptz,
  ended_at timestamptz,
  trial_end timestamptz,
  subscription_metadata jsonb NOT NULL DEFAULT '{}',  -- {"stripe": metadata, "sync": {…}} as for customers
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

-- step: when Stripe created each subscription (an organization's tier reads the oldest first)
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.stripe_subscriptions'::regclass
                 AND attname = 'started_at' AND NOT attisdropped) THEN
    ALTER TABLE public.stripe_subscriptions ADD COLUMN started_at timestamptz;  -- no default: no rewrite
  END IF;
END $$;

-- step: a customer's subscriptions, for access and the console
CREATE INDEX CONCURRENTLY IF NOT EXISTS stripe_subscriptions_customer_idx
  ON public.stripe_subscriptions (stripe_customer_id);

-- step: stripe_entitlements and their sets
-- A customer's active entitlements: the latest summary Stripe sent replaces the whole set. The
-- set's own row carries its sync stamp (which event, when) and whether it is complete (a summary
-- lists at most 10; the rest is read from Stripe with the API key, else the set is incomplete).
CREATE TABLE IF NOT EXISTS public.stripe_entitlements (
  stripe_customer_id text NOT NULL,
  lookup_key text NOT NULL,
  feature text,                        -- feat_…
  stripe_entitlement_id text,          -- ent_…
  PRIMARY KEY (stripe_customer_id, lookup_key)
);
CREATE TABLE IF NOT EXISTS public.stripe_entitlement_sets (
  stripe_customer_id text PRIMARY KEY,
  complete boolean NOT NULL DEFAULT true,
  sync jsonb NOT NULL DEFAULT '{}',     -- {status, source, event_id, event_created, synced_at, note}
  updated_at timestamptz NOT NULL DEFAULT now()
);

-- step: stripe_payment_methods
-- A customer's payment methods (the seed's "separate table for multiple payment methods"): type, and
-- for cards brand, last four digits and expiry, nothing more of the card. Which one is the default
-- follows stripe_customers.default_payment_method. A detached one leaves (with a tombstone).
CREATE TABLE IF NOT EXISTS public.stripe_payment_methods (
  stripe_payment_method_id text PRIMARY KEY CHECK (stripe_payment_method_id ~ '^(pm|card|src|ba)_[a-zA-Z0-9]+$'),
  stripe_customer_id text NOT NULL,
  type text NOT NULL,
  brand text,
  last4 text,
  exp_month integer,
  exp_year integer,
  sync jsonb NOT NULL DEFAULT '{}',
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

-- step: a customer's payment methods
CREATE INDEX CONCURRENTLY IF NOT EXISTS stripe_payment_methods_customer_idx
  ON public.stripe_payment_methods (stripe_customer_id);

-- step: stripe_object_tombstones and stripe_billing_audit
-- What remains of a billing row that left its table (by hand, or verify --fix): the newest event
-- time it reflected, so an older event delivered later does not bring it back.
CREATE TABLE IF NOT EXISTS public.stripe_object_tombstones (
  object text NOT NULL,                -- subscription | entitlements
  stripe_id text NOT NULL,
  event_id text,
  event_created bigint NOT NULL,
  deleted_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (object, stripe_id)
);
-- One row per change to a billing table, by whoever made it (a trigger, as for customers).
CREATE TABLE IF NOT EXISTS public.stripe_billing_audit (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  object text NOT NULL,                -- subscription | entitlement | entitlement_set
  stripe_id text NOT NULL,
  stripe_customer_id text,
  operation text NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
  old_row jsonb,
  new_row jsonb,
  event_id text,
  changed_by text NOT NULL DEFAULT current_user,
  changed_at timestamptz NOT NULL DEFAULT now()
);

-- step: one customer's billing audit
CREATE INDEX CONCURRENTLY IF NOT EXISTS stripe_billing_audit_customer_idx
  ON public.stripe_billing_audit (stripe_customer_id, changed_at);

-- step: the billing functions and triggers
CREATE OR REPLACE FUNCTION public.stripe_billing_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  v_row jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
BEGIN
  IF TG_OP = 'UPDATE' AND public.stripe_restamped(to_jsonb(OLD), to_jsonb(NEW), 'subscription_metadata') THEN
    RETURN NULL;
  END IF;
  INSERT INTO public.stripe_billing_audit
    (object, stripe_id, stripe_customer_id, operation, old_row, new_row, event_id, changed_by)
  VALUES (TG_ARGV[0], coalesce(v_row ->> TG_ARGV[1], v_row ->> 'stripe_customer_id'), v_row ->> 'stripe_customer_id',
          TG_OP, CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END, CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
          nullif(current_setting('stripe_webhook.event_id', true), ''),
          coalesce(nullif(current_setting('stripe_webhook.actor', true), ''), current_user));
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION public.stripe_billing_gone() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  v_row jsonb := to_jsonb(OLD);
  v_sync jsonb := coalesce(v_row -> 'sync', v_row #> '{subscription_metadata,sync}');
BEGIN
  INSERT INTO public.stripe_object_tombstones AS t (object, stripe_id, event_id, event_created)
  VALUES (TG_ARGV[0], v_row ->> TG_ARGV[1], v_sync ->> 'event_id', coalesce((v_sync ->> 'event_created')::bigint, 0))
  ON CONFLICT (object, stripe_id) DO UPDATE SET event_id = EXCLUDED.event_id,
    event_created = EXCLUDED.event_created, deleted_at = now() WHERE t.event_created < EXCLUDED.event_created;
  RETURN NULL;
END $$;

SELECT public.stripe_create_trigger('stripe_subscriptions_touch',
  'BEFORE UPDATE ON public.stripe_subscriptions FOR EACH ROW EXECUTE FUNCTION public.stripe_customers_touch()');
SELECT public.stripe_create_trigger('stripe_subscriptions_audit',
  'AFTER INSERT OR UPDATE OR DELETE ON public.stripe_subscriptions FOR EACH ROW '
  'EXECUTE FUNCTION public.stripe_billing_audit_row(''subscription'', ''stripe_subscription_id'')');
SELECT public.stripe_create_trigger('stripe_subscriptions_gone',
  'AFTER DELETE ON public.stripe_subscriptions FOR EACH ROW '
  'EXECUTE FUNCTION public.stripe_billing_gone(''subscription'', ''stripe_subscription_id'')');
SELECT public.stripe_create_trigger('stripe_entitlements_audit',
  'AFTER INSERT OR UPDATE OR DELETE ON public.stripe_entitlements FOR EACH ROW '
  'EXECUTE FUNCTION public.stripe_billing_audit_row(''entitlement'', ''lookup_key'')');
SELECT public.stripe_create_trigger('stripe_payment_methods_audit',
  'AFTER INSERT OR UPDATE OR DELETE ON public.stripe_payment_methods FOR EACH ROW '
  'EXECUTE FUNCTION public.stripe_billing_audit_row(''payment_method'', ''stripe_payment_method_id'')');
SELECT public.stripe_create_trigger('stripe_payment_methods_gone',
  'AFTER DELETE ON public.stripe_payment_methods FOR EACH ROW '
  'EXECUTE FUNCTION public.stripe_billing_gone(''payment_method'', ''stripe_payment_method_id'')');
SELECT public.stripe_create_trigger('stripe_entitlement_sets_gone',
  'AFTER DELETE ON public.stripe_entitlement_sets FOR EACH ROW '
  'EXECUTE FUNCTION public.stripe_billing_gone(''entitlements'', ''stripe_customer_id'')');

-- The sync stamp every billing row carries, as customers' does. VOLATILE, as its body is
-- (clock_timestamp): a SQL function declared less volatile than its body is not inlined, and is
-- then parsed and planned again on every call.
CREATE OR REPLACE FUNCTION public.stripe_sync_stamp(p_source text, p_event_id text, p_as_of bigint, p_note text)
RETURNS jsonb LANGUAGE sql VOLATILE AS $$
  SELECT jsonb_build_object('status', 'synced', 'source', p_source, 'event_id', p_event_id, 'event_created', p_as_of,
    'synced_at', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
    || CASE WHEN coalesce(p_note, '') = '' THEN '{}' ELSE jsonb_build_object('note', p_note) END
$$;

-- How an event (or a Stripe read) for one billing object is ordered, once its apply function holds
-- the object's lock and has read its row's sync stamp: the state's time (the event's created, or
-- the read's clock), the event it stamps, then stripe_order against the row and its tombstone.
CREATE OR REPLACE FUNCTION public.stripe_object_order(
  p_object text, p_id text, p_sync jsonb, p_change jsonb, p_event_id text, p_event_created bigint, p_event jsonb,
  OUT verdict text, OUT tie text, OUT tie_note text, OUT as_of bigint, OUT event_id text
) LANGUAGE plpgsql STABLE AS $$
DECLARE
  v_gone bigint;
  v_order record;
BEGIN
  as_of := coalesce((p_change ->> 'as_of')::bigint, p_event_created);
  event_id := CASE WHEN p_change ->> 'as_of' IS NULL THEN p_event_id END;
  SELECT t.event_created INTO v_gone FROM public.stripe_object_tombstones t WHERE t.object = p_object AND t.stripe_id = p_id;
  v_order := public.stripe_order(p_sync, v_gone, as_of, event_id, p_event, p_change ->> 'tie' = 'unsettled');
  verdict := v_order.verdict; tie := v_order.tie; tie_note := v_order.tie_note;
END $$;

-- Applies one subscription state (p_change: id, customer, status, items, the period, cancellation
-- and trial times as unix seconds, metadata; as_of and tie as for customers). Same outcome as
-- stripe_apply_customer: processed | stale | tie, with how a tie was settled.
CREATE OR REPLACE FUNCTION public.stripe_apply_subscription(
  p_change jsonb, p_source text, p_event_id text, p_event_created bigint, p_event jsonb DEFAULT NULL,
  OUT status text, OUT note text, OUT tie text
) LANGUAGE plpgsql AS $$
DECLARE
  v_id text := p_change ->> 'id';
  v_sync jsonb;
  v_order record;
BEGIN
  status := 'processed';
  PERFORM pg_advisory_xact_lock(hashtextextended('stripe_subscription:' || v_id, 0));
  SELECT subscription_metadata -> 'sync' INTO v_sync FROM public.stripe_subscriptions WHERE stripe_subscription_id = v_id;
  v_order := public.stripe_object_order('subscription', v_id, v_sync, p_change, p_event_id, p_event_created, p_event);
  tie := v_order.tie;
  IF v_order.verdict <> 'apply' THEN
    status := v_order.verdict; RETURN;
  END IF;
  INSERT INTO public.stripe_subscriptions AS s (stripe_subscription_id, stripe_customer_id, status, items,
    current_period_end, cancel_at_period_end, cancel_at, canceled_at, ended_at, trial_end, subscription_metadata,
    started_at)
  VALUES (v_id, p_change ->> 'customer', p_change ->> 'status', coalesce(p_change -> 'items', '[]'),
    to_timestamp((p_change ->> 'current_period_end')::bigint), coalesce((p_change ->> 'cancel_at_period_end')::boolean, false),
    to_timestamp((p_change ->> 'cancel_at')::bigint), to_timestamp((p_change ->> 'canceled_at')::bigint),
    to_timestamp((p_change ->> 'ended_at')::bigint), to_timestamp((p_change ->> 'trial_end')::bigint),
    jsonb_build_object('stripe', coalesce(p_change -> 'metadata', '{}'),
                       'sync', public.stripe_sync_stamp(p_source, v_order.event_id, v_order.as_of, v_order.tie_note)),
    to_timestamp((p_change ->> 'created')::bigint))
  ON CONFLICT (stripe_subscription_id) DO UPDATE SET stripe_customer_id = EXCLUDED.stripe_customer_id,
    started_at = coalesce(EXCLUDED.started_at, s.started_at),
    status = EXCLUDED.status, items = EXCLUDED.items, current_period_end = EXCLUDED.current_period_end,
    cancel_at_period_end = EXCLUDED.cancel_at_period_end, cancel_at = EXCLUDED.cancel_at,
    canceled_at = EXCLUDED.canceled_at, ended_at = EXCLUDED.ended_at, trial_end = EXCLUDED.trial_end,
    subscription_metadata = EXCLUDED.subscription_metadata;
END $$;

-- Applies a customer's active entitlements (p_change: id = the customer, entitlements = [{id,
-- lookup_key, feature}], complete): the set replaces the one before it; features gone from it go.
CREATE OR REPLACE FUNCTION public.stripe_apply_entitlements(
  p_change jsonb, p_source text, p_event_id text, p_event_created bigint, p_event jsonb DEFAULT NULL,
  OUT status text, OUT note text, OUT tie text
) LANGUAGE plpgsql AS $$
DECLARE
  v_cus text := p_change ->> 'id';
  v_sync jsonb;
  v_order record;
  v_complete boolean := coalesce((p_change ->> 'complete')::boolean, true);
BEGIN
  status := 'processed';
  PERFORM pg_advisory_xact_lock(hashtextextended('stripe_entitlements:' || v_cus, 0));
  SELECT sync INTO v_sync FROM public.stripe_entitlement_sets WHERE stripe_customer_id = v_cus;
  v_order := public.stripe_object_order('entitlements', v_cus, v_sync, p_change, p_event_id, p_event_created, p_event);
  tie := v_order.tie;
  IF v_order.verdict <> 'apply' THEN
    status := v_order.verdict; RETURN;
  END IF;
  DELETE FROM public.stripe_entitlements e WHERE e.stripe_customer_id = v_cus AND e.lookup_key NOT IN (
    SELECT x ->> 'lookup_key' FROM jsonb_array_elements(coalesce(p_change -> 'entitlements', '[]')) AS x);
  INSERT INTO public.stripe_entitlements AS e (stripe_customer_id, lookup_key, feature, stripe_entitlement_id)
  SELECT v_cus, x ->> 'lookup_key', x ->> 'feature', x ->> 'id'
  FROM jsonb_array_elements(coalesce(p_change -> 'entitlements', '[]')) AS x
  WHERE x ->> 'lookup_key' IS NOT NULL
  ON CONFLICT (stripe_customer_id, lookup_key) DO UPDATE SET feature = EXCLUDED.feature,
    stripe_entitlement_id = EXCLUDED.stripe_entitlement_id
    WHERE (e.feature, e.stripe_entitlement_id) IS DISTINCT FROM (EXCLUDED.feature, EXCLUDED.stripe_entitlement_id);
  INSERT INTO public.stripe_entitlement_sets AS s (stripe_customer_id, complete, sync)
  VALUES (v_cus, v_complete, public.stripe_sync_stamp(p_source, v_order.event_id, v_order.as_of,
    concat_ws('; ', v_order.tie_note, p_change ->> 'note')))
  ON CONFLICT (stripe_customer_id) DO UPDATE SET complete = EXCLUDED.complete, sync = EXCLUDED.sync, updated_at = now();
END $$;

-- Applies one payment method's state (p_change: id, customer, type, brand, last4, exp_month,
-- exp_year; action delete when it was detached: the row goes, and its tombstone keeps older
-- events out).
CREATE OR REPLACE FUNCTION public.stripe_apply_payment_method(
  p_change jsonb, p_source text, p_event_id text, p_event_created bigint, p_event jsonb DEFAULT NULL,
  OUT status text, OUT note text, OUT tie text
) LANGUAGE plpgsql AS $$
DECLARE
  v_id text := p_change ->> 'id';
  v_sync jsonb;
  v_order record;
BEGIN
  status := 'processed';
  PERFORM pg_advisory_xact_lock(hashtextextended('stripe_payment_method:' || v_id, 0));
  SELECT sync INTO v_sync FROM public.stripe_payment_methods WHERE stripe_payment_method_id = v_id;
  v_order := public.stripe_object_order('payment_method', v_id, v_sync, p_change, p_event_id, p_event_created, p_event);
  tie := v_order.tie;
  IF v_order.verdict <> 'apply' THEN
    status := v_order.verdict; RETURN;
  END IF;
  IF p_change ->> 'action' = 'delete' THEN
    DELETE FROM public.stripe_payment_methods WHERE stripe_payment_method_id = v_id;
    INSERT INTO public.stripe_object_tombstones AS t (object, stripe_id, event_id, event_created)
    VALUES ('payment_method', v_id, v_order.event_id, v_order.as_of)
    ON CONFLICT (object, stripe_id) DO UPDATE SET event_id = EXCLUDED.event_id,
      event_created = EXCLUDED.event_created, deleted_at = now() WHERE t.event_created <= EXCLUDED.event_created;
    RETURN;
  END IF;
  INSERT INTO public.stripe_payment_methods AS m (stripe_payment_method_id, stripe_customer_id, type, brand, last4,
    exp_month, exp_year, sync)
  VALUES (v_id, p_change ->> 'customer', p_change ->> 'type', p_change ->> 'brand', p_change ->> 'last4',
    (p_change ->> 'exp_month')::int, (p_change ->> 'exp_year')::int,
    public.stripe_sync_stamp(p_source, v_order.event_id, v_order.as_of, v_order.tie_note))
  ON CONFLICT (stripe_payment_method_id) DO UPDATE SET stripe_customer_id = EXCLUDED.stripe_customer_id,
    type = EXCLUDED.type, brand = EXCLUDED.brand, last4 = EXCLUDED.last4, exp_month = EXCLUDED.exp_month,
    exp_year = EXCLUDED.exp_year, sync = EXCLUDED.sync, updated_at = now();
END $$;

-- Each Stripe object is one apply function with the same outcome; the change says which. Events
-- (stripe_apply_event) and states read from the Stripe API (backfill, verify --fix, re-sync) both
-- come through here.
CREATE OR REPLACE FUNCTION public.stripe_apply_object(
  p_change jsonb, p_source text, p_event_id text, p_event_created bigint, p_event jsonb DEFAULT NULL,
  OUT status text, OUT note text, OUT tie text
) LANGUAGE plpgsql AS $$
DECLARE
  v_applied record;
BEGIN
  IF p_change ->> 'object' = 'subscription' THEN
    v_applied := public.stripe_apply_subscription(p_change, p_source, p_event_id, p_event_created, p_event);
  ELSIF p_change ->> 'object' = 'entitlements' THEN
    v_applied := public.stripe_apply_entitlements(p_change, p_source, p_event_id, p_event_created, p_event);
  ELSIF p_change ->> 'object' = 'payment_method' THEN
    v_applied := public.stripe_apply_payment_method(p_change, p_source, p_event_id, p_event_created, p_event);
  ELSE
    v_applied := public.stripe_apply_customer(p_change, p_source, p_event_id, p_event_created, p_event);
  END IF;
  status := v_applied.status; note := v_applied.note; tie := v_applied.tie;
END $$;
