"""The layering of the code base, checked on every module's imports.

Each package has a rank; a module may import its own rank or below, never
above: handlers -> services -> cluster -> ops -> store/realtime -> core. The
node's wiring (``server/app.py``, the CLI, the listener) sits on top, and the
Python client imports nothing of the server.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Package prefix -> rank; the longest matching prefix wins.
RANKS = {
    "server.core": 0,
    "server.realtime": 1,
    "server.store": 1,
    "models": 1,
    "server.ops": 2,
    "server.cluster": 3,
    "server.services": 4,
    "handlers": 5,
    "server": 6,  # the wiring: app, cli, listener, __main__
}
CLIENT = "switchboard_client"


def rank(module: str) -> int | None:
    for prefix in sorted(RANKS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return RANKS[prefix]
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    """Modules ``path`` imports, ``from server import x`` read as ``server.x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize(
    "path", sources("server", "handlers", "models"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_module_imports_a_layer_above_it(path: Path) -> None:
    own = rank(module_name(path))
    assert own is not None, f"{path} is in no layer: add its package to RANKS"
    above = [m for m in imports(path) if (r := rank(m)) is not None and r > own]
    assert not above, f"{module_name(path)} (rank {own}) imports {above}"


def test_the_client_library_imports_nothing_of_the_server() -> None:
    for path in sources(CLIENT):
        server_side = [m for m in imports(path) if rank(m) is not None]
        assert not server_side, f"{path.relative_to(ROOT)} imports {server_side}"


def test_server_modules_live_in_role_packages() -> None:
    """Only the node's wiring stays at the top of ``server/``."""
    top = sorted(p.name for p in (ROOT / "server").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "app.py", "cli.py", "listener.py"]
