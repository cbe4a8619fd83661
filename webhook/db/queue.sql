-- Thin notifications waiting to be read (webhook/thin_queue.py), and the deployment's budget of
-- Stripe reads (webhook/budget.py). Applied by `db migrate` after db/functions.sql; idempotent;
-- undone by db/rollback.sql. A delivery logs a thin notification as `received` and adds it here in
-- one statement, and is answered "queued"; every serve process (and heal) reads and applies it.

-- step: stripe_thin_waiting
-- One row per object that waiting notifications name, so that the notifications waiting together
-- are served by one read. A process leases a row while it reads; a lease that lapses (the process
-- died) lets another take the row up. A read Stripe refuses in a way a retry can fix puts the row
-- back with a back-off, for as long as Stripe itself retries a delivery.
CREATE TABLE IF NOT EXISTS public.stripe_thin_waiting (
  object_key text PRIMARY KEY,        -- "<context>/<related object id>"; an entitlement summary's own event id
  event_ids text[] NOT NULL,          -- the waiting notifications, each `received` in the event log
  first_at timestamptz NOT NULL DEFAULT now(),    -- when the first of them arrived
  not_before timestamptz NOT NULL DEFAULT now(),  -- no read before this (a back-off)
  leased_until timestamptz,           -- a process reads it until then
  holder text,                        -- which one
  attempts integer NOT NULL DEFAULT 0,  -- reads refused in a row
  failing_since timestamptz,          -- the first of them: the notifications fail 3 days after it
  last_error text
);

-- step: the next row due is an index scan, however many wait
CREATE INDEX CONCURRENTLY IF NOT EXISTS stripe_thin_waiting_due_idx ON public.stripe_thin_waiting (not_before);

-- step: stripe_api_budget
-- A token bucket in one row: every process and host takes from it in one statement.
CREATE TABLE IF NOT EXISTS public.stripe_api_budget (
  name text PRIMARY KEY,
  tokens double precision NOT NULL,   -- may go below 0: a 429 makes every process wait it out
  updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- step: queue functions
-- Takes the settled notifications out of their object's row, and the row once none waits. The
-- row lock of the UPDATE holds off a notification being added until this commits; the add then
-- finds the row gone and inserts it anew.
CREATE OR REPLACE FUNCTION public.stripe_thin_release(p_key text, p_holder text, p_ids text[])
RETURNS void LANGUAGE sql VOLATILE AS $$
  UPDATE public.stripe_thin_waiting SET
    event_ids = ARRAY(SELECT id FROM unnest(event_ids) WITH ORDINALITY AS w (id, n)
                      WHERE id <> ALL (p_ids) ORDER BY n),
    not_before = now(),
    leased_until = CASE WHEN holder = p_holder THEN NULL ELSE leased_until END,
    holder = CASE WHEN holder = p_holder THEN NULL ELSE holder END,
    attempts = 0, failing_since = NULL, last_error = NULL
  WHERE object_key = p_key;
  DELETE FROM public.stripe_thin_waiting WHERE object_key = p_key AND event_ids = '{}';
$$;

-- One read applied for every notification it serves, in one transaction: the newest of them
-- carries the change through stripe_apply_caught (logged, ordered, audited as any event), the
-- others are settled with its outcome, and all leave the queue. A tie or an error settles nothing
-- (the caller reads again, or backs off).
CREATE OR REPLACE FUNCTION public.stripe_thin_settle(
  p_key text, p_holder text, p_ids text[], p_event text, p_change text
) RETURNS public.stripe_outcome LANGUAGE plpgsql AS $$
DECLARE
  v_outcome public.stripe_outcome;
  v_id text := p_event::jsonb ->> 'id';
BEGIN
  v_outcome := public.stripe_apply_caught(p_event, p_change, 'thin', NULL, false);
  IF v_outcome.status IS NULL OR v_outcome.status = 'tie' THEN
    RETURN v_outcome;
  END IF;
  -- 'duplicate': the carrier was settled by an earlier read (a process that died before this
  -- step), which the others then share.
  UPDATE public.stripe_webhook_events AS e SET
    status = CASE WHEN v_outcome.status = 'duplicate' THEN 'processed' ELSE v_outcome.status END,
    processed_at = now(), last_error = NULL,
    stripe_customer_id = coalesce(e.stripe_customer_id,
      (SELECT c.stripe_customer_id FROM public.stripe_webhook_events c WHERE c.id = v_id))
  WHERE e.id = ANY (p_ids) AND e.id <> v_id AND e.status IN ('received', 'failed');
  PERFORM public.stripe_thin_release(p_key, p_holder, p_ids);
  RETURN v_outcome;
END $$;
