"""``python -m bench.peers``: see :mod:`bench.peers.driver`."""

from bench.peers.driver import main

raise SystemExit(main())
