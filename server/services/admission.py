"""Who may connect or call: token, client address, roles, connection limits, bans.

Both surfaces admit here. A WebSocket handler reads the token
(:func:`handshake_token`) and the peer's address (:meth:`Admission.client_ip`),
then calls :meth:`Admission.verify`, :func:`require_roles` and
:meth:`Admission.enter` (connection limits, the batched user upsert and ban
check) and keeps the returned :class:`Seat` until the connection closes. A
REST handler calls :meth:`Admission.bearer` once per request: the same token
reading, verification, failure accounting and roles, with the ban read per
request. Every refusal is a :class:`~server.core.errors.GatewayError`.

Example::

    admission = Admission(verifier, limiter, connects, db, security, config.trusted_proxies)
    identity = admission.verify(token)
    require_roles(identity, frozenset({"admin"}))
    seat, info = await admission.enter(identity, "chat", admission.client_ip(peer, forwarded))
    ...
    await seat.release()   # when the connection closes
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from models import chat as chat_db
from models import moderation as mod_db
from server.core import errors
from server.core.auth import Identity, TokenVerifier
from server.core.limits import ConnectionLimiter
from server.services.security import SecurityMonitor
from server.store.batch import Batcher
from server.store.db import Database

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# auth:expiring goes out this long before exp (or at half the remaining time).
AUTH_EXPIRY_WARNING_SECS = 60.0


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <jwt>`` header value; None without one."""
    if authorization[:7].lower() != "bearer ":
        return None
    return authorization[7:].strip() or None


def handshake_token(authorization: str, query: str | None, cookie: str | None) -> str | None:
    """A WebSocket handshake's token: the Bearer header, else ``?token=``, else the cookie.

    A Bearer header, even an empty one, is the client's choice: the other
    places are not consulted then. None means the token will come in the
    first frame (``auth:connect``).
    """
    if authorization[:7].lower() == "bearer ":
        return bearer_token(authorization)
    return query or cookie


def client_ip(peer: str, forwarded: str | None, trusted: Iterable[Network]) -> str:
    """The client's address: ``peer``, or from ``X-Forwarded-For`` when ``peer`` is a trusted proxy.

    The header is walked from the nearest hop outwards; the first address
    that is not a trusted proxy is the client (a client can prepend anything,
    so only the hops our proxies added count).
    """
    proxies = tuple(trusted)
    if not proxies or not forwarded or not _in_networks(peer, proxies):
        return peer
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in_networks(hop, proxies):
            return hop
    return hops[0] if hops else peer


def require_roles(
    identity: Identity,
    roles: frozenset[str] | None,
    message: str = "Needs one of the roles {roles}",
) -> None:
    """FORBIDDEN unless ``identity`` holds one of ``roles`` (None: any role will do).

    ``message`` may name the roles with ``{roles}`` (comma-separated, sorted).
    """
    if roles is not None and not identity.has_any(roles):
        raise errors.Forbidden(message.format(roles=", ".join(sorted(roles))))


def expiry_delays(expires_at: float, now: float) -> tuple[float, float]:
    """Seconds until ``auth:expiring`` and until the close, for a token expiring at ``expires_at``.

    The warning leads the expiry by :data:`AUTH_EXPIRY_WARNING_SECS`, or by
    half the remaining time when less than twice that is left.
    """
    remaining = expires_at - now
    warn_in = remaining - min(AUTH_EXPIRY_WARNING_SECS, remaining / 2)
    return max(0.0, warn_in), max(0.0, remaining)


class Seat:
    """A connection's place in the connection limits, released once when it closes."""

    def __init__(self, limiter: ConnectionLimiter, user_id: str, namespace: str, ip: str) -> None:
        self._limiter = limiter
        self._key = (user_id, namespace, ip)
        self._held = True

    async def release(self) -> None:
        """Give the place back; later calls do nothing."""
        if self._held:
            self._held = False
            await self._limiter.release(*self._key)


class Admission:
    """The node's admission rules, shared by the socket handlers and the REST API."""

    def __init__(
        self,
        verifier: TokenVerifier,
        limiter: ConnectionLimiter,
        connects: Batcher[chat_db.ConnectRequest, chat_db.ConnectInfo],
        db: Database,
        security: SecurityMonitor,
        trusted_proxies: Iterable[Network] = (),
    ) -> None:
        self.verifier = verifier
        self.limiter = limiter
        #: Group commit of connection admissions: user upserts, bans, member rooms.
        self.connects = connects
        self._db = db
        self._security = security
        self._trusted = tuple(trusted_proxies)

    def client_ip(self, peer: str, forwarded: str | None) -> str:
        """:func:`client_ip` with the node's trusted proxies."""
        return client_ip(peer, forwarded, self._trusted)

    def verify(self, token: str | None) -> Identity:
        """The token's identity; UNAUTHORIZED or TOKEN_EXPIRED when it is not valid."""
        return self.verifier.verify(token)

    def refused(self, token: str | None, exc: errors.GatewayError) -> None:
        """Account for a refusal: bad and expired tokens count towards a security alert.

        Counted per (unverified) ``sub``, so repeated failures alert the user
        and the admins; other refusals (roles, limits, bans) are not counted.
        """
        if isinstance(exc, errors.Unauthorized | errors.TokenExpired):
            self._security.auth_failed(token, exc.code)

    async def enter(
        self, identity: Identity, namespace: str, ip: str
    ) -> tuple[Seat, chat_db.ConnectInfo]:
        """Take a connection slot and record the user; TOO_MANY_CONNECTIONS, BANNED...

        The user upsert and ban check run in one transaction with the
        connections arriving alongside; a banned user's own outcome is BANNED,
        a database outage's SERVICE_UNAVAILABLE for the whole batch. On any
        failure the slot is given back before the error propagates.
        """
        exceeded = await self.limiter.acquire(identity.user_id, namespace, ip)
        if exceeded:
            limit = self.limiter.per_user if exceeded == "user" else self.limiter.per_ip
            raise errors.TooManyConnections(
                f"Too many connections per {exceeded}", {"limit": limit, "per": exceeded}
            )
        seat = Seat(self.limiter, identity.user_id, namespace, ip)
        try:
            info = await self.connects.submit(chat_db.ConnectRequest(
                identity.user_id, identity.username, identity.display_name,
                tuple(sorted(identity.roles)),
            ))  # fmt: skip
        except Exception:
            await seat.release()
            raise
        return seat, info

    async def bearer(self, authorization: str, roles: frozenset[str] | None) -> Identity:
        """The caller of a REST request from its ``Authorization`` header value.

        UNAUTHORIZED/TOKEN_EXPIRED (401) without a valid token (counted as
        :meth:`refused`), FORBIDDEN (403) without one of ``roles``, BANNED
        (403, details ``{reason, expiresAt}``) while the user has a ban in
        force. The ban is read per request (no cache): a ban or unban made on
        any node counts at once.
        """
        token = bearer_token(authorization)
        try:
            identity = self.verify(token)
        except errors.GatewayError as exc:
            self.refused(token, exc)
            raise
        require_roles(identity, roles)
        ban = await self._db.run("user.ban", mod_db.ban_in_force, identity.user_id)
        if ban is not None:
            raise errors.Banned(details=ban)
        return identity


def _in_networks(address: str, networks: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)
