-- Before db/schema.sql: a consumer table that already exists in another shape (made by hand from
-- the original design note, say, or by an older tool) is brought to shape keeping its rows, or
-- refused. `CREATE TABLE IF NOT EXISTS` alone would accept it, and every event would then fail.
-- A missing column that can be added is added (with its default); a missing UNIQUE or primary
-- key is added when the rows allow it. A column of another type, a missing column the consumer
-- cannot make up (the Stripe id), or rows that break a key are refused: the migration stops with
-- one error naming every difference, and nothing of this step is applied. Idempotent: on tables
-- of the right shape it reads the catalog and changes nothing (no lock). Undone by db/rollback.sql.

-- step: the shape check
-- p_columns: name, type as format_type() prints it, and how to add it ('' when it cannot be added).
-- p_keys: column and constraint name of each column that must be UNIQUE; the first is the primary key.
CREATE OR REPLACE FUNCTION public.stripe_fit_table(p_table text, p_columns text[], p_keys text[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  v_rel regclass := to_regclass(p_table);
  v_found text;
  v_problems text[] := '{}';
  v_changes text[] := '{}';
  v_change text;
  i int;
BEGIN
  IF v_rel IS NULL THEN
    RETURN;  -- db/schema.sql creates it
  END IF;
  FOR i IN 1 .. array_length(p_columns, 1) LOOP
    SELECT format_type(atttypid, atttypmod) INTO v_found FROM pg_attribute
    WHERE attrelid = v_rel AND attname = p_columns[i][1] AND attnum > 0 AND NOT attisdropped;
    IF v_found IS NULL AND p_columns[i][3] <> '' THEN
      v_changes := v_changes || format('ALTER TABLE %s ADD COLUMN %I %s', v_rel, p_columns[i][1], p_columns[i][3]);
    ELSIF v_found IS NULL THEN
      v_problems := v_problems || format('column %s is missing', p_columns[i][1]);
    ELSIF v_found <> p_columns[i][2] THEN
      v_problems := v_problems || format('column %s is %s, expected %s', p_columns[i][1], v_found, p_columns[i][2]);
    END IF;
  END LOOP;
  IF cardinality(v_problems) > 0 THEN
    RAISE EXCEPTION '% has another shape: %; bring it to shape by hand (or move it aside) and migrate again',
      p_table, array_to_string(v_problems, '; ');
  END IF;
  FOREACH v_change IN ARRAY v_changes LOOP
    EXECUTE v_change;
  END LOOP;
  FOR i IN 1 .. array_length(p_keys, 1) LOOP
    CONTINUE WHEN EXISTS (
      SELECT 1 FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
      WHERE x.indrelid = v_rel AND x.indisunique AND x.indnkeyatts = 1 AND x.indpred IS NULL
        AND x.indexprs IS NULL AND a.attname = p_keys[i][1]);
    EXECUTE format('SELECT string_agg(DISTINCT %1$I::text, '', '') FROM (SELECT %1$I FROM %2$s WHERE %1$I IS NOT NULL '
                   'GROUP BY %1$I HAVING count(*) > 1 LIMIT 3) AS twice', p_keys[i][1], v_rel) INTO v_found;
    IF v_found IS NOT NULL THEN
      RAISE EXCEPTION '% has another shape: % is not unique and rows share it (%); resolve them and migrate again',
        p_table, p_keys[i][1], v_found;
    END IF;
    IF i = 1 AND NOT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = v_rel AND indisprimary) THEN
      EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I PRIMARY KEY (%I)', v_rel, p_keys[i][2], p_keys[i][1]);
    ELSE
      EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I UNIQUE (%I)', v_rel, p_keys[i][2], p_keys[i][1]);
    END IF;
  END LOOP;
END $$;

-- step: stripe_customers as the consumer writes it
SELECT public.stripe_fit_table('public.stripe_customers', ARRAY[
  ['id', 'uuid', 'uuid NOT NULL DEFAULT gen_random_uuid()'],
  ['user_id', 'uuid', 'uuid REFERENCES auth.users (id) ON DELETE CASCADE'],
  ['stripe_customer_id', 'text', ''],
  ['customer_email', 'text', 'text'],
  ['customer_name', 'text', 'text'],
  ['default_payment_method', 'text', 'text'],
  ['customer_metadata', 'jsonb', 'jsonb NOT NULL DEFAULT ''{}'''],
  ['created_at', 'timestamp with time zone', 'timestamptz NOT NULL DEFAULT now()'],
  ['updated_at', 'timestamp with time zone', 'timestamptz NOT NULL DEFAULT now()'],
  ['organization_id', 'uuid', 'uuid']],
  ARRAY[['id', 'stripe_customers_pkey'], ['stripe_customer_id', 'stripe_customers_stripe_customer_id_key'],
        ['user_id', 'unique_user_customer']]);

-- step: stripe_webhook_events as the consumer writes it
SELECT public.stripe_fit_table('public.stripe_webhook_events', ARRAY[
  ['id', 'text', ''],
  ['type', 'text', ''],
  ['api_version', 'text', 'text'],
  ['livemode', 'boolean', 'boolean NOT NULL DEFAULT false'],
  ['created', 'timestamp with time zone', ''],
  ['payload', 'jsonb', ''],
  ['status', 'text', 'text NOT NULL DEFAULT ''received'''],
  ['attempts', 'integer', 'integer NOT NULL DEFAULT 0'],
  ['last_error', 'text', 'text'],
  ['received_at', 'timestamp with time zone', 'timestamptz NOT NULL DEFAULT now()'],
  ['processed_at', 'timestamp with time zone', 'timestamptz']],
  ARRAY[['id', 'stripe_webhook_events_pkey']]);
