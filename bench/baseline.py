"""The bare baseline the consumer is measured against: verify the signature, answer 200."""

from __future__ import annotations

import os

import stripe
from flask import Flask, Response, jsonify, request

SECRET = os.environ["STRIPE_WEBHOOK_SECRET"]


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/webhooks/stripe")
    def stripe_webhook() -> tuple[Response, int]:
        try:
            stripe.WebhookSignature.verify_header(request.get_data(), request.headers.get("Stripe-Signature"), SECRET)
        except stripe.SignatureVerificationError:
            return jsonify(error="bad signature"), 400
        return jsonify(status="ok"), 200

    return app
