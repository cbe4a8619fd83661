-- Stripe customer linking: stripe_customers, the webhook event log, the audit trail and the deletion
-- tombstones. db/functions.sql (applied right after this file) holds the functions and triggers the
-- consumer calls. Needs auth.users, auth.uid(), auth.role() (Supabase, or db/supabase_shim.sql on
-- a plain Postgres 14+). Idempotent: every statement may run again. Undone by db/rollback.sql.
-- Row level security, policies and grants for every table are db/access.sql's, applied last.
--
-- Run while the previous release still takes deliveries: `db migrate` runs each step below in a
-- transaction of its own with a short lock_timeout, and retries a step that could not get its lock,
-- so a delivery waits at most about a second behind it. Statements that need a strong lock are
-- guarded by a catalog check, so that a migrate that changes nothing takes none; indexes are built
-- CONCURRENTLY (one statement a step). psql runs the file as it is, without the retries.

-- step: stripe_customers

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
  organization_id uuid,               -- the organization it bills (db/organizations.sql), if any
  CONSTRAINT stripe_customers_stripe_customer_id_key UNIQUE (stripe_customer_id),
  CONSTRAINT unique_user_customer UNIQUE (user_id),
  CONSTRAINT valid_stripe_id CHECK (stripe_customer_id ~ '^cus_[a-zA-Z0-9]+$')
);

-- step: a table made from the original design note allows email-less customers
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.stripe_customers'::regclass
             AND attname = 'customer_email' AND attnotnull) THEN
    ALTER TABLE public.stripe_customers ALTER COLUMN customer_email DROP NOT NULL;
  END IF;
END $$;

-- step: the design note's indexes duplicated the UNIQUE constraints' own (no lock once gone)
DROP INDEX IF EXISTS public.idx_stripe_customers_user_id, public.idx_stripe_customers_stripe_id,
  public.idx_stripe_customers_email;

-- step: support looks customers up by email, case-insensitively
CREATE INDEX CONCURRENTLY IF NOT EXISTS stripe_customers_email_lower_idx
  ON public.stripe_customers (lower(customer_email));

-- step: stripe_customer_claims
-- Unlinked customers whose metadata names a user that another customer holds: who takes the user
-- over when that customer goes. A table of its own, written only when a link is refused, because an
-- index on customer_metadata would make every update of a customer a non-HOT update.
CREATE TABLE IF NOT EXISTS public.stripe_customer_claims (
  user_id uuid NOT NULL,
  stripe_customer_id text NOT NULL,
  PRIMARY KEY (user_id, stripe_customer_id)
);

-- step: stripe_organization_claims
-- The same for organizations (db/organizations.sql): unlinked customers whose metadata names an
-- organization another customer bills, and who takes it over when that customer goes.
CREATE TABLE IF NOT EXISTS public.stripe_organization_claims (
  organization_id uuid NOT NULL,
  stripe_customer_id text NOT NULL,
  PRIMARY KEY (organization_id, stripe_customer_id)
);

-- step: stripe_webhook_events
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

-- step: replay picks events by status and age
CREATE INDEX CONCURRENTLY IF NOT EXISTS stripe_webhook_events_status_idx
  ON public.stripe_webhook_events (status, received_at);

-- step: the customer each event concerns (added after the first release)
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.stripe_webhook_events'::regclass
                 AND attname = 'stripe_customer_id' AND NOT attisdropped) THEN
    ALTER TABLE public.stripe_webhook_events ADD COLUMN stripe_customer_id text;
  END IF;
END $$;

-- step (repeat): the rows logged before the column, a batch a transaction so deliveries never wait
-- (the rule of public.stripe_event_customer_id, which db/functions.sql creates after this)
UPDATE public.stripe_webhook_events AS e SET stripe_customer_id = filed.customer FROM (
  SELECT id, customer FROM (SELECT id, CASE
      WHEN type LIKE 'customer.%' AND coalesce(payload #>> '{data,object,object}', 'customer') = 'customer'
        THEN payload #>> '{data,object,id}'
      ELSE coalesce(payload #>> '{data,object,customer,id}', payload #>> '{data,object,customer}') END AS customer
    FROM public.stripe_webhook_events WHERE stripe_customer_id IS NULL) AS unfiled
  WHERE customer IS NOT NULL LIMIT 5000) AS filed
WHERE e.id = filed.id;

-- step: one customer's timeline is an index scan at any size
CREATE INDEX CONCURRENTLY IF NOT EXISTS stripe_webhook_events_customer_idx
  ON public.stripe_webhook_events (stripe_customer_id, created);

-- step: stripe_object_tombstones

-- What remains of a declared object's row that left its table, by any way (a deletion event,
-- verify --fix, the auth.users cascade, a DELETE by hand): the newest event time it reflected.
-- Stripe delivers out of order, so an older event arriving later must not bring the row back. One
-- table for every object, written by one function (stripe_bury in db/functions.sql); kept apart
-- from the event log so that pruning the log cannot forget a deletion.
DO $$
BEGIN
  IF to_regclass('public.stripe_object_tombstones') IS NULL THEN
    CREATE TABLE public.stripe_object_tombstones (
      object text NOT NULL,           -- the declared object: customer | subscription | payment_method | …
      stripe_id text NOT NULL,
      event_id text,                  -- the deletion event, or the last event the row reflected
      event_created bigint NOT NULL,  -- unix seconds; events not newer than this are stale
      deleted_at timestamptz NOT NULL DEFAULT now(),
      PRIMARY KEY (object, stripe_id)
    );
    -- Customers deleted before any tombstone table existed (releases before them kept the log only).
    IF to_regclass('public.stripe_customer_tombstones') IS NULL THEN
      INSERT INTO public.stripe_object_tombstones (object, stripe_id, event_id, event_created)
      SELECT DISTINCT ON (payload #>> '{data,object,id}') 'customer', payload #>> '{data,object,id}', id,
             extract(epoch FROM created)::bigint
      FROM public.stripe_webhook_events WHERE type = 'customer.deleted' AND status = 'processed'
      ORDER BY payload #>> '{data,object,id}', created DESC;
    END IF;
  END IF;
END $$;

-- step: the old tombstone lookup (no lock once gone)
DROP INDEX IF EXISTS public.stripe_webhook_events_deleted_idx;

-- step: stripe_customers_audit

-- The one audit: a row per change to any declared object's table (and to an organization's tier),
-- by whoever made it, written by triggers so that changes made by hand are caught too. Named for
-- the customers it began with; `object` and `stripe_id` say which row of which table.
CREATE TABLE IF NOT EXISTS public.stripe_customers_audit (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  stripe_customer_id text,            -- the customer the changed row belongs to
  user_id uuid,
  operation text NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
  old_row jsonb,
  new_row jsonb,
  event_id text,                      -- the Stripe event being applied, when the consumer made the change
  changed_by text NOT NULL DEFAULT current_user,
  changed_at timestamptz NOT NULL DEFAULT now(),
  object text NOT NULL DEFAULT 'customer',
  stripe_id text                      -- the changed row's own id (NULL in rows from before 2026-12-07: the customer's)
);

-- step: the audit of every object (releases before 2026-12-07 audited customers alone here)
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.stripe_customers_audit'::regclass
                 AND attname = 'object' AND NOT attisdropped) THEN
    -- A constant default: catalog only, no rewrite.
    ALTER TABLE public.stripe_customers_audit ADD COLUMN object text NOT NULL DEFAULT 'customer',
      ADD COLUMN stripe_id text;
  END IF;
  -- An organization's tier changes with no billing customer at times (its customer deleted).
  IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.stripe_customers_audit'::regclass
             AND attname = 'stripe_customer_id' AND attnotnull) THEN
    ALTER TABLE public.stripe_customers_audit ALTER COLUMN stripe_customer_id DROP NOT NULL;
  END IF;
END $$;

-- step: the audit of one customer
CREATE INDEX CONCURRENTLY IF NOT EXISTS stripe_customers_audit_customer_idx
  ON public.stripe_customers_audit (stripe_customer_id, changed_at);

-- step: stripe_sync_cursors: the background jobs' state, a row each (named in jobs_store.Cursor):
-- where a stopped backfill resumes, heal's cursor, its lease and what its last round found
CREATE TABLE IF NOT EXISTS public.stripe_sync_cursors (
  name text PRIMARY KEY,
  value text NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);
