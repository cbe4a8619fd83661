"""Every configuration variable's bad value is refused with one message naming it (no database:
the command line turns the message into one line on stderr and exit 2, tests/test_cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import SECRET
from webhook.config import ConfigError, load_settings

BASE = {"DATABASE_URL": "postgresql://localhost/app", "STRIPE_WEBHOOK_SECRET": SECRET}
SECRET_BEARING = {"DATABASE_URL", "STRIPE_WEBHOOK_SECRET", "STRIPE_API_KEY", "SUPPORT_USERS"}
BAD = [
    ("DATABASE_URL", "mysql://root@localhost/app"),
    ("DATABASE_URL", "not a url at all"),
    ("STRIPE_WEBHOOK_SECRET", "sk_live_oops"),
    ("STRIPE_WEBHOOK_SECRET", " , "),
    ("STRIPE_WEBHOOK_TOLERANCE", "soon"),
    ("STRIPE_WEBHOOK_TOLERANCE", "0"),
    ("STRIPE_API_KEY", "pk_live_publishable"),
    ("STRIPE_API_BASE", "api.stripe.com"),
    ("STRIPE_EXPECT_LIVEMODE", "yes"),
    ("MAX_WEBHOOK_BYTES", "1MB"),
    ("MAX_WEBHOOK_BYTES", "0"),
    ("MAX_WEBHOOK_BYTES", "1_000"),  # int() takes these three
    ("PORT", "８０８０"),
    ("DB_POOL_SIZE", "+5"),
    ("PORT", "eighty"),
    ("DB_POOL_SIZE", "0"),
    ("STRIPE_REFETCH", "sometimes"),
    ("STRIPE_REFETCH", "always"),  # needs STRIPE_API_KEY
    ("EVENT_RETENTION_DAYS", "-1"),
    ("HEAL_INTERVAL", "10 minutes"),
    ("HEAL_INTERVAL", "0"),
    ("RECONCILE_INTERVAL", "1y"),
    ("RECONCILE_INTERVAL", "999999999d"),
    ("STRIPE_API_RATE", "0"),
    ("SUPPORT_USERS", "alice:plaintext-password"),
    ("SUPPORT_USERS", "alice:scrypt:1,alice:scrypt:2"),
    ("STRIPE_FREE_TIER", "free'; DROP TABLE x; --"),  # sent with each transaction: words only
    ("STRIPE_FREE_TIER", "100%"),
    ("STRIPE_PAST_DUE_GRACE", "a week"),
    ("STRIPE_PAST_DUE_GRACE", "7 fortnights"),
    ("STRIPE_PAST_DUE_GRACE", "-1d"),
    ("DELIVERY_THREADS", "0"),
    ("GUNICORN_THREADS", "many"),
]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("", None), ("7 days", 7 * 86400), ("1 week", 7 * 86400), ("72h", 72 * 3600), ("36 Hours", 36 * 3600), ("0", 0)],
)
def test_the_grace_reads_as_postgres_writes_an_interval(value: str, seconds: int | None) -> None:
    assert load_settings({**BASE, "STRIPE_PAST_DUE_GRACE": value}).past_due_grace == seconds


@pytest.mark.parametrize(("variable", "value"), BAD)
def test_a_bad_value_is_refused_naming_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings({**BASE, variable: value})
    message = str(refused.value)
    assert variable in message
    if variable in SECRET_BEARING and value.strip(" ,"):
        assert value.strip(" ,") not in message  # never echoes what may be a secret


def test_without_a_database_url_the_secret_is_generated_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    from webhook import config

    monkeypatch.setattr(config, "DATA_DIR", Path(".data"))
    first, second = load_settings({}), load_settings({})
    assert first.embedded and first.webhook_secrets == second.webhook_secrets
    assert first.webhook_secrets[0].startswith("whsec_")
    assert (tmp_path / ".data" / "webhook_secret").stat().st_mode & 0o777 == 0o600


def test_good_values_are_read() -> None:
    settings = load_settings(
        {
            **BASE,
            "STRIPE_WEBHOOK_SECRET": f"{SECRET}, whsec_second",
            "STRIPE_API_KEY": "rk_test_restricted",
            "STRIPE_REFETCH": "always",
            "HEAL_INTERVAL": "30s",
            "RECONCILE_INTERVAL": "0",
            "STRIPE_EXPECT_LIVEMODE": "FALSE",
            "STRIPE_ORG_ID_METADATA_KEY": "workspace_id",
            "STRIPE_FREE_TIER": "Hobby plan",
        }
    )
    assert (settings.keys.organization_id, settings.free_tier) == ("workspace_id", "Hobby plan")
    assert settings.webhook_secrets == (SECRET, "whsec_second")
    assert (settings.refetch, settings.heal_interval, settings.reconcile_interval) == ("always", 30, 0)
    assert settings.expect_livemode is False


@pytest.mark.parametrize(
    ("env", "threads"),
    [({}, 8), ({"GUNICORN_THREADS": "5"}, 5), ({"DELIVERY_THREADS": "3", "GUNICORN_THREADS": "5"}, 3)],
    ids=["default", "the older name", "DELIVERY_THREADS first"],
)
def test_delivery_threads_are_read_under_either_name(env: dict[str, str], threads: int) -> None:
    assert load_settings({**BASE, **env}).delivery_threads == threads
