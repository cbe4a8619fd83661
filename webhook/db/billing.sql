-- Billing state that access is gated on: subscriptions, each customer's active entitlements and
-- payment methods, each declared in webhook/objects/ and kept under the same rules as customers
-- (db/functions.sql: the opening stripe_open, the tombstones, the audit); their writes, and the
-- dispatcher stripe_apply_object every change goes through. The two ways to ask "does this user
-- have access?" (stripe_has_access() and the stripe_user_billing view) are db/access.sql's.
-- Applied by `db migrate` after db/functions.sql; idempotent; undone by db/rollback.sql.

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
  updated_at timestamptz NOT NULL DEFAULT now(),
  entitlements_metadata jsonb NOT NULL DEFAULT '{}'  -- {"sync": {…}} as for customers
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
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  payment_method_metadata jsonb NOT NULL DEFAULT '{}'  -- {"sync": {…}} as for customers
);

-- step: stripe_invoices
-- A customer's invoices (CONTRACT's payment standing is computed from them, db/access.sql): amounts
-- in the currency's minor unit, the payment attempts, and lines (per line: price, product, quantity,
-- amount, period). failing_since: when a payment attempt was first seen failing (the state's time),
-- action_required: the last payment event asked the customer to authenticate. A deleted draft
-- leaves, with a tombstone.
CREATE TABLE IF NOT EXISTS public.stripe_invoices (
  stripe_invoice_id text PRIMARY KEY CHECK (stripe_invoice_id ~ '^in_[a-zA-Z0-9]+$'),
  stripe_customer_id text NOT NULL,
  stripe_subscription_id text,         -- null for a one-off invoice
  status text NOT NULL CHECK (status IN ('draft', 'open', 'paid', 'uncollectible', 'void')),
  amount_due bigint,
  amount_paid bigint,
  amount_remaining bigint,
  currency text,
  attempt_count integer NOT NULL DEFAULT 0,
  next_payment_attempt timestamptz,
  due_date timestamptz,
  paid_at timestamptz,
  billing_reason text,
  hosted_invoice_url text,
  lines jsonb NOT NULL DEFAULT '[]',
  lines_complete boolean NOT NULL DEFAULT true,
  failing_since timestamptz,
  action_required boolean NOT NULL DEFAULT false,
  invoice_metadata jsonb NOT NULL DEFAULT '{}',  -- {"stripe": metadata, "sync": {…}} as for customers
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

-- step: a customer's invoices, for the console and reconciliation
CREATE INDEX CONCURRENTLY IF NOT EXISTS stripe_invoices_customer_idx ON public.stripe_invoices (stripe_customer_id);

-- step: a customer's open invoices, the only ones payment standing reads
CREATE INDEX CONCURRENTLY IF NOT EXISTS stripe_invoices_open_idx
  ON public.stripe_invoices (stripe_customer_id) WHERE status = 'open';

-- step: a customer's uncollectible invoices, by subscription, which make it `unpaid` (payment
-- standing, db/access.sql): without it the rule reads every invoice the customer ever had. Both
-- columns, so that whichever way the planner takes the rule (probe per subscription, or hash the
-- customer's) it is an index range.
CREATE INDEX CONCURRENTLY IF NOT EXISTS stripe_invoices_uncollectible_idx
  ON public.stripe_invoices (stripe_customer_id, stripe_subscription_id) WHERE status = 'uncollectible';

-- step: one place for every object's sync stamp, <object>_metadata.sync (releases before 2026-12-07
-- kept the sets' and the payment methods' in a `sync` column, moved at the end of this file)
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.stripe_entitlement_sets'::regclass
                 AND attname = 'entitlements_metadata' AND NOT attisdropped) THEN
    ALTER TABLE public.stripe_entitlement_sets ADD COLUMN entitlements_metadata jsonb NOT NULL DEFAULT '{}';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.stripe_payment_methods'::regclass
                 AND attname = 'payment_method_metadata' AND NOT attisdropped) THEN
    ALTER TABLE public.stripe_payment_methods ADD COLUMN payment_method_metadata jsonb NOT NULL DEFAULT '{}';
  END IF;
END $$;

-- step: a customer's payment methods
CREATE INDEX CONCURRENTLY IF NOT EXISTS stripe_payment_methods_customer_idx
  ON public.stripe_payment_methods (stripe_customer_id);

-- step: the billing functions and triggers
SELECT public.stripe_create_trigger('stripe_subscriptions_touch',
  'BEFORE UPDATE ON public.stripe_subscriptions FOR EACH ROW EXECUTE FUNCTION public.stripe_customers_touch()');
SELECT public.stripe_object_triggers('stripe_subscriptions', 'subscription', 'stripe_subscription_id', 'subscription_metadata');
SELECT public.stripe_object_triggers('stripe_entitlement_sets', 'entitlements', 'stripe_customer_id', 'entitlements_metadata');
SELECT public.stripe_object_triggers('stripe_payment_methods', 'payment_method', 'stripe_payment_method_id',
  'payment_method_metadata');
SELECT public.stripe_create_trigger('stripe_invoices_touch',
  'BEFORE UPDATE ON public.stripe_invoices FOR EACH ROW EXECUTE FUNCTION public.stripe_customers_touch()');
SELECT public.stripe_object_triggers('stripe_invoices', 'invoice', 'stripe_invoice_id', 'invoice_metadata');
-- A set's entitlements are part of it: audited one by one (they carry no stamp of their own).
SELECT public.stripe_create_trigger('stripe_entitlements_audited', 'AFTER INSERT OR UPDATE OR DELETE ON '
  'public.stripe_entitlements FOR EACH ROW EXECUTE FUNCTION public.stripe_audit_row(''entitlement'', ''lookup_key'', '''')');
-- The triggers of releases before 2026-12-07, replaced by the ones above in this same transaction.
SELECT public.stripe_drop_trigger('stripe_subscriptions', 'stripe_subscriptions_audit');
SELECT public.stripe_drop_trigger('stripe_subscriptions', 'stripe_subscriptions_gone');
SELECT public.stripe_drop_trigger('stripe_entitlements', 'stripe_entitlements_audit');
SELECT public.stripe_drop_trigger('stripe_payment_methods', 'stripe_payment_methods_audit');
SELECT public.stripe_drop_trigger('stripe_payment_methods', 'stripe_payment_methods_gone');
SELECT public.stripe_drop_trigger('stripe_entitlement_sets', 'stripe_entitlement_sets_gone');
DROP FUNCTION IF EXISTS public.stripe_billing_gone();
DROP FUNCTION IF EXISTS public.stripe_object_order(text, text, jsonb, jsonb, text, bigint, jsonb);

-- Each declared object's write, called by stripe_apply_object once its opening (stripe_open: the
-- lock, the stamp, the tombstone, the ordering rules) let the change through: p_event_id and
-- p_as_of are what the row's sync stamp records, p_tie_note why a tie was not settled. Each
-- returns a note for the event's log row, or NULL.

-- A subscription's state (p_change: id, customer, status, items, the period, cancellation and
-- trial times as unix seconds, metadata, created). Stripe keeps canceled ones: never deleted here.
CREATE OR REPLACE FUNCTION public.stripe_apply_subscription(
  p_change jsonb, p_source text, p_event_id text, p_as_of bigint, p_tie_note text DEFAULT NULL, OUT note text
) LANGUAGE sql AS $$
  INSERT INTO public.stripe_subscriptions AS s (stripe_subscription_id, stripe_customer_id, status, items,
    current_period_end, cancel_at_period_end, cancel_at, canceled_at, ended_at, trial_end, subscription_metadata,
    started_at)
  VALUES (p_change ->> 'id', p_change ->> 'customer', p_change ->> 'status', coalesce(p_change -> 'items', '[]'),
    to_timestamp((p_change ->> 'current_period_end')::bigint), coalesce((p_change ->> 'cancel_at_period_end')::boolean, false),
    to_timestamp((p_change ->> 'cancel_at')::bigint), to_timestamp((p_change ->> 'canceled_at')::bigint),
    to_timestamp((p_change ->> 'ended_at')::bigint), to_timestamp((p_change ->> 'trial_end')::bigint),
    jsonb_build_object('stripe', coalesce(p_change -> 'metadata', '{}'),
                       'sync', public.stripe_sync_stamp(p_source, p_event_id, p_as_of, p_tie_note)),
    to_timestamp((p_change ->> 'created')::bigint))
  ON CONFLICT (stripe_subscription_id) DO UPDATE SET stripe_customer_id = EXCLUDED.stripe_customer_id,
    started_at = coalesce(EXCLUDED.started_at, s.started_at),
    status = EXCLUDED.status, items = EXCLUDED.items, current_period_end = EXCLUDED.current_period_end,
    cancel_at_period_end = EXCLUDED.cancel_at_period_end, cancel_at = EXCLUDED.cancel_at,
    canceled_at = EXCLUDED.canceled_at, ended_at = EXCLUDED.ended_at, trial_end = EXCLUDED.trial_end,
    subscription_metadata = EXCLUDED.subscription_metadata
  RETURNING NULL::text
$$;

-- A customer's active entitlements (p_change: id = the customer, entitlements = [{id, lookup_key,
-- feature}], complete, note): the set replaces the one before it; features gone from it go.
CREATE OR REPLACE FUNCTION public.stripe_apply_entitlements(
  p_change jsonb, p_source text, p_event_id text, p_as_of bigint, p_tie_note text DEFAULT NULL, OUT note text
) LANGUAGE plpgsql AS $$
DECLARE
  v_cus text := p_change ->> 'id';
BEGIN
  DELETE FROM public.stripe_entitlements e WHERE e.stripe_customer_id = v_cus AND e.lookup_key NOT IN (
    SELECT x ->> 'lookup_key' FROM jsonb_array_elements(coalesce(p_change -> 'entitlements', '[]')) AS x);
  INSERT INTO public.stripe_entitlements AS e (stripe_customer_id, lookup_key, feature, stripe_entitlement_id)
  SELECT v_cus, x ->> 'lookup_key', x ->> 'feature', x ->> 'id'
  FROM jsonb_array_elements(coalesce(p_change -> 'entitlements', '[]')) AS x
  WHERE x ->> 'lookup_key' IS NOT NULL
  ON CONFLICT (stripe_customer_id, lookup_key) DO UPDATE SET feature = EXCLUDED.feature,
    stripe_entitlement_id = EXCLUDED.stripe_entitlement_id
    WHERE (e.feature, e.stripe_entitlement_id) IS DISTINCT FROM (EXCLUDED.feature, EXCLUDED.stripe_entitlement_id);
  INSERT INTO public.stripe_entitlement_sets AS s (stripe_customer_id, complete, entitlements_metadata)
  VALUES (v_cus, coalesce((p_change ->> 'complete')::boolean, true), jsonb_build_object('sync',
    public.stripe_sync_stamp(p_source, p_event_id, p_as_of, concat_ws('; ', p_tie_note, p_change ->> 'note'))))
  ON CONFLICT (stripe_customer_id) DO UPDATE SET complete = EXCLUDED.complete,
    entitlements_metadata = EXCLUDED.entitlements_metadata, updated_at = now();
END $$;

-- A payment method's state (p_change: id, customer, type, brand, last4, exp_month, exp_year;
-- action delete when it was detached: the row goes, and its tombstone keeps older events out).
CREATE OR REPLACE FUNCTION public.stripe_apply_payment_method(
  p_change jsonb, p_source text, p_event_id text, p_as_of bigint, p_tie_note text DEFAULT NULL, OUT note text
) LANGUAGE plpgsql AS $$
BEGIN
  IF p_change ->> 'action' = 'delete' THEN
    DELETE FROM public.stripe_payment_methods WHERE stripe_payment_method_id = p_change ->> 'id';
    RETURN;
  END IF;
  INSERT INTO public.stripe_payment_methods AS m (stripe_payment_method_id, stripe_customer_id, type, brand, last4,
    exp_month, exp_year, payment_method_metadata)
  VALUES (p_change ->> 'id', p_change ->> 'customer', p_change ->> 'type', p_change ->> 'brand', p_change ->> 'last4',
    (p_change ->> 'exp_month')::int, (p_change ->> 'exp_year')::int,
    jsonb_build_object('sync', public.stripe_sync_stamp(p_source, p_event_id, p_as_of, p_tie_note)))
  ON CONFLICT (stripe_payment_method_id) DO UPDATE SET stripe_customer_id = EXCLUDED.stripe_customer_id,
    type = EXCLUDED.type, brand = EXCLUDED.brand, last4 = EXCLUDED.last4, exp_month = EXCLUDED.exp_month,
    exp_year = EXCLUDED.exp_year, payment_method_metadata = EXCLUDED.payment_method_metadata, updated_at = now();
END $$;

-- An invoice's state (p_change: id, customer, subscription, status, the amounts, attempt_count, the
-- times as unix seconds, lines, lines_complete, action_required, metadata, note; action delete for
-- a deleted draft). failing_since keeps the earliest time an open invoice was seen with a failed
-- attempt; action_required holds until a payment event settles it or the invoice leaves `open`.
CREATE OR REPLACE FUNCTION public.stripe_apply_invoice(
  p_change jsonb, p_source text, p_event_id text, p_as_of bigint, p_tie_note text DEFAULT NULL, OUT note text
) LANGUAGE plpgsql AS $$
DECLARE
  v_open boolean := p_change ->> 'status' = 'open';
BEGIN
  IF p_change ->> 'action' = 'delete' THEN
    DELETE FROM public.stripe_invoices WHERE stripe_invoice_id = p_change ->> 'id';
    RETURN;
  END IF;
  INSERT INTO public.stripe_invoices AS i (stripe_invoice_id, stripe_customer_id, stripe_subscription_id, status,
    amount_due, amount_paid, amount_remaining, currency, attempt_count, next_payment_attempt, due_date, paid_at,
    billing_reason, hosted_invoice_url, lines, lines_complete, failing_since, action_required, invoice_metadata)
  VALUES (p_change ->> 'id', p_change ->> 'customer', p_change ->> 'subscription', p_change ->> 'status',
    (p_change ->> 'amount_due')::bigint, (p_change ->> 'amount_paid')::bigint, (p_change ->> 'amount_remaining')::bigint,
    p_change ->> 'currency', coalesce((p_change ->> 'attempt_count')::int, 0),
    to_timestamp((p_change ->> 'next_payment_attempt')::bigint), to_timestamp((p_change ->> 'due_date')::bigint),
    to_timestamp((p_change ->> 'paid_at')::bigint), p_change ->> 'billing_reason', p_change ->> 'hosted_invoice_url',
    coalesce(p_change -> 'lines', '[]'), coalesce((p_change ->> 'lines_complete')::boolean, true),
    CASE WHEN v_open AND (p_change ->> 'attempt_count')::int >= 1 THEN to_timestamp(p_as_of) END,
    v_open AND coalesce((p_change ->> 'action_required')::boolean, false),
    jsonb_build_object('stripe', coalesce(p_change -> 'metadata', '{}'), 'sync',
      public.stripe_sync_stamp(p_source, p_event_id, p_as_of, concat_ws('; ', p_tie_note, p_change ->> 'note'))))
  ON CONFLICT (stripe_invoice_id) DO UPDATE SET stripe_customer_id = EXCLUDED.stripe_customer_id,
    stripe_subscription_id = EXCLUDED.stripe_subscription_id, status = EXCLUDED.status,
    amount_due = EXCLUDED.amount_due, amount_paid = EXCLUDED.amount_paid, amount_remaining = EXCLUDED.amount_remaining,
    currency = EXCLUDED.currency, attempt_count = EXCLUDED.attempt_count,
    next_payment_attempt = EXCLUDED.next_payment_attempt, due_date = EXCLUDED.due_date, paid_at = EXCLUDED.paid_at,
    billing_reason = EXCLUDED.billing_reason, hosted_invoice_url = EXCLUDED.hosted_invoice_url, lines = EXCLUDED.lines,
    lines_complete = EXCLUDED.lines_complete,
    failing_since = CASE WHEN EXCLUDED.failing_since IS NOT NULL
                         THEN least(i.failing_since, EXCLUDED.failing_since) END,
    action_required = v_open AND coalesce((p_change ->> 'action_required')::boolean, i.action_required),
    invoice_metadata = EXCLUDED.invoice_metadata, updated_at = now();
END $$;

-- An invoice's failure delivered after a newer event of it is stale, yet says the payment was
-- already failing then: it moves failing_since earlier (the one thing a stale change still tells).
CREATE OR REPLACE FUNCTION public.stripe_invoice_failing_earlier(p_change jsonb, p_as_of bigint) RETURNS void
LANGUAGE sql AS $$
  UPDATE public.stripe_invoices i SET failing_since = to_timestamp(p_as_of)
  WHERE i.stripe_invoice_id = p_change ->> 'id' AND i.status = 'open' AND p_change ->> 'status' = 'open'
    AND (p_change ->> 'attempt_count')::int >= 1 AND i.failing_since > to_timestamp(p_as_of)
$$;

-- One change of any declared object, through the one opening: events (stripe_apply_event) and
-- states read from the Stripe API (backfill, verify --fix, re-sync) both come through here.
-- status: processed | stale | tie (nothing written: the caller asks Stripe, or calls again with
-- tie = 'unsettled'); note: for the event's log row; tie: how a same-second pair was ordered.
CREATE OR REPLACE FUNCTION public.stripe_apply_object(
  p_change jsonb, p_source text, p_event_id text, p_event_created bigint, p_event jsonb DEFAULT NULL,
  OUT status text, OUT note text, OUT tie text
) LANGUAGE plpgsql AS $$
DECLARE
  -- A release before 2026-12-07 named no object for customers, and may still be delivering while
  -- this one is deployed.
  v_object text := coalesce(p_change ->> 'object', 'customer');
  v_open record := public.stripe_open(v_object, p_change ->> 'id', p_change, p_event_id, p_event_created, p_event);
BEGIN
  status := coalesce(nullif(v_open.verdict, 'apply'), 'processed');
  tie := v_open.tie;  -- also when this change came out older
  IF v_open.verdict = 'stale' AND v_object = 'invoice' THEN
    PERFORM public.stripe_invoice_failing_earlier(p_change, v_open.as_of);
  END IF;
  IF v_open.verdict <> 'apply' THEN RETURN; END IF;
  IF p_change ->> 'action' = 'delete' THEN
    PERFORM public.stripe_deleting(v_object, p_change ->> 'id', v_open.event_id, v_open.as_of);
  END IF;
  -- A line per declared object (webhook/objects/); any other fails its event alone (case_not_found).
  CASE v_object
    WHEN 'customer' THEN
      note := public.stripe_apply_customer(p_change, p_source, v_open.event_id, v_open.as_of, v_open.tie_note);
    WHEN 'subscription' THEN
      note := public.stripe_apply_subscription(p_change, p_source, v_open.event_id, v_open.as_of, v_open.tie_note);
    WHEN 'entitlements' THEN
      note := public.stripe_apply_entitlements(p_change, p_source, v_open.event_id, v_open.as_of, v_open.tie_note);
    WHEN 'payment_method' THEN
      note := public.stripe_apply_payment_method(p_change, p_source, v_open.event_id, v_open.as_of, v_open.tie_note);
    WHEN 'invoice' THEN
      note := public.stripe_apply_invoice(p_change, p_source, v_open.event_id, v_open.as_of, v_open.tie_note);
  END CASE;
END $$;

-- step: the apply functions of releases before 2026-12-07 (each with an opening of its own), once
-- stripe_apply_object above no longer calls them
DROP FUNCTION IF EXISTS public.stripe_apply_customer(jsonb, text, text, bigint, jsonb);
DROP FUNCTION IF EXISTS public.stripe_apply_subscription(jsonb, text, text, bigint, jsonb);
DROP FUNCTION IF EXISTS public.stripe_apply_entitlements(jsonb, text, text, bigint, jsonb);
DROP FUNCTION IF EXISTS public.stripe_apply_payment_method(jsonb, text, text, bigint, jsonb);
