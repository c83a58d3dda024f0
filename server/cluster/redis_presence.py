"""Cluster-wide presence in Redis (the :class:`~server.realtime.presence.Presence` interface).

A user is online while any connection on any node is open. Per user a hash
``{p}:presence:{user}`` maps node → connection count, so ``connect`` and
``disconnect`` report the cluster-wide first and last. It also records, per
node, the rooms each user joined there (the ``joined``/``left`` hooks): what
a dead node's users left, which :class:`~server.cluster.node_registry.NodeRegistry`
reports when it drops the node.

Typing state stays node-local: typing events are broadcast through the
mirror anyway, and a dead node's typing timers die with it (clients time
typing indicators out themselves).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from server.cluster.redis_link import ClusterLink, RedisUnavailable, as_text
from server.realtime.presence import Presence


class RedisPresence(Presence):
    """Cluster-wide presence (the :class:`~server.realtime.presence.Presence` interface).

    The base class keeps this node's own connections and statuses, which
    answer while Redis is unreachable and rebuild this node's records after.

    Example::

        presence = RedisPresence(link)
        if await presence.connect("alice"):      # first connection in the cluster
            announce("alice", "online")
        await presence.joined({"userId": "alice", ...}, "general")
    """

    def __init__(self, link: ClusterLink) -> None:
        super().__init__(link.node_id)
        self.link = link
        self._connect = link.script("hash_total", "presence_connect")
        self._disconnect = link.script("hash_total", "presence_disconnect")
        self._set_status = link.script("presence_set_status")
        # This node's room records (user → rooms joined here, user → public info).
        self._rooms: dict[str, set[str]] = {}
        self._who: dict[str, dict[str, Any]] = {}

    def _user_keys(self, user_id: str) -> list[str]:
        k, node = self.link.key, self.link.node_id
        return [k("presence", user_id), k("status", user_id), k("node", node, "users"),
                k("online")]  # fmt: skip

    async def connect(self, user_id: str) -> bool:
        first_here = await super().connect(user_id)
        try:
            first = await self.link.run(
                "presence.connect",
                self._connect(self._user_keys(user_id), [self.link.node_id, user_id]),
            )
        except RedisUnavailable:
            return first_here
        return bool(first)

    async def disconnect(self, user_id: str) -> bool:
        last_here = await super().disconnect(user_id)
        if last_here:
            self._rooms.pop(user_id, None)
            self._who.pop(user_id, None)
        k, node = self.link.key, self.link.node_id
        keys = [*self._user_keys(user_id), k("rooms", node, user_id),
                k("node", node, "roomusers"), k("node", node, "who")]  # fmt: skip
        try:
            last = await self.link.run(
                "presence.disconnect", self._disconnect(keys, [node, user_id])
            )
        except RedisUnavailable:
            return last_here
        return bool(last)

    async def set_status(self, user_id: str, status: str) -> None:
        await super().set_status(user_id, status)
        keys = self._user_keys(user_id)[:2]
        try:
            await self.link.run("presence.status", self._set_status(keys, [status]))
        except RedisUnavailable:
            pass

    async def statuses(self, user_ids: Iterable[str]) -> dict[str, str]:
        ids = list(user_ids)
        if not ids:
            return {}
        try:
            values = await self.link.run(
                "presence.statuses", self.link.redis.mget([self.link.key("status", u) for u in ids])
            )
        except RedisUnavailable:
            return await super().statuses(ids)
        return {uid: as_text(v) if v else "offline" for uid, v in zip(ids, values, strict=True)}

    async def online_users(self) -> list[str]:
        try:
            members = await self.link.run(
                "presence.online", self.link.redis.smembers(self.link.key("online"))
            )
        except RedisUnavailable:
            return await super().online_users()
        return sorted(as_text(m) for m in members)

    async def connections_by_node(self, user_ids: Iterable[str]) -> dict[str, dict[str, int]]:
        """Open connections of each user per node (this node's own if Redis is down)."""
        ids = list(user_ids)
        try:
            async with self.link.redis.pipeline(transaction=False) as pipe:
                for uid in ids:
                    pipe.hgetall(self.link.key("presence", uid))
                rows = await self.link.run("presence.by_node", pipe.execute())
        except RedisUnavailable:
            return await super().connections_by_node(ids)
        return {
            uid: {n.decode(): int(c) for n, c in row.items()}
            for uid, row in zip(ids, rows, strict=True)
        }

    async def joined(self, user: Mapping[str, Any], room_id: str) -> None:
        user_id = str(user["userId"])
        self._rooms.setdefault(user_id, set()).add(room_id)
        self._who[user_id] = dict(user)
        k, node = self.link.key, self.link.node_id
        try:
            async with self.link.redis.pipeline(transaction=True) as pipe:
                pipe.sadd(k("rooms", node, user_id), room_id)
                pipe.sadd(k("node", node, "roomusers"), user_id)
                pipe.hset(k("node", node, "who"), user_id, orjson.dumps(dict(user)))
                await self.link.run("presence.joined", pipe.execute())
        except RedisUnavailable:
            pass

    async def left(self, user_id: str, room_id: str) -> None:
        rooms = self._rooms.get(user_id)
        if rooms is not None:
            rooms.discard(room_id)
        try:
            await self.link.run(
                "presence.left",
                self.link.redis.srem(self.link.key("rooms", self.link.node_id, user_id), room_id),
            )
        except RedisUnavailable:
            pass

    def in_room_here(self, user_id: str, room_id: str) -> bool:
        return room_id in self._rooms.get(user_id, ())

    def connected_here(self, user_id: str) -> bool:
        return user_id in self._connections

    async def nodes(self) -> list[dict[str, Any]]:
        """The live nodes, as their heartbeats last described them."""
        try:
            async with self.link.redis.pipeline(transaction=True) as pipe:
                pipe.zrange(self.link.key("nodes"), 0, -1)
                pipe.hgetall(self.link.key("nodeinfo"))
                ids, infos = await self.link.run("nodes", pipe.execute())
        except RedisUnavailable:
            return []
        out = []
        for raw in ids:
            node = raw.decode()
            info = orjson.loads(infos[raw]) if raw in infos else {"id": node}
            out.append({**info, "self": node == self.link.node_id})
        return out

    async def resync(self) -> None:
        """Write this node's share (connections, statuses, rooms) back to Redis."""
        k, node = self.link.key, self.link.node_id
        async with self.link.redis.pipeline(transaction=False) as pipe:
            for user_id, count in self._connections.items():
                pipe.hset(k("presence", user_id), node, count)
                pipe.sadd(k("node", node, "users"), user_id)
                pipe.sadd(k("online"), user_id)
                pipe.set(k("status", user_id), self._status.get(user_id, "online"))
            for user_id, rooms in self._rooms.items():
                if rooms and user_id in self._connections:
                    pipe.sadd(k("rooms", node, user_id), *rooms)
                    pipe.sadd(k("node", node, "roomusers"), user_id)
                    pipe.hset(k("node", node, "who"), user_id, orjson.dumps(self._who[user_id]))
            await self.link.run("presence.resync", pipe.execute(), probe=True)
