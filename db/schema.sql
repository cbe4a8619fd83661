-- Stripe customer linking: stripe_customers, the webhook event log, the audit trail and the functions
-- the consumer calls. Needs auth.users, auth.uid(), auth.role() (Supabase, or db/supabase_shim.sql on
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
-- The deletion tombstones: a deleted customer's row is gone, its deletion event is what remains.
CREATE INDEX IF NOT EXISTS stripe_webhook_events_deleted_idx
  ON public.stripe_webhook_events ((payload #>> '{data,object,id}'), created)
  WHERE type = 'customer.deleted' AND status = 'processed';

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

CREATE OR REPLACE FUNCTION public.stripe_customers_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.updated_at := now();
  RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER stripe_customers_touch BEFORE UPDATE ON public.stripe_customers
  FOR EACH ROW EXECUTE FUNCTION public.stripe_customers_touch();

-- A trigger, not the consumer, writes the audit so that changes made by hand are caught too.
-- stripe_webhook.event_id is set transaction-locally by stripe_apply_event.
CREATE OR REPLACE FUNCTION public.stripe_customers_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  v_row public.stripe_customers := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
BEGIN
  INSERT INTO public.stripe_customers_audit
    (stripe_customer_id, user_id, operation, old_row, new_row, event_id, changed_by)
  VALUES (v_row.stripe_customer_id, v_row.user_id, TG_OP,
          CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
          CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
          nullif(current_setting('stripe_webhook.event_id', true), ''), current_user);
  RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER stripe_customers_audit AFTER INSERT OR UPDATE OR DELETE ON public.stripe_customers
  FOR EACH ROW EXECUTE FUNCTION public.stripe_customers_audit_row();

-- Applies one customer change (p_change: action upsert|delete|link, id, email, name,
-- default_payment_method, metadata, user_id, note) and returns 'processed' or 'stale'.
-- Stripe delivers out of order and retries, and several workers run at once, so each customer is
-- serialised by a transaction-scoped lock (safe behind a transaction-mode pooler), then checked
-- against the newest event it reflects and against its deletion.
CREATE OR REPLACE FUNCTION public.stripe_apply_customer(
  p_change jsonb, p_source text, p_event_id text, p_event_created bigint
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  v_cus text := p_change ->> 'id';
  v_user uuid := p_change ->> 'user_id';
  v_note text := p_change ->> 'note';
  v_row public.stripe_customers;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended('stripe_customer:' || v_cus, 0));
  IF EXISTS (SELECT 1 FROM public.stripe_webhook_events
             WHERE type = 'customer.deleted' AND status = 'processed'
               AND payload #>> '{data,object,id}' = v_cus AND created >= to_timestamp(p_event_created)) THEN
    RETURN 'stale';
  END IF;
  SELECT * INTO v_row FROM public.stripe_customers WHERE stripe_customer_id = v_cus;
  IF FOUND AND p_change ->> 'action' <> 'link'
     AND (v_row.customer_metadata #>> '{sync,event_created}')::bigint > p_event_created THEN
    RETURN 'stale';
  END IF;
  IF p_change ->> 'action' = 'delete' THEN
    DELETE FROM public.stripe_customers WHERE id = v_row.id;
    RETURN 'processed';
  END IF;
  -- The user lock keeps two customers from claiming one user at once.
  IF v_user IS NOT NULL THEN
    PERFORM pg_advisory_xact_lock(hashtextextended('stripe_user:' || v_user, 0));
    IF NOT EXISTS (SELECT 1 FROM auth.users WHERE id = v_user) THEN
      v_note := 'no auth.users row has that user id'; v_user := NULL;
    ELSIF EXISTS (SELECT 1 FROM public.stripe_customers WHERE user_id = v_user AND stripe_customer_id <> v_cus) THEN
      v_note := 'that user is already linked to another customer'; v_user := NULL;
    END IF;
  END IF;
  IF v_row.id IS NOT NULL AND p_change ->> 'action' = 'link' THEN
    -- A checkout carries no full customer state, so whatever its age it only adds a missing link.
    IF v_row.user_id IS NOT NULL AND v_row.user_id IS DISTINCT FROM v_user THEN
      RETURN 'processed';
    END IF;
    UPDATE public.stripe_customers SET user_id = coalesce(v_user, user_id),
      customer_metadata = jsonb_set(customer_metadata, '{sync,status}',
        to_jsonb(CASE WHEN coalesce(v_user, user_id) IS NULL THEN 'unlinked' ELSE 'synced' END))
    WHERE id = v_row.id;
    RETURN 'processed';
  END IF;
  INSERT INTO public.stripe_customers AS c
    (stripe_customer_id, user_id, customer_email, customer_name, default_payment_method, customer_metadata)
  VALUES (v_cus, coalesce(v_user, v_row.user_id), p_change ->> 'email', p_change ->> 'name',
    p_change ->> 'default_payment_method',
    jsonb_build_object('stripe', coalesce(p_change -> 'metadata', '{}'), 'sync', jsonb_build_object(
      'status', CASE WHEN coalesce(v_user, v_row.user_id) IS NULL THEN 'unlinked' ELSE 'synced' END,
      'source', p_source, 'event_id', p_event_id, 'event_created', p_event_created,
      'synced_at', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
      || CASE WHEN v_note IS NULL THEN '{}' ELSE jsonb_build_object('note', v_note) END))
  ON CONFLICT (stripe_customer_id) DO UPDATE SET user_id = EXCLUDED.user_id,
    customer_email = EXCLUDED.customer_email, customer_name = EXCLUDED.customer_name,
    default_payment_method = EXCLUDED.default_payment_method, customer_metadata = EXCLUDED.customer_metadata;
  RETURN 'processed';
END $$;

-- One call per verified event, in one transaction: log it, recognise a duplicate, apply it.
-- Returns processed | duplicate | ignored | stale. p_change NULL means the event is only logged.
CREATE OR REPLACE FUNCTION public.stripe_apply_event(p_event jsonb, p_change jsonb, p_source text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  v_id text := p_event ->> 'id';
  v_status text := 'ignored';
BEGIN
  -- Deliveries of one event id queue here; the later one then finds it finished: a duplicate.
  PERFORM pg_advisory_xact_lock(hashtextextended('stripe_event:' || v_id, 0));
  IF EXISTS (SELECT 1 FROM public.stripe_webhook_events
             WHERE id = v_id AND status NOT IN ('received', 'failed')) THEN
    RETURN 'duplicate';
  END IF;
  PERFORM set_config('stripe_webhook.event_id', v_id, true);
  IF p_change IS NOT NULL THEN
    v_status := public.stripe_apply_customer(p_change, p_source, v_id, (p_event ->> 'created')::bigint);
  END IF;
  -- Written once, with its outcome: an insert, or the retry of a failed or received event.
  INSERT INTO public.stripe_webhook_events AS e
    (id, type, api_version, livemode, created, payload, status, attempts, processed_at)
  VALUES (v_id, p_event ->> 'type', p_event ->> 'api_version', coalesce((p_event ->> 'livemode')::boolean, false),
          to_timestamp((p_event ->> 'created')::bigint), p_event, v_status, 1, now())
  ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, attempts = e.attempts + 1, last_error = NULL,
    processed_at = EXCLUDED.processed_at;
  RETURN v_status;
END $$;

-- Row level security: users read their own customer row; only the service role writes.
-- The log and the audit have no policies: nothing for anon or authenticated.
ALTER TABLE public.stripe_customers ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.stripe_webhook_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.stripe_customers_audit ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS "Users can view own customer data" ON public.stripe_customers;
CREATE POLICY "Users can view own customer data" ON public.stripe_customers
  FOR SELECT USING (auth.uid() = user_id);
DROP POLICY IF EXISTS "Service role only modifications" ON public.stripe_customers;
CREATE POLICY "Service role only modifications" ON public.stripe_customers
  FOR ALL USING (auth.role() = 'service_role');
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
    REVOKE ALL ON public.stripe_webhook_events, public.stripe_customers_audit FROM anon, authenticated;
    REVOKE EXECUTE ON FUNCTION public.stripe_apply_event(jsonb, jsonb, text),
      public.stripe_apply_customer(jsonb, text, text, bigint) FROM PUBLIC, anon, authenticated;
  END IF;
END $$;
