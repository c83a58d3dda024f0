"""Initial schema: users, rooms, members, messages, reactions, notifications, bans, audit log."""
from peewee import *



def up(migrator, db):
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
    db.create_tables([AuditLog])

    class Ban(Model):
        user_id = CharField(unique=True, max_length=128)
        reason = CharField(max_length=500, default='')
        banned_by = CharField(max_length=128)
        created_at = DateTimeField()
        expires_at = DateTimeField(null=True)
        class Meta:
            database = db
            table_name = 'ban'
    db.create_tables([Ban])

    class Room(Model):
        id = CharField(primary_key=True, max_length=64)
        name = CharField(max_length=100)
        type = CharField(max_length=16, default='public')
        description = CharField(max_length=500, default='')
        password_hash = CharField(null=True, max_length=256)
        owner_id = CharField(max_length=128)
        last_seq = BigIntegerField(default=0)
        created_at = DateTimeField()
        last_activity_at = DateTimeField()
        deleted_at = DateTimeField(null=True)
        class Meta:
            database = db
            table_name = 'room'
    db.create_tables([Room])

    class Message(Model):
        id = BigAutoField()
        room = ForeignKeyField(Room, on_delete='CASCADE')
        seq = BigIntegerField()
        sender_id = CharField(max_length=128)
        sender_name = CharField(max_length=128)
        content = TextField()
        type = CharField(max_length=16, default='text')
        parent_id = BigIntegerField(null=True)
        attachments = TextField(default="[]")
        metadata = TextField(default="{}")
        client_msg_id = CharField(null=True, max_length=64)
        created_at = DateTimeField()
        edited_at = DateTimeField(null=True)
        deleted_at = DateTimeField(null=True)
        class Meta:
            database = db
            table_name = 'message'
            indexes = ((('room', 'seq'), True), (('sender_id', 'client_msg_id'), True))
    db.create_tables([Message])

    class Notification(Model):
        id = BigAutoField()
        user_id = CharField(index=True, max_length=128)
        type = CharField(max_length=32, default='info')
        category = CharField(max_length=32, default='system')
        title = CharField(max_length=200)
        message = TextField(default='')
        data = TextField(default="{}")
        action_url = CharField(null=True, max_length=500)
        priority = CharField(max_length=16, default='normal')
        read = BooleanField(default=False)
        group_key = CharField(index=True, null=True, max_length=200)
        created_at = DateTimeField()
        class Meta:
            database = db
            table_name = 'notification'
    db.create_tables([Notification])

    class Reaction(Model):
        message = ForeignKeyField(Message, on_delete='CASCADE')
        user_id = CharField(max_length=128)
        emoji = CharField(max_length=32)
        created_at = DateTimeField()
        class Meta:
            database = db
            table_name = 'reaction'
            indexes = ((('message', 'user_id', 'emoji'), True),)
    db.create_tables([Reaction])

    class RoomMember(Model):
        room = ForeignKeyField(Room, on_delete='CASCADE')
        user_id = CharField(index=True, max_length=128)
        role = CharField(max_length=16, default='member')
        joined_at = DateTimeField()
        last_read_seq = BigIntegerField(default=0)
        muted_until = DateTimeField(null=True)
        class Meta:
            database = db
            table_name = 'room_member'
            indexes = ((('room', 'user_id'), True),)
    db.create_tables([RoomMember])

    class User(Model):
        id = CharField(primary_key=True, max_length=128)
        username = CharField(index=True, max_length=64)
        display_name = CharField(max_length=128)
        roles = CharField(max_length=256, default='user')
        created_at = DateTimeField()
        last_seen_at = DateTimeField()
        class Meta:
            database = db
            table_name = 'user'
    db.create_tables([User])


def down(migrator, db):
    migrator.migrate(migrator.drop_table('user'))
    migrator.migrate(migrator.drop_table('room_member'))
    migrator.migrate(migrator.drop_table('reaction'))
    migrator.migrate(migrator.drop_table('notification'))
    migrator.migrate(migrator.drop_table('message'))
    migrator.migrate(migrator.drop_table('room'))
    migrator.migrate(migrator.drop_table('ban'))
    migrator.migrate(migrator.drop_table('audit_log'))
