"""The support console under gunicorn, as people and attackers use it at once with deliveries:
its own bounded pool, the sign-in throttle under parallel guesses, and sessions that end."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import Engine, text
from werkzeug.security import generate_password_hash

from tests.server import gunicorn, post_event
from tests.support import count, wait_for, waiting_on_locks
from webhook import samples

PASSWORD = "correct horse battery staple"
USERS = f"alice:{generate_password_hash(PASSWORD)}"


def signed_in_session(base: str, name: str = "alice", password: str = PASSWORD) -> requests.Session:
    session = requests.Session()
    session.post(f"{base}/support/signin", data={"name": name, "password": password, "csrf_token": csrf(session, base)})
    return session


def csrf(session: requests.Session, base: str, path: str = "/support/signin") -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', session.get(f"{base}{path}", timeout=10).text)
    assert found
    return found.group(1)


@pytest.fixture
def console_server(database_url: str, engine: Engine) -> Iterator[str]:
    with gunicorn(database_url, workers=2, SUPPORT_USERS=USERS) as (port, _):
        yield f"http://127.0.0.1:{port}"


def test_a_locked_table_slows_the_console_never_a_delivery(console_server: str, engine: Engine) -> None:
    session = signed_in_session(console_server)
    assert session.get(f"{console_server}/support/failed", timeout=10).status_code == 200
    released = threading.Event()
    locked = threading.Event()

    def hold_lock() -> None:
        # An auth migration or VACUUM FULL: auth.users locked for 8 s.
        with engine.connect() as connection:
            connection = connection.execution_options(isolation_level="READ COMMITTED")
            connection.begin()
            connection.exec_driver_sql("SET LOCAL lock_timeout = 0")
            connection.exec_driver_sql("LOCK TABLE auth.users IN ACCESS EXCLUSIVE MODE")
            locked.set()
            time.sleep(8)
            connection.rollback()
        released.set()

    def page(_: int) -> tuple[int, bool]:
        answer = session.get(f"{console_server}/support/?q=nobody@example.com", timeout=30)
        return answer.status_code, released.is_set()

    port = int(console_server.rsplit(":", 1)[1])
    # Customers with no user: an update of one touches nothing of auth.users. (Creating one does:
    # the foreign key's check takes a share lock on auth.users even for a NULL user_id.)
    customers = [samples.customer() for _ in range(6)]
    assert [post_event(port, samples.event("customer.created", customer))[0] for customer in customers] == [200] * 6

    def delivery(customer: dict[str, object]) -> tuple[int, float, bool]:
        started = time.monotonic()
        status, _ = post_event(port, samples.event("customer.updated", {**customer, "name": "Changed"}))
        return status, time.monotonic() - started, released.is_set()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert locked.wait(10)
    with ThreadPoolExecutor(max_workers=18) as pool:
        pages = [pool.submit(page, n) for n in range(12)]
        wait_for(lambda: waiting_on_locks(engine) >= 2, 10)  # two pages (the side pool's two) wait on the lock
        deliveries = list(pool.map(delivery, customers))
        page_answers = [future.result() for future in pages]
    holder.join()
    print(f"\nlongest delivery while 12 console pages waited on a lock: {max(d[1] for d in deliveries):.2f} s")
    # Every delivery answered 200 while the lock was still held; every page gave up (503) before it
    # was released, rather than waiting for it.
    assert [(status, late) for status, _, late in deliveries] == [(200, False)] * 6
    assert page_answers == [(503, False)] * 12
    assert count(engine, "SELECT count(*) FROM stripe_customers WHERE customer_name = 'Changed'") == 6
    # And once the lock is gone, the console answers again.
    assert session.get(f"{console_server}/support/?q=nobody@example.com", timeout=10).status_code == 200


def test_parallel_guesses_check_at_most_five_passwords(console_server: str) -> None:
    def guess(_: int) -> int:
        session = requests.Session()
        token = csrf(session, console_server)
        answer = session.post(
            f"{console_server}/support/signin",
            data={"name": "alice", "password": "wrong guess", "csrf_token": token},
            timeout=30,
        )
        return answer.status_code

    with ThreadPoolExecutor(max_workers=40) as pool:
        statuses = list(pool.map(guess, range(40)))
    # 401: the password was checked (and was wrong); 429: turned away before any check.
    assert (statuses.count(401), statuses.count(429)) == (5, 35)
    # The right password is turned away too, until the window ends.
    late = requests.Session()
    answer = late.post(
        f"{console_server}/support/signin",
        data={"name": "alice", "password": PASSWORD, "csrf_token": csrf(late, console_server)},
        timeout=10,
    )
    assert answer.status_code == 429


def _copied(session: requests.Session) -> requests.Session:
    copy = requests.Session()
    copy.cookies.update(session.cookies)
    return copy


def _opens_pages(session: requests.Session, base: str) -> bool:
    answer = session.get(f"{base}/support/failed", timeout=10, allow_redirects=False)
    assert answer.status_code in (200, 302)
    return answer.status_code == 200


def test_signing_out_or_expiry_ends_the_session_on_the_server(console_server: str, engine: Engine) -> None:
    session = signed_in_session(console_server)
    copy = _copied(session)
    assert _opens_pages(copy, console_server)
    signed_out = session.post(
        f"{console_server}/support/signout", data={"csrf_token": csrf(session, console_server, "/support/")}
    )
    assert signed_out.url.endswith("/support/signin")
    assert not _opens_pages(copy, console_server)  # the cookie copied before sign-out

    expiring = _copied(signed_in_session(console_server))
    assert _opens_pages(expiring, console_server)
    with engine.connect() as connection:
        connection.execute(text("UPDATE stripe_support_sessions SET expires_at = now() - interval '1 second'"))
    assert not _opens_pages(expiring, console_server)
