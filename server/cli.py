"""The ``switchboard`` command: ``serve`` and ``token``.

Example::

    switchboard serve --port 8080
    switchboard token alice --role admin --ttl 600
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

from server import __version__
from server.auth import mint_token
from server.config import Config, ConfigError

log = logging.getLogger("switchboard")

# The token printed at development start-up lasts a working day.
DEV_TOKEN_TTL_SECS = 12 * 3600


class JSONFormatter(logging.Formatter):
    """One JSON object per line, with the node and any connection context."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{record.msecs:03.0f}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "node": self.node_id,
        }
        for key in ("conn_id", "user_id", "event"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["stack"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
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
    serve.add_argument("--heartbeat-interval", dest="heartbeat_interval", type=float)
    serve.add_argument("--log-format", dest="log_format", choices=["text", "json"])
    serve.add_argument("--log-level", dest="log_level")

    token = sub.add_parser("token", help="mint a JWT with the configured secret")
    token.add_argument("user", help="user id (the sub claim)")
    token.add_argument("--role", action="append", dest="roles", help="repeatable; default user")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    token.add_argument("--name", help="username (default: the user id)")
    token.add_argument("--display-name", dest="display_name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command",)}
    try:
        if args.command == "token":
            config = Config.from_env(os.environ)
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
    return asyncio.run(_serve(config))


async def _serve(config: Config) -> int:
    from server.app import Node

    node = Node(config)
    try:
        await node.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, exc)
        return 1
    urls = node.urls
    print(f"switchboard {__version__} node {config.node_id} ({config.env})", flush=True)
    for name, url in urls.items():
        print(f"  listening  {name:<5} {url}", flush=True)
    print(f"  config     {orjson.dumps(config.public_view()).decode()}", flush=True)
    if config.env == "development":
        token = mint_token(config, "dev", roles=["user", "admin"], ttl_secs=DEV_TOKEN_TTL_SECS,
                           name="dev", display_name="Developer")  # fmt: skip
        print(f"  dev token  {token}", flush=True)
        print(f"  try        {urls['chat']}?token=<dev token>", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: closing %d connection(s)", len(node.hub.connections))
    await node.stop()
    return 0
