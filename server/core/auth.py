"""JWT verification and minting.

Tokens are checked against exactly the algorithms configured (HS256 with a
shared secret by default, or RS256/ES256 with a public key), which rules out
``alg: none`` and the HS/RS confusion attack: a token's own header never
chooses the key type. ``exp`` and ``sub`` are required; ``iss``/``aud`` are
checked when configured. Claims are then checked for shape and range:
``exp``/``iat``/``nbf`` are finite numbers no further than
:data:`MAX_TOKEN_HORIZON_SECS` ahead, the lifetime is bounded by
``SWITCHBOARD_JWT_MAX_TTL`` when set, and ``roles`` is a string or a list of
strings; anything else is ``Unauthorized`` with a ``reason``.

Example::

    verifier = TokenVerifier(config)
    identity = verifier.verify(token)   # raises Unauthorized / TokenExpired
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt

from server.core.config import Config
from server.core.errors import TokenExpired, Unauthorized

ROLES = ("user", "moderator", "admin", "service", "logs")

#: Furthest into the future a time claim may lie. A later ``exp`` is no real
#: expiry, and past year 9999 it overflows datetime and the event loop's timers.
MAX_TOKEN_HORIZON_SECS = 10 * 365 * 24 * 3600

# C0 and C1 control characters: refused in ``sub``, dropped from names.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

# Time claims checked for range, with the reason a client sees when one is out of it.
_TIME_CLAIMS = {"exp": "InvalidExpiry", "iat": "InvalidIssuedAt", "nbf": "InvalidNotBefore"}


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection or request is, from the token's claims."""

    user_id: str
    username: str
    display_name: str
    roles: frozenset[str]
    expires_at: float

    def has_any(self, roles: Iterable[str]) -> bool:
        return not self.roles.isdisjoint(roles)

    @property
    def is_staff(self) -> bool:
        return self.has_any(("admin", "moderator"))

    def public(self) -> dict[str, Any]:
        return {
            "userId": self.user_id,
            "username": self.username,
            "displayName": self.display_name,
            "roles": sorted(self.roles),
        }


class TokenVerifier:
    """Checks tokens with the configured key, algorithms, issuer and audience."""

    def __init__(self, config: Config) -> None:
        self._algorithms = list(config.jwt_algorithms)
        self._key = config.jwt_public_key or config.jwt_secret
        self._issuer = config.jwt_issuer
        self._audience = config.jwt_audience
        self._max_ttl = config.jwt_max_ttl

    def verify(self, token: str | None) -> Identity:
        if not token:
            raise Unauthorized("Missing token")
        options: Any = {"require": ["exp", "sub"], "verify_aud": bool(self._audience)}
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired() from None
        except jwt.InvalidTokenError as exc:
            # The reason class name is safe to show; the token itself never is.
            raise Unauthorized("Invalid token", {"reason": type(exc).__name__}) from None
        now = time.time()
        check_time_claims(claims, now)
        if self._max_ttl is not None:
            lifetime = claims["exp"] - claims.get("iat", now)
            if lifetime > self._max_ttl:
                raise Unauthorized(
                    f"Token lifetime exceeds the maximum of {self._max_ttl:g} s",
                    {"reason": "TokenLifetimeTooLong"},
                )
        return identity_from_claims(claims)


def check_time_claims(claims: dict[str, Any], now: float) -> None:
    """``exp`` (and ``iat``/``nbf`` when present) are finite numbers from 1970 to now + 10 years.

    pyjwt accepts anything ``int()`` takes (``"123"``, ``1e20``); the rest of
    the gateway turns ``exp`` into timers and ISO dates, which need a sane number.
    """
    latest = now + MAX_TOKEN_HORIZON_SECS
    for claim, reason in _TIME_CLAIMS.items():
        if claim not in claims:
            continue
        value = claims[claim]
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or not 0 <= value <= latest
        ):
            raise Unauthorized("Invalid token", {"reason": reason})


_USER_ONLY = frozenset({"user"})
_ROLE_SETS: dict[frozenset[str], frozenset[str]] = {}


def parse_roles(raw: Any) -> frozenset[str]:
    """The known roles a ``roles`` claim grants: a list of strings, or one string.

    A missing/null claim, an empty list or only unknown names mean ``user``.
    Unknown names are dropped (they grant nothing and would only bloat the
    stored user row). Any other shape, such as a map ``{"admin": false}``
    whose keys must not count as roles, refuses the token.
    """
    if raw is None:
        names: list[Any] = []
    elif isinstance(raw, str):
        names = [raw]
    elif isinstance(raw, list) and all(isinstance(r, str) for r in raw):
        names = raw
    else:
        raise Unauthorized("Invalid token", {"reason": "InvalidRoles"})
    granted = frozenset(r for r in names if r in ROLES) or _USER_ONLY
    # One shared set per combination (at most 2**len(ROLES)): every open
    # connection's identity holds one, and a frozenset is ~200 bytes.
    return _ROLE_SETS.setdefault(granted, granted)


def identity_from_claims(claims: dict[str, Any]) -> Identity:
    sub = claims.get("sub")
    if (
        not isinstance(sub, str) or not sub or len(sub) > 128
        or _CONTROL.search(sub)  # a NUL would fail the user upsert on PostgreSQL
    ):  # fmt: skip
        raise Unauthorized("Invalid token", {"reason": "InvalidSubject"})
    roles = parse_roles(claims.get("roles"))
    name = _printable(claims.get("name"))
    username = name if name else sub
    display = _printable(claims.get("displayName"))
    return Identity(
        user_id=sub,
        username=username[:64],
        display_name=(display if isinstance(display, str) and display else username)[:128],
        roles=roles,
        expires_at=float(claims["exp"]),
    )


def _printable(value: Any) -> str | None:
    """A name claim without its control characters (None unless a string)."""
    return _CONTROL.sub("", value) if isinstance(value, str) else None


def mint_token(
    config: Config,
    user_id: str,
    *,
    roles: Iterable[str] = ("user",),
    ttl_secs: float = 3600,
    name: str | None = None,
    display_name: str | None = None,
    private_key: str | None = None,
    algorithm: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Sign a token for ``user_id`` with the configured secret (or ``private_key``)."""
    now = int(time.time())
    exp = now + ttl_secs
    claims: dict[str, Any] = {
        "sub": user_id,
        "name": name or user_id,
        "displayName": display_name or name or user_id,
        "roles": list(roles),
        "iat": now,
        # An integer NumericDate when the ttl is whole (``--ttl 60`` arrives as
        # 60.0): "exp": 1700000060.0 breaks consumers that parse it as int64.
        "exp": int(exp) if float(exp).is_integer() else exp,
    }
    if config.jwt_issuer:
        claims["iss"] = config.jwt_issuer
    if config.jwt_audience:
        claims["aud"] = config.jwt_audience
    claims.update(extra or {})
    if private_key is not None:
        return jwt.encode(claims, private_key, algorithm=algorithm or "RS256")
    return jwt.encode(claims, config.jwt_secret, algorithm=algorithm or "HS256")
