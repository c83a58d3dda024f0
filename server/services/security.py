"""Security alerts: repeated authentication failures and rate-limit abuse.

The socket handshake, the REST API and the log endpoints report refusals
here; :class:`SecurityMonitor` counts them per user id in a sliding window
and, when a user crosses the threshold, leaves a ``security`` notification
(type ``warning``, priority ``high``) for that user and for every admin
(SPEC §3 notification sources) — at most once per window per user.

Authentication failures are counted under the ``sub`` of the refused
token, read *without* verifying it (the signature was just found bad, or
the token expired). That claim is attacker-controlled, so it is only ever
a counting key: it grants nothing, the token itself is never logged or
stored, the affected user is notified only if the gateway already knows
them, and the number of alerts per window is capped node-wide so that
forged tokens for ever-new ids cannot flood the admins.

Memory stays bounded: each tracker keeps at most ``threshold`` timestamps
for at most ``MAX_TRACKED_USERS`` users, forgetting the least recently
seen first.

Example::

    security = SecurityMonitor(notifications, db, tasks, metrics)
    security.auth_failed(token, "UNAUTHORIZED")      # from a refused handshake
    security.rate_limited("bob", "messages")        # from a RATE_LIMITED answer
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from models import moderation as mod_db
from server.core.tasks import BackgroundTasks
from server.ops.metrics import SECURITY_ALERT_KINDS, Metrics
from server.services.notify import NotificationService
from server.store.db import Database

log = logging.getLogger("switchboard.security")

#: Refused handshakes / requests (bad or expired token) for one ``sub`` that
#: raise an alert when they happen within ``AUTH_FAILURE_WINDOW_SECS``.
AUTH_FAILURE_THRESHOLD = 5
AUTH_FAILURE_WINDOW_SECS = 300.0
#: ``RATE_LIMITED`` answers to one user that count as abuse within the window.
RATE_LIMIT_THRESHOLD = 20
RATE_LIMIT_WINDOW_SECS = 60.0
#: Users each tracker remembers; the least recently seen are forgotten first.
MAX_TRACKED_USERS = 10_000
#: Alerts of one kind per window, node-wide; further ones are only logged.
MAX_ALERTS_PER_WINDOW = 20
# A ``sub`` longer than this is not a user id the gateway would accept anyway.
MAX_SUBJECT_CHARS = 128


@dataclass(slots=True)
class _Trail:
    """Recent events of one user: the newest ``threshold`` times, and the last alert."""

    times: deque[float]
    alerted_at: float | None = None


class SlidingCounter:
    """Per-key event times in a sliding window, bounded in keys and in times per key.

    :meth:`hit` records one event and returns True exactly when the key has
    reached ``threshold`` events within ``window_secs`` and has not been
    reported within the last window.

    Example::

        counter = SlidingCounter(threshold=5, window_secs=300.0)
        if counter.hit("bob", time.monotonic()):
            ...  # alert once
    """

    def __init__(
        self, threshold: int, window_secs: float, max_keys: int = MAX_TRACKED_USERS
    ) -> None:
        self.threshold = threshold
        self.window_secs = window_secs
        self.max_keys = max_keys
        # Least recently seen first, so eviction pops from the front.
        self._trails: OrderedDict[str, _Trail] = OrderedDict()

    def hit(self, key: str, now: float) -> bool:
        trail = self._trails.get(key)
        if trail is None:
            trail = _Trail(deque(maxlen=self.threshold))
            self._trails[key] = trail
            while len(self._trails) > self.max_keys:
                self._trails.popitem(last=False)
        else:
            self._trails.move_to_end(key)
        trail.times.append(now)
        if len(trail.times) < self.threshold or now - trail.times[0] > self.window_secs:
            return False
        if trail.alerted_at is not None and now - trail.alerted_at < self.window_secs:
            return False
        trail.alerted_at = now
        return True

    def count(self, key: str, now: float) -> int:
        """Events of ``key`` within the window (at most ``threshold``)."""
        trail = self._trails.get(key)
        if trail is None:
            return 0
        return sum(1 for t in trail.times if now - t <= self.window_secs)

    def __len__(self) -> int:
        return len(self._trails)


def unverified_subject(token: str | None) -> str | None:
    """The ``sub`` claim of a token whose signature is NOT checked; None if unreadable.

    For counting failures only: nothing about the caller may be trusted from it.
    """
    if not token:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > MAX_SUBJECT_CHARS:
        return None
    return sub


class SecurityMonitor:
    """Counts refusals per user and raises ``security`` notifications (see module docstring).

    ``notifier`` may be None (a bare node in a tool): counting and logging go
    on, nobody is notified. Alerts are sent in background tasks; callers on
    the request path never wait for the database.
    """

    def __init__(
        self,
        notifier: NotificationService | None,
        db: Database,
        tasks: BackgroundTasks,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self.db = db
        self.tasks = tasks
        self.metrics = metrics
        self._clock = clock
        self.auth_failures = SlidingCounter(AUTH_FAILURE_THRESHOLD, AUTH_FAILURE_WINDOW_SECS)
        self.rate_limits = SlidingCounter(RATE_LIMIT_THRESHOLD, RATE_LIMIT_WINDOW_SECS)
        # Node-wide alert budget per kind (times of recent alerts).
        self._alerts: dict[str, deque[float]] = {
            kind: deque(maxlen=MAX_ALERTS_PER_WINDOW) for kind in SECURITY_ALERT_KINDS
        }

    def auth_failed(self, token: str | None, code: str) -> None:
        """A handshake or request was refused for a bad or expired token."""
        sub = unverified_subject(token)
        if sub is None:
            return  # no token, or not a JWT at all: nobody to count it against
        window = AUTH_FAILURE_WINDOW_SECS
        if not self._tripped(self.auth_failures, sub, "auth_failures", window):
            return
        log.warning(
            "security: %d failed authentications for user id %r within %d s (last: %s)",
            AUTH_FAILURE_THRESHOLD, sub, window, code,
        )  # fmt: skip
        data = {
            "kind": "auth_failures", "userId": sub, "failures": AUTH_FAILURE_THRESHOLD,
            "windowSeconds": int(window), "lastError": code,
        }  # fmt: skip
        self._alert(
            "auth_failures", sub, data,
            user_title="Repeated failed sign-ins to your account",
            user_message=(
                f"{AUTH_FAILURE_THRESHOLD} connections or requests with an invalid or expired "
                f"token for your account were refused within {_minutes(window)}. If this was "
                "not you, tell an administrator."
            ),
            admin_title=f"Repeated authentication failures for {sub}"[:200],
            admin_message=(
                f"{AUTH_FAILURE_THRESHOLD} refused authentications (last: {code}) for user id "
                f"{sub} within {_minutes(window)}."
            ),
        )  # fmt: skip

    def rate_limited(self, user_id: str, bucket: str) -> None:
        """``user_id`` (authenticated) was refused with ``RATE_LIMITED``."""
        if not user_id:
            return
        window = RATE_LIMIT_WINDOW_SECS
        if not self._tripped(self.rate_limits, user_id, "rate_limit_abuse", window):
            return
        log.warning(
            "security: user %s was rate limited %d times within %d s (last bucket: %s)",
            user_id, RATE_LIMIT_THRESHOLD, window, bucket,
        )  # fmt: skip
        data = {
            "kind": "rate_limit_abuse", "userId": user_id, "refusals": RATE_LIMIT_THRESHOLD,
            "windowSeconds": int(window), "bucket": bucket,
        }  # fmt: skip
        self._alert(
            "rate_limit_abuse", user_id, data,
            user_title="You are hitting rate limits",
            user_message=(
                f"{RATE_LIMIT_THRESHOLD} of your requests were refused by rate limits within "
                f"{_minutes(window)}. Slow down, or check a client that retries in a loop."
            ),
            admin_title=f"Rate-limit abuse by {user_id}"[:200],
            admin_message=(
                f"{user_id} was refused {RATE_LIMIT_THRESHOLD} times by rate limits "
                f"(last: {bucket}) within {_minutes(window)}."
            ),
        )  # fmt: skip

    # -- mechanics --------------------------------------------------------------

    def _tripped(self, counter: SlidingCounter, key: str, kind: str, window_secs: float) -> bool:
        """``key`` just crossed ``counter``'s threshold and the ``kind`` alert budget allows one."""
        now = self._clock()
        return counter.hit(key, now) and self._within_budget(kind, now, window_secs)

    def _within_budget(self, kind: str, now: float, window_secs: float) -> bool:
        recent = self._alerts[kind]
        if len(recent) == recent.maxlen and now - recent[0] < window_secs:
            self.metrics.security_alerts_suppressed.labels(kind).inc()
            log.warning("security: %s alert suppressed, %d already sent within %d s",
                        kind, len(recent), window_secs)  # fmt: skip
            return False
        recent.append(now)
        self.metrics.security_alerts.labels(kind).inc()
        return True

    def _alert(
        self,
        kind: str,
        user_id: str,
        data: dict[str, Any],
        *,
        user_title: str,
        user_message: str,
        admin_title: str,
        admin_message: str,
    ) -> None:
        if self.notifier is None:
            return
        self.tasks.spawn(
            self._send(self.notifier, user_id, data, user_title, user_message, admin_title,
                       admin_message),
            f"security-alert-{kind}",
        )  # fmt: skip

    async def _send(
        self,
        notifier: NotificationService,
        user_id: str,
        data: dict[str, Any],
        user_title: str,
        user_message: str,
        admin_title: str,
        admin_message: str,
    ) -> None:
        # The user is told only if the gateway knows them: an unverified sub
        # may name nobody, and rows for made-up ids would only pile up.
        if await self.db.run("security.known_user", mod_db.user_roles, user_id) is not None:
            await notifier.notify(
                [user_id], type="warning", category="security", title=user_title,
                message=user_message, data=data, priority="high",
            )  # fmt: skip
        await notifier.notify_admins(
            type="warning", category="security", title=admin_title, message=admin_message,
            data=data, priority="high",
        )  # fmt: skip


def _minutes(secs: float) -> str:
    if secs >= 120:
        return f"{secs / 60:g} minutes"
    return f"{secs:g} seconds"
