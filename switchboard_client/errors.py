"""Errors the client raises: the server's refusals and a closed connection."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ClientError(Exception):
    """An error reported by the server (failed ack or ``system:error``).

    Attributes: ``code`` (e.g. ``"VALIDATION_ERROR"``), ``message``,
    ``details`` (dict), ``event`` (the event that failed, if known),
    ``close_code`` (the WebSocket close code when the server closed the
    connection because of this error, e.g. 4401, else ``None``) and
    ``close_reason``.

    Example::

        try:
            await client.emit("room:join", {"roomId": "nope"})
        except ClientError as exc:
            assert exc.code == "ROOM_NOT_FOUND"
    """

    def __init__(
        self,
        code: str,
        message: str = "",
        details: Mapping[str, Any] | None = None,
        *,
        event: str | None = None,
        close_code: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code: str = code
        self.message: str = message
        self.details: dict[str, Any] = dict(details or {})
        self.event: str | None = event
        self.close_code: int | None = close_code
        self.close_reason: str | None = None

    @classmethod
    def from_payload(
        cls, payload: Any, *, event: str | None = None, close_code: int | None = None
    ) -> ClientError:
        """Build an error from an ack ``error`` object or ``system:error`` data."""
        body: Mapping[str, Any] = payload if isinstance(payload, Mapping) else {}
        details = body.get("details")
        reported = body.get("event")
        return cls(
            str(body.get("code") or "UNKNOWN_ERROR"),
            str(body.get("message") or ""),
            details if isinstance(details, Mapping) else {},
            event=reported if isinstance(reported, str) else event,
            close_code=close_code,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"details={self.details!r}, event={self.event!r}, close_code={self.close_code!r})"
        )


class HandshakeError(ClientError):
    """The HTTP upgrade itself was refused (e.g. 403 for a bad ``Origin``).

    ``code`` is ``"HANDSHAKE_FAILED"`` and ``status`` the HTTP status, if any.

    Example::

        with pytest.raises(HandshakeError) as info:
            await connect(url, token, origin="https://evil.example")
        assert info.value.status == 403
    """

    def __init__(self, status: int | None, message: str = "") -> None:
        super().__init__("HANDSHAKE_FAILED", message, {"status": status})
        self.status: int | None = status


class ConnectionClosed(Exception):
    """The connection is (or got) closed; ``code``/``reason`` are the close frame's.

    Example::

        with pytest.raises(ConnectionClosed) as info:
            await client.emit("system:ping")
        print(info.value.code)
    """

    def __init__(self, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(f"connection closed (code={code}, reason={reason!r})")
        self.code: int | None = code
        self.reason: str | None = reason
