"""Notifications: persisted per user, pushed live to the user's connections.

Other parts of the gateway (chat mentions and missed messages, moderation,
security alerts, the server API) call :class:`Notifier`; it stores the
notification (enforcing the per-user cap, oldest read ones evicted first)
and pushes ``notification:created`` and ``notification:unread_count`` to
every live connection of the user.

Example::

    await notifier.notify(
        ["bob"], type="warning", category="moderation",
        title="Message removed", message="Your message was removed: spam",
        data={"roomId": "general", "messageId": "42"},
    )
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol


class Notifier(Protocol):
    """What callers need from the notification service."""

    async def notify(
        self,
        user_ids: Iterable[str],
        *,
        type: str = "info",
        category: str = "system",
        title: str,
        message: str = "",
        data: dict[str, Any] | None = None,
        action_url: str | None = None,
        priority: str = "normal",
    ) -> list[dict[str, Any]]:
        """Persist one notification per user and push it live; returns them."""

    async def notify_admins(
        self,
        *,
        type: str = "warning",
        category: str = "security",
        title: str,
        message: str = "",
        data: dict[str, Any] | None = None,
        priority: str = "high",
    ) -> list[dict[str, Any]]:
        """The same, to every user whose last token carried the ``admin`` role."""
