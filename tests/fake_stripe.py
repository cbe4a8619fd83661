"""A small in-memory Stripe API: customers and events with Stripe's list pagination, deleted
customers, idempotency keys and error bodies. Served through `responses` (in-process tests) or a
real HTTP server on loopback (CLI subprocess tests, via STRIPE_API_BASE)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import responses

from webhook import samples

Answer = tuple[int, dict[str, Any]]


def _error(status: int, kind: str, message: str, code: str | None = None) -> Answer:
    return status, {"error": {"type": kind, "message": message, **({"code": code} if code else {})}}


def _form(body: str) -> dict[str, Any]:
    """Stripe's form encoding (metadata[user_id]=…) as nested dicts."""
    params: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        match = re.fullmatch(r"(\w+)\[(\w+)\]", key)
        if match:
            params.setdefault(match[1], {})[match[2]] = value
        else:
            params[key] = value
    return params


class FakeStripe:
    def __init__(self) -> None:
        self.customers: dict[str, dict[str, Any]] = {}
        self.deleted: set[str] = set()
        self.events: list[dict[str, Any]] = []
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.entitlements: dict[str, list[dict[str, Any]]] = {}  # customer -> active entitlements
        self.v2_events: dict[str, dict[str, Any]] = {}  # GET /v2/core/events/{id}
        self.payment_methods: dict[str, dict[str, Any]] = {}
        self.invoices: dict[str, dict[str, Any]] = {}
        self.invoice_lines: dict[str, list[dict[str, Any]]] = {}  # every line of an invoice, paged
        self.failures: list[Answer] = []  # answered, in order, before anything else ...
        self.fail_from = 0  # ... once this many requests have been answered
        self.requests: list[tuple[str, str]] = []
        self.request_times: list[float] = []  # monotonic, one per request
        self.api_key = "sk_test_fake"  # the one key this account accepts
        self.clock: int | None = None  # the Date Stripe's answers carry (unix seconds); None: now
        self.delay = 0.0  # seconds each answer over HTTP waits: a slow Stripe
        self.retry_after: int | None = None  # the Retry-After header of a 429 answered over HTTP
        self.contexts: list[str | None] = []  # the Stripe-Context header of each request
        self.rate_limit: int | None = None  # requests a second this account allows; more are answered 429
        self.rate_limited = 0  # how many were
        self.gate = threading.Event()  # answers over HTTP wait while it is clear: a Stripe held still
        self.gate.set()
        self._idempotent: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def add_customer(self, **fields: Any) -> dict[str, Any]:
        customer = samples.customer(**fields)
        self.customers[customer["id"]] = customer
        return customer

    def delete_customer(self, customer_id: str) -> None:
        self.customers.pop(customer_id, None)
        self.deleted.add(customer_id)

    def handle(self, method: str, url: str, body: str, headers: dict[str, str]) -> Answer:
        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        with self._lock:
            self.requests.append((method, parts.path))
            moment = time.monotonic()
            self.request_times.append(moment)
            self.contexts.append(headers.get("Stripe-Context", headers.get("stripe-context")))
            if self.rate_limit is not None and sum(1 for t in self.request_times if t > moment - 1) > self.rate_limit:
                self.rate_limited += 1
                return _error(429, "invalid_request_error", "Too many requests", "rate_limit")
            if self.failures and len(self.requests) > self.fail_from:
                return self.failures.pop(0)
            if headers.get("Authorization", headers.get("authorization", "")) != f"Bearer {self.api_key}":
                return _error(401, "invalid_request_error", "Invalid API Key provided: sk_test_****")
            return self._route(method, parts.path, query, _form(body))

    def _route(self, method: str, path: str, query: list[tuple[str, str]], form: dict[str, Any]) -> Answer:
        params = dict(query)
        if path == "/v1/customers" and method == "GET":
            return 200, self._page(list(self.customers.values()), params, "/v1/customers")
        if path == "/v1/customers" and method == "POST":
            return 200, self._create(form)
        match = re.fullmatch(r"/v1/customers/(\w+)", path)
        if match and match[1] in self.customers:
            customer = self.customers[match[1]]
            if method == "POST":
                customer.update({key: value for key, value in form.items() if key in ("email", "name")})
            return 200, customer
        if match and match[1] in self.deleted:
            return 200, {"id": match[1], "object": "customer", "deleted": True}
        if match:
            return _error(404, "invalid_request_error", f"No such customer: '{match[1]}'", "resource_missing")
        found = re.fullmatch(r"/v1/subscriptions/(\w+)", path)
        if found and found[1] in self.subscriptions:
            return 200, self.subscriptions[found[1]]
        if found:
            return _error(404, "invalid_request_error", f"No such subscription: '{found[1]}'", "resource_missing")
        if path == "/v1/subscriptions" and method == "GET":
            return 200, self._page(list(self.subscriptions.values()), params, "/v1/subscriptions")
        if path == "/v1/entitlements/active_entitlements" and method == "GET":
            listed = self.entitlements.get(params.get("customer", ""), [])
            return 200, self._page(listed, params, "/v1/entitlements/active_entitlements")
        if path == "/v1/payment_methods" and method == "GET":
            mine = [m for m in self.payment_methods.values() if m.get("customer") == params.get("customer")]
            return 200, self._page(mine, params, "/v1/payment_methods")
        card = re.fullmatch(r"/v1/payment_methods/(\w+)", path)
        if card and card[1] in self.payment_methods:
            return 200, self.payment_methods[card[1]]
        lines = re.fullmatch(r"/v1/invoices/(\w+)/lines", path)
        if lines and lines[1] in self.invoices:
            every = self.invoice_lines.get(lines[1], self.invoices[lines[1]]["lines"]["data"])
            return 200, self._page(every, params, lines[0])
        bill = re.fullmatch(r"/v1/invoices/(\w+)", path)
        if bill and bill[1] in self.invoices:
            return 200, self.invoices[bill[1]]
        if bill:
            return _error(404, "invalid_request_error", f"No such invoice: '{bill[1]}'", "resource_missing")
        if path == "/v1/invoices" and method == "GET":
            wanted = {key: params[key] for key in ("customer", "status") if key in params}
            since = int(params.get("created[gte]", 0))
            chosen = [
                i
                for i in self.invoices.values()
                if all(i.get(key) == value for key, value in wanted.items()) and i.get("created", 0) >= since
            ]
            return 200, self._page(chosen, params, "/v1/invoices")
        thin = re.fullmatch(r"/v2/core/events/(\w+)", path)
        if thin and thin[1] in self.v2_events:
            return 200, self.v2_events[thin[1]]
        if path == "/v1/events" and method == "GET":
            since = int(params.get("created[gte]", 0))
            types = {value for key, value in query if key.startswith("types[")}
            chosen = [e for e in self.events if e["created"] >= since and (not types or e["type"] in types)]
            chosen.sort(key=lambda event: event["created"], reverse=True)
            return 200, self._page(chosen, params, "/v1/events")
        return _error(404, "invalid_request_error", f"Unrecognized request URL ({method}: {path})")

    def _create(self, form: dict[str, Any]) -> dict[str, Any]:
        key = form.pop("__idempotency_key", None)
        if key and key in self._idempotent:
            return self._idempotent[key]
        customer = samples.customer(email=form.get("email"), name=form.get("name"), metadata=form.get("metadata"))
        customer["created"] = int(time.time())
        self.customers[customer["id"]] = customer
        if key:
            self._idempotent[key] = customer
        return customer

    @staticmethod
    def _page(items: list[dict[str, Any]], params: dict[str, str], url: str) -> dict[str, Any]:
        limit = int(params.get("limit", 10))
        start = 0
        if "starting_after" in params:
            start = next(i for i, item in enumerate(items) if item["id"] == params["starting_after"]) + 1
        page = items[start : start + limit]
        return {"object": "list", "url": url, "has_more": start + limit < len(items), "data": page}

    # Served in-process: the stripe library's requests calls, intercepted by `responses`.
    @contextmanager
    def mocked(self, base: str = "https://api.stripe.com") -> Iterator[responses.RequestsMock]:
        def callback(request: Any) -> tuple[int, dict[str, str], str]:
            headers = dict(request.headers)
            body = request.body or ""
            body = body.decode() if isinstance(body, bytes) else body
            if "Idempotency-Key" in headers:
                body += ("&" if body else "") + "__idempotency_key=" + headers["Idempotency-Key"]
            status, answer = self.handle(request.method, request.url, body, headers)
            return status, {"Request-Id": "req_fake"}, json.dumps(answer)

        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            for method in ("GET", "POST", "DELETE"):
                mock.add_callback(method, re.compile(re.escape(base) + r"/v[12]/.*"), callback=callback)
            yield mock

    # Served over real HTTP, for the CLI as a subprocess.
    @contextmanager
    def serving(self) -> Iterator[str]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                headers = dict(self.headers.items())
                if "Idempotency-Key" in headers:
                    body += ("&" if body else "") + "__idempotency_key=" + headers["Idempotency-Key"]
                status, answer = fake.handle(self.command, self.path, body, headers)
                payload = json.dumps(answer).encode()
                self.send_response(status)
                if status == 429 and fake.retry_after is not None:
                    self.send_header("Retry-After", str(fake.retry_after))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def date_time_string(self, timestamp: float | None = None) -> str:
                fake.gate.wait(60)
                time.sleep(fake.delay)
                return super().date_time_string(fake.clock if fake.clock is not None else timestamp)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
