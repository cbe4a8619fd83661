-- What releases before 2026-12-07 kept in shapes of their own, moved into the one shape every
-- declared object now shares: customers' tombstones into stripe_object_tombstones, the billing
-- audit into stripe_customers_audit, and the `sync` column of entitlement sets and payment methods
-- into their <object>_metadata.sync. Applied by `db migrate` after every writer was replaced (db/
-- functions.sql, db/billing.sql, db/organizations.sql), so nothing writes the old shapes any more;
-- moved in batches of a transaction each, beside live traffic. Idempotent: on a database that has
-- the one shape already every step finds nothing to do. db/rollback.sql undoes it with the rest.

-- step: the customers' tombstones join every other object's
DO $$
BEGIN
  IF to_regclass('public.stripe_customer_tombstones') IS NOT NULL THEN
    -- Nothing writes it since db/functions.sql; the lock waits out a reader of the previous release.
    LOCK TABLE public.stripe_customer_tombstones IN ACCESS EXCLUSIVE MODE;
    INSERT INTO public.stripe_object_tombstones AS t (object, stripe_id, event_id, event_created, deleted_at)
    SELECT 'customer', stripe_customer_id, event_id, event_created, deleted_at FROM public.stripe_customer_tombstones
    ON CONFLICT (object, stripe_id) DO UPDATE SET event_id = EXCLUDED.event_id, event_created = EXCLUDED.event_created,
      deleted_at = EXCLUDED.deleted_at WHERE t.event_created < EXCLUDED.event_created;
    DROP TABLE public.stripe_customer_tombstones;
  END IF;
END $$;

-- step: moving what releases before 2026-12-07 kept elsewhere, a batch at a time
-- Each returns the rows it moved (none when there is nothing left, or nothing to move from), so
-- that `db migrate` runs it again until it is done.
CREATE OR REPLACE FUNCTION public.stripe_reshape_audit(p_limit int) RETURNS SETOF bigint LANGUAGE plpgsql AS $$
BEGIN
  IF to_regclass('public.stripe_billing_audit') IS NULL THEN RETURN; END IF;
  RETURN QUERY EXECUTE $sql$
    WITH moved AS (
      DELETE FROM public.stripe_billing_audit WHERE id IN (
        SELECT id FROM public.stripe_billing_audit ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
      RETURNING *)
    INSERT INTO public.stripe_customers_audit
      (object, stripe_id, stripe_customer_id, operation, old_row, new_row, event_id, changed_by, changed_at)
    SELECT object, stripe_id, stripe_customer_id, operation, old_row, new_row, event_id, changed_by, changed_at
    FROM moved ORDER BY id RETURNING id$sql$ USING p_limit;
END $$;

CREATE OR REPLACE FUNCTION public.stripe_reshape_stamps(p_limit int) RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
  v_shape record;
BEGIN
  PERFORM set_config('stripe_webhook.reshaping', 'on', true);  -- the audit sees no change in a move
  FOR v_shape IN SELECT * FROM (VALUES
      ('stripe_entitlement_sets', 'stripe_customer_id', 'entitlements_metadata'),
      ('stripe_payment_methods', 'stripe_payment_method_id', 'payment_method_metadata')) AS shapes (tab, id, metadata)
    WHERE EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = ('public.' || tab)::regclass
                  AND attname = 'sync' AND NOT attisdropped) LOOP
    -- A row the new release stamped already keeps its stamp; the old column is emptied either way.
    RETURN QUERY EXECUTE format($sql$
      UPDATE public.%1$I t SET %3$I = CASE WHEN t.%3$I ? 'sync' THEN t.%3$I
                                            ELSE t.%3$I || jsonb_build_object('sync', t.sync) END, sync = '{}'
      WHERE t.%2$I IN (SELECT %2$I FROM public.%1$I WHERE sync <> '{}' LIMIT $1 FOR UPDATE SKIP LOCKED)
      RETURNING t.%2$I$sql$, v_shape.tab, v_shape.id, v_shape.metadata) USING p_limit;
  END LOOP;
END $$;

-- step (repeat): the billing audit joins the one audit
SELECT public.stripe_reshape_audit(5000);

-- step (repeat): the sets' and payment methods' stamps move into their metadata
SELECT public.stripe_reshape_stamps(5000);

-- step: the emptied shapes go (a catalog change each, taken only while they exist)
-- Dynamic SQL: a plpgsql statement naming a table that is already gone would not even be planned.
CREATE OR REPLACE FUNCTION public.stripe_drop_if_empty(p_table text, p_column text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  v_left boolean;
BEGIN
  IF p_column IS NULL AND to_regclass(p_table) IS NOT NULL THEN
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', p_table) INTO v_left;
    IF NOT v_left THEN EXECUTE format('DROP TABLE %s', p_table); END IF;
  ELSIF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = p_table::regclass AND attname = p_column
                AND NOT attisdropped) THEN
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %I <> ''{}'')', p_table, p_column) INTO v_left;
    IF NOT v_left THEN EXECUTE format('ALTER TABLE %s DROP COLUMN %I', p_table, p_column); END IF;
  END IF;
END $$;
SELECT public.stripe_drop_if_empty('public.stripe_billing_audit', NULL);
SELECT public.stripe_drop_if_empty('public.stripe_entitlement_sets', 'sync');
SELECT public.stripe_drop_if_empty('public.stripe_payment_methods', 'sync');
DROP FUNCTION public.stripe_drop_if_empty(text, text);
DROP FUNCTION IF EXISTS public.stripe_billing_audit_row();
