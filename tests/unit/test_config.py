"""altan.config.Settings read from the environment, and the development keys it generates on first use."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from altan.config import (
    ConfigurationError,
    Settings,
    configuration_problems,
    default_data_dir,
    development_secret,
    setting_name,
)

SECRET = "unit-test-hs256-secret-that-is-long-enough-for-sha256-and-then-some"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Only what a test sets: no ALTAN_* or REDIS_URL from the developer's shell, and a private data dir."""
    for name in list(os.environ):
        if name.startswith("ALTAN_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("ALTAN_JWT_SECRET", SECRET)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("ALTAN_DATA_DIR", str(data_dir))
    return data_dir


def test_defaults() -> None:
    settings = Settings()
    assert settings.jwt_secret == SECRET
    assert settings.jwt_algorithms == ("HS256",)
    assert (settings.jwt_audience, settings.jwt_issuer, settings.jwt_leeway_seconds) == ("altan", "altan-dev", 30)
    assert settings.redis_url is None
    assert (settings.http_port, settings.grpc_port) == (8080, 50051)
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.log_level == "INFO"


def test_redis_url_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache.internal:6379/2")
    assert Settings().redis_url == "redis://cache.internal:6379/2"


def test_prefixed_redis_url_also_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALTAN_REDIS_URL", "redis://other:6379/0")
    assert Settings().redis_url == "redis://other:6379/0"


def test_environment_values_are_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALTAN_HTTP_PORT", "9090")
    monkeypatch.setenv("ALTAN_JWT_AUDIENCE", "api")
    monkeypatch.setenv("ALTAN_JWT_LEEWAY_SECONDS", "5")
    monkeypatch.setenv("ALTAN_DATA_DIR", str(tmp_path / "elsewhere"))
    settings = Settings()
    assert settings.http_port == 9090
    assert settings.jwt_audience == "api"
    assert settings.jwt_leeway_seconds == 5
    assert settings.data_dir == tmp_path / "elsewhere"


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.http_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("HS256", ("HS256",)), ("HS256,HS512", ("HS256", "HS512")), (" HS384 , HS256 ,", ("HS384", "HS256"))],
)
def test_jwt_algorithms_comma_list(monkeypatch: pytest.MonkeyPatch, raw: str, expected: tuple[str, ...]) -> None:
    monkeypatch.setenv("ALTAN_JWT_ALGORITHMS", raw)
    assert Settings().jwt_algorithms == expected


def test_asymmetric_algorithms_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALTAN_JWT_SECRET")
    monkeypatch.setenv("ALTAN_JWT_JWKS_URL", "https://idp.example/.well-known/jwks.json")
    monkeypatch.setenv("ALTAN_JWT_ALGORITHMS", "RS256,ES256,PS256")
    settings = Settings()
    assert settings.jwt_algorithms == ("RS256", "ES256", "PS256")
    assert settings.jwt_jwks_url == "https://idp.example/.well-known/jwks.json"


@pytest.mark.parametrize("raw", ["none", "HS256,none", "HS256,RS256", "RS256", "HS256,XS999"])
def test_bad_algorithm_lists_stop_the_process(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("ALTAN_JWT_ALGORITHMS", raw)
    with pytest.raises(ValidationError):
        Settings()


def test_tool_containers_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().tool_containers == ()
    monkeypatch.setenv("ALTAN_TOOL_CONTAINERS", " 127.0.0.1:7000, weather.tools.svc:7000 ,")
    assert Settings().tool_containers == ("127.0.0.1:7000", "weather.tools.svc:7000")


@pytest.mark.parametrize("raw", ["weather", "weather:0", "weather:http", ":7000", "a:1,a:1", "http://weather:7000"])
def test_bad_tool_containers_stop_the_process_without_their_value(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("ALTAN_TOOL_CONTAINERS", raw)
    with pytest.raises(ValidationError) as caught:
        Settings()
    [line] = configuration_problems(caught.value)
    assert line.startswith("ALTAN_TOOL_CONTAINERS: ") and raw not in line


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ALTAN_TOOL_CONTAINERS_REFRESH_SECONDS", "0.5"),
        ("ALTAN_JWT_LEEWAY_SECONDS", "61"),
        ("ALTAN_HTTP_PORT", "70000"),
        ("ALTAN_LOG_LEVEL", "CHATTY"),
        ("ALTAN_MAX_BODY_BYTES", "10"),
        ("ALTAN_CALL_DEADLINE_SECONDS", "0"),
    ],
)
def test_out_of_range_values_are_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_master_key_from_the_environment(monkeypatch: pytest.MonkeyPatch, _clean_environment: Path) -> None:
    key = os.urandom(32)
    monkeypatch.setenv("ALTAN_MASTER_KEY", base64.b64encode(key).decode())
    assert Settings().master_key_bytes() == key
    assert not _clean_environment.exists()  # a configured key never writes a development key


@pytest.mark.parametrize(
    "value",
    [
        base64.b64encode(b"k" * 16).decode(),
        base64.b64encode(b"k" * 31).decode(),
        base64.b64encode(b"k" * 33).decode(),
        "not base64 at all!",
        "k" * 32,  # 32 characters are not 32 bytes
        base64.b64encode(b"k" * 32).decode()[:-1],
    ],
)
def test_master_key_must_be_base64_of_32_bytes(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("ALTAN_MASTER_KEY", value)
    with pytest.raises(ValidationError, match=r"MASTER_KEY|base64"):
        Settings()


def test_development_master_key_is_generated_once_with_mode_0600(_clean_environment: Path) -> None:
    data_dir = _clean_environment
    assert not data_dir.exists()
    first = Settings().master_key_bytes()
    assert len(first) == 32
    path = data_dir / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert base64.b64decode(path.read_text().strip()) == first
    # The next start (a new Settings) reads the same key back.
    assert Settings().master_key_bytes() == first
    assert Settings().master_key_bytes() == first


def test_development_keys_differ_per_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys = []
    for name in ("one", "two"):
        monkeypatch.setenv("ALTAN_DATA_DIR", str(tmp_path / name))
        keys.append(Settings().master_key_bytes())
    assert keys[0] != keys[1]


def test_development_secret_file(tmp_path: Path) -> None:
    value = development_secret(tmp_path / "nested" / "dir", "jwt.secret", size=48)
    assert len(base64.b64decode(value)) == 48
    assert stat.S_IMODE((tmp_path / "nested" / "dir" / "jwt.secret").stat().st_mode) == 0o600
    assert development_secret(tmp_path / "nested" / "dir", "jwt.secret") == value


def test_default_data_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "altan"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == Path.home() / ".local" / "share" / "altan"


# --- bad settings: one line per problem, naming the variable, never its value -------------------------------------


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Path:
    """An existing directory this process cannot create files in (root ignores modes, but not /sys)."""
    if os.geteuid() == 0:
        return Path("/sys")
    path = tmp_path / "read-only"
    path.mkdir(mode=0o500)
    return path


@pytest.mark.parametrize("secret", ["x" * 31, "é" * 15, "short"])
def test_a_jwt_secret_under_32_bytes_is_refused(monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    monkeypatch.setenv("ALTAN_JWT_SECRET", secret)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert configuration_problems(caught.value) == [
        "ALTAN_JWT_SECRET: must be at least 32 bytes (e.g. `openssl rand -base64 32`)"
    ]


@pytest.mark.parametrize("secret", ["x" * 32, "é" * 16])
def test_a_jwt_secret_of_32_bytes_is_enough(monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    monkeypatch.setenv("ALTAN_JWT_SECRET", secret)
    assert Settings().jwt_secret == secret


def test_each_problem_is_one_line_naming_its_variable_and_never_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALTAN_HTTP_PORT", "abc")
    monkeypatch.setenv("ALTAN_MASTER_KEY", "c2VjcmV0LXZhbHVl")  # base64, but of 12 bytes
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@cache:6379/0")
    monkeypatch.setenv("ALTAN_LOG_LEVEL", "CHATTY")
    with pytest.raises(ValidationError) as caught:
        Settings()
    problems = configuration_problems(caught.value)
    assert problems == [
        "ALTAN_HTTP_PORT: Input should be a valid integer, unable to parse string as an integer",
        "ALTAN_MASTER_KEY: must be base64 of exactly 32 bytes",
        "ALTAN_LOG_LEVEL: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'",
    ]
    assert "c2VjcmV0LXZhbHVl" not in repr(problems)


def test_problems_of_the_whole_model_and_renamed_fields() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(jwt_algorithms=("HS256", "RS256"), jwt_jwks_file=Path("/keys.json"))
    assert configuration_problems(caught.value) == ["ALTAN_JWT_ALGORITHMS must not mix HS* with asymmetric algorithms"]
    with pytest.raises(ValidationError) as caught:
        Settings(http_port=70000)
    assert configuration_problems(caught.value, {"http_port": "--http-port"}) == [
        "--http-port: Input should be less than or equal to 65535"
    ]
    assert setting_name("redis_url") == "REDIS_URL"


def test_a_data_dir_that_is_a_file_is_named(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(ConfigurationError) as caught:
        development_secret(not_a_dir, "jwt.secret")
    assert str(caught.value) == f"ALTAN_DATA_DIR: {not_a_dir} is not a directory"
    with pytest.raises(ConfigurationError, match=f"ALTAN_DATA_DIR: cannot create {not_a_dir / 'sub'}: not a directory"):
        development_secret(not_a_dir / "sub", "jwt.secret")


def test_an_unwritable_data_dir_is_named(unwritable_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match=f"ALTAN_DATA_DIR: {unwritable_dir} is not writable"):
        development_secret(unwritable_dir, "master.key")


def test_a_secret_that_exists_is_read_from_a_read_only_data_dir(tmp_path: Path) -> None:
    value = development_secret(tmp_path, "jwt.secret")
    tmp_path.chmod(0o500)
    try:
        assert development_secret(tmp_path, "jwt.secret") == value
    finally:
        tmp_path.chmod(0o700)


def test_a_corrupt_development_master_key_is_named(_clean_environment: Path) -> None:
    _clean_environment.mkdir()
    (_clean_environment / "master.key").write_text("too-short\n")
    with pytest.raises(ConfigurationError) as caught:
        Settings().master_key_bytes()
    assert str(caught.value) == f"ALTAN_DATA_DIR: {_clean_environment / 'master.key'} is not base64 of 32 bytes"
