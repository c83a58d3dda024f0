"""The ``switchboard`` command: ``serve``, ``token``, ``tail`` and ``renew-epochs``.

Example::

    switchboard serve --port 8080
    switchboard token alice --role admin --ttl 600
    switchboard tail --level WARNING --service billing
    switchboard renew-epochs --database-url postgresql://...  # after restoring a backup
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

from server import __version__
from server.core.auth import mint_token
from server.core.config import Config, ConfigError
from server.core.redaction import RedactionFilter

log = logging.getLogger("switchboard")

# The token printed at development start-up lasts a working day.
DEV_TOKEN_TTL_SECS = 12 * 3600


#: Record attributes (``extra=``) a JSON log line carries when a record has them.
CONTEXT_FIELDS = ("connection_id", "user_id", "event")


class JSONFormatter(logging.Formatter):
    """One JSON object per line, with the node and any connection context.

    Every line has ``timestamp`` (UTC, ms), ``level``, ``logger``, ``message``
    and ``node``; the :data:`CONTEXT_FIELDS` follow when the record carries
    them (the WebSocket handlers log through an adapter that adds them), and
    ``stack`` when it has an exception.
    """

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            # UTC whatever the host's zone: the "Z" says so.
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "node": self.node_id,
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            # Cached like logging.Formatter does, so RedactionFilter's text is used.
            entry["stack"] = record.exc_text
        return orjson.dumps(entry).decode()


def setup_logging(config: Config, stream: TextIO | None = None) -> None:
    """One handler on the root logger, to ``stream`` (stderr), credentials redacted."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactionFilter())
    if config.log_format == "json":
        handler.setFormatter(JSONFormatter(config.node_id))
    else:
        text = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        text.converter = time.gmtime
        handler.setFormatter(text)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    # One access line per WebSocket upgrade is noise at scale.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


def freeze_startup_heap() -> None:
    """Move what start-up allocated out of the garbage collector's sight.

    Modules, tornado, peewee, marshmallow, the compiled schemas: tens of
    thousands of objects that live as long as the process, and that every
    full collection would otherwise traverse again, a pause of milliseconds
    on the event loop (in the tail of send->ack). Called once the node
    listens; a process that never gets here (a test's node) is unaffected.
    """
    gc.collect()
    gc.freeze()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"switchboard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a gateway node")
    serve.add_argument("--env", choices=["development", "test", "production"])
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--node-id", dest="node_id")
    serve.add_argument("--database-url", dest="database_url")
    serve.add_argument("--redis-url", dest="redis_url")
    serve.add_argument("--allowed-origins", dest="allowed_origins")
    serve.add_argument("--jwt-max-ttl", dest="jwt_max_ttl", type=float,
                       help="seconds; refuse tokens whose exp - iat is longer")  # fmt: skip
    serve.add_argument("--heartbeat-interval", dest="heartbeat_interval", type=float)
    serve.add_argument("--header-timeout", dest="header_timeout", type=float,
                       help="seconds to send a request's headers, and its body (default 10)")
    serve.add_argument(
        "--auth-timeout", dest="auth_timeout", type=float,
        help="seconds a connection without a token has to send auth:connect (default 5)",
    )  # fmt: skip
    serve.add_argument("--log-format", dest="log_format", choices=["text", "json"])
    serve.add_argument("--log-level", dest="log_level")

    token = sub.add_parser("token", help="mint a JWT with the configured secret")
    token.add_argument("user", help="user id (the sub claim)")
    token.add_argument("--role", action="append", dest="roles", help="repeatable; default user")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    token.add_argument("--name", help="username (default: the user id)")
    token.add_argument("--display-name", dest="display_name")
    _add_tail_parser(sub)
    epochs = sub.add_parser(
        "renew-epochs",
        help="give every room a new epoch (after restoring a database backup): "
        "clients then reload rooms instead of resuming them",
    )
    epochs.add_argument("--database-url", dest="database_url")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "tail":
        return tail(args, os.environ)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command",)}
    try:
        if args.command == "token":
            config = Config.from_env(os.environ)
            if config.jwt_max_ttl is not None and args.ttl > config.jwt_max_ttl:
                # The node would refuse it (TokenLifetimeTooLong): say so now.
                print(
                    f"switchboard: --ttl {args.ttl:g} exceeds SWITCHBOARD_JWT_MAX_TTL "
                    f"({config.jwt_max_ttl:g} s); the gateway would refuse the token",
                    file=sys.stderr,
                )
                return 2
            print(
                mint_token(
                    config, args.user, roles=args.roles or ["user"], ttl_secs=args.ttl,
                    name=args.name, display_name=args.display_name,
                )
            )  # fmt: skip
            return 0
        config = Config.from_env(os.environ, **overrides)
    except ConfigError as exc:
        print(f"switchboard: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    if args.command == "renew-epochs":
        return asyncio.run(_renew_epochs(config))
    return asyncio.run(_serve(config))


async def _renew_epochs(config: Config) -> int:
    from models import chat as chat_db
    from server.store.db import Database

    db = Database(config.database_url)
    try:
        await db.start()  # a backup may predate the epoch column: migrate first
        count = await db.run("room.renew_epochs", chat_db.renew_epochs)
    finally:
        await db.close()
    print(f"renewed the epoch of {count} room(s)", flush=True)
    return 0


async def _serve(config: Config) -> int:
    from server.app import Node
    from server.listener import raise_fd_limit

    raise_fd_limit()  # every connection is a descriptor; the soft limit is often 1024

    # Handle signals before announcing anything: a SIGTERM/SIGINT sent as soon
    # as the listening line appears must shut down gracefully, not kill us.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    node = Node(config)
    try:
        await node.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, exc)
        return 1
    freeze_startup_heap()
    urls = node.urls
    print(f"switchboard {__version__} node {config.node_id} ({config.env})", flush=True)
    for name, url in urls.items():
        print(f"  listening  {name:<5} {url}", flush=True)
    print(f"  config     {orjson.dumps(config.public_view()).decode()}", flush=True)
    # Development only: test and production never print a usable credential.
    if config.env == "development":
        ttl = min(DEV_TOKEN_TTL_SECS, config.jwt_max_ttl or DEV_TOKEN_TTL_SECS)
        token = mint_token(config, "dev", roles=["user", "admin"], ttl_secs=ttl,
                           name="dev", display_name="Developer")  # fmt: skip
        print(f"  dev token  {token}", flush=True)
        print(f"  try        {urls['chat']}?token=<dev token>", flush=True)
    await stop.wait()
    log.info("shutting down: closing %d connection(s)", len(node.hub.connections))
    await node.stop()
    return 0


# -- switchboard tail -------------------------------------------------------------

DEFAULT_TAIL_URL = "ws://127.0.0.1:8080/ws/logs"
# First connection attempts back off up to this long between tries.
TAIL_MAX_BACKOFF_SECS = 10.0
_TAIL_COLORS = {
    "DEBUG": "\x1b[2m",
    "INFO": "",
    "WARNING": "\x1b[33m",
    "ERROR": "\x1b[31m",
    "CRITICAL": "\x1b[1;31m",
}
_RESET = "\x1b[0m"


def _add_tail_parser(sub: Any) -> None:
    tail_cmd = sub.add_parser("tail", help="print live log entries from /ws/logs")
    tail_cmd.add_argument("--url", default=DEFAULT_TAIL_URL, help=f"default {DEFAULT_TAIL_URL}")
    tail_cmd.add_argument(
        "--token", help="JWT with role admin or logs (default $SWITCHBOARD_TOKEN)"
    )
    tail_cmd.add_argument("--level", help="minimum level: DEBUG, INFO, WARNING, ERROR, CRITICAL")
    tail_cmd.add_argument("--service", action="append", dest="services", help="repeatable")
    tail_cmd.add_argument("--context", action="append", dest="contexts", help="repeatable")
    tail_cmd.add_argument("--contains", help="only messages containing this (any case)")
    tail_cmd.add_argument("--json", action="store_true", help="one JSON entry per line")


def format_entry(entry: dict[str, Any], *, color: bool) -> str:
    """One human line per entry (plus the stack, indented), colored by level on a TTY."""
    level = str(entry.get("level", "INFO"))
    context = entry.get("context") or "-"
    line = (
        f"{entry.get('timestamp', '')} {level:<8} {entry.get('service', '?')} "
        f"[{entry.get('node', '?')}] {context}: {entry.get('message', '')}"
    )
    metadata = entry.get("metadata")
    if metadata:
        line += " " + orjson.dumps(metadata).decode()
    stack = entry.get("stack")
    if stack:
        line += "\n" + "\n".join("    " + part for part in str(stack).splitlines())
    prefix = _TAIL_COLORS.get(level, "") if color else ""
    return f"{prefix}{line}{_RESET}" if prefix else line


def tail(args: argparse.Namespace, environ: Any) -> int:
    """``switchboard tail``: exit 0 on Ctrl-C, 1 when refused for good, 2 on bad usage."""
    token = args.token or environ.get("SWITCHBOARD_TOKEN")
    if not token:
        print("switchboard tail: a token is needed (--token or SWITCHBOARD_TOKEN)", file=sys.stderr)
        return 2
    subscription: dict[str, Any] = {}
    if args.level:
        subscription["level"] = args.level
    if args.services:
        subscription["services"] = args.services
    if args.contexts:
        subscription["contexts"] = args.contexts
    if args.contains:
        subscription["contains"] = args.contains
    try:
        return asyncio.run(_tail(args.url, token, subscription, as_json=args.json))
    except KeyboardInterrupt:
        return 0


async def _tail(url: str, token: str, subscription: dict[str, Any], *, as_json: bool) -> int:
    from switchboard_client import FATAL_CLOSE_CODES, Client, ClientError, ConnectionClosed

    color = sys.stdout.isatty() and not as_json
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def say(text: str) -> None:
        print(f"switchboard tail: {text}", file=sys.stderr, flush=True)

    def show(frame: dict[str, Any]) -> None:
        entry = frame.get("data") or {}
        try:
            if as_json:
                print(orjson.dumps(entry).decode(), flush=True)
            else:
                print(format_entry(entry, color=color), flush=True)
        except BrokenPipeError:
            stop.set()  # the reader went away (| head): finish quietly

    async def subscribe() -> None:
        try:
            await client.emit("logs:subscribe", subscription)
        except ClientError as exc:
            say(f"subscription refused: {exc.code} {exc.message}")
            stop.set()
            return
        except (ConnectionClosed, TimeoutError):
            return  # lost again: the next reconnect subscribes again
        say(f"subscribed to {url}")

    def lost(frame: dict[str, Any]) -> None:
        data = frame["data"]
        more = "; reconnecting" if data.get("willReconnect") else ""
        say(f"connection lost (code {data.get('code')}){more}")

    def failed(frame: dict[str, Any]) -> None:
        data = frame["data"]
        say(f"reconnection refused: {data.get('code')} {data.get('message')}")
        stop.set()

    async def reconnected(frame: dict[str, Any]) -> None:
        say(f"reconnected after {frame['data'].get('attempts')} attempt(s)")
        await subscribe()

    def dropped(frame: dict[str, Any]) -> None:
        say(f"{frame['data'].get('count')} entries dropped (this terminal fell behind)")

    client = Client(url, token, reconnect=True, keep_history=False, buffer_events=False)
    for event in ("log:entry", "log:warning", "log:error"):
        client.on(event, show)
    client.on("log:dropped", dropped)
    client.on("client:disconnected", lost)
    client.on("client:reconnected", reconnected)
    client.on("client:reconnect_failed", failed)

    attempt = 0
    while not stop.is_set():
        try:
            await client.connect()
            break
        except ClientError as exc:
            if exc.close_code in FATAL_CLOSE_CODES:
                say(f"refused: {exc.code} {exc.message}")
                return 1
            error: str = f"{exc.code} {exc.message}"
        except (OSError, ConnectionClosed, TimeoutError) as exc:
            error = str(exc) or type(exc).__name__
        delay = min(TAIL_MAX_BACKOFF_SECS, 0.25 * 2**attempt)
        attempt += 1
        say(f"cannot connect to {url} ({error}); retrying in {delay:.1f}s")
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            pass
    if stop.is_set():
        return 0
    await subscribe()
    await stop.wait()
    refused = client.closed and client.close_code in FATAL_CLOSE_CODES
    await client.aclose(timeout=2.0)
    return 1 if refused else 0
