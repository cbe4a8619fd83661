-- The support console's own state: who is signed in (so that signing out, an expired session or a
-- removed person ends a session on the server, whatever a copied cookie says), and the sign-in
-- attempts per name that turn guessing away. Applied by `db migrate` after db/functions.sql;
-- idempotent; undone by db/rollback.sql. Tables of their own, apart from the jobs' cursors.

-- step: stripe_support_sessions
CREATE TABLE IF NOT EXISTS public.stripe_support_sessions (
  token_hash text PRIMARY KEY,        -- sha256 of the random token in the signed cookie; never the token
  name text NOT NULL,                 -- the SUPPORT_USERS name signed in
  expires_at timestamptz NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);

-- step: stripe_support_signins
-- Attempts in the current window (15 minutes from its first attempt), counted before the password
-- is checked, so parallel guesses cannot pass between a read and a write.
CREATE TABLE IF NOT EXISTS public.stripe_support_signins (
  name text PRIMARY KEY,              -- a SUPPORT_USERS name, or '?' for every unknown one
  attempts integer NOT NULL,
  window_started timestamptz NOT NULL DEFAULT now()
);

-- step: sign-in counts kept in the jobs' cursors by earlier releases
DELETE FROM public.stripe_sync_cursors WHERE name LIKE 'support-signin:%';
