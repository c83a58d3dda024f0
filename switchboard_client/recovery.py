"""What a reconnecting client remembers to catch up: rooms joined and ``seq`` seen.

:class:`RoomLedger` is the client's memory across connections: the payload
of every ``room:join`` that succeeded (to re-join with), the highest message
``seq`` seen per room (the ``sinceSeq`` of the re-join), which ``seq`` were
already delivered (so a message is never handed to the application twice,
whether it came live, in an ack or from recovery) and the live frames held
back while a room's missed messages are still being fetched (so the
application sees each room in ``seq`` order). It does no I/O;
:func:`page_history` fetches what a re-join could not return.

It also finds holes. A room's ``seq`` is gapless, so a live message more
than one above the room's *contiguous* ``seq`` (every message up to it was
delivered or seen in an ack) shows that one was lost on the way: it is held
back until the gap closes by itself or the client fetches the missing range
(:meth:`RoomLedger.gap`, :meth:`RoomLedger.repaired`). A reconnection
recovers from the contiguous ``seq``, so a message lost before the
connection dropped comes back with the rest.
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
#: How long a message after a gap is held before the missing range is fetched:
#: two nodes' broadcasts can cross on the way and close the gap by themselves.
DEFAULT_HOLE_WAIT_SECS: Final = 0.5
#: Messages held behind one gap; beyond this the gap is repaired at once.
MAX_HELD: Final = 1000

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

    def __init__(self, *, repair: bool = True) -> None:
        #: Hold a message that follows a gap until the gap is repaired (False:
        #: deliver as it comes, e.g. to observe what a server sends).
        self.repair = repair
        self._rooms: dict[str, dict[str, Any]] = {}
        self._last_seq: dict[str, int] = {}
        # Each room's epoch from its join ack: room:resume presents it.
        self._epochs: dict[str, str] = {}
        # Seen: delivered, or returned in an ack (history, the sender's own
        # message). Delivered: handed to the application as message:new. The
        # sender's own message is seen in its ack and still delivered live once.
        self._seen: dict[str, set[int]] = {}
        self._delivered: dict[str, set[int]] = {}
        # Highest seq up to which every message of the room was seen.
        self._contig: dict[str, int] = {}
        # Live frames after a gap, by seq, until the gap closes or is repaired.
        self._held: dict[str, dict[int, Frame]] = {}
        # Rooms being re-joined: their live message:new frames wait here until
        # the recovered ones are delivered, so the application sees seq order.
        self._holding: dict[str, list[Frame]] = {}
        self.duplicates = 0
        """Live ``message:new`` frames dropped because their (roomId, seq) was delivered."""

    @property
    def room_ids(self) -> list[Any]:
        return [payload["roomId"] for payload in self._rooms.values()]

    def joins(self) -> list[tuple[str, dict[str, Any]]]:
        """``(room key, room:join payload)`` of every room to re-join."""
        return list(self._rooms.items())

    def payload(self, room_key: str) -> dict[str, Any] | None:
        """The ``room:join`` payload of a joined room, ``None`` for a room not joined."""
        return self._rooms.get(room_key)

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

    def contiguous_seq(self, room_key: str) -> int | None:
        """Highest ``seq`` up to which every message of the room was seen, or ``None``."""
        return self._contig.get(room_key)

    def since(self, room_key: str) -> int:
        """The ``sinceSeq`` of a re-join: the contiguous ``seq``, not the highest seen."""
        contig = self._contig.get(room_key)
        return contig if contig is not None else self._last_seq.get(room_key) or 0

    def forget(self, room_key: str) -> None:
        """Stop re-joining ``room_key`` (left, deleted, or a re-join was refused)."""
        self._rooms.pop(room_key, None)
        self._epochs.pop(room_key, None)
        self._contig.pop(room_key, None)
        self._held.pop(room_key, None)

    def reset(self, room_key: str) -> None:
        """The room's history is another one (``room:resume`` answered reset): start afresh."""
        self._epochs.pop(room_key, None)
        self._last_seq.pop(room_key, None)
        self._seen.pop(room_key, None)
        self._delivered.pop(room_key, None)
        self._contig.pop(room_key, None)
        self._held.pop(room_key, None)

    def drop_held(self) -> None:
        """Connection lost: forget held frames (the re-join recovers them), keep the line."""
        self._held.clear()

    def note(self, message: Mapping[str, Any]) -> bool:
        """Record a message's (roomId, seq); False if it was already seen."""
        key = message_key(message)
        if key is None:
            return True
        room, seq = key
        if not _remember(self._seen, room, seq):
            return False
        if seq > self._last_seq.get(room, -1):
            self._last_seq[room] = seq
        return True

    def track_ack(self, event: str, request: Any, result: Any) -> list[Frame]:
        """Learn from a successful ack: rooms joined or left, ``seq`` numbers returned.

        Returns held frames that the ``seq`` numbers of the ack released, to deliver now.
        """
        if not isinstance(result, dict):
            return []
        if isinstance(request, dict) and request.get("roomId") is not None:
            room_key = str(request["roomId"])
            if event == "room:join":
                self._rooms[room_key] = {k: v for k, v in request.items() if k != "sinceSeq"}
                room = result.get("room")
                hint = as_int(room.get("lastSeq")) if isinstance(room, dict) else None
                # Messages before the join are history, not a hole.
                if hint is not None and hint > self._last_seq.get(room_key, -1):
                    self._last_seq[room_key] = hint
                self.keep_epoch(room_key, room)
                if hint is not None and hint > self._contig.get(room_key, -1):
                    self._contig[room_key] = hint
            elif event == "room:leave":
                self.forget(room_key)
        rooms: set[str] = set()
        found = [result.get("message")]
        for field in ("missed", "messages"):
            items = result.get(field)
            if isinstance(items, list):
                found.extend(items)
        for item in found:
            if isinstance(item, dict) and self.note(item) and item.get("roomId") is not None:
                rooms.add(str(item["roomId"]))
        return [frame for room in sorted(rooms) for frame in self.advance(room)]

    def receive(self, frame: Frame, message: Mapping[str, Any]) -> list[Frame]:
        """The frames to deliver now that the live ``message:new`` ``frame`` arrived.

        Empty when its room is being re-joined (held until :meth:`release`),
        when it was delivered already, or when it follows a gap (held until
        the gap closes or :meth:`repaired`); more than one when it closes a gap.
        """
        key = message_key(message)
        if key is None:
            return [frame]
        room, seq = key
        held = self._holding.get(room)
        if held is not None:
            held.append(frame)  # after the room's recovered messages
            return []
        if seq in self._delivered.get(room, ()):
            self.duplicates += 1
            return []
        contig = self._contig.get(room)
        if contig is not None and seq > contig + 1:
            if not self.repair:  # as it comes: the gap stays, the contiguous seq with it
                return self._admit(frame, room, seq)
            self._held.setdefault(room, {})[seq] = frame
            return []
        if contig is None:  # a room this client never joined: its first message starts it
            self._contig[room] = seq - 1
        return [*self._admit(frame, room, seq), *self.advance(room)]

    def advance(self, room: str) -> list[Frame]:
        """Move the room's contiguous ``seq`` forward; return the held frames that now fit."""
        contig = self._contig.get(room)
        if contig is None:
            return []
        out: list[Frame] = []
        seen = self._seen.get(room, set())
        held = self._held.get(room, {})
        # Held below the line (a repair gave up on a seq, a re-join hint): late, not lost.
        for seq in sorted(s for s in held if s <= contig):
            out += self._admit(held.pop(seq), room, seq)
        while True:
            following = contig + 1
            if following in held:
                out += self._admit(held.pop(following), room, following)
            elif following not in seen:
                break
            contig = following
        self._contig[room] = contig
        if not held:
            self._held.pop(room, None)
        return out

    def gap(self, room: str) -> tuple[int, int, dict[int, Frame]] | None:
        """``(highest held seq, contiguous seq, held)`` of the room's holes, or ``None``.

        Every ``seq`` between the two that is not held is missing (one hole
        or several: while one node's broadcasts are lost, every other message
        of a busy room may be); ``held`` identifies them for :meth:`repaired`.
        """
        held = self._held.get(room)
        contig = self._contig.get(room)
        if not held or contig is None:
            return None
        return max(held), contig, held

    def held_count(self, room: str) -> int:
        return len(self._held.get(room, ()))

    def repaired(
        self, room: str, hole: dict[int, Frame], top: int, found: list[dict[str, Any]]
    ) -> list[Frame] | None:
        """Frames to deliver once the messages below ``top`` were fetched (``found``).

        The ``found`` ones (flagged ``recovered``) and the held ones, in
        ``seq`` order. What was not found is given up on (history no longer
        has it, or the fetch was refused): it must not stall the room.
        ``None`` when ``hole`` is gone meanwhile (connection lost, room left).
        """
        if self._held.get(room) is not hole:
            return None
        delivered = self._delivered.get(room, set())
        for frame in self.recovered(found, mark=False):
            seq = frame["data"]["message"]["seq"]
            if seq not in delivered:
                hole.setdefault(seq, frame)
        if top - 1 > self._contig.get(room, top - 1):
            self._contig[room] = top - 1
        return self.advance(room)

    def hold(self, room_key: str) -> None:
        """Hold ``room_key``'s live messages while its missed ones are fetched."""
        self._holding[room_key] = []

    def release(self, room_key: str) -> list[Frame]:
        """Stop holding ``room_key``; return the live frames that arrived meanwhile."""
        return self._holding.pop(room_key, [])

    def recovered(self, messages: list[dict[str, Any]], *, mark: bool = True) -> list[Frame]:
        """``message:new`` frames (``recovered``) of the ``messages`` not delivered yet, in order.

        With ``mark`` they are marked delivered (a room's contiguous ``seq``
        moves on at its next :meth:`advance`); without, the caller admits them.
        """
        fresh: list[Frame] = []
        for message in sorted(messages, key=lambda m: as_int(m.get("seq")) or 0):
            key = message_key(message)
            if key is not None and key[1] in self._delivered.get(key[0], ()):
                continue  # already delivered live or in another page
            if mark:
                self.note(message)
                if key is not None:
                    _remember(self._delivered, *key)
            fresh.append({"event": "message:new", "data": {"message": message}, "recovered": True})
        return fresh

    def _admit(self, frame: Frame, room: str, seq: int) -> list[Frame]:
        """``[frame]`` marked delivered, or ``[]`` if its seq was delivered already."""
        if not _remember(self._delivered, room, seq):
            return []
        self.note(frame["data"]["message"])
        return [frame]


def _remember(numbers: dict[str, set[int]], room: str, seq: int) -> bool:
    """Add ``seq`` to ``room``'s set (the newest :data:`SEEN_KEEP` kept); False if there."""
    known = numbers.setdefault(room, set())
    if seq in known:
        return False
    known.add(seq)
    if len(known) > 2 * SEEN_KEEP:
        numbers[room] = set(sorted(known)[-SEEN_KEEP:])
    return True


async def page_history(
    request: Request,
    room_id: Any,
    since: int,
    before: int | None = None,
    found: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Messages of ``room_id`` with ``since < seq < before``, newest pages first.

    Without ``before``: everything after ``since`` (a re-join whose ack said
    ``recovered: false``, more missed messages than the server returns at
    once). With it: the holes below a held message, bounded on both sides
    (``afterSeq``/``beforeSeq``) so a one-message hole costs a one-message page.
    Pages are added to ``found`` (returned) as they arrive: what came before
    an error is kept.
    """
    found = [] if found is None else found
    while len(found) < MAX_RECOVERED and (before is None or before - 1 > since):
        query: dict[str, Any] = {"roomId": room_id, "limit": HISTORY_PAGE}
        if before is not None:
            # afterSeq only with beforeSeq: alone it would page from the oldest.
            query.update(
                beforeSeq=before, afterSeq=since, limit=min(HISTORY_PAGE, before - 1 - since)
            )
        page = await request("room:get_messages", query)
        messages = [
            m
            for m in page.get("messages") or []
            if isinstance(m, dict) and as_int(m.get("seq")) is not None
        ]
        if not messages:
            break
        found.extend(
            m for m in messages if since < m["seq"] and (before is None or m["seq"] < before)
        )
        lowest = min(m["seq"] for m in messages)
        if lowest <= since + 1 or not page.get("hasMore"):
            break
        before = lowest
    return found
