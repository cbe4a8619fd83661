-- Stripe customer linking: stripe_customers, the webhook event log, the audit trail and the deletion
-- tombstones. db/functions.sql (applied right after this file) holds the functions and triggers the
-- consumer calls. Needs auth.users, auth.uid(), auth.role() (Supabase, or db/supabase_shim.sql on
-- a plain Postgres 14+). Idempotent: every statement may run again. Undone by db/rollback.sql.

-- Links an auth.users row to its Stripe customer: the table all billing looks customers up in.
CREATE TABLE IF NOT EXISTS public.stripe_customers (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id uuid REFERENCES auth.users (id) ON DELETE CASCADE,
  stripe_customer_id text NOT NULL,
  customer_email text,                -- NULL allowed: Stripe customers need not have an email
  customer_name text,
  default_payment_method text,        -- a Stripe payment method id (pm_…, card_…, src_…)
  customer_metadata jsonb NOT NULL DEFAULT '{}',  -- {"stripe": metadata, "sync": {status, source, …}}
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT stripe_customers_stripe_customer_id_key UNIQUE (stripe_customer_id),
  CONSTRAINT unique_user_customer UNIQUE (user_id),
  CONSTRAINT valid_stripe_id CHECK (stripe_customer_id ~ '^cus_[a-zA-Z0-9]+$')
);
-- A table made from the original design note: allow email-less customers, drop its indexes
-- that duplicated the UNIQUE constraints' own.
ALTER TABLE public.stripe_customers ALTER COLUMN customer_email DROP NOT NULL;
DROP INDEX IF EXISTS public.idx_stripe_customers_user_id, public.idx_stripe_customers_stripe_id,
  public.idx_stripe_customers_email;
-- Support looks customers up by email, case-insensitively.
CREATE INDEX IF NOT EXISTS stripe_customers_email_lower_idx ON public.stripe_customers (lower(customer_email));
-- Unlinked customers whose metadata names a user that another customer holds: who takes the user
-- over when that customer goes. A table of its own, written only when a link is refused, because an
-- index on customer_metadata would make every update of a customer a non-HOT update.
CREATE TABLE IF NOT EXISTS public.stripe_customer_claims (
  user_id uuid NOT NULL,
  stripe_customer_id text NOT NULL,
  PRIMARY KEY (user_id, stripe_customer_id)
);

-- Every verified Stripe event, kept so failures can be replayed and duplicates recognised.
CREATE TABLE IF NOT EXISTS public.stripe_webhook_events (
  id text PRIMARY KEY CHECK (id ~ '^evt_'),
  type text NOT NULL,
  api_version text,
  livemode boolean NOT NULL DEFAULT false,
  created timestamptz NOT NULL,       -- Stripe's event.created: the ordering key
  payload jsonb NOT NULL,
  status text NOT NULL DEFAULT 'received'
    CHECK (status IN ('received', 'processed', 'ignored', 'stale', 'failed')),
  attempts integer NOT NULL DEFAULT 0,
  last_error text,
  received_at timestamptz NOT NULL DEFAULT now(),
  processed_at timestamptz
);
-- replay picks events by status and age.
CREATE INDEX IF NOT EXISTS stripe_webhook_events_status_idx ON public.stripe_webhook_events (status, received_at);
-- The customer each event concerns, so one customer's timeline is an index scan at any size.
-- Added after the first release: the rows logged before are filled from their payloads once.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'public'
                 AND table_name = 'stripe_webhook_events' AND column_name = 'stripe_customer_id') THEN
    ALTER TABLE public.stripe_webhook_events ADD COLUMN stripe_customer_id text;
    UPDATE public.stripe_webhook_events SET stripe_customer_id = CASE
      WHEN type LIKE 'customer.%' THEN payload #>> '{data,object,id}'
      ELSE coalesce(payload #>> '{data,object,customer,id}', payload #>> '{data,object,customer}') END;
  END IF;
END $$;
CREATE INDEX IF NOT EXISTS stripe_webhook_events_customer_idx
  ON public.stripe_webhook_events (stripe_customer_id, created);

-- What remains of a customer whose row left the table, by any way (customer.deleted, verify --fix,
-- the auth.users cascade, a DELETE by hand): the newest event time it reflected. Stripe delivers out
-- of order, so an older event arriving later must not bring the row back. Kept apart from the event
-- log so that pruning the log cannot forget a deletion.
DO $$
BEGIN
  IF to_regclass('public.stripe_customer_tombstones') IS NULL THEN
    CREATE TABLE public.stripe_customer_tombstones (
      stripe_customer_id text PRIMARY KEY,
      event_id text,                  -- the deletion event, or the last event the row reflected
      event_created bigint NOT NULL,  -- unix seconds; events not newer than this are stale
      deleted_at timestamptz NOT NULL DEFAULT now()
    );
    -- Deletions logged before this table existed.
    INSERT INTO public.stripe_customer_tombstones (stripe_customer_id, event_id, event_created)
    SELECT DISTINCT ON (payload #>> '{data,object,id}') payload #>> '{data,object,id}', id,
           extract(epoch FROM created)::bigint
    FROM public.stripe_webhook_events WHERE type = 'customer.deleted' AND status = 'processed'
    ORDER BY payload #>> '{data,object,id}', created DESC;
  END IF;
END $$;
DROP INDEX IF EXISTS public.stripe_webhook_events_deleted_idx;  -- the old tombstone lookup

-- One row per change to stripe_customers, by whoever made it.
CREATE TABLE IF NOT EXISTS public.stripe_customers_audit (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  stripe_customer_id text NOT NULL,
  user_id uuid,
  operation text NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
  old_row jsonb,
  new_row jsonb,
  event_id text,                      -- the Stripe event being applied, when the consumer made the change
  changed_by text NOT NULL DEFAULT current_user,
  changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS stripe_customers_audit_customer_idx
  ON public.stripe_customers_audit (stripe_customer_id, changed_at);

-- Row level security: users read their own customer row; only the service role writes.
-- The log, the audit, the tombstones and the claims have no policies: nothing for anon or authenticated.
ALTER TABLE public.stripe_customers ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.stripe_webhook_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.stripe_customers_audit ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.stripe_customer_tombstones ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.stripe_customer_claims ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS "Users can view own customer data" ON public.stripe_customers;
CREATE POLICY "Users can view own customer data" ON public.stripe_customers
  FOR SELECT USING (auth.uid() = user_id);
DROP POLICY IF EXISTS "Service role only modifications" ON public.stripe_customers;
CREATE POLICY "Service role only modifications" ON public.stripe_customers
  FOR ALL USING (auth.role() = 'service_role');
-- Supabase's default grants give the API roles every privilege; TRUNCATE ignores row level security
-- and fires no row trigger (no audit, no tombstone), and writes belong to the consumer alone.
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
    REVOKE ALL ON public.stripe_webhook_events, public.stripe_customers_audit,
      public.stripe_customer_tombstones, public.stripe_customer_claims FROM anon, authenticated;
    REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON public.stripe_customers FROM anon, authenticated;
  END IF;
END $$;
