"""What clients see when a node's users are lost: the chat side of the node registry.

:class:`~server.cluster.node_registry.NodeRegistry` knows no chat: when it drops a
node's records (a dead node reaped, or this node leaving) it reports a
:class:`~server.cluster.node_registry.NodeLoss`. :func:`announce_node_loss`, wired
as its ``on_loss`` in ``server/app.py``, publishes what members would have
seen had each user left: ``room:user_left`` (reason ``node_lost``) in each
room the user is in on no other node, then ``user:status_changed`` offline
for each user now offline everywhere. It publishes through the hub, so
every node's members hear it.

Example::

    registry = NodeRegistry(..., on_loss=functools.partial(announce_node_loss, hub, db))
"""

from __future__ import annotations

import logging

from models import chat as chat_db
from server.cluster.node_registry import NodeLoss
from server.realtime.hub import Hub, Target
from server.store.db import Database

log = logging.getLogger("switchboard.cluster")


async def announce_node_loss(hub: Hub, db: Database, loss: NodeLoss) -> None:
    """Announce ``loss`` to the members of the rooms concerned."""
    for left in loss.left:
        who = dict(left.user)
        for room_id in left.room_ids:
            # The dead node's typing timers died with it: clear any indicator
            # (harmless for someone who was not typing).
            hub.publish(Target.room(room_id), "user:stopped_typing", {"roomId": room_id, **who})
            hub.publish(
                Target.room(room_id),
                "room:user_left",
                {"roomId": room_id, "user": who, "reason": "node_lost"},
            )
    for user_id in loss.offline:
        try:
            rooms = await db.run("user.rooms", chat_db.member_room_ids, user_id)
        except Exception:
            log.warning("could not read the rooms of %s to announce them offline",
                        user_id, exc_info=True)  # fmt: skip
            continue
        if rooms:
            hub.publish_rooms(
                rooms, "user:status_changed", {"userId": user_id, "status": "offline"}
            )
