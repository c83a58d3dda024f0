"""Peer server for bench/peers: a minimal, idiomatic python-socketio chat-room server.

Run by ``bench.peers`` with its own virtualenv (``bench/peers/.venv``: python-socketio,
aiohttp, PyJWT), not the product's. aiohttp rather than ASGI + uvicorn: python-socketio's
aiohttp integration hands WebSocket frames straight to aiohttp's own (C-accelerated) reader
and writer, one library for HTTP and WebSocket, where ASGI adds a message-dict layer and
uvicorn a second WebSocket library per frame; it is the cheaper idiomatic choice.

JWT (HS256, ``BENCH_JWT_SECRET``) checked at connect from the handshake's auth payload; a
bad token is refused (``ConnectionRefusedError``: the client gets a connect error).
Events: ``join`` {room} -> acks {ok: true}; ``send`` {room, content, metadata} -> emits
``message`` to the room's other members (``skip_sid``: Switchboard does not echo a sender's
own message either), then acks {ok: true, id}. Nothing is persisted. WebSocket transport
only. Listens on ``PORT`` (0: any) and prints ``{"port", "pid"}`` as one JSON line; then
answers ``gc`` on stdin with ``{"ok": true}``; exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import itertools
import json
import os
import sys
from typing import Any

import jwt
import socketio
from aiohttp import web

SECRET = os.environ["BENCH_JWT_SECRET"]

sio = socketio.AsyncServer(async_mode="aiohttp", transports=["websocket"], cors_allowed_origins=[])
ids = itertools.count(1)


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: dict[str, Any] | None) -> None:
    try:
        claims = jwt.decode((auth or {}).get("token", ""), SECRET, algorithms=["HS256"])
    except jwt.PyJWTError as exc:
        raise socketio.exceptions.ConnectionRefusedError("unauthorized") from exc
    await sio.save_session(sid, {"user": claims["sub"]})


@sio.event
async def join(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    await sio.enter_room(sid, data["room"])
    return {"ok": True}


@sio.event
async def send(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    session = await sio.get_session(sid)
    message_id = next(ids)
    await sio.emit(
        "message",
        {
            "id": message_id,
            "room": data["room"],
            "sender": session["user"],
            "createdAt": datetime.datetime.now(datetime.UTC).isoformat(),
            "content": data["content"],
            "metadata": data.get("metadata"),
        },
        to=data["room"],
        skip_sid=sid,
    )
    return {"ok": True, "id": message_id}


async def main() -> None:
    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(os.environ.get("PORT", "0")), backlog=4096)
    await site.start()
    port = runner.addresses[0][1]  # the bound (host, port): port 0 picks one
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    # Commands, one a line: "gc" (collect, so idle memory is measured after it); end of
    # stdin (the driver stops us, or died) -> exit.
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip() == "gc":
            gc.collect()
            print(json.dumps({"ok": True}), flush=True)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
