"""Mutes outlive membership: a room_mute table, the live mutes copied into it.

Until now a mute was ``room_member.muted_until``, so leaving the room (which
deletes the membership row) lifted it. The mutes still in force move to
``room_mute``; their actor and reason come from the newest matching audit
row when there is one. ``room_member.muted_until`` stays (nullable, unread):
dropping it would break nodes still running the old code during a rolling
upgrade on a shared database; a later migration may drop it.
"""
import datetime
import json

from peewee import *


def _frozen(db):
    """The tables as this migration knows them (independent of models/)."""
    class Room(Model):
        id = CharField(primary_key=True, max_length=64)
        class Meta:
            database = db
            table_name = 'room'

    class RoomMember(Model):
        room = ForeignKeyField(Room, on_delete='CASCADE')
        user_id = CharField(max_length=128)
        muted_until = DateTimeField(null=True)
        class Meta:
            database = db
            table_name = 'room_member'

    class AuditLog(Model):
        id = BigAutoField()
        actor_id = CharField(max_length=128)
        action = CharField(max_length=64)
        target = CharField(max_length=200)
        reason = CharField(max_length=500, default='')
        details = TextField(default="{}")
        created_at = DateTimeField()
        class Meta:
            database = db
            table_name = 'audit_log'

    class RoomMute(Model):
        room = ForeignKeyField(Room, on_delete='CASCADE')
        user_id = CharField(max_length=128)
        until = DateTimeField()
        muted_by = CharField(max_length=128)
        reason = CharField(max_length=500, default='')
        created_at = DateTimeField()
        class Meta:
            database = db
            table_name = 'room_mute'
            indexes = ((('room', 'user_id'), True),)

    return RoomMember, AuditLog, RoomMute


def _utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _mute_origin(AuditLog, room_id, user_id, default):
    """(actor, reason, created_at) of the newest audited mute of the user in the room."""
    audits = (AuditLog.select()
              .where((AuditLog.action == 'mute') & (AuditLog.target == 'user:%s' % user_id))
              .order_by(AuditLog.id.desc()))
    for row in audits:
        try:
            audited_room = json.loads(row.details).get('roomId')
        except (ValueError, AttributeError):
            continue
        if audited_room == room_id:
            return row.actor_id, row.reason, row.created_at
    return default


def up(migrator, db):
    RoomMember, AuditLog, RoomMute = _frozen(db)
    db.create_tables([RoomMute])
    now = _utcnow()
    live = (RoomMember.select(RoomMember.room, RoomMember.user_id, RoomMember.muted_until)
            .where(RoomMember.muted_until > now))
    for member in live:
        muted_by, reason, created_at = _mute_origin(
            AuditLog, member.room_id, member.user_id, ('', '', now))
        RoomMute.create(room=member.room_id, user_id=member.user_id, until=member.muted_until,
                        muted_by=muted_by, reason=reason, created_at=created_at)


def down(migrator, db):
    # Live mutes of members go back on the membership row; those of
    # non-members have nowhere to go and are lost.
    RoomMember, _, RoomMute = _frozen(db)
    for mute in RoomMute.select().where(RoomMute.until > _utcnow()):
        (RoomMember.update(muted_until=mute.until)
         .where((RoomMember.room == mute.room_id) & (RoomMember.user_id == mute.user_id))
         .execute())
    migrator.migrate(migrator.drop_table('room_mute'))
