"""Waiting for a condition that becomes true in the background: :func:`eventually`.

For state that changes after the action a test awaited (a gauge refreshed by
a timer, clean-up after a close, a subscription reaching Redis, a scrape by
Prometheus). When the test can wait on an event instead (an ack, a frame, a
ping round trip) it should; this is for what no event announces.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def eventually(
    check: Callable[[], Any],
    *,
    timeout: float = 5.0,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """Poll ``check`` (sync or async) every ``interval`` seconds until it returns a
    truthy value; return that value.

    An :class:`OSError` from ``check`` (a node or service not answering yet)
    counts as "not yet". Raises :class:`AssertionError` naming ``what`` and the
    last value after ``timeout`` seconds.

    Example::

        await eventually(lambda: not node.hub.connections, what="connections closed")
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if asyncio.iscoroutine(last):
                last = await last
        except OSError as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)
