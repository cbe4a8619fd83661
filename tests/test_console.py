"""The support console without a browser: who may see what, CSRF, throttling, escaping, logs, the
query plans behind a customer's page, and support-user. tests/test_console_browser.py drives it in
Chromium."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text
from werkzeug.security import generate_password_hash

from tests.fake_stripe import FakeStripe
from tests.support import add_user, count, customer_row, deliver, event_row, failing_writes, now, settings_for
from webhook import samples
from webhook.app import create_app
from webhook.console import queries
from webhook.console.timeline import dashboard_url, state_of

PASSWORD = "correct horse battery staple"
USERS = f"alice:{generate_password_hash(PASSWORD)},bob:{generate_password_hash('another long password')}"


@pytest.fixture
def console(database_url: str, engine: Engine) -> Iterator[FlaskClient]:
    app = create_app(settings_for(database_url, SUPPORT_USERS=USERS), engine)
    yield app.test_client()


def _csrf(client: FlaskClient, path: str = "/support/signin") -> str:
    page = client.get(path).get_data(as_text=True)
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def sign_in(client: FlaskClient, name: str = "alice", password: str = PASSWORD) -> int:
    answer = client.post("/support/signin", data={"name": name, "password": password, "csrf_token": _csrf(client)})
    return answer.status_code


URLS = [
    ("GET", "/support/"),
    ("GET", "/support/?q=someone@example.com"),
    ("GET", "/support/customers/cus_Anything"),
    ("GET", "/support/users/7d0f6a5e-1b9a-4d47-9d55-3f0d3c1f0a11"),
    ("GET", "/support/failed"),
    ("POST", "/support/events/evt_1/replay"),
    ("POST", "/support/failed/replay"),
    ("POST", "/support/customers/cus_Anything/resync"),
    ("POST", "/support/signout"),
]


def test_nothing_answers_without_a_session(console: FlaskClient) -> None:
    for method, url in URLS:
        answer = console.open(url, method=method, data={"csrf_token": _csrf(console)})
        assert answer.status_code in (302, 401), (method, url, answer.status_code)
        if answer.status_code == 302:
            assert answer.headers["Location"].endswith("/support/signin")
        assert "cus_" not in answer.get_data(as_text=True) or url.endswith("resync")  # echoes nothing
    assert console.get("/support/signin").headers["Cache-Control"] == "no-store"


def test_the_console_is_off_without_support_users(client: FlaskClient) -> None:
    assert client.get("/support/").status_code == 404
    assert client.get("/support/signin").status_code == 404


def test_a_post_without_the_right_csrf_token_changes_nothing(console: FlaskClient, engine: Engine) -> None:
    event = samples.event("customer.created", samples.customer())
    with failing_writes(engine, "public.stripe_customers", "BEFORE"):
        assert deliver(console, event).status_code == 500
    assert sign_in(console) == 302
    for token in ({}, {"csrf_token": "forged"}):
        assert console.post(f"/support/events/{event['id']}/replay", data=token).status_code == 400
        assert console.post("/support/failed/replay", data=token).status_code == 400
    assert event_row(engine, event["id"])["status"] == "failed"  # type: ignore[index]
    replayed = console.post(f"/support/events/{event['id']}/replay", data={"csrf_token": _csrf(console, "/support/")})
    assert replayed.status_code == 302
    assert event_row(engine, event["id"])["status"] == "processed"  # type: ignore[index]
    audit = text("SELECT changed_by FROM stripe_customers_audit WHERE stripe_customer_id = :c")
    with engine.connect() as connection:
        assert connection.execute(audit, {"c": event["data"]["object"]["id"]}).scalar_one() == "support:alice"


def test_failed_sign_ins_are_turned_away_and_never_logged(
    console: FlaskClient, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.INFO, logger="webhook"):
        for _ in range(5):
            assert sign_in(console, password="wrong password guess") == 401
        # The count is in the database: every worker and host refuses now, the right password too.
        assert sign_in(console) == 429
        assert sign_in(console, "bob", "another long password") == 302  # others are not locked out
    logged = caplog.text + capfd.readouterr().err
    assert logged.count('"msg":"support sign-in failed"') == 5  # the log is seen
    assert "wrong password guess" not in logged and PASSWORD not in logged


@pytest.mark.parametrize(
    "people",
    [
        f"alice:{generate_password_hash('a brand new long password')}",  # alice's password changed
        f"bob:{generate_password_hash('another long password')}",  # alice removed
    ],
)
def test_a_changed_or_removed_person_loses_their_session(database_url: str, engine: Engine, people: str) -> None:
    # One SUPPORT_SESSION_SECRET for every app: the cookie stays readable whatever SUPPORT_USERS
    # says, so only the person's fingerprint in it can end the session.
    secret = {"SUPPORT_SESSION_SECRET": "a session secret of this deployment"}
    client = create_app(settings_for(database_url, SUPPORT_USERS=USERS, **secret), engine).test_client()
    assert sign_in(client) == 302
    cookie = client.get_cookie("support_session")
    assert cookie is not None

    def opens_pages(users: str) -> bool:
        other = create_app(settings_for(database_url, SUPPORT_USERS=users, **secret), engine).test_client()
        other.set_cookie("support_session", cookie.value)
        return bool(other.get("/support/failed").status_code == 200)

    assert opens_pages(USERS)  # the same people elsewhere: the session holds
    assert not opens_pages(people)


def test_html_in_a_customers_name_is_shown_as_text(console: FlaskClient, engine: Engine) -> None:
    customer = samples.customer(name="<script>alert(1)</script>", metadata={"note": "<img src=x onerror=alert(2)>"})
    deliver(console, samples.event("customer.created", customer))
    assert sign_in(console) == 302
    page = console.get(f"/support/customers/{customer['id']}").get_data(as_text=True)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page


def test_search_by_every_kind_of_key(console: FlaskClient, engine: Engine) -> None:
    user_id = add_user(engine, email="Paid.User@example.com")
    customer = samples.customer(email="Paid.User@example.com", metadata={"user_id": user_id})
    event = samples.event("customer.created", customer)
    deliver(console, event)
    lonely = add_user(engine, email="Lonely@Example.com")
    assert sign_in(console) == 302
    page = f"/support/customers/{customer['id']}"
    for query in ("paid.user@EXAMPLE.com", user_id, customer["id"]):
        assert console.get("/support/", query_string={"q": query}, follow_redirects=True).request.path == page
    by_event = console.get("/support/", query_string={"q": event["id"]})
    assert by_event.headers["Location"] == f"{page}#{event['id']}"
    no_customer = console.get("/support/", query_string={"q": lonely}, follow_redirects=True).get_data(as_text=True)
    assert "No Stripe customer is linked" in no_customer
    # "I paid but have no access": a user without a customer, found whatever the case of the email.
    found = console.get("/support/", query_string={"q": "lonely@EXAMPLE.com"}).get_data(as_text=True)
    assert f"/support/users/{lonely}" in found


def test_no_email_in_any_log_line(console: FlaskClient, engine: Engine, capfd: pytest.CaptureFixture[str]) -> None:
    customer = samples.customer(email="private.person@example.com")
    deliver(console, samples.event("customer.created", customer))
    assert sign_in(console) == 302
    console.get("/support/", query_string={"q": "private.person@example.com"}, follow_redirects=True)
    logged = capfd.readouterr().err
    assert '"msg":"support sign-in"' in logged and '"msg":"event handled"' in logged  # the log is seen
    assert "private.person" not in logged and PASSWORD not in logged


def test_a_customers_page_reads_by_index(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SET enable_seqscan = off"))  # a tiny table would be scanned anyway
        for sql in (queries.EVENTS_OF, queries.AUDIT_OF):
            plan = connection.execute(text("EXPLAIN " + sql), {"id": "cus_X", "limit": 200}).scalars().all()
            assert any("Index Scan" in line for line in plan), plan
            assert not any("Seq Scan" in line for line in plan), plan
        connection.execute(text("RESET enable_seqscan"))


def _support_user(database_url: str, typed: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "webhook", "support-user", "carol"],
        input=typed,
        capture_output=True,
        text=True,
        timeout=60,
        env={"DATABASE_URL": database_url, "STRIPE_WEBHOOK_SECRET": "whsec_x", "PATH": "/usr/bin:/bin"},
    )


def test_support_user_prints_a_salted_hash_and_never_the_password(database_url: str) -> None:
    result = _support_user(database_url, f"{PASSWORD}\n{PASSWORD}\n")
    assert result.returncode == 0, result.stderr
    name, _, hashed = result.stdout.strip().partition(":")
    assert name == "carol" and hashed.startswith("scrypt:") and PASSWORD not in result.stdout + result.stderr
    app = create_app(settings_for(database_url, SUPPORT_USERS=result.stdout.strip()))
    assert sign_in(app.test_client(), "carol") == 302
    mismatch = _support_user(database_url, f"{PASSWORD}\nsomething else entirely\n")
    assert mismatch.returncode == 2 and "differ" in mismatch.stderr and PASSWORD not in mismatch.stderr


def test_an_unlinked_row_and_an_unsettled_tie_stand_out_in_words() -> None:
    unlinked = {
        "user_id": None,
        "customer_metadata": {"sync": {"note": "that user is already linked to another customer"}},
    }
    tie = {"user_id": "u1", "customer_metadata": {"sync": {"note": "tie not settled: evt_1"}}}
    fine = {"user_id": "u1", "customer_metadata": {"sync": {"status": "synced"}}}
    said = state_of(unlinked, None, None)
    assert said.alarming and said.headline == "Not linked to any user" and "already linked" in (said.note or "")
    assert state_of(tie, {"email": "a@example.com"}, None).alarming
    assert not state_of(fine, {"email": "a@example.com"}, None).alarming
    assert state_of(None, None, {"event_id": "evt_1"}).headline.startswith("Deleted")
    assert dashboard_url("cus_1", livemode=False) == "https://dashboard.stripe.com/test/customers/cus_1"
    assert dashboard_url("cus_1", livemode=True) == "https://dashboard.stripe.com/customers/cus_1"


@pytest.mark.parametrize(
    ("key", "in_stripe", "outcome"),
    [
        ("sk_test_fake", "renamed", "re-synced from Stripe: processed"),
        ("sk_test_fake", "deleted", "re-synced from Stripe: processed"),
        # Refused, nothing changed: a key of the other mode, and a customer the key cannot see at
        # all (Stripe keeps deleted customers, so that is another account's key).
        ("sk_live_fake", "deleted", "not re-synced: STRIPE_API_KEY is a live-mode key"),
        ("sk_test_fake", "unknown", "not re-synced: Stripe does not know"),
    ],
)
def test_resync_applies_stripes_state_with_verify_fixs_refusals(
    database_url: str, engine: Engine, key: str, in_stripe: str, outcome: str
) -> None:
    fake = FakeStripe()
    customer = samples.customer(created=now() - 60)
    if in_stripe == "renamed":
        fake.customers[customer["id"]] = {**customer, "name": "Renamed in Stripe"}
    elif in_stripe == "deleted":
        fake.deleted.add(customer["id"])
    with fake.serving() as base:
        app = create_app(
            settings_for(database_url, SUPPORT_USERS=USERS, STRIPE_API_KEY=key, STRIPE_API_BASE=base), engine
        )
        console = app.test_client()
        assert deliver(console, samples.event("customer.created", customer, created=now() - 60)).status_code == 200
        assert sign_in(console) == 302
        page = f"/support/customers/{customer['id']}"
        answer = console.post(f"{page}/resync", data={"csrf_token": _csrf(console, page)}, follow_redirects=True)
    assert outcome in answer.get_data(as_text=True)
    row = customer_row(engine, customer["id"])
    if outcome.startswith("not"):
        assert row is not None and row["customer_name"] == customer["name"]
        assert count(engine, "SELECT count(*) FROM stripe_object_tombstones WHERE object = 'customer'") == 0
    elif in_stripe == "renamed":
        assert row is not None and row["customer_name"] == "Renamed in Stripe"
        audit = text("SELECT changed_by FROM stripe_customers_audit WHERE operation = 'UPDATE'")
        with engine.connect() as connection:
            assert connection.execute(audit).scalar_one() == "support:alice"
    else:
        assert row is None


def test_a_back_field_that_is_not_a_console_page_is_refused_before_the_replay(
    console: FlaskClient, engine: Engine
) -> None:
    event = samples.event("customer.created", samples.customer())
    with failing_writes(engine, "public.stripe_customers", "BEFORE"):
        assert deliver(console, event).status_code == 500
    assert sign_in(console) == 302
    token = _csrf(console, "/support/failed")
    for back in ("/support/failed\r\nSet-Cookie: stolen=1", "https://elsewhere.example/support/", "//evil/support/"):
        answer = console.post(f"/support/events/{event['id']}/replay", data={"csrf_token": token, "back": back})
        assert answer.status_code == 400, back
        assert event_row(engine, event["id"])["status"] == "failed"  # type: ignore[index]
    page = f"/support/customers/{event['data']['object']['id']}"
    replayed = console.post(f"/support/events/{event['id']}/replay", data={"csrf_token": token, "back": page})
    assert replayed.status_code == 302 and replayed.headers["Location"] == page
    assert event_row(engine, event["id"])["status"] == "processed"  # type: ignore[index]


def test_every_page_is_private_and_scriptless(console: FlaskClient, engine: Engine) -> None:
    user_id = add_user(engine, email="someone@example.com")
    customer = samples.customer(metadata={"user_id": user_id})
    event = samples.event("customer.created", customer)
    assert deliver(console, event).status_code == 200
    pages = ["/support/signin"]
    assert sign_in(console) == 302
    pages += [
        "/support/",
        "/support/?q=nobody@example.com",
        f"/support/customers/{customer['id']}",
        f"/support/users/{add_user(engine)}",
        "/support/failed",
    ]
    for page in pages:
        answer = console.get(page)
        assert answer.status_code == 200, page
        assert answer.headers["Cache-Control"] == "no-store", page
        assert "default-src 'none'" in answer.headers["Content-Security-Policy"], page
        assert "<script" not in answer.get_data(as_text=True), page


def test_replay_all_runs_every_failed_event_as_the_person(console: FlaskClient, engine: Engine) -> None:
    events = [samples.event("customer.created", samples.customer()) for _ in range(3)]
    with failing_writes(engine, "public.stripe_customers", "BEFORE"):
        assert [deliver(console, event).status_code for event in events] == [500] * 3
    assert sign_in(console) == 302
    answer = console.post(
        "/support/failed/replay", data={"csrf_token": _csrf(console, "/support/failed")}, follow_redirects=True
    )
    assert "replayed 3: 3 processed" in answer.get_data(as_text=True)
    assert [event_row(engine, event["id"])["status"] for event in events] == ["processed"] * 3  # type: ignore[index]
    with engine.connect() as connection:
        audit = connection.execute(text("SELECT DISTINCT changed_by FROM stripe_customers_audit")).scalars().all()
    assert audit == ["support:alice"]


def test_the_customer_page_says_in_words_why_a_user_has_no_access(console: FlaskClient, engine: Engine) -> None:
    from datetime import UTC, datetime

    user_id = add_user(engine, email="paid@example.com")
    customer = samples.customer(metadata={"user_id": user_id})
    assert deliver(console, samples.event("customer.created", customer, created=now() - 100)).status_code == 200
    assert sign_in(console) == 302
    page = f"/support/customers/{customer['id']}"

    def access() -> str:
        html = console.get(page).get_data(as_text=True)
        return re.sub(r"\s+", " ", html.split('id="access"', 1)[1].split("</div>", 1)[0])

    assert "no subscription; entitlements not synced: no API key" in access()
    canceled_at = now() - 50
    subscription = samples.subscription(customer["id"], status="canceled", canceled_at=canceled_at)
    deliver(console, samples.event("customer.subscription.deleted", subscription, created=now() - 50))
    day = datetime.fromtimestamp(canceled_at, UTC).strftime("%Y-%m-%d")
    assert f"no active subscription: {subscription['id']} canceled on {day}" in access()

    active = samples.subscription(customer["id"], status="active")
    deliver(console, samples.event("customer.subscription.created", active, created=now() - 40))
    summary = samples.entitlement_summary(customer["id"], ["pro", "export"])
    deliver(console, samples.event("entitlements.active_entitlement_summary.updated", summary, created=now() - 40))
    assert "Access to: export, pro" in access() and f"active subscription {active['id']}" in access()
    html = console.get(page).get_data(as_text=True)
    assert f"subscription {active['id']} added" in html and "entitlement pro added" in html  # the timeline


def test_the_customer_page_lists_payment_methods_and_the_default(console: FlaskClient, engine: Engine) -> None:
    method = samples.payment_method(None, last4="4242", exp_year=2031)
    customer = samples.customer(default_payment_method=method["id"])
    assert deliver(console, samples.event("customer.created", customer)).status_code == 200
    attached = samples.event("payment_method.attached", {**method, "customer": customer["id"]})
    assert deliver(console, attached).get_json()["status"] == "processed"
    assert sign_in(console) == 302
    html = console.get(f"/support/customers/{customer['id']}").get_data(as_text=True)
    listed = re.sub(r"\s+", " ", html.split('id="payment-methods"', 1)[1].split("</p>", 1)[0])
    assert "visa ···· 4242, expires 12/2031 (default)" in listed


def test_the_pages_show_the_organization_and_access_through_it(console: FlaskClient, engine: Engine) -> None:
    from tests.test_organizations import add_organization

    member, lonely_member = add_user(engine, email="member@example.com"), add_user(engine)
    organization = add_organization(engine, members=(member,))
    unbilled = add_organization(engine, members=(lonely_member,))
    customer = samples.customer(metadata={"organization_id": organization})
    deliver(console, samples.event("customer.created", customer, created=now() - 100))
    plan = samples.subscription(customer["id"], prices=[samples.price("team_monthly", tier="team")])
    plan_event = samples.event("customer.subscription.created", plan, created=now() - 90)
    deliver(console, plan_event)
    summary = samples.entitlement_summary(customer["id"], ["reports"])
    deliver(console, samples.event("entitlements.active_entitlement_summary.updated", summary, created=now() - 90))
    assert sign_in(console) == 302

    def words(html: str, marker: str, end: str = "</table>") -> str:
        """The text of the part of the page after marker, as a person reads it."""
        part = html.split(marker, 1)[1].split(end, 1)[0]
        return " ".join(re.sub(r"<[^>]+>", " ", part).replace(">", " ").split())

    html = console.get(f"/support/customers/{customer['id']}").get_data(as_text=True)
    assert "Bills organization Acme" in html
    assert words(html, 'id="organization"', "</dd>") == f"Acme {organization} : tier team , 1 member"
    assert f"organization {organization} changed event {plan_event['id']} tier: free → team" in words(
        html, "<h2>Timeline"
    )

    page = console.get(f"/support/users/{member}")
    assert page.status_code == 200  # no redirect: the user has no customer of their own
    said = words(page.get_data(as_text=True), 'id="access"', "</div>")
    assert said.startswith(f"Access comes through an organization: Acme {organization} , tier team , 1 member")
    assert f"billed by {customer['id']} ." in said and "Access to: reports" in said
    lonely = words(console.get(f"/support/users/{lonely_member}").get_data(as_text=True), 'id="organizations"')
    assert f"Acme {unbilled} free 1 the organization has no billing customer" in lonely


def test_thin_notifications_show_on_their_customers_page_waiting_or_failed(database_url: str, engine: Engine) -> None:
    """A queued notification shows as waiting, a failed one (no API key) with its reason, both on
    the page of the customer they name; a new row's empty metadata is no 'change'."""
    customer = samples.customer(metadata={})
    keyed = create_app(
        settings_for(
            database_url, SUPPORT_USERS=USERS, STRIPE_API_KEY="sk_test_fake", STRIPE_API_BASE="http://127.0.0.1:9"
        ),
        engine,
    ).test_client()
    assert deliver(keyed, samples.event("customer.created", customer)).status_code == 200
    waiting = samples.thin_event("v1.customer.updated", customer["id"])
    assert deliver(keyed, waiting).get_json()["status"] == "queued"
    unkeyed = create_app(settings_for(database_url, SUPPORT_USERS=USERS), engine).test_client()
    failed = samples.thin_event("v1.customer.updated", customer["id"])
    assert deliver(unkeyed, failed).status_code == 500
    assert sign_in(unkeyed) == 302
    page = unkeyed.get(f"/support/customers/{customer['id']}").get_data(as_text=True)
    assert re.search(rf"{waiting['id']}.*?badge waiting", page, re.S)
    assert re.search(rf"{failed['id']}.*?badge failed.*?need STRIPE_API_KEY", page, re.S)
    assert "Stripe metadata" not in page  # created with {}: nothing changed from nothing


def test_the_pages_list_invoices_and_say_when_access_is_at_risk(database_url: str, engine: Engine) -> None:
    from datetime import UTC, datetime

    app = create_app(settings_for(database_url, SUPPORT_USERS=USERS, STRIPE_PAST_DUE_GRACE="7 days"), engine)
    console = app.test_client()
    user_id = add_user(engine)
    customer = samples.customer(metadata={"user_id": user_id})
    assert deliver(console, samples.event("customer.created", customer, created=now() - 100)).status_code == 200
    failed_at = now() - 2 * 86400
    invoice = samples.invoice(customer["id"], subscription_id="sub_Risk", attempt_count=3, amount=1999)
    assert deliver(console, samples.event("invoice.payment_failed", invoice, created=failed_at)).status_code == 200
    paid = samples.invoice(customer["id"], status="paid", amount=1999)
    assert deliver(console, samples.event("invoice.paid", paid, created=now() - 50 * 86400)).status_code == 200
    assert sign_in(console) == 302
    html = console.get(f"/support/customers/{customer['id']}").get_data(as_text=True)
    words = re.sub(r"\s+", " ", html.split('id="access"', 1)[1].split("</div>", 1)[0])
    day = lambda stamp: datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d")  # noqa: E731
    next_try = day(invoice["next_payment_attempt"])
    assert f"payment failing since {day(failed_at)} (3 attempts, next {next_try})" in words
    assert f"access ends {day(failed_at + 7 * 86400)} under a 7-day grace" in words
    listed = re.sub(r"\s+", " ", html.split('id="invoices"', 1)[1].split("</table>", 1)[0])
    assert f"<code>{invoice['id']}</code>" in listed and f"<code>{paid['id']}</code>" in listed
    assert listed.index(invoice["id"]) < listed.index(paid["id"])  # the open one first
    assert "19.99 USD" in listed and invoice["hosted_invoice_url"] in listed
