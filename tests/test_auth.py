"""Authentication as a client sees it: where the token may travel, every way
it can be wrong (and the ``system:error`` code + close code that follow),
asymmetric keys, issuer/audience, bans, and expiry with ``auth:refresh``.

Real server on port 0, real clients; no mocks.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tornado.websocket import WebSocketClientConnection, websocket_connect

from models import Ban, User, utcnow
from server.core.auth import mint_token
from switchboard_client import Client, ClientError, HandshakeError
from tests.support.client_checks import assert_no_event
from tests.support.waiting import eventually

ISSUER = "https://auth.example.com"
AUDIENCE = "switchboard"


# -- helpers -------------------------------------------------------------------


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _claims(user: str = "mallory", ttl: float = 3600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "name": user, "roles": ["user"], "iat": now, "exp": now + ttl, **extra}


def hand_made_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A JWT built without pyjwt, so its header can say anything (alg none, HS256+PEM)."""
    signing_input = (
        _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
    )
    signature = b""
    if secret is not None:
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64url(signature)


def raw_client(gw: Any, token: str | None, **kw: Any) -> Client:
    """An unconnected client with exactly ``token`` (None: no token at all)."""
    client = Client(gw.url("chat"), token, **kw)
    gw.clients.append(client)
    return client


async def refused(client: Client) -> ClientError:
    """Connect, expecting the server to upgrade, send system:error and close."""
    with pytest.raises(ClientError) as info:
        await client.connect()
    exc = info.value
    assert not isinstance(exc, HandshakeError), f"upgrade itself was refused: {exc!r}"
    return exc


def _pem_private(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _pem_public(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def rsa_files(tmp_path: Any, rsa_key: Any) -> tuple[str, str, str]:
    """(public key path, public PEM, private PEM)."""
    public_pem = _pem_public(rsa_key)
    path = tmp_path / "rsa_public.pem"
    path.write_text(public_pem)
    return str(path), public_pem, _pem_private(rsa_key)


# -- where the token travels ----------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("token_in", ["header", "query", "cookie"])
async def test_token_accepted_from_each_source(gateway, token_in):
    client = raw_client(gateway, gateway.token("alice"), token_in=token_in)
    welcome = await client.connect()
    assert welcome["userId"] == "alice"
    pong = await client.emit("system:ping", {})
    assert "serverTime" in pong


@pytest.mark.asyncio
async def test_lowercase_bearer_scheme_is_accepted(gateway):
    client = raw_client(
        gateway, None, headers={"Authorization": f"bearer {gateway.token('alice')}"}
    )
    assert (await client.connect())["userId"] == "alice"


@pytest.mark.asyncio
async def test_header_wins_over_query_and_cookie(gateway):
    # Valid header, a different user's token in the query string and cookie.
    bob = gateway.token("bob")
    url = gateway.url("chat") + f"?token={bob}"
    client = Client(url, gateway.token("alice"), headers={"Cookie": f"access_token={bob}"})
    gateway.clients.append(client)
    assert (await client.connect())["userId"] == "alice"

    # A bad header is not rescued by a good query token: first found wins.
    client = Client(
        url, gateway.token("alice"), token_in="query",
        headers={"Authorization": "Bearer not-a-jwt"},
    )  # fmt: skip
    gateway.clients.append(client)
    exc = await refused(client)
    assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)


@pytest.mark.asyncio
async def test_query_wins_over_cookie(gateway):
    url = gateway.url("chat") + f"?token={gateway.token('carol')}"
    client = Client(url, None, headers={"Cookie": f"access_token={gateway.token('dave')}"})
    gateway.clients.append(client)
    assert (await client.connect())["userId"] == "carol"


# -- refusals -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_missing_token(gateway):
    exc = await refused(raw_client(gateway, None))
    assert exc.code == "UNAUTHORIZED"
    assert exc.close_code == 4401
    assert gateway.node.hub.connections == {}


@pytest.mark.asyncio
@pytest.mark.parametrize("token_in", ["header", "query", "cookie"])
async def test_malformed_token(gateway, token_in):
    exc = await refused(raw_client(gateway, "definitely.not.a-jwt", token_in=token_in))
    assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)


@pytest.mark.asyncio
async def test_wrong_secret(gateway, caplog):
    token = jwt.encode(_claims(), "some-other-secret-that-is-long-enough!", algorithm="HS256")
    with caplog.at_level(logging.DEBUG):
        exc = await refused(raw_client(gateway, token))
    assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)
    # Neither the client's error nor the server's log repeats the token.
    assert token not in exc.message and token not in json.dumps(exc.details)
    assert "refused chat connection" in caplog.text
    assert token not in caplog.text
    assert token.split(".")[2] not in caplog.text


@pytest.mark.asyncio
async def test_expired_token(gateway):
    exc = await refused(raw_client(gateway, gateway.token("alice", ttl_secs=-30)))
    assert exc.code == "TOKEN_EXPIRED"
    assert exc.close_code == 4401


@pytest.mark.asyncio
async def test_missing_exp_is_refused(gateway):
    claims = _claims()
    del claims["exp"]
    token = jwt.encode(claims, gateway.config.jwt_secret, algorithm="HS256")
    exc = await refused(raw_client(gateway, token))
    assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)


@pytest.mark.asyncio
async def test_missing_sub_is_refused(gateway):
    claims = _claims()
    del claims["sub"]
    token = jwt.encode(claims, gateway.config.jwt_secret, algorithm="HS256")
    exc = await refused(raw_client(gateway, token))
    assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)


@pytest.mark.asyncio
async def test_not_yet_valid_token_is_refused(gateway):
    token = jwt.encode(
        _claims(nbf=int(time.time()) + 600), gateway.config.jwt_secret, algorithm="HS256"
    )
    exc = await refused(raw_client(gateway, token))
    assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)


@pytest.mark.asyncio
async def test_alg_none_is_refused(gateway):
    token = hand_made_token({"alg": "none", "typ": "JWT"}, _claims(), None)
    assert token.endswith(".")
    exc = await refused(raw_client(gateway, token))
    assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)
    # Same with the signature of a valid token glued on.
    valid_sig = gateway.token("mallory").split(".")[2]
    exc = await refused(raw_client(gateway, token + valid_sig))
    assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)


# -- asymmetric keys ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rs256_happy_path(gateway_factory, rsa_files):
    path, _public_pem, private_pem = rsa_files
    gw = await gateway_factory(jwt_public_key=path)
    token = mint_token(gw.config, "alice", private_key=private_pem, algorithm="RS256")
    client = await gw.connect("alice", token=token)
    assert client.welcome["userId"] == "alice"
    # The HS256 development secret no longer opens the door.
    hs = mint_token(gw.config, "alice")
    exc = await refused(raw_client(gw, hs))
    assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)


@pytest.mark.asyncio
async def test_es256_happy_path(gateway_factory, tmp_path, ec_key):
    path = tmp_path / "ec_public.pem"
    path.write_text(_pem_public(ec_key))
    gw = await gateway_factory(jwt_public_key=str(path))
    token = mint_token(gw.config, "erin", private_key=_pem_private(ec_key), algorithm="ES256")
    client = await gw.connect("erin", token=token)
    assert client.welcome["userId"] == "erin"


@pytest.mark.asyncio
async def test_rs256_token_signed_by_another_key_is_refused(gateway_factory, rsa_files):
    path, _, _ = rsa_files
    gw = await gateway_factory(jwt_public_key=path)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = mint_token(gw.config, "alice", private_key=_pem_private(other), algorithm="RS256")
    exc = await refused(raw_client(gw, token))
    assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)


@pytest.mark.asyncio
async def test_algorithm_confusion_hs256_with_public_key_is_refused(gateway_factory, rsa_files):
    path, public_pem, _ = rsa_files
    gw = await gateway_factory(jwt_public_key=path)
    # The classic attack: HMAC-sign with the (public!) RSA key as the secret.
    for pem in (public_pem, public_pem.strip()):
        token = hand_made_token({"alg": "HS256", "typ": "JWT"}, _claims(), pem.encode())
        exc = await refused(raw_client(gw, token))
        assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)


# -- issuer and audience -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_issuer_and_audience_checked_when_configured(gateway_factory):
    gw = await gateway_factory(jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    secret = gw.config.jwt_secret
    # mint_token stamps the configured iss/aud: accepted.
    ok = await gw.connect("alice")
    assert ok.welcome["userId"] == "alice"

    cases = {
        "wrong issuer": _claims(iss="https://evil.example.com", aud=AUDIENCE),
        "wrong audience": _claims(iss=ISSUER, aud="someone-else"),
        "missing issuer": _claims(aud=AUDIENCE),
        "missing audience": _claims(iss=ISSUER),
    }
    for label, claims in cases.items():
        token = jwt.encode(claims, secret, algorithm="HS256")
        exc = await refused(raw_client(gw, token))
        assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401), label

    # An audience list that contains ours is fine.
    token = jwt.encode(_claims(iss=ISSUER, aud=["other", AUDIENCE]), secret, algorithm="HS256")
    assert (await raw_client(gw, token).connect())["userId"] == "mallory"


@pytest.mark.asyncio
async def test_aud_claim_ignored_when_no_audience_configured(gateway):
    # Tokens from an identity provider usually carry aud; without a configured
    # audience the server has nothing to compare it with and must not refuse.
    token = jwt.encode(
        _claims(aud="some-api", iss="https://idp.example"),
        gateway.config.jwt_secret,
        algorithm="HS256",
    )
    assert (await raw_client(gateway, token).connect())["userId"] == "mallory"


# -- bans and users ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_banned_user_is_refused(gateway):
    await gateway.node.db.run(
        "test", lambda: Ban.create(user_id="mallory", reason="spam", banned_by="admin")
    )
    exc = await refused(gateway.client("mallory"))
    assert exc.code == "BANNED"
    assert exc.close_code == 4403
    assert exc.details.get("reason") == "spam"
    assert gateway.node.hub.connections == {}
    # Others are unaffected.
    assert (await gateway.connect("alice")).welcome["userId"] == "alice"


@pytest.mark.asyncio
async def test_expired_ban_does_not_block(gateway):
    expired = utcnow() - dt.timedelta(hours=1)
    await gateway.node.db.run(
        "test",
        lambda: Ban.create(user_id="mallory", reason="spam", banned_by="admin", expires_at=expired),
    )
    client = await gateway.connect("mallory")
    assert client.welcome["userId"] == "mallory"


@pytest.mark.asyncio
async def test_refused_connections_release_their_slot(gateway_factory):
    # A banned user's attempts must not eat the connection limit.
    gw = await gateway_factory(max_connections_per_user=1)
    await gw.node.db.run(
        "test", lambda: Ban.create(user_id="mallory", reason="spam", banned_by="admin")
    )
    for _ in range(3):
        exc = await refused(gw.client("mallory"))
        assert exc.code == "BANNED"
    await gw.node.db.run("test", lambda: Ban.delete().where(Ban.user_id == "mallory").execute())
    assert (await gw.connect("mallory")).welcome["userId"] == "mallory"


@pytest.mark.asyncio
async def test_user_upserted_from_claims(gateway):
    token = gateway.token(
        "alice", roles=("user", "admin"), name="alice_w", display_name="Alice Wonder"
    )
    client = await gateway.connect("alice", token=token)
    assert client.welcome["user"] == {
        "userId": "alice",
        "username": "alice_w",
        "displayName": "Alice Wonder",
        "roles": ["admin", "user"],
    }
    row = await gateway.node.db.run("test", lambda: User.get_by_id("alice"))
    assert (row.username, row.display_name) == ("alice_w", "Alice Wonder")
    assert set(row.roles.split(",")) == {"admin", "user"}
    first_seen = row.created_at

    # The next connect updates the row from the new claims, keeping created_at.
    token = gateway.token("alice", name="alice_w", display_name="Alice W.")
    await gateway.connect("alice", token=token)
    row = await gateway.node.db.run("test", lambda: User.get_by_id("alice"))
    assert row.display_name == "Alice W."
    assert row.roles == "user"
    assert row.created_at == first_seen
    assert row.last_seen_at >= first_seen


# -- expiry and refresh ----------------------------------------------------------------------

SHORT_TTL = 3


@pytest.mark.asyncio
async def test_expiring_then_refresh_keeps_connection_open(gateway):
    token = gateway.token("alice", ttl_secs=SHORT_TTL)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    client = await gateway.connect("alice", token=token)

    warning = await client.next_event("auth:expiring", timeout=SHORT_TTL + 1)
    arrived = time.time()
    assert arrived < exp
    expires_in = warning["data"]["expiresIn"]
    assert 0 < expires_in <= SHORT_TTL
    assert abs((arrived + expires_in) - exp) < 0.5

    fresh = gateway.token("alice", ttl_secs=3600)
    new_exp = jwt.decode(fresh, options={"verify_signature": False})["exp"]
    ack = await client.refresh_token(fresh)
    expires_at = dt.datetime.strptime(ack["expiresAt"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert abs(expires_at.replace(tzinfo=dt.UTC).timestamp() - new_exp) < 0.01

    # Past the old exp the connection is still open and working. A real-clock
    # wait: the old token's expiry timer would fire at exp, and no event says
    # "a timer did not fire" (the 0.7 s margin covers the timer's lateness).
    await asyncio.sleep(max(0.0, exp - time.time()) + 0.7)
    await assert_no_event(client, "system:error")
    assert client.connected and client.close_code is None
    assert "serverTime" in await client.emit("system:ping", {})
    await assert_no_event(client, "auth:expiring", ping=False)


@pytest.mark.asyncio
async def test_refresh_with_other_users_token_is_unauthorized(gateway):
    client = await gateway.connect("alice")
    with pytest.raises(ClientError) as info:
        await client.emit("auth:refresh", {"token": gateway.token("bob")})
    assert info.value.code == "UNAUTHORIZED"
    # A failed refresh is an answer, not a disconnect.
    assert "serverTime" in await client.emit("system:ping", {})

    with pytest.raises(ClientError) as info:
        await client.emit("auth:refresh", {"token": "garbage"})
    assert info.value.code == "UNAUTHORIZED"
    with pytest.raises(ClientError) as info:
        await client.emit("auth:refresh", {"token": gateway.token("alice", ttl_secs=-5)})
    assert info.value.code == "TOKEN_EXPIRED"
    with pytest.raises(ClientError) as info:
        await client.emit("auth:refresh", {})
    assert info.value.code == "VALIDATION_ERROR"
    assert "token" in info.value.details
    assert client.connected


@pytest.mark.asyncio
async def test_refresh_with_another_users_token_keeps_old_expiry(gateway):
    token = gateway.token("alice", ttl_secs=SHORT_TTL)
    client = await gateway.connect("alice", token=token)
    with pytest.raises(ClientError):
        await client.emit("auth:refresh", {"token": gateway.token("bob", ttl_secs=3600)})
    error = await client.next_event("system:error", timeout=SHORT_TTL + 1)
    assert error["data"]["code"] == "TOKEN_EXPIRED"
    code, _ = await client.wait_closed(timeout=2)
    assert code == 4401


@pytest.mark.asyncio
async def test_unrefreshed_connection_closed_at_expiry(gateway):
    token = gateway.token("alice", ttl_secs=SHORT_TTL)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    client = await gateway.connect("alice", token=token)
    peer = await gateway.connect("bob")

    code, _reason = await client.wait_closed(timeout=SHORT_TTL + 2)
    closed_at = time.time()
    assert code == 4401
    assert closed_at >= exp - 0.05
    assert closed_at < exp + 1.0
    names = [f["event"] for f in client.events]
    assert "auth:expiring" in names and "system:error" in names
    assert names.index("auth:expiring") < names.index("system:error")
    error = next(f for f in client.events if f["event"] == "system:error")
    assert error["data"]["code"] == "TOKEN_EXPIRED"
    assert error is client.events[-1]  # nothing after the error: it precedes the close
    # Another user's connection is untouched.
    assert "serverTime" in await peer.emit("system:ping", {})


# -- auth frame (no token in the handshake) ---------------------------------------------------


async def bare_socket(gw: Any, namespace: str = "chat") -> WebSocketClientConnection:
    """An upgraded socket whose handshake carries no token at all."""
    return await websocket_connect(f"ws://127.0.0.1:{gw.port}/ws/{namespace}")


async def frames_until_close(conn: WebSocketClientConnection) -> list[dict[str, Any]]:
    """Every frame the server sends until it closes the socket (waits on the close)."""
    frames = []
    async with asyncio.timeout(10):
        while (raw := await conn.read_message()) is not None:
            frames.append(json.loads(raw))
    return frames


def refusal(frames: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [f["data"] for f in frames if f.get("event") == "system:error"]
    assert len(errors) == 1, frames
    assert not any(f.get("event") == "system:welcome" for f in frames), frames
    return errors[0]


def auth_failures(gw: Any, reason: str) -> float:
    labels = {"reason": reason}
    return gw.node.registry.get_sample_value("switchboard_auth_failures_total", labels) or 0.0


@pytest.mark.asyncio
async def test_auth_frame_connects_and_chats(gateway):
    alice = raw_client(gateway, gateway.token("alice"), token_in="frame")
    welcome = await alice.connect()
    assert (welcome["userId"], welcome["namespace"]) == ("alice", "chat")
    bob = await gateway.connect("bob")
    await alice.emit("room:create", {"roomId": "lobby", "name": "Lobby"})
    await alice.emit("room:join", {"roomId": "lobby"})
    await bob.emit("room:join", {"roomId": "lobby"})
    await alice.emit("message:send", {"roomId": "lobby", "content": "no token in my URL"})
    frame = await bob.next_event("message:new")
    assert frame["data"]["message"]["content"] == "no token in my URL"
    assert frame["data"]["message"]["senderId"] == "alice"


@pytest.mark.asyncio
async def test_auth_frame_with_an_ack_is_acked_with_the_welcome(gateway):
    conn = await bare_socket(gateway)
    token = gateway.token("alice")
    await conn.write_message(
        json.dumps({"event": "auth:connect", "data": {"token": token}, "ack": 7})
    )
    welcome = json.loads(await conn.read_message())
    ack = json.loads(await conn.read_message())
    assert welcome["event"] == "system:welcome"
    assert ack == {"ack": 7, "ok": True, "data": welcome["data"]}
    await conn.write_message(json.dumps({"event": "system:ping", "data": {}, "ack": 8}))
    assert json.loads(await conn.read_message())["ack"] == 8
    conn.close()


@pytest.mark.asyncio
async def test_no_auth_frame_closes_4401_after_the_timeout(gateway_factory):
    gw = await gateway_factory(auth_timeout=0.5)
    before = auth_failures(gw, "unauthorized")
    started = time.monotonic()
    conn = await bare_socket(gw)
    # Waiting for its frame, the connection is in no hub and no gauge.
    assert gw.node.hub.connections == {}
    assert gw.node.registry.get_sample_value("switchboard_connections", {"namespace": "chat"}) in (
        None,
        0.0,
    )
    error = refusal(await frames_until_close(conn))
    assert time.monotonic() - started >= 0.5
    assert (error["code"], error["message"]) == ("UNAUTHORIZED", "Authentication timed out")
    assert conn.close_code == 4401
    assert auth_failures(gw, "unauthorized") == before + 1


OTHER_EVENT = "Expected auth:connect as the first frame"
NO_TOKEN = "auth:connect needs data.token (a string)"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("first_frame", "message"),
    [
        ({"event": "system:ping", "data": {}}, OTHER_EVENT),
        ({"event": "auth:refresh", "data": {"token": "x"}}, OTHER_EVENT),
        ({"event": "auth:connect", "data": {}}, NO_TOKEN),
        ({"event": "auth:connect", "data": {"token": 42}}, NO_TOKEN),
        ("not json at all", "Expected an auth:connect frame"),
        (b"\x00binary", "Authentication frame is binary"),
        # Refused unparsed: over MAX_AUTH_FRAME_BYTES (16 KiB), under the 64 KiB frame limit.
        ({"event": "auth:connect", "data": {"token": "x" * (17 * 1024)}},
         "Authentication frame is over 16384 bytes"),
    ],
    ids=["other-event", "auth-refresh", "no-token", "token-not-a-string", "not-json", "binary",
         "oversized"],
)  # fmt: skip
async def test_any_other_first_frame_is_refused_with_4401(gateway, first_frame, message):
    conn = await bare_socket(gateway)
    if isinstance(first_frame, dict):
        first_frame = json.dumps(first_frame)
    await conn.write_message(first_frame, binary=isinstance(first_frame, bytes))
    error = refusal(await frames_until_close(conn))
    assert (error["code"], error["message"]) == ("UNAUTHORIZED", message)
    assert conn.close_code == 4401
    assert gateway.node.hub.connections == {}


@pytest.mark.asyncio
async def test_no_second_chance_after_a_wrong_first_frame(gateway):
    conn = await bare_socket(gateway)
    await conn.write_message(json.dumps({"event": "system:ping", "data": {}}))
    auth = {"event": "auth:connect", "data": {"token": gateway.token("alice")}}
    await conn.write_message(json.dumps(auth))
    error = refusal(await frames_until_close(conn))
    assert (error["code"], error["message"]) == ("UNAUTHORIZED", OTHER_EVENT)
    assert conn.close_code == 4401


@pytest.mark.asyncio
async def test_room_join_before_auth_does_nothing(gateway):
    alice = await gateway.connect("alice")
    await alice.emit("room:create", {"roomId": "lobby", "name": "Lobby"})
    await alice.emit("room:join", {"roomId": "lobby"})
    conn = await bare_socket(gateway)
    join = {"event": "room:join", "data": {"roomId": "lobby"}, "ack": 1}
    await conn.write_message(json.dumps(join))
    frames = await frames_until_close(conn)
    # Its ack is a refusal, then the connection-level error and the close.
    acks = [f for f in frames if "ack" in f]
    assert len(acks) == 1 and acks[0]["ok"] is False, frames
    assert acks[0]["error"]["code"] == refusal(frames)["code"] == "UNAUTHORIZED"
    assert conn.close_code == 4401
    await assert_no_event(alice, "room:user_joined")
    members = await alice.emit("room:members", {"roomId": "lobby"})
    assert [m["userId"] for m in members["members"]] == ["alice"]


@pytest.mark.asyncio
async def test_expired_token_in_the_auth_frame(gateway):
    exc = await refused(raw_client(gateway, gateway.token("alice", ttl_secs=-30), token_in="frame"))
    assert (exc.code, exc.close_code) == ("TOKEN_EXPIRED", 4401)
    assert auth_failures(gateway, "token_expired") == 1


@pytest.mark.asyncio
async def test_badly_signed_token_in_the_auth_frame_is_counted_for_its_subject(gateway):
    forged = jwt.encode(_claims("ghost"), "some-other-secret-that-is-long-enough!", "HS256")
    exc = await refused(raw_client(gateway, forged, token_in="frame"))
    assert (exc.code, exc.close_code) == ("UNAUTHORIZED", 4401)
    assert exc.details == {"reason": "InvalidSignatureError"}
    # Like a refused handshake: one failure towards the security alert for that sub.
    assert gateway.node.security.auth_failures.count("ghost", time.monotonic()) == 1


@pytest.mark.asyncio
async def test_auth_frame_with_a_user_token_for_the_admin_namespace_is_forbidden(gateway):
    client = Client(gateway.url("admin"), gateway.token("alice"), token_in="frame")
    gateway.clients.append(client)
    exc = await refused(client)
    assert (exc.code, exc.close_code) == ("FORBIDDEN", 4403)
    admin = Client(gateway.url("admin"), gateway.token("root", ("admin",)), token_in="frame")
    gateway.clients.append(admin)
    assert (await admin.connect())["namespace"] == "admin"


@pytest.mark.asyncio
async def test_shutdown_closes_sockets_still_waiting_for_their_auth_frame(gateway_factory):
    gw = await gateway_factory(auth_timeout=60)
    conn = await bare_socket(gw)
    await eventually(lambda: len(gw.node.state.awaiting_auth) == 1, timeout=10,
                     what="the socket waiting for its auth frame")  # fmt: skip
    stopping = asyncio.ensure_future(gw.node.stop(grace_secs=5.0))
    frames = await frames_until_close(conn)  # well before the 60 s auth timeout
    assert [f.get("event") for f in frames] == ["system:disconnect"]
    assert frames[0]["data"] == {"reason": "server_shutdown", "reconnect": True}
    assert conn.close_code == 1001
    await stopping
    assert gw.node.state.awaiting_auth == set()
