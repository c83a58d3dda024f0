"""``python -m server`` is the ``switchboard`` command."""

from server.cli import main

raise SystemExit(main())
