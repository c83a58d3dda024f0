"""The web app's HTTP side: static files at ``/`` and ``POST /dev/token``.

:class:`WebAppHandler` serves the top-level files of the web folder
(``index.html`` for ``/``); :class:`DevTokenHandler` mints sign-in tokens in
``development`` only, so a person can open the app and start chatting.

Example::

    routes += web_routes(deps)   # last: the static pattern is narrow but at "/"
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from tornado.web import HTTPError, StaticFileHandler

from handlers.http import JSONHandler
from server.core import errors
from server.core.auth import mint_token

if TYPE_CHECKING:
    from handlers.deps import Deps

#: The repository's web/ folder, used when ``SWITCHBOARD_WEB_ROOT`` is unset.
DEFAULT_WEB_ROOT = Path(__file__).resolve().parent.parent / "web"

# Only top-level files with these suffixes are served: web/test/ and
# package.json stay private, and the pattern cannot shadow routes added later.
STATIC_PATTERN = r"/((?:[A-Za-z0-9_-]+\.(?:html|js|css|svg|png|ico|webmanifest))?)"

# Revalidated on every load (ETag → 304) unless the URL is versioned with ?v=.
NO_CACHE = "no-cache"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

DEV_TOKEN_TTL_SECS = 12 * 3600
DEV_TOKEN_MAX_TTL_SECS = 7 * 24 * 3600
_USER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ROLES = frozenset({"user", "moderator", "admin", "service", "logs"})


class WebAppHandler(StaticFileHandler):
    """Static files of the web app with cache and security headers.

    Files are revalidated on each load (``Cache-Control: no-cache`` plus
    tornado's ETag/Last-Modified, so unchanged files cost a 304), except
    requests carrying ``?v=`` which tornado caches for a long time.
    """

    def set_extra_headers(self, path: str) -> None:
        if "v" not in self.request.arguments:
            self.set_header("Cache-Control", NO_CACHE)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        if path.endswith(".html") or path == "":
            self.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)


class DevTokenHandler(JSONHandler):
    """``POST /dev/token {userId, name?, displayName?, roles?, ttl?}`` → ``{token}``.

    Exists only when ``config.env == "development"`` and tokens are HS256
    (the gateway holds the secret); answers 404 otherwise.
    """

    def prepare(self) -> None:
        config = self.deps.config
        if config.env != "development" or config.jwt_public_key:
            raise HTTPError(404)

    def post(self) -> None:
        try:
            body: Any = orjson.loads(self.request.body or b"{}")
        except orjson.JSONDecodeError:
            raise errors.BadRequest("Body must be JSON") from None
        if not isinstance(body, dict):
            raise errors.BadRequest("Body must be a JSON object")
        problems: dict[str, list[str]] = {}
        user_id = body.get("userId")
        if not isinstance(user_id, str) or not _USER_ID.match(user_id):
            problems["userId"] = ["1-64 letters, digits, '_', '-' or '.'"]
        roles = body.get("roles", ["user"])
        if (
            not isinstance(roles, list)
            or not roles
            # Checked before set(): a list or object in the list is unhashable.
            or not all(isinstance(role, str) for role in roles)
            or not set(roles) <= _ROLES
        ):
            problems["roles"] = [f"a non-empty list of {', '.join(sorted(_ROLES))}"]
        names = {key: body.get(key) for key in ("name", "displayName")}
        for key, value in names.items():
            if value is not None and (not isinstance(value, str) or not 1 <= len(value) <= 64):
                problems[key] = ["1-64 characters"]
        # Never longer than the gateway accepts (SWITCHBOARD_JWT_MAX_TTL).
        config = self.deps.config
        max_ttl = min(DEV_TOKEN_MAX_TTL_SECS, config.jwt_max_ttl or DEV_TOKEN_MAX_TTL_SECS)
        ttl = body.get("ttl", min(DEV_TOKEN_TTL_SECS, max_ttl))
        if not isinstance(ttl, int | float) or isinstance(ttl, bool):
            problems["ttl"] = ["seconds, a number"]
        elif not 1 <= ttl <= max_ttl:
            problems["ttl"] = [f"between 1 and {max_ttl:g} seconds"]
        if problems or not isinstance(user_id, str):
            raise errors.ValidationFailed(details=problems)
        token = mint_token(
            config, user_id, roles=roles, ttl_secs=ttl,
            name=names["name"], display_name=names["displayName"],
        )  # fmt: skip
        self.write_json({"token": token, "userId": user_id, "expiresIn": ttl})


def web_routes(deps: Deps) -> list[Any]:
    """Routes of the web app; the static one goes last in the application."""
    config = deps.config
    root = str(Path(config.web_root) if config.web_root else DEFAULT_WEB_ROOT)
    return [
        (r"/dev/token", DevTokenHandler, {"deps": deps}),
        (STATIC_PATTERN, WebAppHandler, {"path": root, "default_filename": "index.html"}),
    ]
