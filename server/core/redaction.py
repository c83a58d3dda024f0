"""Keeping credentials out of log records.

Two layers. The access log (:func:`log_request`, the application's
``log_function``) writes each request's URI with the values of the
``token`` and ``access_token`` query parameters replaced by
``[redacted]``, so an operator still sees that a token was sent but never
which. :class:`RedactionFilter` is the net behind it: installed on every
handler the gateway configures (stderr in ``setup_logging``, the log
stream's capture handler), it rewrites any record whose message, exception
text or stack still contains such a parameter or anything shaped like a
JWT, whoever logged it (tornado's ``log_exception`` prints the request URI,
an exception message may quote a token).

Example::

    handler.addFilter(RedactionFilter())
    redact("403 GET /ws/chat?token=eyJhbGciOi... (10.0.0.7)")
    # -> "403 GET /ws/chat?token=[redacted] (10.0.0.7)"
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

from tornado.log import access_log
from tornado.web import RequestHandler

#: Query parameters that carry a credential (the gateway reads ``token``;
#: ``access_token`` is the OAuth 2.0 bearer spelling, RFC 6750 §2.3).
TOKEN_PARAMS = frozenset({"token", "access_token"})
REDACTED = "[redacted]"

# A parameter value runs to the next separator; whitespace and quotes end it
# too, so "GET /x?token=abc (10.0.0.7)" and "uri='/x?token=abc'" keep the rest.
_PARAM_RE = re.compile(r"(?<![\w-])(access_token|token)=[^&\s#'\"]*")
# Three base64url segments, the first a JSON object ("{" encodes to "eyJ");
# the signature may be empty (alg none), so the last segment may be too.
_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_exception_formatter = logging.Formatter()


def redact(text: str) -> str:
    """``text`` with token parameter values and JWT-shaped strings replaced.

    Cheap on the common path: the regexes run only when ``text`` contains
    ``token`` or ``eyJ``.
    """
    if "token" not in text and "eyJ" not in text:
        return text
    return _JWT_RE.sub(REDACTED, _PARAM_RE.sub(rf"\1={REDACTED}", text))


def redact_uri(uri: str) -> str:
    """A request URI as the access log shows it: credential parameters redacted.

    The query is split the way tornado parses it, so a percent-encoded
    name (``to%6Ben=``, which tornado reads as ``token``) is caught too.
    """
    path, sep, query = uri.partition("?")
    if not sep:
        return redact(uri)
    pairs = query.split("&")
    for i, pair in enumerate(pairs):
        name, eq, _value = pair.partition("=")
        if eq and unquote_plus(name) in TOKEN_PARAMS:
            pairs[i] = f"{name}={REDACTED}"
    return redact(f"{path}?{'&'.join(pairs)}")


def log_request(handler: RequestHandler) -> None:
    """The application's ``log_function``: tornado's access line, URI redacted.

    Same logger (``tornado.access``), levels (INFO below 400, WARNING for
    4xx, ERROR for 5xx) and shape (``403 GET /ws/chat?token=[redacted]
    (127.0.0.1) 1.52ms``) as tornado's own ``Application.log_request``,
    except 503: a deliberate, retryable refusal (the database or Redis is
    away, the node shutting down, ``/health/ready`` saying "not ready" to
    every probe) is a WARNING; the cause is logged where it is found.
    """
    status = handler.get_status()
    if status < 400:
        level = logging.INFO
    elif status < 500 or status == 503:
        level = logging.WARNING
    else:
        level = logging.ERROR
    if not access_log.isEnabledFor(level):
        return
    request = handler.request
    access_log.log(
        level, "%d %s %s (%s) %.2fms",
        status, request.method, redact_uri(request.uri or ""), request.remote_ip,
        1000.0 * request.request_time(),
    )  # fmt: skip


class RedactionFilter(logging.Filter):
    """Rewrites a record so that no handler after it can print a credential.

    Attach it to handlers, not loggers: a logger's filters do not see the
    records its children propagate. The record is changed in place (message
    formatted and redacted, ``args`` emptied, exception text formatted once
    and redacted into ``exc_text``, which ``logging.Formatter`` reuses), so
    the handlers that run after this one print the redacted text as well.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # bad %-args: the handler reports the record as usual
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = _exception_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
