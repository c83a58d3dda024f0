"""Every error a client can see, each a class with a code.

A :class:`GatewayError` carries what the client is told (``code``,
``message``, ``details``) and how the transport expresses it: the HTTP
``status`` for REST, and for connection-level failures the WebSocket
``close_code``. What operators need goes to the log, never into these.

Example::

    raise RoomNotFound(details={"roomId": room_id})
"""

from __future__ import annotations

from typing import Any, ClassVar

from marshmallow import ValidationError


class GatewayError(Exception):
    """Root of client-visible errors. Subclasses set ``code`` and defaults."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "Internal error"
    #: Close code when this error ends a connection (auth, limits); None otherwise.
    close_code: ClassVar[int | None] = None

    def __init__(self, message: str | None = None, details: dict[str, Any] | None = None) -> None:
        self.message = message or self.default_message
        self.details = details or {}
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class BadRequest(GatewayError):
    code, status, default_message = "BAD_REQUEST", 400, "Malformed frame"


class UnknownEvent(GatewayError):
    code, status, default_message = "UNKNOWN_EVENT", 400, "Unknown event"


class ValidationFailed(GatewayError):
    code, status, default_message = "VALIDATION_ERROR", 400, "Invalid data"

    @classmethod
    def from_marshmallow(cls, exc: ValidationError) -> ValidationFailed:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        return cls(details=_flatten(messages))


class Unauthorized(GatewayError):
    code, status, close_code = "UNAUTHORIZED", 401, 4401
    default_message = "Authentication required"


class TokenExpired(GatewayError):
    code, status, close_code = "TOKEN_EXPIRED", 401, 4401
    default_message = "Token expired"


class Forbidden(GatewayError):
    code, status, close_code = "FORBIDDEN", 403, 4403
    default_message = "Not allowed"


class Banned(GatewayError):
    code, status, close_code = "BANNED", 403, 4403
    default_message = "You are banned"


class Muted(GatewayError):
    code, status, default_message = "MUTED", 403, "You are muted in this room"


class RoomNotFound(GatewayError):
    code, status, default_message = "ROOM_NOT_FOUND", 404, "Room not found"


class RoomAccessDenied(GatewayError):
    code, status, default_message = "ROOM_ACCESS_DENIED", 403, "No access to this room"


class NotInRoom(GatewayError):
    code, status, default_message = "NOT_IN_ROOM", 403, "Join the room first"


class MessageNotFound(GatewayError):
    code, status, default_message = "MESSAGE_NOT_FOUND", 404, "Message not found"


class NotificationNotFound(GatewayError):
    code, status, default_message = "NOTIFICATION_NOT_FOUND", 404, "Notification not found"


class Conflict(GatewayError):
    code, status, default_message = "CONFLICT", 409, "Already exists"


class RateLimited(GatewayError):
    code, status, default_message = "RATE_LIMITED", 429, "Too many requests"


class TooManyConnections(GatewayError):
    code, status, close_code = "TOO_MANY_CONNECTIONS", 429, 4429
    default_message = "Too many connections"


class PayloadTooLarge(GatewayError):
    code, status, close_code = "PAYLOAD_TOO_LARGE", 413, 1009
    default_message = "Payload too large"


class ServiceUnavailable(GatewayError):
    code, status, close_code = "SERVICE_UNAVAILABLE", 503, 1001
    default_message = "Service unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    """The database did not answer: down, unreachable, or locked past its busy timeout.

    Raised by :meth:`server.store.db.Database.run` for the driver's connection
    errors, so every surface answers a retryable ``SERVICE_UNAVAILABLE``
    instead of ``INTERNAL_ERROR``. Details: ``{"retryable": true}``.
    """

    default_message = "Database unavailable; retry"

    def __init__(self, message: str | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, {"retryable": True, **(details or {})})


class InternalError(GatewayError):
    """An unexpected failure; the cause is logged, the client sees only this."""


def _flatten(messages: dict[str, Any], prefix: str = "") -> dict[str, list[str]]:
    """Nested marshmallow messages → ``{"field.sub": ["msg", ...]}``."""
    out: dict[str, list[str]] = {}
    for key, value in messages.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat: list[str] = []
            for item in value:
                if isinstance(item, dict):
                    out.update(_flatten(item, f"{name}."))
                else:
                    flat.append(str(item))
            if flat:
                out[name] = flat
        else:
            out[name] = [str(value)]
    return out
