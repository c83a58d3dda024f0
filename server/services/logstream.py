"""Live logs: capture the gateway's ``logging`` records and fan them out.

:class:`LogStream` keeps the newest entries in a ring buffer, counts them
for ``/api/v1/logs/stats`` and hands each new entry to every subscriber
whose :class:`LogFilter` matches. Entries come from two places: the
gateway's own loggers, through the :class:`LogCaptureHandler` that
:meth:`LogStream.install` attaches (``Node.start``) and :meth:`uninstall`
removes (``Node.stop``), and other services' entries ingested through
``POST /api/v1/logs`` (:meth:`LogStream.publish`). In a cluster, entries
stored on the other nodes arrive through :meth:`LogStream.receive` and go
to the subscribers only (server/services/logcluster.py relays them).

An entry is a plain dict, already in wire shape::

    {"timestamp": "2026-11-23T10:00:00.123Z", "level": "ERROR",
     "service": "switchboard", "context": "switchboard.ws",
     "message": "...", "metadata": {...}, "stack": "Traceback ...", "node": "n1"}

Credentials: the capture handler carries a
:class:`~server.core.redaction.RedactionFilter`, so token query values and
JWT-shaped strings are redacted before an entry is buffered or delivered;
ingested entries get the same treatment (:func:`ingested_entry`).

Threading: records are emitted on any thread (the database runs in worker
threads), so the handler only builds the entry there and passes it to the
event loop with ``call_soon_threadsafe``; buffering and delivery happen on
the loop thread alone, and a log call never waits for a subscriber.

Recursion: a record emitted while an entry is being delivered (a sink that
logs, a write that fails and logs) is not captured — it still reaches the
other handlers (stderr) — and records of this module's own logger are never
captured, so delivering logs cannot produce more logs to deliver.

Example::

    stream = LogStream("n1", buffer_size=1000)
    stream.install(asyncio.get_running_loop())
    stream.subscribe("conn-1", LogFilter(min_level=LEVELS["WARNING"]), on_entry)
    ...
    stream.uninstall()
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from server.core import protocol
from server.core.redaction import RedactionFilter, redact

log = logging.getLogger("switchboard.logstream")

#: Entry levels, lowest first; a subscription's level is a minimum.
LEVELS: dict[str, int] = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}
# Spellings other services' loggers use (NestJS: log/verbose/warn; winston: warn).
_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL", "LOG": "INFO", "VERBOSE": "DEBUG",
                  "TRACE": "DEBUG"}  # fmt: skip

#: The service name of the gateway's own entries.
OWN_SERVICE = "switchboard"
#: Logger trees captured by default: ours, and tornado's error reporting.
CAPTURED_LOGGERS = ("switchboard", "tornado.application", "tornado.general")

# Bounds on one entry, so a huge message or traceback cannot bloat the buffer.
MAX_MESSAGE_CHARS = 8000
MAX_STACK_CHARS = 16000
MAX_METADATA_VALUE_CHARS = 1000
# Entries handed to the loop but not yet published. Bounded so that worker
# threads logging while the loop is stalled cannot queue without limit.
MAX_PENDING_ENTRIES = 10_000
# How many error entries ``stats()["recentErrors"]`` shows.
RECENT_ERRORS_KEPT = 10
# Distinct service names counted in stats; ingested names are client input,
# so the map is bounded and later names are counted under "other".
MAX_SERVICES_COUNTED = 100

LogEntry = dict[str, Any]
#: A subscriber's callback: the entry and its pre-built ``log:*`` frame.
LogSink = Callable[[LogEntry, bytes], None]

# Attributes every LogRecord has; anything else came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_exception_formatter = logging.Formatter()


def normalize_level(name: str) -> str:
    """``"warn"`` → ``"WARNING"``; raises ValueError for an unknown level."""
    upper = name.strip().upper()
    upper = _LEVEL_ALIASES.get(upper, upper)
    if upper not in LEVELS:
        raise ValueError(f"unknown level {name!r}")
    return upper


def level_number(entry: LogEntry) -> int:
    return LEVELS.get(entry["level"], logging.INFO)


def event_for(entry: LogEntry) -> str:
    """The event an entry is pushed as: ``log:error``, ``log:warning`` or ``log:entry``."""
    number = level_number(entry)
    if number >= logging.ERROR:
        return "log:error"
    if number >= logging.WARNING:
        return "log:warning"
    return "log:entry"


@dataclass(frozen=True, slots=True)
class LogFilter:
    """What a subscriber wants to see; empty fields match everything.

    ``contexts`` match a logger name or any logger below it
    (``switchboard`` matches ``switchboard.ws``); ``contains`` is a
    case-insensitive substring of the message.
    """

    min_level: int = 0
    services: frozenset[str] | None = None
    contexts: frozenset[str] | None = None
    contains: str | None = None

    def matches(self, entry: LogEntry) -> bool:
        if level_number(entry) < self.min_level:
            return False
        if self.services is not None and entry["service"] not in self.services:
            return False
        if self.contexts is not None:
            context = entry["context"]
            if not any(context == c or context.startswith(c + ".") for c in self.contexts):
                return False
        return self.contains is None or self.contains.lower() in entry["message"].lower()

    @classmethod
    def of(
        cls,
        level: str | None,
        services: list[str] | None,
        contexts: list[str] | None,
        contains: str | None,
    ) -> LogFilter:
        """The filter a ``logs:subscribe`` request asks for (``level`` a :data:`LEVELS` name)."""
        return cls(
            min_level=LEVELS[level] if level else 0,
            services=frozenset(services) if services else None,
            contexts=frozenset(contexts) if contexts else None,
            contains=contains,
        )

    def public(self) -> dict[str, Any]:
        names = {number: name for name, number in LEVELS.items()}
        return {
            "level": names.get(self.min_level),
            "services": sorted(self.services) if self.services is not None else None,
            "contexts": sorted(self.contexts) if self.contexts is not None else None,
            "contains": self.contains,
        }


class LogStream:
    """Ring buffer, counters and filtered fan-out of log entries (loop thread only).

    Only :meth:`submit` and the capture handler may be used from other
    threads; everything else runs on the event loop.
    """

    # Shared by every LogStream of the process (several nodes run in one test
    # process): a sink of one node that logs must not be captured by another
    # node's handler either, or two nodes could feed each other forever.
    _guard: ClassVar[threading.local] = threading.local()

    def __init__(self, node_id: str, buffer_size: int) -> None:
        self.node_id = node_id
        self._buffer: deque[LogEntry] = deque(maxlen=max(1, buffer_size))
        self._subscribers: dict[str, tuple[LogFilter, LogSink]] = {}
        self.total = 0
        self.by_level: Counter[str] = Counter()
        self.by_service: Counter[str] = Counter()
        self._recent_errors: deque[LogEntry] = deque(maxlen=RECENT_ERRORS_KEPT)
        #: Records not captured because they were emitted while delivering.
        self.suppressed = 0
        #: Entries dropped because the loop had MAX_PENDING_ENTRIES waiting.
        self.overflowed = 0
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._handler: LogCaptureHandler | None = None
        self._loggers: tuple[str, ...] = ()
        #: Called with each entry this node stores (its own and ingested ones),
        #: after it is buffered: the cluster relay (server/services/logcluster.py).
        self.on_stored: Callable[[LogEntry], None] | None = None
        #: Called when the set of subscribers (and so the lowest level wanted) changes.
        self.on_subscribers_changed: Callable[[], None] | None = None

    # -- capture --------------------------------------------------------------

    def install(
        self, loop: asyncio.AbstractEventLoop, loggers: Iterable[str] = CAPTURED_LOGGERS
    ) -> None:
        """Attach the capture handler to ``loggers``; entries go to ``loop``."""
        if self._handler is not None:
            return
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._handler = LogCaptureHandler(self)
        self._loggers = tuple(loggers)
        for name in self._loggers:
            logging.getLogger(name).addHandler(self._handler)

    def uninstall(self) -> None:
        """Detach the capture handler (idempotent)."""
        if self._handler is None:
            return
        for name in self._loggers:
            logging.getLogger(name).removeHandler(self._handler)
        self._handler = None

    @property
    def capturing(self) -> bool:
        """True on a thread that is delivering or capturing right now."""
        return bool(getattr(self._guard, "active", False))

    def submit(self, entry: LogEntry) -> None:
        """Thread-safe: publish ``entry`` on the loop thread, soon."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._pending_lock:
            if self._pending >= MAX_PENDING_ENTRIES:
                self.overflowed += 1
                return
            self._pending += 1
        try:
            # Never inline, even on the loop thread: the record may come from
            # the middle of a hub or handler operation. call_soon_threadsafe
            # costs a wake-up write, so it is kept for the other threads.
            if threading.get_ident() == self._loop_thread:
                loop.call_soon(self._publish_submitted, entry)
            else:
                loop.call_soon_threadsafe(self._publish_submitted, entry)
        except RuntimeError:
            # The loop closed between the check and the call: shutting down.
            with self._pending_lock:
                self._pending -= 1

    def _publish_submitted(self, entry: LogEntry) -> None:
        with self._pending_lock:
            self._pending -= 1
        self.publish(entry)

    # -- subscribers ----------------------------------------------------------

    def subscribe(self, key: str, log_filter: LogFilter, sink: LogSink) -> None:
        """Deliver matching entries to ``sink`` (replaces ``key``'s earlier subscription)."""
        self._subscribers[key] = (log_filter, sink)
        self._subscribers_changed()

    def unsubscribe(self, key: str) -> bool:
        if self._subscribers.pop(key, None) is None:
            return False
        self._subscribers_changed()
        return True

    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def lowest_level_wanted(self) -> int | None:
        """The lowest minimum level of the subscribers; None without subscribers."""
        if not self._subscribers:
            return None
        return min(log_filter.min_level for log_filter, _ in self._subscribers.values())

    def _subscribers_changed(self) -> None:
        if self.on_subscribers_changed is not None:
            self.on_subscribers_changed()

    # -- entries --------------------------------------------------------------

    def publish(self, entry: LogEntry) -> int:
        """Store, count and deliver one entry of this node; returns how many sinks got it."""
        return self._deliver(entry, store=True)

    def receive(self, entry: LogEntry) -> int:
        """Deliver an entry of another node (buffered and counted there, not here)."""
        return self._deliver(entry, store=False)

    def _deliver(self, entry: LogEntry, *, store: bool) -> int:
        if self.capturing:
            # A sink published while we deliver: drop it rather than recurse.
            self.suppressed += 1
            return 0
        self._guard.active = True
        try:
            if store:
                self._store(entry)
                if self.on_stored is not None:
                    self.on_stored(entry)
            delivered = 0
            frame: bytes | None = None
            # Snapshot: a sink may close its connection, which unsubscribes it.
            for key, (log_filter, sink) in tuple(self._subscribers.items()):
                if not log_filter.matches(entry):
                    continue
                if frame is None:
                    frame = protocol.event_frame(event_for(entry), entry)
                try:
                    sink(entry, frame)
                    delivered += 1
                except Exception:
                    # Not captured (guard is set): goes to stderr only.
                    log.exception("log subscriber %s failed; unsubscribing it", key)
                    self.unsubscribe(key)
            return delivered
        finally:
            self._guard.active = False

    def _store(self, entry: LogEntry) -> None:
        self._buffer.append(entry)
        self.total += 1
        self.by_level[entry["level"]] += 1
        service = entry["service"]
        if service in self.by_service or len(self.by_service) < MAX_SERVICES_COUNTED:
            self.by_service[service] += 1
        else:
            self.by_service["other"] += 1
        if level_number(entry) >= logging.ERROR:
            self._recent_errors.append(entry)

    def recent(
        self, limit: int, *, min_level: int = 0, service: str | None = None
    ) -> list[LogEntry]:
        """Up to ``limit`` newest buffered entries that match, oldest first."""
        found: list[LogEntry] = []
        for entry in reversed(self._buffer):
            if len(found) >= limit:
                break
            if level_number(entry) >= min_level and (
                service is None or entry["service"] == service
            ):
                found.append(entry)
        found.reverse()
        return found

    def stats(self) -> dict[str, Any]:
        """``{total, buffered, byLevel, byService, recentErrors, subscribers}``."""
        return {
            "total": self.total,
            "buffered": len(self._buffer),
            "byLevel": {name: self.by_level.get(name, 0) for name in LEVELS},
            "byService": dict(self.by_service),
            "recentErrors": list(reversed(self._recent_errors)),
            "subscribers": len(self._subscribers),
        }


def ingested_entry(loaded: dict[str, Any], default_service: str, node_id: str) -> LogEntry:
    """An entry ingested over ``POST /api/v1/logs``, loaded, as a wire entry like our own."""
    stamp: dt.datetime = loaded["timestamp"] or protocol.now()
    entry: LogEntry = {
        "timestamp": protocol.iso(stamp),
        "level": loaded["level"],
        "service": loaded["service"] or default_service,
        "context": loaded["context"],
        # Another service's line may quote a URL with ?token=: redacted like ours.
        "message": redact(loaded["message"]),
        "metadata": loaded["metadata"],
        "node": node_id,
    }
    if loaded["stack"]:
        entry["stack"] = redact(loaded["stack"])
    return entry


def fit_entries(entries: list[LogEntry], budget_bytes: int) -> tuple[list[LogEntry], bool]:
    """The newest entries whose JSON fits ``budget_bytes``; True if some were left out."""
    kept: list[LogEntry] = []
    used = 0
    for entry in reversed(entries):
        used += len(orjson.dumps(entry)) + 1
        if used > budget_bytes:
            kept.reverse()
            return kept, True
        kept.append(entry)
    kept.reverse()
    return kept, False


class LogCaptureHandler(logging.Handler):
    """A ``logging.Handler`` that turns records into entries of a :class:`LogStream`.

    It runs on whatever thread logs; it never blocks on subscribers and
    never captures records emitted while the same thread is capturing or
    delivering (see the module docstring).
    """

    def __init__(self, stream: LogStream) -> None:
        super().__init__(logging.NOTSET)
        self.stream = stream
        # Before the ring buffer and the subscribers: no credential in an entry.
        self.addFilter(RedactionFilter())

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == log.name or record.name.startswith(log.name + "."):
            return
        stream = self.stream
        if stream.capturing:
            stream.suppressed += 1
            return
        stream._guard.active = True
        try:
            stream.submit(entry_from_record(record, stream.node_id))
        except Exception:
            self.handleError(record)
        finally:
            stream._guard.active = False


def entry_from_record(record: logging.LogRecord, node_id: str) -> LogEntry:
    """The wire entry for one of our own ``logging`` records."""
    try:
        message = record.getMessage()
    except Exception:  # bad %-args: show the template rather than lose the record
        message = str(record.msg)
    entry: LogEntry = {
        "timestamp": protocol.iso(dt.datetime.fromtimestamp(record.created, dt.UTC)),
        "level": record.levelname if record.levelname in LEVELS else _nearest(record.levelno),
        "service": OWN_SERVICE,
        "context": record.name,
        "message": message[:MAX_MESSAGE_CHARS],
        "metadata": {
            key: _jsonable(value)
            for key, value in vars(record).items()
            if key not in _RECORD_ATTRS and not key.startswith("_")
        },
        "node": node_id,
    }
    stack = record.exc_text or ""  # redacted by RedactionFilter when it ran
    if not stack and record.exc_info and record.exc_info[0] is not None:
        stack = _exception_formatter.formatException(record.exc_info)
    if record.stack_info:
        stack = f"{stack}\n{record.stack_info}" if stack else record.stack_info
    if stack:
        entry["stack"] = stack[-MAX_STACK_CHARS:]
    return entry


def _nearest(levelno: int) -> str:
    name = "DEBUG"
    for candidate, number in LEVELS.items():
        if levelno >= number:
            name = candidate
    return name


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value[:MAX_METADATA_VALUE_CHARS]
    try:
        text = orjson.dumps(value)
    except TypeError:
        return repr(value)[:MAX_METADATA_VALUE_CHARS]
    if len(text) > MAX_METADATA_VALUE_CHARS:
        return repr(value)[:MAX_METADATA_VALUE_CHARS]
    # A JSON-native copy: the caller may mutate its object after logging it.
    return orjson.loads(text)
