"""Moderation: kick, ban, unban, mute, delete messages, broadcast.

The operations are transport-free so the admin namespace, the HTTP API and
the cluster layer share them: each checks the actor's role, persists what
lasts (bans, mutes) and an audit row, tells the people concerned over the
hub, logs one line, and (when a :class:`~server.services.notify.NotificationService` is set)
leaves them a notification.

Who may do what (SPEC §3): moderators and admins kick, mute and delete
messages; only admins ban, unban and delete rooms (room deletion is
:meth:`server.services.rooms.Rooms.delete`, which uses :func:`require_role` too). A
moderator may not kick or mute an admin (FORBIDDEN); an admin may.

Example::

    moderation = Moderation(hub, db, tasks)
    await moderation.ban(admin_identity, "mallory", "spam", duration_secs=3600)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from models import chat as chat_db
from models import moderation as mod_db
from server.core import errors, protocol
from server.core.auth import Identity
from server.core.tasks import BackgroundTasks
from server.realtime.hub import Hub, Target
from server.services.notify import NotificationService
from server.store.db import Database

log = logging.getLogger("switchboard.moderation")

STAFF_ROLES = frozenset({"admin", "moderator"})
ADMIN_ROLES = frozenset({"admin"})
#: Actions only admins may take; the rest are open to moderators too.
ADMIN_ONLY_ACTIONS = frozenset({"ban", "unban", "delete_room", "read_audit"})
#: The ``action`` values audit rows carry.
AUDIT_ACTIONS = (
    "kick", "ban", "unban", "mute", "delete_room", "update_room", "delete_message", "broadcast",
)  # fmt: skip
NAMESPACES = ("chat", "notifications", "admin", "logs")
#: Close code for kicked and banned connections (SPEC: forbidden / banned / kicked).
CLOSE_FORBIDDEN = 4403
#: The broker control action that carries disconnect_user to the other nodes.
DISCONNECT_USER_CONTROL = "disconnect_user"


def require_role(actor: Identity, action: str) -> None:
    """Raise FORBIDDEN unless ``actor`` may take ``action``."""
    needed = ADMIN_ROLES if action in ADMIN_ONLY_ACTIONS else STAFF_ROLES
    if not actor.has_any(needed):
        raise errors.Forbidden(
            f"Only {' or '.join(sorted(needed))}s may {action.replace('_', ' ')}",
            {"action": action},
        )


class Moderation:
    """The moderation operations of one node (see module docstring).

    ``notifier`` may be set after construction; without one, nobody gets a
    stored notification but everything else happens.
    """

    def __init__(
        self,
        hub: Hub,
        db: Database,
        tasks: BackgroundTasks,
        notifier: NotificationService | None = None,
    ) -> None:
        self.hub = hub
        self.db = db
        self.tasks = tasks
        self.notifier = notifier
        # Kick and ban close the user's connections on every node: the other
        # nodes run disconnect_user when this control message reaches them.
        hub.broker.on_control(DISCONNECT_USER_CONTROL, self._disconnect_from_elsewhere)
        #: Set on a cluster: a user's open connections on every node, so kick
        #: and ban acks count what the relay closes elsewhere too.
        self.cluster_connections: Callable[[str], Awaitable[int]] | None = None

    # -- people ---------------------------------------------------------------

    async def kick(self, actor: Identity, user_id: str, reason: str) -> dict[str, Any]:
        """Close every connection of ``user_id`` (4403) after ``system:kicked``."""
        require_role(actor, "kick")
        await self._protect_admins(actor, user_id, "kick")
        await self.db.run(
            "moderation.audit", mod_db.audit, actor.user_id, "kick", f"user:{user_id}", reason
        )
        elsewhere = await self._cluster_count(user_id)
        closed = self.disconnect_user(
            user_id, "system:kicked", {"reason": reason, "kickedBy": actor.user_id},
            errors.Forbidden(f"You were disconnected by a moderator: {reason}",
                             {"reason": reason, "kicked": True}),
        )  # fmt: skip
        log.info("kick: %s kicked %s (%s): %d connection(s)", actor.user_id, user_id, reason,
                 closed)  # fmt: skip
        return {"userId": user_id, "reason": reason, "connectionsClosed": max(closed, elsewhere)}

    async def ban(
        self, actor: Identity, user_id: str, reason: str, duration_secs: int | None
    ) -> dict[str, Any]:
        """Persist a ban (until ``duration_secs`` from now, or for good); close the user."""
        require_role(actor, "ban")
        if user_id == actor.user_id:
            raise errors.Forbidden("You cannot ban yourself", {"userId": user_id})
        ban = await self.db.run(
            "moderation.ban", mod_db.ban_user, user_id, actor.user_id, reason, duration_secs
        )
        elsewhere = await self._cluster_count(user_id)
        closed = self.disconnect_user(
            user_id, None, None,
            errors.Banned(f"You are banned: {reason}",
                          {"reason": reason, "expiresAt": ban["expiresAt"]}),
        )  # fmt: skip
        log.info("ban: %s banned %s until %s (%s): %d connection(s)", actor.user_id, user_id,
                 ban["expiresAt"] or "revoked", reason, closed)  # fmt: skip
        until = f" until {ban['expiresAt']}" if ban["expiresAt"] else ""
        self._notify([user_id], type="error", category="system", title="You were banned",
                     message=f"You were banned{until}: {reason}", priority="high",
                     data={"reason": reason, "expiresAt": ban["expiresAt"]})  # fmt: skip
        return {"ban": ban, "connectionsClosed": max(closed, elsewhere)}

    async def unban(self, actor: Identity, user_id: str) -> dict[str, Any]:
        require_role(actor, "unban")
        was_banned = await self.db.run(
            "moderation.unban", mod_db.unban_user, user_id, actor.user_id
        )
        log.info("unban: %s lifted the ban on %s (was banned: %s)", actor.user_id, user_id,
                 was_banned)  # fmt: skip
        return {"userId": user_id, "wasBanned": was_banned}

    async def mute(
        self, actor: Identity, user_id: str, room_id: str, duration_secs: int, reason: str
    ) -> dict[str, Any]:
        """Mute a user (member or not yet) in a room; speaking there is MUTED until it ends."""
        require_role(actor, "mute")
        await self._protect_admins(actor, user_id, "mute")
        muted = await self.db.run(
            "moderation.mute", mod_db.mute_user,
            room_id, user_id, actor.user_id, duration_secs, reason,
        )  # fmt: skip
        event = {**muted, "mutedBy": actor.user_id, "reason": reason}
        self.hub.publish_many(
            [Target.room(room_id), Target.user(user_id, "chat")], "room:user_muted", event
        )
        log.info("mute: %s muted %s in %s until %s (%s)", actor.user_id, user_id, room_id,
                 muted["mutedUntil"], reason)  # fmt: skip
        self._notify([user_id], type="warning", category="moderation",
                     title="You were muted",
                     message=f"You are muted in {room_id} until {muted['mutedUntil']}"
                             + (f": {reason}" if reason else ""),
                     data={"roomId": room_id, "mutedUntil": muted["mutedUntil"],
                           "reason": reason})  # fmt: skip
        return muted

    # -- content ----------------------------------------------------------------

    async def delete_message(self, actor: Identity, message_id: int, reason: str) -> dict[str, Any]:
        """Soft-delete a message; its room gets ``message:deleted``, its author a notice."""
        require_role(actor, "delete_message")
        message = await self.db.run(
            "message.delete", chat_db.delete_message, message_id, actor.user_id, True
        )
        await self.db.run(
            "moderation.audit", mod_db.audit, actor.user_id, "delete_message",
            f"message:{message['id']}", reason,
            {"roomId": message["roomId"], "senderId": message["senderId"]},
        )  # fmt: skip
        data = {
            "messageId": message["id"],
            "roomId": message["roomId"],
            "deletedBy": actor.user_id,
            "reason": reason,
        }
        self.hub.publish(Target.room(message["roomId"]), "message:deleted", data)
        log.info("delete_message: %s removed message %s in %s (%s)", actor.user_id,
                 message["id"], message["roomId"], reason)  # fmt: skip
        if message["senderId"] != actor.user_id:
            self._notify([message["senderId"]], type="warning", category="moderation",
                         title="Message removed",
                         message="Your message was removed" + (f": {reason}" if reason else ""),
                         data={"roomId": message["roomId"], "messageId": message["id"],
                               "reason": reason})  # fmt: skip
        return data

    async def broadcast(
        self,
        actor: Identity,
        message: str,
        type: str,
        namespaces: Iterable[str] | None,
        role: str | None = None,
    ) -> dict[str, Any]:
        """Send ``admin:broadcast`` to every connection of the chosen namespaces.

        With ``role``, only to those whose token carries it (a role no token
        has reaches nobody), on every node.
        """
        require_role(actor, "broadcast")
        chosen = sorted(set(namespaces)) if namespaces else list(NAMESPACES)
        data: dict[str, Any] = {
            "message": message,
            "type": type,
            "from": actor.user_id,
            "sentAt": protocol.iso(protocol.now()),
            "namespaces": chosen,
        }
        details: dict[str, Any] = {"message": message[:200], "type": type}
        if role is None:
            targets = [Target.ns(ns) for ns in chosen]
        else:
            # One role channel for every namespace: each node delivers once per connection.
            targets = [Target.role(role, ns) for ns in chosen]
            data["role"] = details["role"] = role
        await self.db.run(
            "moderation.audit", mod_db.audit, actor.user_id, "broadcast", ",".join(chosen),
            "", details,
        )  # fmt: skip
        delivered = self.hub.publish_many(targets, "admin:broadcast", data)
        log.info("broadcast: %s to %s%s (%d local connections): %s", actor.user_id,
                 ",".join(chosen), f" role {role}" if role else "", delivered,
                 message[:80])  # fmt: skip
        return {**data, "delivered": delivered}

    # -- records ------------------------------------------------------------------

    async def audit_log(
        self, actor: Identity, limit: int, offset: int, action: str | None
    ) -> dict[str, Any]:
        """``{entries, total}``: audit rows newest first, optionally of one action (admins)."""
        require_role(actor, "read_audit")
        page: dict[str, Any] = await self.db.run(
            "moderation.audit_page", mod_db.audit_page, limit, offset, action
        )
        return page

    # -- mechanics ----------------------------------------------------------------

    async def _cluster_count(self, user_id: str) -> int:
        """The user's connections on every node (0 on a single node: count locally)."""
        if self.cluster_connections is None:
            return 0
        return await self.cluster_connections(user_id)

    def disconnect_user(
        self,
        user_id: str,
        notice_event: str | None,
        notice: dict[str, Any] | None,
        error: errors.GatewayError,
        *,
        relay: bool = True,
    ) -> int:
        """Tell every local connection of ``user_id`` why, then close it with 4403.

        Returns how many connections of this node were closed. With ``relay``
        a control message on the user's channel carries the call to the other
        nodes with a connection of that user, which run it with ``relay=False``.
        """
        if relay:
            data = {
                "userId": user_id,
                "code": error.close_code or CLOSE_FORBIDDEN,
                "errorCode": error.code,
                "message": error.message,
                "details": error.details,
                "noticeEvent": notice_event,
                "notice": notice,
            }
            self.hub.broker.send_control(DISCONNECT_USER_CONTROL, data, target=Target.user(user_id))
        conns = self.hub.user_connections(user_id)
        frames = []
        if notice_event is not None:
            frames.append(protocol.frame(protocol.event_payload(notice_event, notice or {})))
        frames.append(protocol.frame(protocol.system_error_payload(error, None)))
        # Counted as connections_closed{reason="banned"|"kicked"}.
        cause = "banned" if isinstance(error, errors.Banned) else "kicked"
        for conn in conns:
            for frame in frames:
                conn.send_frame(frame)
            # Gateway handlers record why they close; other connections just close.
            close_as = getattr(conn, "close_as", None)
            if close_as is not None:
                close_as(cause, CLOSE_FORBIDDEN, error.code.lower())
            else:
                conn.close_with(CLOSE_FORBIDDEN, error.code.lower())
        return len(conns)

    def _disconnect_from_elsewhere(self, data: dict[str, Any]) -> None:
        """``disconnect_user`` sent by another node (see :meth:`disconnect_user`)."""
        error = _error_class(data["errorCode"])(data["message"], data.get("details"))
        closed = self.disconnect_user(
            data["userId"], data.get("noticeEvent"), data.get("notice"), error, relay=False
        )
        log.info("disconnect_user from another node: %s (%s): %d connection(s)",
                 data["userId"], data["errorCode"], closed)  # fmt: skip

    async def _protect_admins(self, actor: Identity, user_id: str, action: str) -> None:
        """Raise FORBIDDEN when a non-admin ``actor`` acts on an admin.

        An admin is a user whose stored roles (from their last token) or any
        live connection on this node carries ``admin``: a second, lesser
        token must not make an admin fair game.
        """
        if actor.has_any(ADMIN_ROLES):
            return
        identities = (getattr(c, "identity", None) for c in self.hub.user_connections(user_id))
        is_admin = any(isinstance(i, Identity) and i.has_any(ADMIN_ROLES) for i in identities)
        if not is_admin:
            stored = await self.db.run("moderation.target_roles", mod_db.user_roles, user_id)
            is_admin = stored is not None and not stored.isdisjoint(ADMIN_ROLES)
        if is_admin:
            raise errors.Forbidden(
                f"Only admins may {action} an admin", {"action": action, "userId": user_id}
            )

    def _notify(self, user_ids: list[str], **fields: Any) -> None:
        # Node sets ``self.notifier`` (server/services/notify.py); without one (a bare
        # Moderation in a tool or test) the action still happens, silently.
        notifier = self.notifier
        if notifier is None:
            return
        # In the background: a slow notification store must not delay the ack;
        # BackgroundTasks logs a failure with the task name.
        self.tasks.spawn(
            notifier.notify(user_ids, **fields), f"notify-{fields.get('title', 'moderation')}"
        )


def _error_class(code: str) -> type[errors.GatewayError]:
    """The GatewayError subclass with ``code`` (the root class if none)."""
    pending: list[type[errors.GatewayError]] = [errors.GatewayError]
    while pending:
        cls = pending.pop()
        if cls.code == code:
            return cls
        pending.extend(cls.__subclasses__())
    return errors.GatewayError
