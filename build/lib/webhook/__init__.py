"""Stripe customer webhook consumer: keeps stripe_customers right from signed Stripe events."""
