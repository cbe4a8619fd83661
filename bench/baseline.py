"""The bare baseline the consumer is measured against: verify the signature, answer 200."""

from __future__ import annotations

import json
import os
from typing import Any

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


def create_asgi() -> Any:
    """The same as an ASGI app, verifying in the event loop."""
    ok, bad = json.dumps({"status": "ok"}).encode(), json.dumps({"error": "bad signature"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ok)).encode())]
    bad_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(bad)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        signature = next((v for k, v in scope["headers"] if k == b"stripe-signature"), b"").decode()
        try:
            stripe.WebhookSignature.verify_header(bytes(body), signature, SECRET)
            status, answer, head = 200, ok, headers
        except stripe.SignatureVerificationError:
            status, answer, head = 400, bad, bad_headers
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": answer})

    return app
