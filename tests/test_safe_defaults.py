"""Safe by default and strict claims, as a client and an operator see them.

A node started in production mode (32+ byte secret, explicit origin) is
probed with real clients: time claims out of range (``exp`` of 1e20 at
connect and at ``auth:refresh``), ``SWITCHBOARD_JWT_MAX_TTL`` at connect,
refresh and REST, and ``roles`` claims of the wrong shape. ``switchboard
serve`` itself is run to check that only development prints a token and
that a node listening beyond loopback without ``SWITCHBOARD_ENV`` refuses to
start in anything but production.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_asyncio
from tornado.httpclient import AsyncHTTPClient

from server.core.auth import MAX_TOKEN_HORIZON_SECS
from switchboard_client import Client, ClientError, HandshakeError

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")
if not Path(PYTHON).exists():  # e.g. a CI image with the packages installed system-wide
    PYTHON = sys.executable

SECRET = "safe-defaults-production-secret-0123456789"
PRODUCTION = {"env": "production", "jwt_secret": SECRET, "allowed_origins": "http://app.test"}
MAX_TTL_SECS = 600
# Anything that looks like a JWT (base64url JSON header "{"...).
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
LISTENING_RE = re.compile(r"listening\s+http\s+http://127\.0\.0\.1:(\d+)")


def signed(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def claims_for(user: str = "alice", ttl: float = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "roles": ["user"], "iat": now, "exp": now + ttl, **extra}


async def refused(gw: Any, token: str, namespace: str = "chat") -> ClientError:
    """Connect with ``token``: the upgrade completes, then system:error and a close."""
    client = Client(gw.url(namespace), token)
    gw.clients.append(client)
    with pytest.raises(ClientError) as info:
        await client.connect()
    assert not isinstance(info.value, HandshakeError), info.value
    return info.value


async def get_stats(gw: Any, token: str) -> tuple[int, dict[str, Any]]:
    """``GET /websocket/stats`` (admin only) with ``token`` as the bearer."""
    resp = await AsyncHTTPClient().fetch(
        f"{gw.http}/websocket/stats", headers={"Authorization": f"Bearer {token}"},
        raise_error=False, request_timeout=10,
    )  # fmt: skip
    return resp.code, json.loads(resp.body)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest_asyncio.fixture
async def prod(gateway_factory: Any) -> Any:
    return await gateway_factory(**PRODUCTION)


# -- time claims within a sane range ----------------------------------------------------------


@pytest.mark.asyncio
async def test_exp_of_1e20_is_unauthorized_at_connect(prod, caplog):
    with caplog.at_level(logging.INFO):
        exc = await refused(prod, signed(claims_for(exp=1e20)))
    assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)
    assert exc.details == {"reason": "InvalidExpiry"}
    assert prod.node.hub.connections == {}
    assert errors_logged(caplog) == []


@pytest.mark.asyncio
async def test_exp_of_1e20_is_unauthorized_at_refresh_not_internal_error(prod, caplog):
    client = await prod.connect("alice")
    with caplog.at_level(logging.INFO), pytest.raises(ClientError) as info:
        await client.emit("auth:refresh", {"token": signed(claims_for(exp=1e20))})
    assert info.value.code == "UNAUTHORIZED"
    assert info.value.details == {"reason": "InvalidExpiry"}
    # A refused refresh is an answer: the connection keeps working.
    assert "serverTime" in await client.emit("system:ping", {})
    assert errors_logged(caplog) == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"exp": "4102444800"}, "InvalidExpiry"),  # a string, not a NumericDate
        ({"exp": int(time.time()) + MAX_TOKEN_HORIZON_SECS + 3600}, "InvalidExpiry"),
        ({"iat": -1}, "InvalidIssuedAt"),
        ({"iat": "0"}, "InvalidIssuedAt"),
        ({"nbf": -5}, "InvalidNotBefore"),
        ({"nbf": True}, "InvalidNotBefore"),
    ],
    ids=["exp-string", "exp-past-horizon", "iat-negative", "iat-string", "nbf-negative",
         "nbf-bool"],
)  # fmt: skip
async def test_time_claims_out_of_range_are_unauthorized(prod, caplog, extra, reason):
    with caplog.at_level(logging.INFO):
        exc = await refused(prod, signed(claims_for(**extra)))
    assert (exc.code, exc.close_code, exc.details) == ("UNAUTHORIZED", 4401, {"reason": reason})
    assert errors_logged(caplog) == []


@pytest.mark.asyncio
async def test_a_long_but_sane_exp_is_accepted_and_refreshed(prod):
    nine_years = int(time.time()) + MAX_TOKEN_HORIZON_SECS - 365 * 24 * 3600
    client = await prod.connect("alice", token=signed(claims_for(exp=nine_years)))
    answer = await client.emit("auth:refresh", {"token": signed(claims_for(exp=nine_years + 1))})
    assert answer["expiresAt"].startswith(time.strftime("%Y", time.gmtime(nine_years + 1)))


# -- SWITCHBOARD_JWT_MAX_TTL ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_max_ttl_refuses_long_tokens_at_connect(gateway_factory):
    gw = await gateway_factory(**PRODUCTION, jwt_max_ttl=MAX_TTL_SECS)
    ok = await gw.connect("alice", token=signed(claims_for(ttl=MAX_TTL_SECS)))
    assert ok.welcome is not None

    now = int(time.time())
    too_long = {
        "ttl": claims_for(ttl=MAX_TTL_SECS + 1),
        # Lifetime is exp - iat, however little of it is left.
        "old iat": claims_for(iat=now - 3000, exp=now + 60),
        # Without iat, the lifetime counts from now.
        "no iat": {"sub": "alice", "exp": now + MAX_TTL_SECS + 60},
    }
    for label, claims in too_long.items():
        exc = await refused(gw, signed(claims))
        assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401), label
        assert exc.details == {"reason": "TokenLifetimeTooLong"}, label
    no_iat = await gw.connect("alice", token=signed({"sub": "alice", "exp": now + 60}))
    assert no_iat.welcome is not None


@pytest.mark.asyncio
async def test_max_ttl_refuses_long_tokens_at_refresh(gateway_factory):
    gw = await gateway_factory(**PRODUCTION, jwt_max_ttl=MAX_TTL_SECS)
    client = await gw.connect("alice", token=signed(claims_for(ttl=60)))
    with pytest.raises(ClientError) as info:
        await client.emit("auth:refresh", {"token": signed(claims_for(ttl=3600))})
    assert info.value.code == "UNAUTHORIZED"
    assert info.value.details == {"reason": "TokenLifetimeTooLong"}
    answer = await client.emit("auth:refresh", {"token": signed(claims_for(ttl=MAX_TTL_SECS))})
    assert answer["expiresAt"]


@pytest.mark.asyncio
async def test_max_ttl_refuses_long_bearer_tokens_over_rest(gateway_factory):
    gw = await gateway_factory(**PRODUCTION, jwt_max_ttl=MAX_TTL_SECS)
    status, body = await get_stats(gw, signed(claims_for("root", ttl=3600, roles=["admin"])))
    assert status == 401
    assert body["error"]["code"] == "UNAUTHORIZED"
    assert body["error"]["details"] == {"reason": "TokenLifetimeTooLong"}
    status, _ = await get_stats(gw, signed(claims_for("root", ttl=MAX_TTL_SECS, roles=["admin"])))
    assert status == 200


@pytest.mark.asyncio
async def test_dev_token_endpoint_stays_within_max_ttl(gateway_factory):
    gw = await gateway_factory(env="development", jwt_max_ttl=MAX_TTL_SECS)
    http = AsyncHTTPClient()
    resp = await http.fetch(f"{gw.http}/dev/token", method="POST", body='{"userId": "dora"}')
    body = json.loads(resp.body)
    assert body["expiresIn"] == MAX_TTL_SECS
    client = await gw.connect("dora", token=body["token"])
    assert client.welcome is not None
    resp = await http.fetch(
        f"{gw.http}/dev/token", method="POST", raise_error=False,
        body=json.dumps({"userId": "dora", "ttl": MAX_TTL_SECS + 1}),
    )  # fmt: skip
    assert resp.code == 400
    assert "ttl" in json.loads(resp.body)["error"]["details"]


# -- roles -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_roles_map_is_not_admitted_to_admin(prod, caplog):
    token = signed(claims_for("mallory", roles={"admin": False}))
    with caplog.at_level(logging.INFO):
        exc = await refused(prod, token, "admin")
    assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)
    assert exc.details == {"reason": "InvalidRoles"}
    assert prod.node.hub.connections == {}
    assert errors_logged(caplog) == []


@pytest.mark.asyncio
async def test_roles_map_is_unauthorized_over_rest(prod):
    status, body = await get_stats(prod, signed(claims_for("mallory", roles={"admin": True})))
    assert status == 401
    assert body["error"]["code"] == "UNAUTHORIZED"
    assert body["error"]["details"] == {"reason": "InvalidRoles"}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "roles",
    [{"admin": False}, {}, 5, True, ["admin", 5], [["admin"]], [None]],
    ids=["map", "empty-map", "number", "bool", "list-with-number", "nested-list", "list-null"],
)
async def test_roles_of_any_other_shape_are_unauthorized(prod, roles):
    exc = await refused(prod, signed(claims_for("mallory", roles=roles)))
    assert (exc.code, exc.close_code, exc.details) == (
        "UNAUTHORIZED", 4401, {"reason": "InvalidRoles"}
    )  # fmt: skip


@pytest.mark.asyncio
async def test_roles_as_a_single_string_is_one_role(prod):
    client = await prod.connect("root", "admin", token=signed(claims_for("root", roles="admin")))
    assert client.welcome is not None
    assert client.welcome["user"]["roles"] == ["admin"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("roles", "granted"),
    [
        (["admin", "root", "superuser"], ["admin"]),  # unknown names dropped
        (["root"], ["user"]),
        ([], ["user"]),
        (None, ["user"]),
    ],
)
async def test_unknown_role_names_are_dropped(prod, roles, granted):
    client = await prod.connect("bob", token=signed(claims_for("bob", roles=roles)))
    assert client.welcome is not None
    assert client.welcome["user"]["roles"] == granted


@pytest.mark.asyncio
async def test_admin_endpoint_still_admits_a_list_of_roles(prod):
    status, _ = await get_stats(prod, signed(claims_for("root", roles=["user", "admin"])))
    assert status == 200


# -- development only beyond loopback when asked -------------------------------------------


@pytest.mark.asyncio
async def test_explicit_development_beyond_loopback_warns(gateway_factory, caplog):
    with caplog.at_level(logging.WARNING, logger="switchboard"):
        gw = await gateway_factory(env="development", host="0.0.0.0")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("development mode is exposed beyond loopback" in m for m in warnings), warnings
    # Allowed all the same: the operator asked.
    client = await gw.connect("alice")
    assert client.welcome is not None


@pytest.mark.asyncio
async def test_loopback_development_does_not_warn(gateway_factory, caplog):
    with caplog.at_level(logging.WARNING, logger="switchboard"):
        await gateway_factory(env="development")
    assert not any("exposed beyond loopback" in r.getMessage() for r in caplog.records)


# -- switchboard serve ---------------------------------------------------------------------


def clean_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update({f"SWITCHBOARD_{k.upper()}": v for k, v in settings.items()})
    return env


async def serve_output(tmp_path: Path, *flags: str, **settings: str) -> tuple[str, str]:
    """Run ``switchboard serve`` on loopback until it listens, stop it; (stdout, stderr)."""
    env = clean_env(database_url=f"sqlite:///{tmp_path}/x.db", **settings)
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "server", "serve", "--port", "0", "--host", "127.0.0.1", *flags,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(15):
            while not LISTENING_RE.search(line := (await proc.stdout.readline()).decode()):
                assert line, f"exited before listening: {''.join(seen)}"
                seen.append(line)
            seen.append(line)
            proc.send_signal(signal.SIGTERM)
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return "".join(seen) + out.decode(), err.decode()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "settings",
    [
        {"env": "production", "jwt_secret": SECRET, "allowed_origins": "http://app.test"},
        {"env": "test"},
    ],
    ids=["production", "test"],
)
async def test_serve_prints_no_token_outside_development(tmp_path, settings):
    stdout, stderr = await serve_output(tmp_path, **settings)
    assert f"({settings['env']})" in stdout
    assert "dev token" not in stdout
    assert not JWT_RE.search(stdout + stderr), stdout + stderr


@pytest.mark.asyncio
async def test_serve_prints_a_dev_token_in_development_within_max_ttl(tmp_path):
    stdout, _ = await serve_output(tmp_path, "--jwt-max-ttl", str(MAX_TTL_SECS), env="development")
    match = JWT_RE.search(stdout.split("dev token", 1)[1])
    assert match, stdout
    claims = jwt.decode(match.group(0), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == MAX_TTL_SECS


def test_serve_beyond_loopback_without_env_is_production(tmp_path):
    """No SWITCHBOARD_ENV and 0.0.0.0: production's guards refuse the default secret."""
    result = subprocess.run(
        [PYTHON, "-m", "server", "serve", "--port", "0", "--host", "0.0.0.0"],
        cwd=ROOT, env=clean_env(database_url=f"sqlite:///{tmp_path}/x.db"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "production" in result.stderr and "SWITCHBOARD_JWT_SECRET" in result.stderr
    assert "Traceback" not in result.stderr
    assert "listening" not in result.stdout and not JWT_RE.search(result.stdout)
    assert not (tmp_path / "x.db").exists()


@pytest.mark.asyncio
@pytest.mark.parametrize("sub", ["ali\x00ce", "bob\n", "\x7f"])
async def test_a_subject_with_control_characters_is_unauthorized(prod, caplog, sub):
    exc = await refused(prod, signed(claims_for(sub)))
    assert exc.code == "UNAUTHORIZED" and exc.details == {"reason": "InvalidSubject"}
    assert errors_logged(caplog) == []


@pytest.mark.asyncio
async def test_control_characters_are_dropped_from_names(prod):
    token = signed(claims_for("carol", name="car\x00ol", displayName="Carol \x1b[31m👩‍💻"))
    client = await prod.connect("carol", token=token)
    assert client.welcome is not None
    assert client.welcome["user"]["username"] == "carol"
    assert client.welcome["user"]["displayName"] == "Carol [31m👩‍💻"
