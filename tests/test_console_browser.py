"""The support console in a real browser: headless Chromium (Debian's package) driven by Selenium,
against the app under gunicorn on a real Postgres, with a customer built by real signed deliveries.
Screenshots go to $SCREENSHOT_DIR (default: the test's tmp dir)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import Engine
from werkzeug.security import generate_password_hash

from tests.server import gunicorn, post_event
from tests.support import KEY, add_user, deliver, event_row, failing_writes, now, settings_for
from webhook import samples
from webhook.app import create_app

pytestmark = pytest.mark.browser
PASSWORD = "correct horse battery staple"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()


def _shot(browser: webdriver.Chrome, tmp_path: Path, name: str) -> None:
    folder = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(folder / f"{name}.png"))


def _after(browser: webdriver.Chrome, act: Callable[[], None]) -> None:
    """Do what loads a new page, and wait until it has (a click returns before the navigation)."""
    old = browser.find_element(By.TAG_NAME, "html")
    act()
    # While the old document is being torn down, chromedriver may answer a look at it with "Node
    # with given id does not belong to the document" rather than "stale": look again.
    wait = WebDriverWait(browser, 15, ignored_exceptions=(WebDriverException,))
    wait.until(expected_conditions.staleness_of(old))
    # ... and finished loading: a form found while the new document is still being built may be
    # detached under the next action ("Node with given id does not belong to the document").
    wait.until(lambda driver: driver.execute_script("return document.readyState") == "complete")


def _search(browser: webdriver.Chrome, query: str) -> None:
    box = browser.find_element(By.NAME, "q")
    box.clear()
    box.send_keys(query)
    _after(browser, box.submit)


def test_support_person_answers_why_a_user_has_no_access(
    browser: webdriver.Chrome, database_url: str, engine: Engine, tmp_path: Path
) -> None:
    user_id = add_user(engine, email="jane.doe@example.com")
    customer = samples.customer(email="jane.doe@example.com", name="Jane Doe", metadata={"user_id": user_id})
    second = now() - 120
    created = samples.event("customer.created", customer, created=second)
    updated = samples.event(
        "customer.updated",
        {**customer, "name": "Jane Q. Doe"},
        created=second,
        previous_attributes={"name": "Jane Doe"},
    )
    failing = samples.event(
        "customer.updated",
        {**customer, "name": "Jane Q. Doe", "invoice_settings": {"default_payment_method": "pm_card_visa"}},
        created=second + 30,
    )
    stale = samples.event("customer.updated", {**customer, "name": "Old Name"}, created=second - 3600)
    users = f"alice:{generate_password_hash(PASSWORD)}"

    # A thin notification about her, queued by a consumer with a key and not read yet: waiting.
    waiting = samples.thin_event("v1.customer.updated", customer["id"])
    keyed = create_app(settings_for(database_url, STRIPE_API_KEY=KEY), engine).test_client()
    assert deliver(keyed, waiting).get_json()["status"] == "queued"
    with gunicorn(database_url, workers=2, SUPPORT_USERS=users) as (port, _):
        for event in (updated, created):  # the update first, as Stripe may deliver them
            assert post_event(port, event)[0] == 200
        with failing_writes(engine, "public.stripe_customers_audit", "BEFORE"):
            assert post_event(port, failing)[0] == 500
        assert post_event(port, stale)[1]["status"] == "stale"
        base = f"http://127.0.0.1:{port}/support"

        browser.get(f"{base}/customers/{customer['id']}")
        assert browser.current_url.endswith("/support/signin")  # no page without signing in
        browser.find_element(By.NAME, "name").send_keys("alice")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        _after(browser, browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click)
        assert browser.current_url.endswith("/support/")

        for query in ("JANE.DOE@example.com", user_id, customer["id"], failing["id"]):
            _search(browser, query)
            assert f"/support/customers/{customer['id']}" in browser.current_url, query
        page = browser.find_element(By.TAG_NAME, "main").text
        assert "Linked to jane.doe@example.com" in page and "Jane Q. Doe" in page
        failed_row = browser.find_element(By.ID, failing["id"])
        assert "failed" in failed_row.text and "injected failure" in failed_row.text
        assert "alarm" in failed_row.get_attribute("class")
        assert "stale" in browser.find_element(By.ID, stale["id"]).text
        assert "stale" in browser.find_element(By.ID, created["id"]).text  # same second: the type orders them
        assert "waiting" in browser.find_element(By.ID, waiting["id"]).text
        _shot(browser, tmp_path, "customer-with-a-failed-event")

        _after(browser, failed_row.find_element(By.TAG_NAME, "button").click)  # replay it
        assert "1 processed" in browser.find_element(By.CLASS_NAME, "flash").text
        assert "processed" in browser.find_element(By.ID, failing["id"]).text
        assert event_row(engine, failing["id"])["status"] == "processed"  # type: ignore[index]
        assert "replayed by alice" in browser.find_element(By.TAG_NAME, "main").text
        assert "pm_card_visa" in browser.find_element(By.TAG_NAME, "dl").text
        assert "payment method: — → pm_card_visa" in browser.find_element(By.TAG_NAME, "main").text
        _shot(browser, tmp_path, "customer")

        # "I paid but I'm still on the free plan": a canceled subscription, then a new one with the
        # entitlements it brings, each seen on the page as support would read it.
        canceled = samples.subscription(customer["id"], status="canceled", canceled_at=second + 40)
        assert post_event(port, samples.event("customer.subscription.deleted", canceled, created=second + 40))[0] == 200
        browser.refresh()
        access = browser.find_element(By.ID, "access")
        assert f"no active subscription: {canceled['id']} canceled on" in access.text
        assert "entitlements not synced: no API key" in access.text and "alarm" in access.get_attribute("class")
        _shot(browser, tmp_path, "customer-without-access")
        active = samples.subscription(
            customer["id"], status="active", prices=[samples.price("pro_monthly", tier="pro")]
        )
        summary = samples.entitlement_summary(customer["id"], ["pro", "export"])
        for event in (
            samples.event("customer.subscription.created", active, created=second + 50),
            samples.event("entitlements.active_entitlement_summary.updated", summary, created=second + 50),
        ):
            assert post_event(port, event)[1]["status"] == "processed"
        browser.refresh()
        access = browser.find_element(By.ID, "access")
        assert "Access to: export, pro" in access.text and "alarm" not in access.get_attribute("class")
        assert "pro_monthly (pro)" in browser.find_element(By.ID, "subscriptions").text
        _shot(browser, tmp_path, "customer-with-access")

        deleted = samples.event("customer.deleted", customer, created=second + 60)
        assert post_event(port, deleted)[0] == 200
        browser.refresh()
        main = browser.find_element(By.TAG_NAME, "main").text
        assert "Deleted" in main and "row deleted" in main

        browser.get(f"{base}/failed")
        assert "No failed events." in browser.find_element(By.TAG_NAME, "main").text
        _after(browser, browser.find_element(By.XPATH, "//header//button[text()='Sign out']").click)
        browser.get(f"{base}/customers/{customer['id']}")
        assert browser.current_url.endswith("/support/signin")
        assert "jane.doe" not in browser.page_source


def test_support_person_sees_access_through_an_organization(
    browser: webdriver.Chrome, database_url: str, engine: Engine, tmp_path: Path
) -> None:
    from tests.test_organizations import add_organization

    member = add_user(engine, email="sam.member@example.com")
    organization = add_organization(engine, members=(member, add_user(engine)))
    customer = samples.customer(
        email="billing@acme.example", name="Acme Inc", metadata={"organization_id": organization}
    )
    plan = samples.subscription(customer["id"], prices=[samples.price("team_monthly", tier="team")])
    card = {
        **samples.payment_method(customer["id"], last4="4444"),
        "card": {"brand": "mastercard", "last4": "4444", "exp_month": 7, "exp_year": 2031},
    }
    users = f"alice:{generate_password_hash(PASSWORD)}"
    with gunicorn(database_url, workers=2, SUPPORT_USERS=users) as (port, _):
        for event in (
            samples.event("customer.created", {**customer, "invoice_settings": {"default_payment_method": card["id"]}}),
            samples.event("customer.subscription.created", plan),
            samples.event(
                "entitlements.active_entitlement_summary.updated",
                samples.entitlement_summary(customer["id"], ["reports"]),
            ),
            samples.event("payment_method.attached", card),
        ):
            assert post_event(port, event)[1]["status"] == "processed"
        base = f"http://127.0.0.1:{port}/support"
        browser.get(f"{base}/signin")
        browser.find_element(By.NAME, "name").send_keys("alice")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        _after(browser, browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click)

        _search(browser, "SAM.member@example.com")
        _after(browser, browser.find_element(By.PARTIAL_LINK_TEXT, member).click)
        access = browser.find_element(By.ID, "access").text
        assert f"Access comes through an organization: Acme {organization}" in access
        assert "tier team, 2 members" in access and "Access to: reports" in access
        _shot(browser, tmp_path, "user-through-an-organization")

        _after(browser, browser.find_element(By.LINK_TEXT, customer["id"]).click)
        assert f"Acme {organization}: tier team, 2 members" in browser.find_element(By.ID, "organization").text
        assert "mastercard ···· 4444, expires 7/2031 (default)" in browser.find_element(By.ID, "payment-methods").text
        assert "Bills organization Acme" in browser.find_element(By.TAG_NAME, "main").text
        _shot(browser, tmp_path, "customer-billing-an-organization")
