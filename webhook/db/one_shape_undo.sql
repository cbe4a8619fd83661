-- Undoes db/one_shape.sql, keeping every row: puts back the shapes the release before 2026-12-07
-- kept apart (a customers' tombstone table, a billing audit, a `sync` column on entitlement sets and
-- payment methods) and drops this release's triggers, so that the previous release's `db migrate`
-- and code run again. Applied by `db rollback --to-previous-release`; then deploy that release,
-- whose release step (`db migrate`) puts its own functions and triggers back. Until then this
-- release keeps taking deliveries into the one shape: stop deliveries for the switch, or run heal
-- (or `replay --from-stripe`) afterwards. Idempotent.

-- step: the customers' tombstones, kept in both tables
CREATE TABLE IF NOT EXISTS public.stripe_customer_tombstones (
  stripe_customer_id text PRIMARY KEY,
  event_id text,
  event_created bigint NOT NULL,
  deleted_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.stripe_customer_tombstones AS t (stripe_customer_id, event_id, event_created, deleted_at)
SELECT stripe_id, event_id, event_created, deleted_at FROM public.stripe_object_tombstones WHERE object = 'customer'
ON CONFLICT (stripe_customer_id) DO UPDATE SET event_id = EXCLUDED.event_id, event_created = EXCLUDED.event_created,
  deleted_at = EXCLUDED.deleted_at WHERE t.event_created < EXCLUDED.event_created;

-- step: the billing audit, moved back out of the one audit
CREATE TABLE IF NOT EXISTS public.stripe_billing_audit (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  object text NOT NULL,
  stripe_id text NOT NULL,
  stripe_customer_id text,
  operation text NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
  old_row jsonb,
  new_row jsonb,
  event_id text,
  changed_by text NOT NULL DEFAULT current_user,
  changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS stripe_billing_audit_customer_idx
  ON public.stripe_billing_audit (stripe_customer_id, changed_at);
WITH moved AS (DELETE FROM public.stripe_customers_audit WHERE object <> 'customer' RETURNING *)
INSERT INTO public.stripe_billing_audit
  (object, stripe_id, stripe_customer_id, operation, old_row, new_row, event_id, changed_by, changed_at)
SELECT object, coalesce(stripe_id, ''), stripe_customer_id, operation, old_row, new_row, event_id, changed_by, changed_at
FROM moved ORDER BY id;

-- step: the sets' and payment methods' stamps, copied back into a `sync` column
ALTER TABLE public.stripe_entitlement_sets ADD COLUMN IF NOT EXISTS sync jsonb NOT NULL DEFAULT '{}';
ALTER TABLE public.stripe_payment_methods ADD COLUMN IF NOT EXISTS sync jsonb NOT NULL DEFAULT '{}';
UPDATE public.stripe_entitlement_sets SET sync = entitlements_metadata -> 'sync'
WHERE entitlements_metadata ? 'sync' AND sync IS DISTINCT FROM entitlements_metadata -> 'sync';
UPDATE public.stripe_payment_methods SET sync = payment_method_metadata -> 'sync'
WHERE payment_method_metadata ? 'sync' AND sync IS DISTINCT FROM payment_method_metadata -> 'sync';

-- step: this release's triggers go; the previous release's migrate makes its own
SELECT public.stripe_drop_trigger(tab, tab || suffix)
FROM unnest(ARRAY['stripe_customers', 'stripe_subscriptions', 'stripe_entitlement_sets', 'stripe_payment_methods',
                  'stripe_entitlements']) AS tab, unnest(ARRAY['_audited', '_buried']) AS suffix;

-- step: the view, which grew columns the previous release's cannot drop: its migrate makes its own
DROP VIEW IF EXISTS public.stripe_user_billing;
