"""The JavaScript client (web/switchboard.js) against a live gateway.

The tests themselves are in web/test/*.test.js and run with Node's built-in
runner; this module starts the gateway (restartable through a small control
endpoint, for the reconnection tests) and fails with node's output when any
JavaScript test fails.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.services import require_binary
from tests.web.gateway import REPO_ROOT, ControlServer, GatewayProcess

NODE_TESTS_TIMEOUT_SECS = 100


def _node_flags(node: str) -> list[str]:
    """Flags that give Node a global WebSocket (built in from 22, flagged in 20.10+)."""
    probe = "process.exit(typeof WebSocket === 'function' ? 0 : 1)"
    for flags in ([], ["--experimental-websocket"]):
        if subprocess.run([node, *flags, "-e", probe], capture_output=True).returncode == 0:
            return flags
    message = "Node.js >= 20.10 is needed (a global WebSocket)"
    if os.environ.get("CI") == "true":
        raise RuntimeError(message + "; required under CI=true")
    pytest.skip(message)


def test_javascript_client_against_live_gateway(tmp_path: Path) -> None:
    node = require_binary("node", "Node.js is not installed")
    tests = sorted(
        str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "web" / "test").glob("*.test.js")
    )
    assert tests, "no web/test/*.test.js files"
    with GatewayProcess(tmp_path) as gateway, ControlServer(gateway) as control:
        env = {
            **gateway.env,
            "SWITCHBOARD_TEST_URL": gateway.http,
            "SWITCHBOARD_CONTROL_URL": control.url,
        }
        result = subprocess.run(
            [node, *_node_flags(node), "--test", "--test-reporter=spec", *tests],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True,
            timeout=NODE_TESTS_TIMEOUT_SECS,
        )  # fmt: skip
        gateway_log = gateway.log()
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"node --test failed:\n{output}\n--- gateway log ---\n{gateway_log}"
    )
    assert re.search(r"\bfail 0\b", output), output
