"""The support console's pages and actions: a blueprint whose views are module-level functions;
what they need (the console's engine, the settings) is reached through the app (install())."""

from __future__ import annotations

import re
import uuid
from typing import Any

import stripe
from flask import Blueprint, Response, abort, current_app, flash, g, redirect, render_template, request, url_for
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.wrappers import Response as BaseResponse

from webhook import stripe_api
from webhook.config import Settings
from webhook.console import auth, queries
from webhook.console.timeline import State, access_of, dashboard_url, state_of, timeline, with_standing
from webhook.objects.customer import CUSTOMER
from webhook.reconcile import FixRefused, resync
from webhook.replay import replay_stored

Page = str | BaseResponse | tuple[str, int]
_CONSOLE_PAGE = re.compile(r"/support/[A-Za-z0-9_./#%-]*")
EXTENSION = "stripe_webhook_console"

bp = Blueprint("console", __name__, url_prefix="/support", template_folder="templates")


def _engine() -> Engine:
    """The console's own small pool (never the deliveries')."""
    engine: Engine = current_app.extensions[EXTENSION]["engine"]
    return engine


def _settings() -> Settings:
    settings: Settings = current_app.extensions[EXTENSION]["settings"]
    return settings


@bp.before_request
def guard() -> BaseResponse | tuple[str, int] | None:
    if request.method == "POST":
        auth.csrf.protect()  # a missing or wrong token is answered 400, nothing done
    if request.endpoint == "console.sign_in" or auth.signed_in(_engine(), _settings()):
        return None
    if request.method == "GET":
        return redirect(url_for("console.sign_in"))
    return "sign in first", 401


@bp.after_request
def private(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    )
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.errorhandler(SQLAlchemyError)
def database_busy(error: SQLAlchemyError) -> tuple[str, int]:
    # A locked table or a full console pool: the page gives up within seconds, and says so.
    return render_template("console/busy.html"), 503


@bp.context_processor
def who() -> dict[str, Any]:
    return {"who": g.get("support_user")}


@bp.route("/signin", methods=["GET", "POST"])
def sign_in() -> Page:
    if request.method == "GET":
        return render_template("console/signin.html")
    try:
        if auth.sign_in(_engine(), _settings(), request.form.get("name", ""), request.form.get("password", "")):
            return redirect(url_for("console.search"))
    except auth.TooManyAttempts:
        return render_template("console/signin.html", error="Too many failed sign-ins: wait 15 minutes."), 429
    return render_template("console/signin.html", error="Wrong name or password."), 401


@bp.post("/signout")
def sign_out() -> BaseResponse:
    auth.sign_out(_engine())
    return redirect(url_for("console.sign_in"))


@bp.get("/")
def search() -> Page:
    query = request.args.get("q", "").strip()
    if not query:
        return render_template("console/search.html", query="")
    if query.startswith("cus_"):
        return redirect(url_for("console.customer", customer_id=query))
    if query.startswith("evt_"):
        event = queries.event(_engine(), query)
        if event and event["stripe_customer_id"]:
            return redirect(url_for("console.customer", customer_id=event["stripe_customer_id"]) + f"#{query}")
        return render_template("console/search.html", query=query, event=event, searched=True)
    try:
        return redirect(url_for("console.user", user_id=str(uuid.UUID(query))))
    except ValueError:
        pass
    customers = queries.customers_by_email(_engine(), query)
    if len(customers) == 1:
        return redirect(url_for("console.customer", customer_id=customers[0]["stripe_customer_id"]))
    users = [] if customers else queries.users_by_email(_engine(), query)
    return render_template("console/search.html", query=query, customers=customers, users=users, searched=True)


@bp.get("/users/<uuid:user_id>")
def user(user_id: uuid.UUID) -> Page:
    found = queries.user(_engine(), str(user_id))
    customer_id = queries.customer_of_user(_engine(), str(user_id))
    organizations = queries.organizations_of_user(_engine(), str(user_id))
    billed = [organization for organization in organizations if organization["stripe_customer_id"]]
    if customer_id and not billed:
        return redirect(url_for("console.customer", customer_id=customer_id))
    claims = queries.claims_of_user(_engine(), str(user_id))
    through = billed[0] if billed else None
    return render_template(
        "console/user.html",
        user_id=str(user_id),
        user=found,
        claims=claims,
        customer_id=customer_id,
        organizations=organizations,
        through=through,
        access=_access(through["stripe_customer_id"]) if through else None,
    )


def _access(
    customer_id: str, row: dict[str, Any] | None = None
) -> tuple[State, list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """Whether a customer gives access, and if not why; with its subscriptions, entitlements and invoices."""
    row = row if row is not None else queries.customer(_engine(), customer_id)
    subscriptions = queries.subscriptions_of(_engine(), customer_id)
    entitlements, entitlement_set = queries.entitlements_of(_engine(), customer_id)
    invoices = queries.invoices_of(_engine(), customer_id)
    settings = _settings()
    state = access_of(row, subscriptions, entitlements, entitlement_set, settings.stripe_api_key is not None)
    return with_standing(state, invoices, settings.past_due_grace), subscriptions, entitlements, invoices


@bp.get("/customers/<customer_id>")
def customer(customer_id: str) -> Page:
    row = queries.customer(_engine(), customer_id)
    events = queries.events_of(_engine(), customer_id)
    if row is None and not events:
        abort(404)
    linked = queries.user(_engine(), str(row["user_id"])) if row and row["user_id"] else None
    billed = row["organization_id"] if row else None
    organization = queries.organization(_engine(), str(billed)) if billed else None
    tombstone = queries.tombstone(_engine(), customer_id)
    access, subscriptions, entitlements, invoices = _access(customer_id, row)
    livemode = bool(events[0]["livemode"]) if events else "_live_" in (_settings().stripe_api_key or "")
    return render_template(
        "console/customer.html",
        customer_id=customer_id,
        row=row,
        sync=((row or {}).get("customer_metadata") or {}).get("sync") or {},
        user=linked,
        organization=organization,
        state=state_of(row, linked, tombstone, organization),
        tombstone=tombstone,
        dashboard=dashboard_url(customer_id, livemode),
        entries=timeline(events, queries.audit_of(_engine(), customer_id)),
        can_resync=_settings().stripe_api_key is not None,
        subscriptions=subscriptions,
        entitlements=entitlements,
        payment_methods=queries.payment_methods_of(_engine(), customer_id),
        invoices=invoices,
        access=access,
    )


@bp.get("/failed")
def failed() -> Page:
    return render_template("console/failed.html", events=queries.failed_events(_engine()))


@bp.post("/events/<event_id>/replay")
def replay_one(event_id: str) -> BaseResponse:
    # Where to go afterwards: a console page, never elsewhere; checked before anything is done.
    back = request.form.get("back") or url_for("console.failed")
    if not _CONSOLE_PAGE.fullmatch(back):
        abort(400)
    summary = replay_stored(
        _engine(), _settings(), event_id=event_id, status="failed", since_seconds=None, actor=_actor()
    )
    flash(summary.line() if summary.outcomes else f"no stored event {event_id}")
    return redirect(back)


@bp.post("/failed/replay")
def replay_failed() -> BaseResponse:
    summary = replay_stored(_engine(), _settings(), event_id=None, status="failed", since_seconds=None, actor=_actor())
    flash(summary.line())
    return redirect(url_for("console.failed"))


@bp.post("/customers/<customer_id>/resync")
def resync_customer(customer_id: str) -> BaseResponse:
    settings = _settings()
    if settings.stripe_api_key is None:
        abort(404)  # the page offers no re-sync without a key
    try:
        outcome = resync(
            _engine(),
            stripe_api.make_client(settings),
            settings.stripe_api_key,
            CUSTOMER,
            customer_id,
            settings.keys,
            _actor(),
        )
        flash(f"re-synced from Stripe: {outcome}")
    except FixRefused as refusal:
        flash(f"not re-synced: {refusal}; nothing changed")
    except stripe.StripeError as error:
        flash(f"not re-synced: {stripe_api.explain(error)}")
    except stripe_api.StripeUnavailable as error:
        flash(f"not re-synced: {error}")
    return redirect(url_for("console.customer", customer_id=customer_id))


def _actor() -> str:
    return f"support:{auth.signed_in(_engine(), _settings())}"
