"""Which of a room's seqs this node has delivered: the memory behind catch-up and dedupe.

Room frames that carry a ``seq`` (``message:new``) are numbered gaplessly
per room, so what a node delivered for a room is a contiguous prefix
(``upto``) plus the seqs seen beyond a hole (``ahead``): a broadcast that
another node published before this node's copy arrived, or one that was
lost (Redis down, a node killed between its commit and its publish).

The hub records every delivery here and refuses a seq it already delivered
(a re-broadcast of a retry's duplicate, a catch-up racing live traffic), so
each node delivers a message at most once however many copies reach it. A
catch-up (:mod:`server.services.catch_up`) reads the room's messages above
:meth:`RoomSeqs.baseline` from the database and delivers those not
:meth:`RoomSeqs.seen`.

Until a room's prefix is known (a join tells it: the ``lastSeq`` its
database read saw), only exact seqs count as seen: a guess would refuse a
message this node never delivered.

Example::

    seqs = RoomSeqs()
    seqs.known("general", 10)      # a join read the room at seq 10
    seqs.add("general", 12)        # 11 is still missing
    seqs.seen("general", 11)       # False: a catch-up delivers it
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Seqs remembered beyond a hole per room. A hole that outlives this many
#: later messages is given up (the prefix jumps over it): clients repair
#: such a hole themselves, by seq, when the later messages reach them.
AHEAD_MAX = 1024


@dataclass(slots=True)
class _Room:
    upto: int | None = None
    ahead: set[int] = field(default_factory=set)


class RoomSeqs:
    """Per room: the seqs this node delivered (see the module docstring)."""

    def __init__(self) -> None:
        self._rooms: dict[str, _Room] = {}

    def seen(self, room: str, seq: int) -> bool:
        state = self._rooms.get(room)
        if state is None:
            return False
        return (state.upto is not None and seq <= state.upto) or seq in state.ahead

    def add(self, room: str, seq: int) -> None:
        """``seq`` was delivered to the room's local members."""
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room()
        upto = state.upto
        if upto is not None:
            if seq <= upto:
                return
            if seq == upto + 1 and not state.ahead:  # in order: the usual case
                state.upto = seq
                return
        state.ahead.add(seq)
        self._absorb(state)
        if len(state.ahead) > AHEAD_MAX:
            state.upto = min(state.ahead)
            self._absorb(state)

    def known(self, room: str, seq: int) -> None:
        """Every seq up to ``seq`` reached the room's members (a join's read).

        Only a room whose prefix is unknown takes it: a known prefix with a
        hole is this node's to repair, not to paper over.
        """
        state = self._rooms.setdefault(room, _Room())
        if state.upto is None:
            state.upto = seq
            self._absorb(state)

    def baseline(self, room: str) -> int | None:
        """The seq a catch-up reads above; None when nothing is known of the room."""
        state = self._rooms.get(room)
        if state is None:
            return None
        if state.upto is not None:
            return state.upto
        return min(state.ahead) - 1 if state.ahead else None

    def forget(self, room: str) -> None:
        """The room's last local member left: a new member starts from its own join."""
        self._rooms.pop(room, None)

    @staticmethod
    def _absorb(state: _Room) -> None:
        upto = state.upto
        if upto is None:
            return
        ahead = state.ahead
        drop = [s for s in ahead if s <= upto]
        for s in drop:
            ahead.discard(s)
        while upto + 1 in ahead:
            upto += 1
            ahead.discard(upto)
        state.upto = upto
