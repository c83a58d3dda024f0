"""server/core/config.py: environment parsing, rate-limit strings, production
guards, masked secrets, and the ``switchboard token`` CLI (run for real).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server import cli
from server.core.config import (
    DEFAULT_JWT_SECRET,
    MIN_JWT_SECRET_BYTES,
    TCP_HEADROOM_PER_IP,
    Config,
    ConfigError,
    RateLimit,
    is_loopback,
    mask_url,
    parse_rate_limits,
)

ROOT = Path(__file__).resolve().parent.parent
SWITCHBOARD = ROOT / ".venv" / "bin" / "switchboard"
SECRET = "a-long-random-test-secret-0123456789abcdef"
PROD_OK = {
    "SWITCHBOARD_ENV": "production",
    "SWITCHBOARD_JWT_SECRET": SECRET,
    "SWITCHBOARD_ALLOWED_ORIGINS": "https://chat.example.com",
}


@pytest.fixture
def ec_public_key_file(tmp_path: Path) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "public.pem"
    path.write_bytes(pem)
    return str(path)


# -- environment parsing ---------------------------------------------------------------------


def test_defaults_without_environment():
    config = Config.from_env({})
    assert config.env == "development"
    assert config.port == 8080
    assert config.jwt_secret == DEFAULT_JWT_SECRET
    assert config.jwt_algorithms == ("HS256",)
    assert config.allowed_origins == ("*",)
    assert config.max_connections_per_user == 5
    assert config.max_connections_per_ip == 1000
    assert config.max_message_bytes == 64 * 1024
    assert config.heartbeat_interval == 25.0
    assert config.heartbeat_timeout == 20.0
    assert config.metrics_interval == 5.0
    assert config.log_buffer_size == 1000
    assert config.max_notifications_per_user == 100
    assert config.redis_url is None


def test_environment_variables_are_read():
    config = Config.from_env(
        {
            "SWITCHBOARD_ENV": "test",
            "SWITCHBOARD_HOST": "0.0.0.0",
            "SWITCHBOARD_PORT": "9001",
            "SWITCHBOARD_NODE_ID": "node-7",
            "SWITCHBOARD_JWT_SECRET": SECRET,
            "SWITCHBOARD_JWT_ISSUER": "https://auth.example.com",
            "SWITCHBOARD_JWT_AUDIENCE": "switchboard",
            "SWITCHBOARD_DATABASE_URL": "postgresql://sb:pw@db/sb",
            "SWITCHBOARD_REDIS_URL": "redis://redis:6379/0",
            "SWITCHBOARD_ALLOWED_ORIGINS": "https://a.example, https://b.example ,",
            "SWITCHBOARD_MAX_CONNECTIONS_PER_USER": "3",
            "SWITCHBOARD_MAX_CONNECTIONS_PER_IP": "50",
            "SWITCHBOARD_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
            "SWITCHBOARD_MAX_MESSAGE_BYTES": "2048",
            "SWITCHBOARD_HEARTBEAT_INTERVAL": "10",
            "SWITCHBOARD_METRICS_INTERVAL": "2.5",
            "SWITCHBOARD_LOG_BUFFER_SIZE": "50",
            "SWITCHBOARD_MAX_NOTIFICATIONS_PER_USER": "7",
            "SWITCHBOARD_LOG_FORMAT": "json",
            "SWITCHBOARD_LOG_LEVEL": "DEBUG",
            "UNRELATED": "ignored",
        }
    )
    assert config.env == "test"
    assert (config.host, config.port, config.node_id) == ("0.0.0.0", 9001, "node-7")
    assert config.jwt_secret == SECRET
    assert config.jwt_issuer == "https://auth.example.com"
    assert config.jwt_audience == "switchboard"
    assert config.database_url == "postgresql://sb:pw@db/sb"
    assert config.redis_url == "redis://redis:6379/0"
    assert config.allowed_origins == ("https://a.example", "https://b.example")
    assert config.max_connections_per_user == 3
    assert config.max_connections_per_ip == 50
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"),
    )
    assert config.max_message_bytes == 2048
    assert config.heartbeat_interval == 10.0
    assert config.heartbeat_timeout == 10.0  # never longer than the interval by default
    assert config.metrics_interval == 2.5
    assert config.log_buffer_size == 50
    assert config.max_notifications_per_user == 7
    assert (config.log_format, config.log_level) == ("json", "DEBUG")


def test_empty_variables_count_as_unset():
    config = Config.from_env({"SWITCHBOARD_PORT": "", "SWITCHBOARD_JWT_SECRET": ""})
    assert config.port == 8080
    assert config.jwt_secret == DEFAULT_JWT_SECRET


def test_overrides_win_and_none_is_ignored():
    # An explicit environment: without one, 0.0.0.0 would mean production.
    env = {"SWITCHBOARD_PORT": "9001", "SWITCHBOARD_HOST": "0.0.0.0", "SWITCHBOARD_ENV": "test"}
    config = Config.from_env(env, port=0, host=None)
    assert config.port == 0
    assert config.host == "0.0.0.0"


def test_auth_timeout_from_environment_and_cli_flag():
    assert Config.from_env({}).auth_timeout == 5.0
    assert Config.from_env({"SWITCHBOARD_AUTH_TIMEOUT": "0.5"}).auth_timeout == 0.5
    args = vars(cli._parser().parse_args(["serve", "--auth-timeout", "12.5"]))
    flags = {k: v for k, v in args.items() if k != "command"}
    assert Config.from_env({"SWITCHBOARD_AUTH_TIMEOUT": "3"}, **flags).auth_timeout == 12.5


def test_explicit_heartbeat_timeout_is_kept():
    config = Config.from_env(
        {"SWITCHBOARD_HEARTBEAT_INTERVAL": "30", "SWITCHBOARD_HEARTBEAT_TIMEOUT": "5"}
    )
    assert (config.heartbeat_interval, config.heartbeat_timeout) == (30.0, 5.0)
    config = Config.from_env({"SWITCHBOARD_HEARTBEAT_INTERVAL": "60"})
    assert config.heartbeat_timeout == 20.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SWITCHBOARD_ENV": "staging"}, "SWITCHBOARD_ENV"),
        ({"SWITCHBOARD_PORT": "eighty"}, "SWITCHBOARD_PORT"),
        ({"SWITCHBOARD_HEARTBEAT_INTERVAL": "soon"}, "SWITCHBOARD_HEARTBEAT_INTERVAL"),
        ({"SWITCHBOARD_MAX_CONNECTIONS_PER_USER": "2.5"}, "SWITCHBOARD_MAX_CONNECTIONS_PER_USER"),
        ({"SWITCHBOARD_TRUSTED_PROXIES": "10.0.0.0/8, not-an-ip"}, "SWITCHBOARD_TRUSTED_PROXIES"),
        ({"SWITCHBOARD_LOG_FORMAT": "xml"}, "SWITCHBOARD_LOG_FORMAT"),
        ({"SWITCHBOARD_HEARTBEAT_INTERVAL": "0"}, "heartbeat"),
        ({"SWITCHBOARD_JWT_ALGORITHMS": "none"}, "none"),
        ({"SWITCHBOARD_JWT_ALGORITHMS": "RS256"}, "SWITCHBOARD_JWT_PUBLIC_KEY"),
        ({"SWITCHBOARD_JWT_PUBLIC_KEY": "/nonexistent/key.pem"}, "/nonexistent/key.pem"),
        ({"SWITCHBOARD_RATE_LIMITS": "messages=lots"}, "SWITCHBOARD_RATE_LIMITS"),
        ({"SWITCHBOARD_HEADER_TIMEOUT": "soon"}, "SWITCHBOARD_HEADER_TIMEOUT"),
        ({"SWITCHBOARD_HEADER_TIMEOUT": "0"}, "SWITCHBOARD_HEADER_TIMEOUT"),
        ({"SWITCHBOARD_MAX_TCP_CONNECTIONS_PER_IP": "-1"}, "MAX_TCP_CONNECTIONS_PER_IP"),
        (
            {
                "SWITCHBOARD_MAX_CONNECTIONS_PER_IP": "50",
                "SWITCHBOARD_MAX_TCP_CONNECTIONS_PER_IP": "4",
            },
            "SWITCHBOARD_MAX_TCP_CONNECTIONS_PER_IP",
        ),
        ({"SWITCHBOARD_AUTH_TIMEOUT": "soon"}, "SWITCHBOARD_AUTH_TIMEOUT"),
        ({"SWITCHBOARD_AUTH_TIMEOUT": "0.1"}, "SWITCHBOARD_AUTH_TIMEOUT must be between 0.5"),
        ({"SWITCHBOARD_AUTH_TIMEOUT": "61"}, "SWITCHBOARD_AUTH_TIMEOUT must be between 0.5"),
        ({"SWITCHBOARD_AUTH_TIMEOUT": "nan"}, "SWITCHBOARD_AUTH_TIMEOUT"),
    ],
)
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    assert message in str(info.value)


def test_mixing_hmac_and_public_key_algorithms_is_refused(ec_public_key_file):
    with pytest.raises(ConfigError) as info:
        Config.from_env(
            {
                "SWITCHBOARD_JWT_PUBLIC_KEY": ec_public_key_file,
                "SWITCHBOARD_JWT_ALGORITHMS": "HS256,ES256",
            }
        )
    assert "mix" in str(info.value)


def test_public_key_file_is_read_and_selects_asymmetric_algorithms(ec_public_key_file):
    config = Config.from_env({"SWITCHBOARD_JWT_PUBLIC_KEY": ec_public_key_file})
    assert config.jwt_public_key is not None
    assert config.jwt_public_key.startswith("-----BEGIN PUBLIC KEY-----")
    assert config.jwt_algorithms == ("RS256", "ES256")
    config = Config.from_env(
        {"SWITCHBOARD_JWT_PUBLIC_KEY": ec_public_key_file, "SWITCHBOARD_JWT_ALGORITHMS": "ES256"}
    )
    assert config.jwt_algorithms == ("ES256",)


# -- the environment follows the host unless given ----------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("localhost", True),
        ("LocalHost", True), ("0.0.0.0", False), ("::", False), ("", False),
        ("192.168.1.20", False), ("2001:db8::1", False), ("gateway.internal", False),
        ("localhost.example.com", False), ("[::1]", False), ("::ffff:127.0.0.1", False),
    ],
)  # fmt: skip
def test_is_loopback_resolves_nothing(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_host_without_env_is_development(host):
    config = Config.from_env({"SWITCHBOARD_HOST": host})
    assert config.env == "development" and not config.exposed
    assert config.jwt_secret == DEFAULT_JWT_SECRET


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway.internal"])
def test_exposed_host_without_env_is_production(host):
    secured = {k: v for k, v in PROD_OK.items() if k != "SWITCHBOARD_ENV"}
    config = Config.from_env({**secured, "SWITCHBOARD_HOST": host})
    assert config.env == "production" and config.exposed
    assert config.max_connections_per_ip == 20  # production's defaults follow
    # ... so the public default secret and a wildcard origin are refused.
    with pytest.raises(ConfigError) as info:
        Config.from_env({"SWITCHBOARD_HOST": host})
    assert "production" in str(info.value) and "SWITCHBOARD_JWT_SECRET" in str(info.value)
    with pytest.raises(ConfigError) as info:
        Config.from_env({"SWITCHBOARD_HOST": host, "SWITCHBOARD_JWT_SECRET": SECRET})
    assert "SWITCHBOARD_ALLOWED_ORIGINS" in str(info.value)


def test_host_flag_counts_like_the_variable():
    # --host 0.0.0.0 on the command line, nothing in the environment.
    with pytest.raises(ConfigError) as info:
        Config.from_env({"SWITCHBOARD_HOST": "127.0.0.1"}, host="0.0.0.0")
    assert "production" in str(info.value)
    config = Config.from_env({"SWITCHBOARD_HOST": "0.0.0.0"}, host="127.0.0.1")
    assert config.env == "development"


@pytest.mark.parametrize("how", ["variable", "flag"])
def test_explicit_development_beyond_loopback_is_allowed(how):
    if how == "variable":
        config = Config.from_env({"SWITCHBOARD_ENV": "development", "SWITCHBOARD_HOST": "0.0.0.0"})
    else:
        config = Config.from_env({"SWITCHBOARD_HOST": "0.0.0.0"}, env="development")
    assert config.env == "development" and config.exposed
    assert config.allowed_origins == ("*",)


# -- JWT maximum lifetime ---------------------------------------------------------------------


def test_jwt_max_ttl_is_unset_by_default_and_read_in_seconds():
    assert Config.from_env({}).jwt_max_ttl is None
    assert Config.from_env({"SWITCHBOARD_JWT_MAX_TTL": "3600"}).jwt_max_ttl == 3600.0
    assert Config.from_env({}, jwt_max_ttl=90.5).jwt_max_ttl == 90.5


@pytest.mark.parametrize("raw", ["0", "-60", "inf", "nan", "an hour"])
def test_bad_jwt_max_ttl_names_the_variable(raw):
    with pytest.raises(ConfigError) as info:
        Config.from_env({"SWITCHBOARD_JWT_MAX_TTL": raw})
    assert "SWITCHBOARD_JWT_MAX_TTL" in str(info.value)


# -- rate limits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ("production", {"messages": 30, "joins": 10, "typing": 60}),
        ("development", {"messages": 60, "joins": 20, "typing": 120}),
        ("test", {"messages": 10, "joins": 5, "typing": 20}),
    ],
)
def test_default_rate_limits_per_environment(env, expected):
    environ = {**PROD_OK, "SWITCHBOARD_ENV": env}
    config = Config.from_env(environ)
    for name, count in expected.items():
        assert config.rate_limit(name) == RateLimit(count, 60.0), name
    assert "other" in config.rate_limits


@pytest.mark.parametrize(
    ("env", "expected"), [("production", 20), ("development", 1000), ("test", 1000)]
)
def test_default_connections_per_ip_per_environment(env, expected):
    config = Config.from_env({**PROD_OK, "SWITCHBOARD_ENV": env})
    assert config.max_connections_per_ip == expected
    assert config.max_connections_per_user == 5


def test_tcp_bound_per_ip_is_the_websocket_limit_plus_headroom_unless_set():
    production = Config.from_env(PROD_OK)
    assert production.max_tcp_connections_per_ip == 0  # derived
    assert production.tcp_connections_per_ip == 20 + TCP_HEADROOM_PER_IP
    # Operators see the bound in force, not the 0 that means "derived".
    assert production.public_view()["max_tcp_connections_per_ip"] == 20 + TCP_HEADROOM_PER_IP
    raised = Config.from_env({**PROD_OK, "SWITCHBOARD_MAX_CONNECTIONS_PER_IP": "100"})
    assert raised.tcp_connections_per_ip == 100 + TCP_HEADROOM_PER_IP
    explicit = Config.from_env({**PROD_OK, "SWITCHBOARD_MAX_TCP_CONNECTIONS_PER_IP": "400"})
    assert explicit.tcp_connections_per_ip == 400


def test_header_timeout_defaults_to_ten_seconds_and_is_read():
    assert Config.from_env({}).header_timeout == 10.0
    assert Config.from_env({"SWITCHBOARD_HEADER_TIMEOUT": "2.5"}).header_timeout == 2.5
    flag = Config.from_env({"SWITCHBOARD_HEADER_TIMEOUT": "2.5"}, header_timeout=4.0)
    assert flag.header_timeout == 4.0


def test_explicit_connections_per_ip_wins_in_production():
    config = Config.from_env({**PROD_OK, "SWITCHBOARD_MAX_CONNECTIONS_PER_IP": "500"})
    assert config.max_connections_per_ip == 500


def test_parse_rate_limits_forms():
    limits = parse_rate_limits("messages=30/1m, joins=10/60s,typing=60/min,other=5/2h")
    assert limits == {
        "messages": RateLimit(30, 60.0),
        "joins": RateLimit(10, 60.0),
        "typing": RateLimit(60, 60.0),
        "other": RateLimit(5, 7200.0),
    }
    assert parse_rate_limits("messages=3/10") == {"messages": RateLimit(3, 10.0)}
    assert parse_rate_limits("messages=3/0.5s") == {"messages": RateLimit(3, 0.5)}
    assert parse_rate_limits(" messages = 4 / 1m ") == {"messages": RateLimit(4, 60.0)}
    assert parse_rate_limits("") == {}
    assert str(RateLimit(30, 60.0)) == "30/60s"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("messages", "cannot read 'messages'"),
        ("messages=30", "cannot read 'messages=30'"),
        ("messages=many/1m", "cannot read"),
        ("messages=30/1fortnight", "cannot read"),
        ("messages=30/-1s", "cannot read"),
        ("emails=30/1m", "unknown class 'emails'"),
        ("messages=0/1m", "must be positive"),
        ("messages=-5/1m", "must be positive"),
        ("messages=5/0s", "must be positive"),
    ],
)
def test_parse_rate_limits_errors(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_rate_limits(raw)
    text = str(info.value)
    assert "SWITCHBOARD_RATE_LIMITS" in text
    assert message in text


def test_rate_limit_override_keeps_other_defaults():
    config = Config.from_env(
        {"SWITCHBOARD_ENV": "test", "SWITCHBOARD_RATE_LIMITS": "messages=3/10s"}
    )
    assert config.rate_limit("messages") == RateLimit(3, 10.0)
    assert config.rate_limit("joins") == RateLimit(5, 60.0)
    # Overrides (CLI flags, tests) take the same string form.
    config = Config.from_env({}, env="test", rate_limits="typing=1/1s")
    assert config.rate_limit("typing") == RateLimit(1, 1.0)
    assert config.rate_limit("messages") == RateLimit(10, 60.0)


# -- production guards --------------------------------------------------------------------------


def test_production_accepts_a_real_secret_and_origins():
    config = Config.from_env(PROD_OK)
    assert config.is_production
    assert config.allowed_origins == ("https://chat.example.com",)


@pytest.mark.parametrize("secret", [None, "", DEFAULT_JWT_SECRET])
def test_production_refuses_default_or_missing_secret(secret):
    env = dict(PROD_OK)
    if secret is None:
        del env["SWITCHBOARD_JWT_SECRET"]
    else:
        env["SWITCHBOARD_JWT_SECRET"] = secret
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    text = str(info.value)
    assert "production" in text and "SWITCHBOARD_JWT_SECRET" in text


@pytest.mark.parametrize("origins", [None, "*", "https://chat.example.com,*"])
def test_production_refuses_wildcard_origin(origins):
    env = dict(PROD_OK)
    if origins is None:
        del env["SWITCHBOARD_ALLOWED_ORIGINS"]
    else:
        env["SWITCHBOARD_ALLOWED_ORIGINS"] = origins
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    text = str(info.value)
    assert "production" in text and "SWITCHBOARD_ALLOWED_ORIGINS" in text


@pytest.mark.parametrize(
    "secret",
    ["s" * (MIN_JWT_SECRET_BYTES - 1), "Q", "é" * 15],  # "é" * 15: 15 characters, 30 bytes
    ids=["31-bytes", "1-byte", "30-utf8-bytes"],
)
def test_production_refuses_a_short_secret_naming_the_variable_and_minimum(secret):
    with pytest.raises(ConfigError) as info:
        Config.from_env({**PROD_OK, "SWITCHBOARD_JWT_SECRET": secret})
    text = str(info.value)
    assert "SWITCHBOARD_JWT_SECRET" in text and f"{MIN_JWT_SECRET_BYTES} bytes" in text
    assert secret not in text  # never echo the secret itself


@pytest.mark.parametrize("secret", ["s" * MIN_JWT_SECRET_BYTES, "é" * 16])
def test_production_accepts_a_32_byte_secret(secret):
    config = Config.from_env({**PROD_OK, "SWITCHBOARD_JWT_SECRET": secret})
    assert config.is_production and config.jwt_secret == secret


@pytest.mark.parametrize(("algorithm", "minimum"), [("HS384", 48), ("HS512", 64)])
def test_longer_hashes_need_longer_secrets_in_production(algorithm, minimum):
    env = {**PROD_OK, "SWITCHBOARD_JWT_ALGORITHMS": algorithm}
    with pytest.raises(ConfigError) as info:
        Config.from_env({**env, "SWITCHBOARD_JWT_SECRET": "s" * (minimum - 1)})
    assert f"{minimum} bytes" in str(info.value) and algorithm in str(info.value)
    config = Config.from_env({**env, "SWITCHBOARD_JWT_SECRET": "s" * minimum})
    assert config.jwt_algorithms == (algorithm,)


@pytest.mark.parametrize("env", ["development", "test"])
def test_short_secrets_stay_usable_outside_production(env):
    config = Config.from_env({"SWITCHBOARD_ENV": env, "SWITCHBOARD_JWT_SECRET": "short"})
    assert config.jwt_secret == "short"


def test_production_with_public_key_needs_no_secret(ec_public_key_file):
    env = dict(PROD_OK)
    del env["SWITCHBOARD_JWT_SECRET"]
    config = Config.from_env({**env, "SWITCHBOARD_JWT_PUBLIC_KEY": ec_public_key_file})
    assert config.is_production and config.jwt_algorithms == ("RS256", "ES256")


# -- masked secrets ----------------------------------------------------------------------------


def test_public_view_masks_secrets(ec_public_key_file):
    config = Config.from_env(
        {
            "SWITCHBOARD_JWT_SECRET": SECRET,
            "SWITCHBOARD_DATABASE_URL": "postgresql://sb:db-password-42@db:5432/sb",
            "SWITCHBOARD_REDIS_URL": "redis://:redis-password-42@redis:6379/0",
            "SWITCHBOARD_TRUSTED_PROXIES": "10.0.0.0/8",
            "SWITCHBOARD_RATE_LIMITS": "messages=3/10s",
        }
    )
    view = config.public_view()
    text = orjson.dumps(view).decode()  # JSON-able as a whole
    for secret in (SECRET, "db-password-42", "redis-password-42"):
        assert secret not in text  # never echo the secret itself
    assert view["jwt_secret"] == "***"
    assert view["database_url"] == "postgresql://sb:***@db:5432/sb"
    assert view["redis_url"] == "redis://:***@redis:6379/0"
    assert view["trusted_proxies"] == ["10.0.0.0/8"]
    assert view["rate_limits"]["messages"] == "3/10s"
    assert view["allowed_origins"] == ["*"]
    assert view["port"] == 8080

    with_key = Config.from_env({"SWITCHBOARD_JWT_PUBLIC_KEY": ec_public_key_file}).public_view()
    assert with_key["jwt_public_key"] == "(set)"
    assert "BEGIN PUBLIC KEY" not in orjson.dumps(with_key).decode()


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:///var/lib/sb.db", "sqlite:///var/lib/sb.db"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked


# -- the switchboard token CLI ---------------------------------------------------------------


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=30, cwd=ROOT, check=False
    )


def test_cli_token_mints_a_verifiable_token():
    before = int(time.time())
    result = _run(
        [str(SWITCHBOARD), "token", "bob", "--role", "admin", "--ttl", "60"],
        _cli_env(SWITCHBOARD_JWT_SECRET=SECRET),
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bob"
    assert claims["roles"] == ["admin"]
    assert claims["name"] == "bob"
    assert isinstance(claims["exp"], int)
    assert claims["exp"] - claims["iat"] == 60
    assert before <= claims["iat"] <= int(time.time())
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    # The secret is not printed.
    assert SECRET not in result.stdout + result.stderr


def test_cli_token_defaults_and_repeated_roles():
    result = _run(
        [str(SWITCHBOARD), "token", "carol", "--role", "user", "--role", "moderator",
         "--name", "carol_c", "--display-name", "Carol C."],
        _cli_env(SWITCHBOARD_JWT_SECRET=SECRET, SWITCHBOARD_JWT_ISSUER="https://auth.example"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(
        result.stdout.strip(), SECRET, algorithms=["HS256"], issuer="https://auth.example"
    )
    assert claims["roles"] == ["user", "moderator"]
    assert (claims["name"], claims["displayName"]) == ("carol_c", "Carol C.")
    assert claims["exp"] - claims["iat"] == 3600

    result = _run(
        [sys.executable, "-m", "server", "token", "dan"], _cli_env(SWITCHBOARD_JWT_SECRET=SECRET)
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert (claims["sub"], claims["roles"]) == ("dan", ["user"])


def test_cli_token_refuses_in_production_without_secret():
    result = _run(
        [str(SWITCHBOARD), "token", "bob"],
        _cli_env(SWITCHBOARD_ENV="production", SWITCHBOARD_ALLOWED_ORIGINS="https://x.example"),
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "SWITCHBOARD_JWT_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_token_refuses_a_ttl_over_the_max_ttl():
    env = _cli_env(SWITCHBOARD_JWT_SECRET=SECRET, SWITCHBOARD_JWT_MAX_TTL="600")
    result = _run([str(SWITCHBOARD), "token", "bob", "--ttl", "601"], env)
    assert result.returncode == 2 and result.stdout == ""
    assert "SWITCHBOARD_JWT_MAX_TTL" in result.stderr and "Traceback" not in result.stderr
    result = _run([str(SWITCHBOARD), "token", "bob", "--ttl", "600"], env)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 600
