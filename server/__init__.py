"""Switchboard: a real-time WebSocket gateway on Tornado.

The server is grouped by role, each package importing only those below it
(``tests/test_layers.py`` checks it; docs/architecture.md follows one message
through them):

- ``services/``: domain services, called by the handlers and by admin alike
  (rooms, typing, moderation, notifications, log stream, security, admission);
- ``cluster/``: the Redis broker (the mirror) and cluster-wide state;
- ``ops/``: metrics, stats, health;
- ``store/``: the database executor and the group-commit batcher;
- ``realtime/``: the hub, its broker interface, outbound writes, presence;
- ``core/``: protocol, errors, configuration, tokens, limits, task plumbing.

On top, the node's wiring: ``app.py`` (``Node``, ``make_app``), ``cli.py`` and
``listener.py``. The namespace handlers are the ``handlers`` package; the
models and queries the ``models`` package.
"""

__version__ = "0.1.0"
