"""The gateway's configuration: one frozen dataclass, built once.

Everything configurable comes from ``SWITCHBOARD_*`` environment variables
or the matching CLI flags (flags win). Nothing else in the code base reads
``os.environ``; components receive the :class:`Config` they need.

Example::

    config = Config.from_env(os.environ, port=0)
    node = Node(config)   # server/app.py: every component built from it
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENVIRONMENTS = ("development", "test", "production")

#: The secret development and test use when none is given. Production refuses it.
DEFAULT_JWT_SECRET = "switchboard-development-secret-change-me"

#: Shortest HS* secret production accepts, in bytes of its UTF-8 encoding
#: (RFC 7518 §3.2: a key at least as long as the hash output, 256 bits for HS256).
MIN_JWT_SECRET_BYTES = 32
#: The same rule for each HMAC algorithm: its hash output size.
MIN_JWT_SECRET_BYTES_BY_ALGORITHM = {"HS256": 32, "HS384": 48, "HS512": 64}

#: Host names that count as loopback without resolving anything. Any other
#: name, "0.0.0.0", "::" and every non-loopback address count as exposed:
#: a name may resolve to a public address, so only literals are trusted.
LOOPBACK_NAMES = frozenset({"localhost"})

#: Rate-limit classes every inbound event falls into.
RATE_LIMIT_CLASSES = ("messages", "joins", "typing", "other")

# Per-user limits per minute by environment: messages, joins, typing, other.
# Test values are low on purpose so the suite can reach them quickly.
_DEFAULT_RATE_LIMITS_PER_MIN = {
    "production": {"messages": 30, "joins": 10, "typing": 60, "other": 120},
    "development": {"messages": 60, "joins": 20, "typing": 120, "other": 300},
    "test": {"messages": 10, "joins": 5, "typing": 20, "other": 100},
}
# Bounds of SWITCHBOARD_AUTH_TIMEOUT: below half a second a slow mobile link
# cannot make it; above a minute an unauthenticated socket is held too long.
AUTH_TIMEOUT_MIN_SECS = 0.5
AUTH_TIMEOUT_MAX_SECS = 60.0
_DEFAULT_MAX_CONNECTIONS_PER_IP = {"production": 20, "development": 1000, "test": 1000}

#: TCP connections one address may hold on a node beyond its WebSockets
#: (``max_connections_per_ip``), for REST calls and their keep-alives: a browser
#: keeps up to 6 HTTP/1.1 connections per origin, so 32 covers several browsers
#: behind one address at once, and idle ones close after the header timeout.
TCP_HEADROOM_PER_IP = 32


#: Upper bound of SWITCHBOARD_WRITE_BATCH_MAX: one batch's multi-row insert
#: binds 11 parameters a message (an admission batch's upsert 6 a user), and
#: SQLite allows 32,766 per statement.
MAX_WRITE_BATCH = 2000


class ConfigError(ValueError):
    """The configuration is unusable; the message says which setting and why."""


@dataclass(frozen=True)
class RateLimit:
    """``count`` events per ``window_secs``, refilled continuously (token bucket)."""

    count: int
    window_secs: float

    def __str__(self) -> str:
        return f"{self.count}/{self.window_secs:g}s"


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Config:
    """Effective settings of one gateway node. Build with :meth:`from_env`."""

    env: str = "development"
    host: str = "127.0.0.1"
    port: int = 8080
    node_id: str = field(default_factory=_default_node_id)
    jwt_secret: str = DEFAULT_JWT_SECRET
    jwt_public_key: str | None = None  # PEM text, read from the file the setting names
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    # Longest token lifetime (exp - iat) accepted, in seconds; None: no bound.
    jwt_max_ttl: float | None = None
    database_url: str = "sqlite:///switchboard.db"
    # PostgreSQL worker threads (each with a pooled connection); 0 = one per core,
    # at least 2. More threads than cores adds event-loop lag (bench/db.py).
    db_workers: int = 0
    # Most message:send requests, and most connection admissions, one
    # transaction commits (server/store/batch.py); 1 turns group commit off: one
    # transaction per message and per connection, as before it.
    write_batch_max: int = 256
    redis_url: str | None = None
    redis_prefix: str = "switchboard"
    allowed_origins: tuple[str, ...] = ("*",)
    rate_limits: Mapping[str, RateLimit] = field(default_factory=dict)
    max_connections_per_user: int = 5
    max_connections_per_ip: int = 1000
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Open TCP connections per peer address on one node, checked at accept (before
    # any HTTP); 0: max_connections_per_ip + TCP_HEADROOM_PER_IP. Trusted proxies
    # are exempt. See tcp_connections_per_ip.
    max_tcp_connections_per_ip: int = 0
    # Seconds a connection gets to send a request's headers (from accept, or from
    # the previous response on keep-alive; idle connections close then) and again
    # to send its body. WebSockets, once upgraded, are governed by the heartbeat.
    header_timeout: float = 10.0
    max_message_bytes: int = 64 * 1024
    # Bytes queued for one connection before it counts as a slow consumer (4408).
    max_outbound_bytes: int = 1024 * 1024
    # Seconds a handshake without a token may take to send its auth:connect frame.
    auth_timeout: float = 5.0
    heartbeat_interval: float = 25.0
    heartbeat_timeout: float = 20.0
    metrics_interval: float = 5.0
    # Per-room metric series for the busiest N rooms only (0: none; keeps label sets bounded).
    metrics_room_series: int = 0
    log_buffer_size: int = 1000
    max_notifications_per_user: int = 100
    log_format: str = "text"
    log_level: str = "INFO"
    web_root: str | None = None

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    @property
    def exposed(self) -> bool:
        """True when the listener is reachable beyond this machine (see :func:`is_loopback`)."""
        return not is_loopback(self.host)

    @property
    def tcp_connections_per_ip(self) -> int:
        """The per-address TCP bound in force (``max_tcp_connections_per_ip`` or derived)."""
        return self.max_tcp_connections_per_ip or (
            self.max_connections_per_ip + TCP_HEADROOM_PER_IP
        )

    def rate_limit(self, bucket: str) -> RateLimit:
        return self.rate_limits[bucket]

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Config:
        """Read ``SWITCHBOARD_*`` variables, apply ``overrides`` (CLI flags), validate.

        ``overrides`` use field names (``port=0``); ``None`` values are ignored so
        argparse defaults can be passed straight through.

        Without ``SWITCHBOARD_ENV``/``env``, the environment is ``development``
        on a loopback host and ``production`` on any other: a node reachable
        from the network never gets development's public secret, wildcard
        origin and ``POST /dev/token`` unless the operator asks for them.
        """

        def get(name: str) -> str | None:
            value = environ.get(f"SWITCHBOARD_{name}")
            return value if value not in (None, "") else None

        host = overrides.get("host")
        if host is None:
            host = get("HOST") or cls.host
        env = overrides.get("env") or get("ENV")
        if env is None:
            env = "development" if is_loopback(host) else "production"
        if env not in ENVIRONMENTS:
            raise ConfigError(f"SWITCHBOARD_ENV must be one of {', '.join(ENVIRONMENTS)}")
        values: dict[str, Any] = {"env": env}
        strings = {
            "host": "HOST", "node_id": "NODE_ID", "jwt_secret": "JWT_SECRET",
            "jwt_issuer": "JWT_ISSUER", "jwt_audience": "JWT_AUDIENCE",
            "database_url": "DATABASE_URL", "redis_url": "REDIS_URL",
            "redis_prefix": "REDIS_PREFIX", "log_format": "LOG_FORMAT",
            "log_level": "LOG_LEVEL", "web_root": "WEB_ROOT",
        }  # fmt: skip
        for attr, name in strings.items():
            if (value := get(name)) is not None:
                values[attr] = value
        numbers: dict[str, tuple[str, type]] = {
            "port": ("PORT", int),
            "db_workers": ("DB_WORKERS", int),
            "write_batch_max": ("WRITE_BATCH_MAX", int),
            "max_connections_per_user": ("MAX_CONNECTIONS_PER_USER", int),
            "max_connections_per_ip": ("MAX_CONNECTIONS_PER_IP", int),
            "max_tcp_connections_per_ip": ("MAX_TCP_CONNECTIONS_PER_IP", int),
            "header_timeout": ("HEADER_TIMEOUT", float),
            "max_message_bytes": ("MAX_MESSAGE_BYTES", int),
            "max_outbound_bytes": ("MAX_OUTBOUND_BYTES", int),
            "jwt_max_ttl": ("JWT_MAX_TTL", float),
            "auth_timeout": ("AUTH_TIMEOUT", float),
            "heartbeat_interval": ("HEARTBEAT_INTERVAL", float),
            "heartbeat_timeout": ("HEARTBEAT_TIMEOUT", float),
            "metrics_interval": ("METRICS_INTERVAL", float),
            "metrics_room_series": ("METRICS_ROOM_SERIES", int),
            "log_buffer_size": ("LOG_BUFFER_SIZE", int),
            "max_notifications_per_user": ("MAX_NOTIFICATIONS_PER_USER", int),
        }
        for attr, (name, kind) in numbers.items():
            if (raw := get(name)) is not None:
                try:
                    values[attr] = kind(raw)
                except ValueError:
                    raise ConfigError(f"SWITCHBOARD_{name} must be a number, got {raw!r}") from None
        values.setdefault("max_connections_per_ip", _DEFAULT_MAX_CONNECTIONS_PER_IP[env])
        if (raw := get("JWT_ALGORITHMS")) is not None:
            values["jwt_algorithms"] = _split(raw)
        if (raw := get("ALLOWED_ORIGINS")) is not None:
            values["allowed_origins"] = _split(raw)
        if (raw := get("TRUSTED_PROXIES")) is not None:
            values["trusted_proxies"] = _parse_networks(raw)
        if (path := get("JWT_PUBLIC_KEY")) is not None:
            values["jwt_public_key"] = path
        values["rate_limits"] = get("RATE_LIMITS")

        for key, value in overrides.items():
            if value is not None:
                values[key] = value
        return cls._validated(values)

    @classmethod
    def _validated(cls, values: dict[str, Any]) -> Config:
        env = values["env"]
        limits = dict(_defaults_per_minute(env))
        raw_limits = values.pop("rate_limits", None)
        if isinstance(raw_limits, str):
            limits.update(parse_rate_limits(raw_limits))
        elif isinstance(raw_limits, Mapping):
            limits.update(raw_limits)
        values["rate_limits"] = limits

        if isinstance(values.get("allowed_origins"), str):
            values["allowed_origins"] = _split(values["allowed_origins"])
        if isinstance(values.get("jwt_algorithms"), str):
            values["jwt_algorithms"] = _split(values["jwt_algorithms"])
        if isinstance(values.get("trusted_proxies"), str):
            values["trusted_proxies"] = _parse_networks(values["trusted_proxies"])
        key_path = values.get("jwt_public_key")
        if key_path and not str(key_path).lstrip().startswith("-----BEGIN"):
            try:
                with open(key_path, encoding="ascii") as fh:
                    values["jwt_public_key"] = fh.read()
            except OSError as exc:
                msg = f"SWITCHBOARD_JWT_PUBLIC_KEY: cannot read {key_path}: {exc}"
                raise ConfigError(msg) from None
            if "jwt_algorithms" not in values or values["jwt_algorithms"] == ("HS256",):
                values["jwt_algorithms"] = ("RS256", "ES256")
        if "heartbeat_timeout" not in values and "heartbeat_interval" in values:
            values["heartbeat_timeout"] = min(20.0, float(values["heartbeat_interval"]))

        config = cls(**values)
        config._check()
        return config

    def _check(self) -> None:
        asymmetric = [a for a in self.jwt_algorithms if not a.startswith("HS")]
        if "none" in (a.lower() for a in self.jwt_algorithms):
            raise ConfigError("SWITCHBOARD_JWT_ALGORITHMS may not include 'none'")
        if asymmetric and any(a.startswith("HS") for a in self.jwt_algorithms):
            # Mixing families is how algorithm-confusion attacks start.
            raise ConfigError("SWITCHBOARD_JWT_ALGORITHMS may not mix HS* with RS*/ES*")
        if asymmetric and not self.jwt_public_key:
            raise ConfigError(f"{', '.join(asymmetric)} needs SWITCHBOARD_JWT_PUBLIC_KEY")
        if self.log_format not in ("text", "json"):
            raise ConfigError("SWITCHBOARD_LOG_FORMAT must be text or json")
        if not AUTH_TIMEOUT_MIN_SECS <= self.auth_timeout <= AUTH_TIMEOUT_MAX_SECS:
            raise ConfigError(
                f"SWITCHBOARD_AUTH_TIMEOUT must be between {AUTH_TIMEOUT_MIN_SECS:g} and "
                f"{AUTH_TIMEOUT_MAX_SECS:g} seconds, got {self.auth_timeout:g}"
            )
        if self.heartbeat_interval <= 0 or self.heartbeat_timeout <= 0:
            raise ConfigError("heartbeat interval and timeout must be positive")
        if self.jwt_max_ttl is not None and not 0 < self.jwt_max_ttl < math.inf:
            raise ConfigError("SWITCHBOARD_JWT_MAX_TTL must be a positive number of seconds")
        if not 1 <= self.write_batch_max <= MAX_WRITE_BATCH:
            raise ConfigError(
                f"SWITCHBOARD_WRITE_BATCH_MAX must be between 1 (no group commit) "
                f"and {MAX_WRITE_BATCH}"
            )
        if not self.header_timeout > 0:
            raise ConfigError("SWITCHBOARD_HEADER_TIMEOUT must be a positive number of seconds")
        if self.max_tcp_connections_per_ip < 0:
            raise ConfigError("SWITCHBOARD_MAX_TCP_CONNECTIONS_PER_IP must be 0 (derived) or more")
        if self.max_tcp_connections_per_ip and (
            self.max_tcp_connections_per_ip < self.max_connections_per_ip
        ):
            raise ConfigError(
                "SWITCHBOARD_MAX_TCP_CONNECTIONS_PER_IP must be at least "
                f"SWITCHBOARD_MAX_CONNECTIONS_PER_IP ({self.max_connections_per_ip}): "
                "every WebSocket is a TCP connection too"
            )
        if self.is_production:
            if not asymmetric and (not self.jwt_secret or self.jwt_secret == DEFAULT_JWT_SECRET):
                raise ConfigError(
                    "production refuses to start without SWITCHBOARD_JWT_SECRET "
                    "(the development default is public); set a long random secret"
                )
            minimum = max(
                (MIN_JWT_SECRET_BYTES_BY_ALGORITHM.get(a, MIN_JWT_SECRET_BYTES)
                 for a in self.jwt_algorithms), default=MIN_JWT_SECRET_BYTES,
            )  # fmt: skip
            if not asymmetric and len(self.jwt_secret.encode()) < minimum:
                raise ConfigError(
                    f"production refuses a SWITCHBOARD_JWT_SECRET shorter than "
                    f"{minimum} bytes for {', '.join(self.jwt_algorithms)}; set a long "
                    f"random secret (e.g. openssl rand -hex {minimum})"
                )
            if "*" in self.allowed_origins:
                raise ConfigError(
                    "production refuses a wildcard origin; set SWITCHBOARD_ALLOWED_ORIGINS "
                    "to the web app's origins, e.g. https://chat.example.com"
                )

    def public_view(self) -> dict[str, Any]:
        """Settings as a JSON-able dict with secrets masked, for logs and stats."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "jwt_secret":
                value = "***" if value else None
            elif f.name == "jwt_public_key":
                value = "(set)" if value else None
            elif f.name in ("database_url", "redis_url") and value:
                value = mask_url(value)
            elif f.name == "rate_limits":
                value = {k: str(v) for k, v in value.items()}
            elif f.name == "trusted_proxies":
                value = [str(n) for n in value]
            elif f.name == "max_tcp_connections_per_ip":
                value = self.tcp_connections_per_ip  # the bound in force, even when derived
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def is_loopback(host: str) -> bool:
    """Whether ``host`` is "localhost" or a literal loopback address (127.0.0.0/8, ::1).

    Nothing is resolved: a name other than "localhost" may point anywhere,
    and "0.0.0.0", "::" or "" listen on every interface, so all count as exposed.
    """
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _parse_networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(part, strict=False) for part in _split(raw))
    except ValueError as exc:
        raise ConfigError(f"SWITCHBOARD_TRUSTED_PROXIES: {exc}") from None


def _defaults_per_minute(env: str) -> dict[str, RateLimit]:
    return {k: RateLimit(v, 60.0) for k, v in _DEFAULT_RATE_LIMITS_PER_MIN[env].items()}


_WINDOW_UNITS_SECS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_rate_limits(raw: str) -> dict[str, RateLimit]:
    """Parse ``"messages=30/1m,joins=10/60s,typing=60/min"`` into limits.

    Each item is ``CLASS=COUNT/WINDOW``; the window is seconds, or a number
    with ``s``/``m``/``min``/``h``. Classes are those of ``RATE_LIMIT_CLASSES``.
    """
    limits: dict[str, RateLimit] = {}
    for item in _split(raw):
        try:
            name, spec = item.split("=", 1)
            count_s, window_s = spec.split("/", 1)
            name = name.strip()
            window_s = window_s.strip()
            unit = window_s.lstrip("0123456789.")
            number = window_s[: len(window_s) - len(unit)] or "1"
            window = float(number) * _WINDOW_UNITS_SECS[unit or "s"]
            count = int(count_s)
        except (ValueError, KeyError):
            raise ConfigError(
                f"SWITCHBOARD_RATE_LIMITS: cannot read {item!r} (want e.g. messages=30/1m)"
            ) from None
        if name not in RATE_LIMIT_CLASSES:
            raise ConfigError(
                f"SWITCHBOARD_RATE_LIMITS: unknown class {name!r} "
                f"(one of {', '.join(RATE_LIMIT_CLASSES)})"
            )
        if count <= 0 or window <= 0:
            raise ConfigError(f"SWITCHBOARD_RATE_LIMITS: {item!r} must be positive")
        limits[name] = RateLimit(count, window)
    return limits


def mask_url(url: str) -> str:
    """``postgresql://u:secret@h/db`` → ``postgresql://u:***@h/db``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"
