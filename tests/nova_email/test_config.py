"""Settings: an existing deployment's defaults, one clear line per bad value, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from nova_email.config import Settings, load_settings, redact_url
from nova_email.errors import ConfigError


def test_unset_variables_take_the_defaults_existing_deployments_rely_on() -> None:
    settings = load_settings({}, env_file=None)
    assert (settings.poll_interval_ms, settings.visibility_timeout_s) == (5000, 300)
    assert settings.completion_check_interval_ms == 5000
    assert settings.enable_auto_recovery is True
    assert settings.recovery_check_interval_ms == 60000
    assert (settings.nylas_grant_rate, settings.nylas_grant_burst, settings.nylas_app_rate) == (10.0, 10, 0.0)
    assert settings.testing_mode is False
    assert settings.log_level == "info"
    assert settings.nylas_api_uri == "https://api.us.nylas.com"
    assert settings.database_url is None


def _delays(settings: Settings) -> list[int]:
    return [settings.thread_delay_ms, settings.message_delay_ms, settings.api_delay_ms]


def test_legacy_delays_apply_only_when_set_explicitly_paced_or_not() -> None:
    # NYLAS_GRANT_RATE=0 turns a limit off: it must not bring in 3 s / 1 s / 200 ms sleeps.
    paced = load_settings({}, env_file=None)
    unpaced = load_settings({"NYLAS_GRANT_RATE": "0"}, env_file=None)
    explicit = load_settings({"NYLAS_GRANT_RATE": "0", "THREAD_DELAY_MS": "1000", "API_DELAY_MS": "50"}, env_file=None)
    assert _delays(paced) == [0, 0, 0]
    assert not unpaced.pacing_enabled
    assert _delays(unpaced) == [0, 0, 0]
    assert _delays(explicit) == [1000, 0, 50]


def test_environment_values_are_parsed() -> None:
    settings = load_settings(
        {
            "POLL_INTERVAL_MS": "250",
            "ENABLE_AUTO_RECOVERY": "false",
            "TESTING_MODE": "yes",
            "LOG_LEVEL": "DEBUG",
            "NYLAS_API_URI": "https://api.eu.nylas.com/",
            "DATABASE_URL": "postgresql://svc:pw@db:5432/mail",
            "DATABASE_POOL_SIZE": "5",
        },
        env_file=None,
    )
    assert settings.database_pool_size == 5
    assert settings.poll_interval_ms == 250
    assert settings.enable_auto_recovery is False
    assert settings.testing_mode is True
    assert settings.log_level == "debug"
    assert settings.nylas_api_uri == "https://api.eu.nylas.com"
    assert settings.database_url == "postgresql://svc:pw@db:5432/mail"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("POLL_INTERVAL_MS", "soon", r"POLL_INTERVAL_MS='soon' is not a whole number of milliseconds"),
        ("VISIBILITY_TIMEOUT", "-5", r"VISIBILITY_TIMEOUT='-5' is not a whole number of seconds"),
        ("ENABLE_AUTO_RECOVERY", "maybe", r"ENABLE_AUTO_RECOVERY='maybe' is not a boolean"),
        ("NYLAS_GRANT_RATE", "fast", r"NYLAS_GRANT_RATE='fast' is not a rate in calls per second"),
        ("NYLAS_APP_RATE", "-1", r"NYLAS_APP_RATE='-1' is not a rate"),
        ("NYLAS_TIMEOUT_S", "0", r"NYLAS_TIMEOUT_S='0' is not a timeout in seconds"),
        ("LOG_LEVEL", "loud", r"LOG_LEVEL='loud' is not one of"),
        ("LOG_FORMAT", "xml", r"LOG_FORMAT='xml' is not one of json, text"),
        ("NYLAS_API_URI", "api.nylas.com", r"NYLAS_API_URI='api.nylas.com' is not an http\(s\) URL"),
        ("DATABASE_POOL_SIZE", "0", r"DATABASE_POOL_SIZE='0' is not a whole number of connections >= 1"),
        ("DATABASE_URL", "mysql://u:pw@h/db", r"DATABASE_URL='mysql://u:\*\*\*@h/db' is not a PostgreSQL URL"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_a_bad_value_fails_with_one_line_naming_the_variable(variable: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        load_settings({variable: value}, env_file=None)
    assert "\n" not in str(info.value)


def test_the_env_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("POLL_INTERVAL_MS=250\nAPI_DELAY_MS=50\n")
    settings = load_settings({"API_DELAY_MS": "75"}, env_file=env_file)
    assert (settings.poll_interval_ms, settings.api_delay_ms) == (250, 75)


@pytest.mark.parametrize(("value", "level"), [("warn", "warning"), ("WARN", "warning"), ("fatal", "critical")])
def test_log_level_accepts_the_spellings_of_node_services(value: str, level: str) -> None:
    assert load_settings({"LOG_LEVEL": value}, env_file=None).log_level == level


def test_an_originals_env_file_with_batch_size_still_loads(tmp_path: Path) -> None:
    # The original read BATCH_SIZE; here the broker's prefetch decides how many messages a read fetches.
    env_file = tmp_path / ".env"
    env_file.write_text("BATCH_SIZE=10\nPOLL_INTERVAL_MS=5000\n")
    assert not hasattr(load_settings({}, env_file=env_file), "batch_size")


def test_copying_the_env_example_keeps_the_legacy_delays_off_while_paced() -> None:
    # `cp .env.example .env` must not bring in fixed sleeps while pacing limits the calls.
    settings = load_settings({}, env_file=Path(__file__).resolve().parents[2] / ".env.example")
    assert settings.pacing_enabled
    assert _delays(settings) == [0, 0, 0]


def test_secrets_stay_out_of_the_repr() -> None:
    settings = Settings(
        database_url="postgresql://svc:hunter2@db/mail", nylas_api_key="nyk_secret", nylas_webhook_secret="whsec"
    )
    text = repr(settings)
    assert "hunter2" not in text and "nyk_secret" not in text and "whsec" not in text
    assert settings.database_url_redacted == "postgresql://svc:***@db/mail"


def test_a_bad_database_url_error_does_not_echo_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"DATABASE_URL": "mysql://svc:hunter2@db/mail"}, env_file=None)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://u:p@h:5432/d", "postgresql://u:***@h:5432/d"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
        ("postgresql://h/d", "postgresql://h/d"),
        ("postgresql://u@h/d?sslmode=require&password=p", "postgresql://u@h/d?sslmode=require&password=***"),
        ("postgresql://u@h/d?application_name=password", "postgresql://u@h/d?application_name=password"),
        ("host=h password=p user=u", "host=h password=*** user=u"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
