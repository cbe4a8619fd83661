-- Undoes db/schema.sql: drops the consumer's functions, triggers and tables, with their data.
-- Take a backup first (`python -m webhook db migrate --backup-dir DIR` keeps the schema; pg_dump
-- the data). Idempotent: safe to run on a database that never had the schema.
-- auth.* and the API roles are left alone: they belong to Supabase (or db/supabase_shim.sql).

DROP FUNCTION IF EXISTS public.stripe_thin_settle(text, text, text[], text, text);
DROP FUNCTION IF EXISTS public.stripe_thin_release(text, text, text[]);
DROP TABLE IF EXISTS public.stripe_thin_waiting;
DROP TABLE IF EXISTS public.stripe_api_budget;
DROP FUNCTION IF EXISTS public.stripe_apply_events(text[], text[], text[], text[]);
DROP FUNCTION IF EXISTS public.stripe_apply_batch(text[], text[], text[], text[]);
DROP FUNCTION IF EXISTS public.stripe_apply_caught(text, text, text, text, boolean);
DROP FUNCTION IF EXISTS public.stripe_apply_event(jsonb, jsonb, text);
DROP FUNCTION IF EXISTS public.stripe_apply_customer(jsonb, text, text, bigint, jsonb);
DROP FUNCTION IF EXISTS public.stripe_apply_customer(jsonb, text, text, bigint);
DROP FUNCTION IF EXISTS public.stripe_order(jsonb, bigint, bigint, text, jsonb, boolean);
DROP FUNCTION IF EXISTS public.stripe_tie_order(jsonb, text);
DROP FUNCTION IF EXISTS public.stripe_attrs_match(jsonb, jsonb);
DROP FUNCTION IF EXISTS public.stripe_event_customer_id(jsonb);
DROP VIEW IF EXISTS public.stripe_user_billing;
DROP FUNCTION IF EXISTS public.stripe_items_tier(jsonb[]);
DROP FUNCTION IF EXISTS public.stripe_has_access(text);
DROP FUNCTION IF EXISTS public.stripe_has_access(text, uuid);
DROP FUNCTION IF EXISTS public.stripe_apply_object(jsonb, text, text, bigint, jsonb);
DROP FUNCTION IF EXISTS public.stripe_object_order(text, text, jsonb, jsonb, text, bigint, jsonb);
DROP FUNCTION IF EXISTS public.stripe_open(text, text, jsonb, text, bigint, jsonb);
DROP FUNCTION IF EXISTS public.stripe_stamp(text, text);
DROP FUNCTION IF EXISTS public.stripe_reshape_audit(integer);
DROP FUNCTION IF EXISTS public.stripe_reshape_stamps(integer);
DROP FUNCTION IF EXISTS public.stripe_apply_subscription(jsonb, text, text, bigint, jsonb);
DROP FUNCTION IF EXISTS public.stripe_apply_payment_method(jsonb, text, text, bigint, jsonb);
DROP FUNCTION IF EXISTS public.stripe_apply_entitlements(jsonb, text, text, bigint, jsonb);
DROP FUNCTION IF EXISTS public.stripe_sync_stamp(text, text, bigint, text);
DROP FUNCTION IF EXISTS public.stripe_organization_tier(uuid);
-- Dropping the tables drops their triggers, indexes, policies and the link to public.organizations
-- with them (the app's organizations keep the tier last written).
DROP TABLE IF EXISTS public.stripe_subscriptions;
DROP TABLE IF EXISTS public.stripe_payment_methods;
DROP TABLE IF EXISTS public.stripe_entitlements;
DROP TABLE IF EXISTS public.stripe_entitlement_sets;
DROP TABLE IF EXISTS public.stripe_object_tombstones;
DROP TABLE IF EXISTS public.stripe_billing_audit;
DROP FUNCTION IF EXISTS public.stripe_billing_audit_row();
DROP FUNCTION IF EXISTS public.stripe_billing_gone();
DROP FUNCTION IF EXISTS public.stripe_subscriptions_tier();
DROP TABLE IF EXISTS public.stripe_customers_audit;
DROP TABLE IF EXISTS public.stripe_webhook_events;
DROP TABLE IF EXISTS public.stripe_customers;
DROP TABLE IF EXISTS public.stripe_customer_tombstones;
DROP TABLE IF EXISTS public.stripe_customer_claims;
DROP TABLE IF EXISTS public.stripe_organization_claims;
DROP TABLE IF EXISTS public.stripe_sync_cursors;
DROP TABLE IF EXISTS public.stripe_support_sessions;
DROP TABLE IF EXISTS public.stripe_support_signins;
DROP FUNCTION IF EXISTS public.stripe_customers_audit_row();
DROP FUNCTION IF EXISTS public.stripe_audit_row();
DROP FUNCTION IF EXISTS public.stripe_tombstone();
DROP FUNCTION IF EXISTS public.stripe_deleting(text, text, text, bigint);
DROP FUNCTION IF EXISTS public.stripe_bury(text, text, text, bigint);
DROP FUNCTION IF EXISTS public.stripe_object_triggers(text, text, text, text);
DROP FUNCTION IF EXISTS public.stripe_drop_trigger(text, text);
DROP FUNCTION IF EXISTS public.stripe_restamped(jsonb, jsonb, text);
DROP FUNCTION IF EXISTS public.stripe_customers_touch();
DROP FUNCTION IF EXISTS public.stripe_customers_gone();
DROP FUNCTION IF EXISTS public.stripe_customers_moved();
DROP FUNCTION IF EXISTS public.stripe_customers_organization();
DROP FUNCTION IF EXISTS public.stripe_relink_users(boolean);
DROP FUNCTION IF EXISTS public.stripe_relink(boolean);
DROP FUNCTION IF EXISTS public.stripe_link_tables(text);
DROP FUNCTION IF EXISTS public.stripe_hand_on_user(uuid, text);
DROP FUNCTION IF EXISTS public.stripe_hand_on(text, uuid, text);
DROP FUNCTION IF EXISTS public.stripe_link_state(uuid, uuid, uuid, uuid, text, text);
DROP FUNCTION IF EXISTS public.stripe_claim(text, uuid, uuid, uuid, uuid);
DROP FUNCTION IF EXISTS public.stripe_organizations_on();
DROP FUNCTION IF EXISTS public.stripe_create_trigger(text, text);
DROP TYPE IF EXISTS public.stripe_outcome;
DROP FUNCTION IF EXISTS public.stripe_fit_table(text, text[], text[]);
