"""``/ws/notifications``: a user's notifications, live.

On connect the client gets ``notification:unread_count`` and
``notification:recent``; afterwards every change (from this connection, the
user's other connections, the REST API or a server-side source) arrives as
``notification:created|updated|read|deleted`` followed by
``notification:unread_count``. Storage and pushes live in
:class:`server.services.notify.NotificationService`; this handler only translates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from marshmallow import Schema, fields

from handlers.base import GatewayHandler
from handlers.schemas import EventSchema, Int, MessageIdField

if TYPE_CHECKING:
    from handlers.deps import Deps

#: Page size of ``notifications:get`` when the client names none, and its ceiling.
DEFAULT_PAGE = 20
MAX_PAGE = 100


class NotificationIdField(MessageIdField):
    """Notification ids travel as strings of digits (integers accepted; 1..2^63-1)."""

    default_error_messages = {"invalid": "Not a valid notification id."}


class NotificationsGet(EventSchema):
    unread_only = fields.Boolean(data_key="unreadOnly", load_default=False)
    limit = Int(1, MAX_PAGE, load_default=DEFAULT_PAGE)
    before = NotificationIdField(load_default=None)


class NotificationRef(EventSchema):
    notification_id = NotificationIdField(data_key="notificationId", required=True)


class NotificationsEmpty(EventSchema):
    pass


class NotificationsHandler(GatewayHandler):
    """The notifications namespace (any authenticated user)."""

    namespace = "notifications"
    schemas: ClassVar[dict[str, type[Schema]]] = {
        "notifications:get": NotificationsGet,
        "notifications:read": NotificationRef,
        "notifications:read_all": NotificationsEmpty,
        "notifications:delete": NotificationRef,
    }

    def initialize(self, deps: Deps) -> None:
        super().initialize(deps)
        self.notifications = deps.notifications

    async def on_connected(self) -> None:
        """Send the unread count and the newest notifications."""
        state = await self.notifications.initial_state(self.user_id)
        self.send_event("notification:unread_count", {"count": state["count"]})
        self.send_event("notification:recent", {"notifications": state["notifications"]})

    async def on_notifications_get(
        self, unread_only: bool, limit: int, before: int | None
    ) -> dict[str, Any]:
        return await self.notifications.page(
            self.user_id, unread_only=unread_only, limit=limit, before=before
        )

    async def on_notifications_read(self, notification_id: int) -> dict[str, Any]:
        change = await self.notifications.mark_read(self.user_id, notification_id)
        return {"notificationId": str(notification_id), "unreadCount": change.unread}

    async def on_notifications_read_all(self) -> dict[str, Any]:
        change = await self.notifications.mark_all_read(self.user_id)
        return {"updated": len(change.read), "unreadCount": change.unread}

    async def on_notifications_delete(self, notification_id: int) -> dict[str, Any]:
        change = await self.notifications.delete(self.user_id, notification_id)
        return {"notificationId": str(notification_id), "unreadCount": change.unread}
