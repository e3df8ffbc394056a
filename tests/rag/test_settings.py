from __future__ import annotations

from pathlib import Path

import pytest

from rag.platform.errors import ConfigError
from rag.platform.settings import FIELDS, Settings, settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_are_the_embedded_offline_setup() -> None:
    settings = Settings.from_env({})
    assert settings.database_url is None and settings.redis_url is None
    assert settings.provider_kind == "offline"
    assert settings.embedding_dimensions == 1536
    assert settings.embedding_model_id == "offline-hash-v1"


def test_an_api_key_selects_the_openai_provider() -> None:
    settings = Settings.from_env({"OPENAI_API_KEY": "sk-test"})
    assert settings.provider_kind == "openai"
    assert settings.embedding_model_id == "text-embedding-3-small"
    assert settings.redacted()["OPENAI_API_KEY"] == "***"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"DB_POOL_MAX": "lots"}, "DB_POOL_MAX='lots': expected a whole number from 1 to 1000"),
        ({"DB_POOL_MAX": "0"}, "DB_POOL_MAX='0': expected a whole number from 1 to 1000"),
        ({"EMBEDDING_DIMENSIONS": "4096"}, "EMBEDDING_DIMENSIONS='4096'"),
        ({"DB_PGBOUNCER": "maybe"}, "DB_PGBOUNCER='maybe': expected one of true, false"),
        ({"PROVIDER": "anthropic"}, "PROVIDER='anthropic': expected one of auto, openai, offline"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL='mysql://x': expected a URL starting with"),
        ({"DB_POOL_MIN": "20", "DB_POOL_MAX": "5"}, "DB_POOL_MIN=20 is above DB_POOL_MAX=5"),
        ({"CHUNK_TARGET_TOKENS": "100", "CHUNK_OVERLAP_TOKENS": "60"}, "CHUNK_OVERLAP_TOKENS=60"),
        ({"PROVIDER": "openai"}, "PROVIDER=openai needs OPENAI_API_KEY"),
        ({"OPENAI_API_KEY": " "}, ""),
    ],
)
def test_a_bad_value_names_the_variable_and_what_is_allowed(
    env: dict[str, str], fragment: str
) -> None:
    if not fragment:  # a blank optional value means unset, not an error
        assert Settings.from_env(env).openai_api_key is None
        return
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert fragment in err.value.message


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.api_port = 1  # type: ignore[misc]
    assert settings.replace(api_port=9000).api_port == 9000


def test_every_field_is_a_settings_attribute() -> None:
    attrs = set(Settings.__dataclass_fields__)
    assert {f.attr for f in FIELDS} == attrs


def test_the_readme_documents_every_setting() -> None:
    assert settings_table() in README.read_text(), (
        "README's configuration table is stale: paste `python -m workers settings-table`"
    )


@pytest.mark.parametrize("value", ["1", "15", "30", "120", "3600"])
def test_the_reconciler_runs_on_periods_a_cron_can_keep(value: str) -> None:
    assert Settings.from_env({"RECONCILE_INTERVAL": value}).reconcile_interval == int(value)


@pytest.mark.parametrize("value", ["0", "7", "45", "90", "7200", "soon"])
def test_other_reconciler_periods_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=f"RECONCILE_INTERVAL='{value}': expected seconds"):
        Settings.from_env({"RECONCILE_INTERVAL": value})


def test_cors_origins_are_origins_and_never_a_wildcard() -> None:
    assert Settings.from_env({}).cors_origins == ()
    given = " https://lms.example.edu/, http://127.0.0.1:8080 "
    parsed = Settings.from_env({"CORS_ORIGINS": given})
    assert parsed.cors_origins == ("https://lms.example.edu", "http://127.0.0.1:8080")
    for bad in ("*", "lms.example.edu", "https://lms.example.edu/course/1"):
        with pytest.raises(ConfigError, match="is not an origin: expected scheme://host"):
            Settings.from_env({"CORS_ORIGINS": bad})


def test_sentinels_are_addresses_and_need_redis_url_for_the_rest() -> None:
    env = {"REDIS_SENTINELS": "10.0.0.5:26379, sentinel-b:26380", "REDIS_URL": "redis://x/2"}
    assert Settings.from_env(env).redis_sentinels == (("10.0.0.5", 26379), ("sentinel-b", 26380))
    with pytest.raises(ConfigError, match="'sentinel-b' is not host:port"):
        Settings.from_env({**env, "REDIS_SENTINELS": "sentinel-b"})
    with pytest.raises(ConfigError, match="REDIS_SENTINELS needs REDIS_URL as well"):
        Settings.from_env({"REDIS_SENTINELS": "10.0.0.5:26379"})
