"""What a reconnecting client remembers to catch up: rooms joined and ``seq`` seen.

:class:`RoomLedger` is the client's memory across connections: the payload
of every ``room:join`` that succeeded (to re-join with), the highest message
``seq`` seen per room (the ``sinceSeq`` of the re-join), which ``seq`` were
already delivered (so a message is never handed to the application twice,
whether it came live, in an ack or from recovery) and the live frames held
back while a room's missed messages are still being fetched (so the
application sees each room in ``seq`` order). It does no I/O;
:func:`page_history` fetches what a re-join could not return.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from switchboard_client.wire import Frame, as_int

#: ``room:get_messages`` page size when a re-join could not return every missed message.
HISTORY_PAGE: Final = 100
#: Most messages recovered per room and reconnection; older ones stay in history.
MAX_RECOVERED: Final = 5000
#: ``seq`` numbers remembered per room for de-duplication (the newest ones).
SEEN_KEEP: Final = 1024

Request = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


def message_key(message: Mapping[str, Any]) -> tuple[str, int] | None:
    """``(roomId, seq)`` of a message, or ``None`` when it carries no usable ones."""
    room_id = message.get("roomId")
    seq = as_int(message.get("seq"))
    if room_id is None or seq is None:
        return None
    return str(room_id), seq


class RoomLedger:
    """Rooms joined and message ``seq`` numbers seen, kept across reconnections."""

    def __init__(self) -> None:
        self._rooms: dict[str, dict[str, Any]] = {}
        self._last_seq: dict[str, int] = {}
        # Each room's epoch from its join ack: room:resume presents it.
        self._epochs: dict[str, str] = {}
        self._seen: dict[str, set[int]] = {}
        self._recovered_keys: set[tuple[str, int]] = set()
        # Rooms being re-joined: their live message:new frames wait here until
        # the recovered ones are delivered, so the application sees seq order.
        self._holding: dict[str, list[Frame]] = {}

    @property
    def room_ids(self) -> list[Any]:
        return [payload["roomId"] for payload in self._rooms.values()]

    def joins(self) -> list[tuple[str, dict[str, Any]]]:
        """``(room key, room:join payload)`` of every room to re-join."""
        return list(self._rooms.items())

    def last_seq(self, room_key: str) -> int | None:
        return self._last_seq.get(room_key)

    def epoch(self, room_key: str) -> str | None:
        """The room's epoch from its latest join ack (None: joined through an older gateway)."""
        return self._epochs.get(room_key)

    def keep_epoch(self, room_key: str, room: Any) -> None:
        """Remember the epoch of a room object from a join ack."""
        epoch = room.get("epoch") if isinstance(room, dict) else None
        if isinstance(epoch, str):
            self._epochs[room_key] = epoch

    def forget(self, room_key: str) -> None:
        """Stop re-joining ``room_key`` (it was deleted, or a re-join was refused)."""
        self._rooms.pop(room_key, None)
        self._epochs.pop(room_key, None)

    def reset(self, room_key: str) -> None:
        """The room's history is another one (``room:resume`` answered reset): start afresh."""
        self._epochs.pop(room_key, None)
        self._last_seq.pop(room_key, None)
        self._seen.pop(room_key, None)
        self._recovered_keys = {key for key in self._recovered_keys if key[0] != room_key}

    def note(self, message: Mapping[str, Any]) -> bool:
        """Record a message's (roomId, seq); False if it was already seen."""
        key = message_key(message)
        if key is None:
            return True
        room, seq = key
        seen = self._seen.setdefault(room, set())
        if seq in seen:
            return False
        seen.add(seq)
        if len(seen) > 2 * SEEN_KEEP:
            self._seen[room] = set(sorted(seen)[-SEEN_KEEP:])
        if seq > self._last_seq.get(room, -1):
            self._last_seq[room] = seq
        return True

    def track_ack(self, event: str, request: Any, result: Any) -> None:
        """Learn from a successful ack: rooms joined or left, ``seq`` numbers returned."""
        if not isinstance(result, dict):
            return
        if isinstance(request, dict) and request.get("roomId") is not None:
            room_key = str(request["roomId"])
            if event == "room:join":
                self._rooms[room_key] = {k: v for k, v in request.items() if k != "sinceSeq"}
                room = result.get("room")
                hint = as_int(room.get("lastSeq")) if isinstance(room, dict) else None
                if hint is not None and hint > self._last_seq.get(room_key, -1):
                    self._last_seq[room_key] = hint
                self.keep_epoch(room_key, room)
            elif event == "room:leave":
                self.forget(room_key)
        for field in ("missed", "messages"):
            items = result.get(field)
            if isinstance(items, list):
                for item in items:
                    if isinstance(item, dict):
                        self.note(item)
        message = result.get("message")
        if isinstance(message, dict):
            self.note(message)

    def admit_live(self, frame: Frame, message: Mapping[str, Any]) -> bool:
        """Whether a live ``message:new`` frame is delivered now.

        False when its room is being re-joined (the frame is held until
        :meth:`release`) or recovery already delivered it.
        """
        held = self._holding.get(str(message.get("roomId")))
        if held is not None:
            held.append(frame)  # after the room's recovered messages
            return False
        key = message_key(message)
        if key is not None and key in self._recovered_keys:
            self._recovered_keys.discard(key)
            return False
        self.note(message)
        return True

    def hold(self, room_key: str) -> None:
        """Hold ``room_key``'s live messages while its missed ones are fetched."""
        self._holding[room_key] = []

    def release(self, room_key: str) -> list[Frame]:
        """Stop holding ``room_key``; return the live frames that arrived meanwhile."""
        return self._holding.pop(room_key, [])

    def recovered(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The missed ``messages`` not delivered yet, in ``seq`` order (now marked seen)."""
        fresh = []
        for message in sorted(messages, key=lambda m: as_int(m.get("seq")) or 0):
            if not self.note(message):
                continue  # already seen live or in another page
            key = message_key(message)
            if key is not None:
                if len(self._recovered_keys) > 4 * MAX_RECOVERED:
                    self._recovered_keys.clear()
                self._recovered_keys.add(key)
            fresh.append(message)
        return fresh


async def page_history(request: Request, room_id: Any, since: int) -> list[dict[str, Any]]:
    """Messages of ``room_id`` after ``since``, newest pages first, through ``request``.

    For a re-join whose ack said ``recovered: false`` (more missed messages
    than the server returns at once).
    """
    found: list[dict[str, Any]] = []
    before: int | None = None
    while len(found) < MAX_RECOVERED:
        query: dict[str, Any] = {"roomId": room_id, "limit": HISTORY_PAGE}
        if before is not None:
            query["beforeSeq"] = before
        page = await request("room:get_messages", query)
        messages = [
            m
            for m in page.get("messages") or []
            if isinstance(m, dict) and as_int(m.get("seq")) is not None
        ]
        if not messages:
            break
        found.extend(m for m in messages if m["seq"] > since)
        lowest = min(m["seq"] for m in messages)
        if lowest <= since + 1 or not page.get("hasMore"):
            break
        before = lowest
    return found
