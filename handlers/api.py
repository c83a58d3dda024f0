"""The REST API under ``/api/v1``: notifications, history, room updates, the server API.

User endpoints take ``Authorization: Bearer <jwt>`` (checked by the same
:class:`~server.core.auth.TokenVerifier` as the sockets); the server API needs
the ``service`` role. Bodies and query strings are loaded with marshmallow
schemas; every failure is a :class:`~server.core.errors.GatewayError` rendered
once, as ``{"error": {code, message, details}}`` with its HTTP status.

REST and socket views stay one: a change made here goes through the same
:class:`~server.services.notify.NotificationService`, which pushes it live to the
user's ``/ws/notifications`` connections.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema
from tornado.web import HTTPError

from handlers.http import JSONHandler
from handlers.notifications import DEFAULT_PAGE, MAX_PAGE, NotificationIdField
from handlers.schemas import (
    EventSchema,
    HistoryWindow,
    Int,
    JSONObject,
    NoQuery,
    RoomChanges,
    RoomRef,
    Str,
    Strict,
    Text,
    load,
    role_name,
    room_id,
)
from models import chat as chat_db
from models import notifications as store
from server.core import errors
from server.core.auth import Identity
from server.realtime.hub import Target
from server.services.admission import require_roles

if TYPE_CHECKING:
    from handlers.deps import Deps

log = logging.getLogger("switchboard.api")

NAMESPACES = ("chat", "notifications", "admin", "logs")
# Events a service may not publish: clients trust these to come from the gateway itself.
RESERVED_EVENT_PREFIXES = ("system:", "auth:")
MAX_NOTIFY_USERS = 1000


# -- schemas ------------------------------------------------------------------


class NotificationQuery(Strict):
    unread_only = fields.Boolean(data_key="unreadOnly", load_default=False)
    limit = Int(1, MAX_PAGE, load_default=DEFAULT_PAGE)
    before = NotificationIdField(load_default=None)


class NotificationPath(EventSchema):
    notification_id = NotificationIdField(data_key="id", required=True)


class HistoryQuery(HistoryWindow):
    """History over HTTP mirrors ``room:get_messages``; the room is in the path."""


class RoomPatch(RoomChanges):
    """The body of ``PATCH /api/v1/rooms/{roomId}``.

    Unlike socket events, a REST body refuses unknown fields: a misspelt
    field in an update must not pass for "nothing to change there".
    """

    class Meta:
        unknown = RAISE


class PublishTarget(Schema):
    user_id = Str(128, data_key="userId")
    room_id = room_id()
    role = role_name()
    namespace = fields.String(validate=validate.OneOf(NAMESPACES))
    all = fields.Boolean()

    @validates_schema
    def _one_target(self, data: dict[str, Any], **kwargs: Any) -> None:
        chosen = [k for k in ("user_id", "room_id", "role") if k in data] + (
            ["all"] if data.get("all") else []
        )
        if len(chosen) > 1 or (not chosen and "namespace" not in data):
            raise ValidationError(
                "Give exactly one of userId, roomId, role, namespace or all (namespace may "
                "narrow userId, role or all).",
                "target",
            )
        if "room_id" in data and "namespace" in data:
            raise ValidationError("roomId cannot be narrowed by namespace.", "namespace")


class Publish(EventSchema):
    target = fields.Nested(PublishTarget, required=True)
    event = fields.String(
        required=True,
        validate=[
            validate.Length(1, 64),
            validate.Regexp(r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)*\Z", error="Not an event name."),
        ],
    )
    # Its size is bounded by the request body (SWITCHBOARD_MAX_MESSAGE_BYTES).
    data = JSONObject(load_default=dict)

    @validates_schema
    def _not_reserved(self, data: dict[str, Any], **kwargs: Any) -> None:
        if str(data.get("event", "")).startswith(RESERVED_EVENT_PREFIXES):
            raise ValidationError("system: and auth: events are the gateway's own.", "event")


class NotificationCreate(EventSchema):
    user_ids = fields.List(
        Str(128),
        data_key="userIds",
        required=True,
        validate=validate.Length(1, MAX_NOTIFY_USERS),
    )
    type = fields.String(load_default="info", validate=validate.OneOf(store.TYPES))
    category = fields.String(load_default="system", validate=validate.OneOf(store.CATEGORIES))
    title = Text(required=True, validate=validate.Length(1, store.TITLE_MAX_CHARS))
    message = Text(load_default="", validate=validate.Length(0, 4000))
    data = JSONObject(load_default=dict)
    action_url = Str(500, data_key="actionUrl", load_default=None, allow_none=True)
    priority = fields.String(load_default="normal", validate=validate.OneOf(store.PRIORITIES))


# -- base ---------------------------------------------------------------------


class APIHandler(JSONHandler):
    """Base of the ``/api/v1`` handlers: auth, roles, limits, JSON in and out.

    ``prepare()`` runs before every method: it refuses new work while the
    node shuts down (503), checks the Bearer token (401) and the class's
    ``allowed_roles`` (403), the body size (413) and the caller's ``other``
    rate limit (429), then loads the query string with the method's entry in
    :attr:`query_schemas` into ``self.args`` (400 on an unknown, repeated or
    bad parameter; a method without an entry takes none). Methods then read
    ``self.identity``, ``self.args`` and :meth:`body` with
    :func:`handlers.schemas.load` for validated input.

    Example::

        class Hello(APIHandler):
            async def get(self) -> None:
                self.write_json({"hello": self.identity.user_id})
    """

    #: Roles of which the caller needs one; None admits any authenticated user.
    allowed_roles: ClassVar[frozenset[str] | None] = None

    #: Client errors of the API are logged here (see :class:`JSONHandler`).
    error_log = log

    #: The query string's schema by HTTP method; a method not listed takes none.
    query_schemas: ClassVar[dict[str, type[Schema]]] = {}

    def initialize(self, deps: Deps) -> None:
        super().initialize(deps)
        self._identity: Identity | None = None
        #: The query string, loaded by ``prepare()`` with the method's schema.
        self.args: dict[str, Any] = {}

    @property
    def identity(self) -> Identity:
        assert self._identity is not None, "prepare() authenticates first"
        return self._identity

    @property
    def user_id(self) -> str:
        return self.identity.user_id

    async def prepare(self) -> None:
        deps = self.deps
        if deps.state.shutting_down:
            raise errors.ServiceUnavailable("Server is shutting down")
        self._identity = await self.bearer_identity(self.allowed_roles)
        declared = self.request.headers.get("Content-Length")
        size = int(declared) if declared and declared.isdigit() else len(self.request.body or b"")
        limit = deps.config.max_message_bytes
        if size > limit:
            raise errors.PayloadTooLarge(details={"limit": limit, "size": size})
        decision = await deps.rate_limiter.hit(self.user_id, "other")
        if not decision.allowed:
            deps.security.rate_limited(self.user_id, "other")
            raise errors.RateLimited(details=decision.details())
        self.args = self.query_args(self.query_schemas.get(self.request.method or "", NoQuery))

    def body(self) -> Any:
        try:
            return orjson.loads(self.request.body or b"{}")
        except orjson.JSONDecodeError:
            raise errors.BadRequest("Body is not JSON") from None


# -- notifications ------------------------------------------------------------


class NotificationsAPI(APIHandler):
    """``GET /api/v1/notifications`` (a page); ``POST`` creates them (role ``service``)."""

    query_schemas: ClassVar[dict[str, type[Schema]]] = {"GET": NotificationQuery}

    async def get(self) -> None:
        args = self.args
        page = await self.deps.notifications.page(
            self.user_id, unread_only=args["unread_only"], limit=args["limit"],
            before=args["before"],
        )  # fmt: skip
        self.write_json(page)

    async def post(self) -> None:
        require_roles(self.identity, frozenset({"service"}))
        args = load(NotificationCreate, self.body())
        created = await self.deps.notifications.notify(
            args.pop("user_ids"), **args,
        )  # fmt: skip
        self.write_json({"notifications": created, "count": len(created)}, 201)


class UnreadCountAPI(APIHandler):
    """``GET /api/v1/notifications/unread/count`` → ``{count}``."""

    async def get(self) -> None:
        self.write_json({"count": await self.deps.notifications.unread_count(self.user_id)})


class ReadAllAPI(APIHandler):
    """``POST /api/v1/notifications/read-all`` → ``{updated, unreadCount}``."""

    async def post(self) -> None:
        change = await self.deps.notifications.mark_all_read(self.user_id)
        self.write_json({"updated": len(change.read), "unreadCount": change.unread})


class NotificationReadAPI(APIHandler):
    """``POST /api/v1/notifications/{id}/read`` → ``{notificationId, unreadCount}``."""

    async def post(self, raw_id: str) -> None:
        notification_id = load(NotificationPath, {"id": raw_id})["notification_id"]
        change = await self.deps.notifications.mark_read(self.user_id, notification_id)
        self.write_json({"notificationId": str(notification_id), "unreadCount": change.unread})


class NotificationAPI(APIHandler):
    """``DELETE /api/v1/notifications/{id}`` → ``{notificationId, unreadCount}``."""

    async def delete(self, raw_id: str) -> None:
        notification_id = load(NotificationPath, {"id": raw_id})["notification_id"]
        change = await self.deps.notifications.delete(self.user_id, notification_id)
        self.write_json({"notificationId": str(notification_id), "unreadCount": change.unread})


# -- history ------------------------------------------------------------------


class RoomMessagesAPI(APIHandler):
    """``GET /api/v1/rooms/{roomId}/messages?limit=&beforeSeq=&afterSeq=&before=&after=&offset=``.

    Members only; the page and its bounds are those of ``room:get_messages``.
    """

    query_schemas: ClassVar[dict[str, type[Schema]]] = {"GET": HistoryQuery}

    async def get(self, raw_room_id: str) -> None:
        room = load(RoomRef, {"roomId": raw_room_id})["room_id"]
        page = await self.deps.db.run(
            "message.page", chat_db.get_messages, room, self.user_id, **self.args
        )
        self.write_json(page)


class RoomAPI(APIHandler):
    """``PATCH /api/v1/rooms/{roomId}`` → ``{room}``: the same operation as ``room:update``.

    Body ``{name?, topic?, description?, type?, password?}``; the room's
    owner or an admin.
    """

    async def patch(self, raw_room_id: str) -> None:
        room_id = load(RoomRef, {"roomId": raw_room_id})["room_id"]
        values = load(RoomPatch, self.body())
        self.write_json({"room": await self.deps.rooms.update(self.identity, room_id, values)})


# -- server API ---------------------------------------------------------------


class PublishAPI(APIHandler):
    """``POST /api/v1/publish {target, event, data}`` (role ``service``) → ``{delivered}``.

    ``delivered`` counts the connections reached on this node; with the Redis
    mirror the event also goes to the other nodes' matching connections.
    A ``role`` target reaches every connection whose token carries the role
    (narrowed by ``namespace`` when given); a role no token has reaches nobody.
    """

    allowed_roles = frozenset({"service"})

    async def post(self) -> None:
        args = load(Publish, self.body())
        where = args["target"]
        namespace = where.get("namespace")
        if "user_id" in where:
            target = Target.user(where["user_id"], namespace)
        elif "room_id" in where:
            target = Target.room(where["room_id"])
        elif "role" in where:
            target = Target.role(where["role"], namespace)
        elif where.get("all"):
            target = Target("all", "", namespace)
        else:
            target = Target.ns(namespace)
        delivered = self.deps.hub.publish(target, args["event"], args["data"])
        self.write_json({"delivered": delivered})


class APINotFound(JSONHandler):
    """Any other ``/api/v1`` path: a JSON 404 rather than the web app's HTML one."""

    def prepare(self) -> None:
        raise HTTPError(404, reason="No such API endpoint")


#: The ``/api/v1`` routes (:func:`server.app.make_app` gives each the node's deps).
#: The last one answers every other ``/api/v1`` path with a JSON 404, so
#: further API routes must be listed before these.
API_ROUTES: list[tuple[str, type[JSONHandler]]] = [
    (r"/api/v1/notifications", NotificationsAPI),
    (r"/api/v1/notifications/unread/count", UnreadCountAPI),
    (r"/api/v1/notifications/read-all", ReadAllAPI),
    (r"/api/v1/notifications/([^/]+)/read", NotificationReadAPI),
    (r"/api/v1/notifications/([^/]+)", NotificationAPI),
    (r"/api/v1/rooms/([^/]+)/messages", RoomMessagesAPI),
    (r"/api/v1/rooms/([^/]+)", RoomAPI),
    (r"/api/v1/publish", PublishAPI),
    (r"/api/v1/.*", APINotFound),
]
