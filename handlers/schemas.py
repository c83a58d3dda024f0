"""One marshmallow schema per inbound event.

Schemas load the client's camelCase ``data`` into snake_case keyword
arguments for the handler's ``on_<event>`` method. Unknown fields are
ignored (clients may be newer than the server); wrong or missing ones
become ``VALIDATION_ERROR`` with per-field details.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

# \Z, not $: "$" also matches before a trailing newline ("general\n").
ROOM_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
# Control characters other than tab and newline are stripped from text.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
MAX_CONTENT_CHARS = 4000
MAX_ATTACHMENTS = 10
MAX_METADATA_BYTES = 4096


def clean_text(value: str) -> str:
    return _CONTROL_RE.sub("", value)


class Text(fields.String):
    """A string with control characters (except tab/newline) stripped before checks."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return clean_text(super()._deserialize(value, attr, data, **kwargs))


class MessageIdField(fields.Field[int]):
    """Message ids travel as strings of digits; integers are accepted too."""

    default_error_messages = {"invalid": "Not a valid message id."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        if isinstance(value, int) and 0 < value < 2**63:
            return value
        if isinstance(value, str) and value.isdigit() and len(value) <= 19:
            return int(value)
        raise self.make_error("invalid")


def room_id(**kwargs: Any) -> fields.String:
    return fields.String(
        data_key="roomId",
        # marshmallow str.format()s the message: the braces must be doubled.
        validate=validate.Regexp(ROOM_ID_RE, error="Must match ^[A-Za-z0-9_-]{{1,64}}$."),
        **kwargs,
    )


def content_field() -> Text:
    return Text(required=True, validate=validate.Length(1, MAX_CONTENT_CHARS))


class EventSchema(Schema):
    class Meta:
        unknown = EXCLUDE


class Empty(EventSchema):
    pass


class RoomCreate(EventSchema):
    room_id = room_id(load_default=None)
    name = Text(required=True, validate=validate.Length(1, 100))
    type = fields.String(load_default="public", validate=validate.OneOf(["public", "private"]))
    password = fields.String(load_default=None, validate=validate.Length(1, 128))
    description = Text(load_default="", validate=validate.Length(0, 500))
    members = fields.List(
        fields.String(validate=validate.Length(1, 128)),
        load_default=list,
        validate=validate.Length(0, 200),
    )


class RoomList(EventSchema):
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 100))
    offset = fields.Integer(load_default=0, validate=validate.Range(0, 1_000_000))
    q = Text(load_default=None, validate=validate.Length(0, 100))


class RoomRef(EventSchema):
    room_id = room_id(required=True)


class RoomJoin(RoomRef):
    password = fields.String(load_default=None, validate=validate.Length(1, 128))
    since_seq = fields.Integer(data_key="sinceSeq", load_default=None, validate=validate.Range(0))


class RoomMessages(RoomRef):
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 100))
    before_seq = fields.Integer(
        data_key="beforeSeq", load_default=None, validate=validate.Range(1)
    )
    offset = fields.Integer(load_default=None, validate=validate.Range(0, 1_000_000))

    @validates_schema
    def _one_cursor(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("before_seq") is not None and data.get("offset") is not None:
            raise ValidationError("Use beforeSeq or offset, not both.", "beforeSeq")


class RoomRead(RoomRef):
    seq = fields.Integer(required=True, validate=validate.Range(0))


def _metadata_size(value: dict[str, Any]) -> None:
    if len(orjson.dumps(value)) > MAX_METADATA_BYTES:
        raise ValidationError(f"Must be at most {MAX_METADATA_BYTES} bytes as JSON.")


class MessageSend(RoomRef):
    content = content_field()
    type = fields.String(load_default="text", validate=validate.OneOf(["text", "image", "file"]))
    parent_message_id = MessageIdField(data_key="parentMessageId", load_default=None)
    attachments = fields.List(
        fields.Url(schemes={"http", "https"}, require_tld=False),
        load_default=list,
        validate=validate.Length(0, MAX_ATTACHMENTS),
    )
    metadata = fields.Dict(keys=fields.String(), load_default=dict, validate=_metadata_size)
    client_msg_id = fields.String(
        data_key="clientMsgId", load_default=None, validate=validate.Length(1, 64)
    )


class MessageRef(EventSchema):
    message_id = MessageIdField(data_key="messageId", required=True)


class MessageEdit(MessageRef):
    content = content_field()


class MessageDelete(MessageRef):
    reason = Text(load_default=None, validate=validate.Length(0, 500))


class MessageReact(MessageRef):
    emoji = fields.String(
        required=True,
        validate=[
            validate.Length(1, 32),
            validate.Regexp(r"^\S+\Z", error="Must not contain whitespace."),
        ],
    )
    action = fields.String(load_default="add", validate=validate.OneOf(["add", "remove"]))


class StatusUpdate(EventSchema):
    status = fields.String(required=True, validate=validate.OneOf(["online", "away", "busy"]))


class Ping(EventSchema):
    t = fields.Float(load_default=None, allow_nan=False)


class AuthRefresh(EventSchema):
    token = fields.String(required=True, validate=validate.Length(1, 8192))
