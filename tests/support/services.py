"""Throwaway PostgreSQL and Redis servers for tests and benchmarks.

Plain helpers, no pytest fixtures: ``tests/conftest.py`` wraps them in
fixtures, and bench scripts can use them directly (pytest is imported lazily,
only by :func:`require_binary`).

Every server runs as a real process on a free loopback port with its data in
a private directory ``switchboard-KIND-*`` (in ``$SWITCHBOARD_TEST_TMPDIR``,
else ``/dev/shm`` when it is a big enough RAM disk, else the temp dir).
Servers are context managers::

    with PostgresServer() as pg, RedisServer() as rd:
        run_app(database_url=pg.url, redis_url=rd.url)

Leaving the ``with`` block (also on an exception) stops the process and
removes its directory; an :mod:`atexit` hook stops whatever is still running
when the interpreter exits, so a failing or interrupted test does not leave
servers behind. A run killed outright (SIGKILL, CI timeout) cannot clean up;
the next run that creates a server stops what it left and deletes its
directories (each records its owner's PID in ``owner.pid``).

PostgreSQL refuses to run as root. When the current user is root, ``initdb``,
``pg_ctl`` and the server itself run as the ``postgres`` system user (through
``subprocess``' ``user=``/``group=`` arguments) and the temporary directory
is handed to that user.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "PostgresServer",
    "RedisServer",
    "ServiceError",
    "find_binary",
    "free_port",
    "require_binary",
]

_LOOPBACK = "127.0.0.1"
_PG_SYSTEM_USER = "postgres"


class ServiceError(RuntimeError):
    """A throwaway service could not be started or stopped."""


# --------------------------------------------------------------------------
# Ports and binaries
# --------------------------------------------------------------------------

_handed_out_ports: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    The kernel picks the port; ports already returned by this process are
    never returned twice, so two servers started back to back do not race
    for the same number. Another process may still grab the port before it
    is used; the servers below retry with a new port when that happens.
    """
    with _ports_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((_LOOPBACK, 0))
                port: int = sock.getsockname()[1]
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port
    raise ServiceError("could not find a free loopback port")


def _version_key(path: str) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin/...`` paths."""
    return tuple(int(part) for part in re.findall(r"\d+", path))


def find_binary(name: str) -> str | None:
    """Return the absolute path of executable *name*, or ``None``.

    Looks in ``PATH`` first, then in ``/usr/lib/postgresql/*/bin`` (newest
    version first), where Debian keeps ``initdb``, ``pg_ctl`` and
    ``postgres`` outside ``PATH``.
    """
    found = shutil.which(name)
    if found:
        return os.path.abspath(found)
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    for candidate in sorted(candidates, key=_version_key, reverse=True):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def require_binary(name: str, reason: str | None = None) -> str:
    """Return the path of executable *name* or give up on the current test.

    When the binary is missing and the environment variable ``CI`` is
    ``"true"`` this raises :class:`RuntimeError`: a missing service under CI
    is a broken setup, not a reason to skip. Otherwise it calls
    ``pytest.skip(reason)`` (pytest is imported only here, so bench scripts
    can import this module without pytest installed).
    """
    path = find_binary(name)
    if path is not None:
        return path
    message = reason or f"{name} is not installed"
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"{message} ({name!r} not found; required under CI=true)")
    import pytest

    pytest.skip(message)


# --------------------------------------------------------------------------
# Cleanup safety net
# --------------------------------------------------------------------------

_live_services: set[_Service] = set()
_live_lock = threading.Lock()


def _stop_all_at_exit() -> None:
    with _live_lock:
        services = list(_live_services)
    for service in services:
        with contextlib.suppress(Exception):
            service.stop()
    with contextlib.suppress(Exception):
        _discard_pg_template()


atexit.register(_stop_all_at_exit)


class Managed:
    """A context manager over ``start()`` (returning self) and ``stop()``.

    Services, clusters and stacks all start processes a test must not leak;
    ``with`` stops them whatever the test did.
    """

    def start(self) -> Self:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _Service(Managed):
    """A service process, registered for the atexit sweep while it runs."""

    def _register(self) -> None:
        with _live_lock:
            _live_services.add(self)

    def _unregister(self) -> None:
        with _live_lock:
            _live_services.discard(self)


def _tail(path: Path, lines: int = 30) -> str:
    """Last *lines* lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _pid_alive(pid: int) -> bool:
    """Whether process *pid* exists and is not a zombie.

    ``pg_ctl`` daemonizes the postmaster, so once it exits it is a zombie of
    PID 1 until init reaps it (which can take seconds in containers). A
    zombie holds no ports or files, so it counts as gone here.
    """
    with contextlib.suppress(ChildProcessError):
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.02)
    return not _pid_alive(pid)


def _rmtree(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _pg_identity() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as, or ``None`` to run as ourselves."""
    if not _running_as_root():
        return None
    try:
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        raise ServiceError(
            "running as root, and PostgreSQL refuses to run as root, but there is "
            f"no {_PG_SYSTEM_USER!r} system user to run it as"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _pg_env() -> dict[str, str]:
    """Environment for PostgreSQL tools: no stray PG* settings, C messages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env.pop("LANG", None)
    return env


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def _temp_base() -> Path:
    """Where service directories go.

    ``SWITCHBOARD_TEST_TMPDIR`` if set; else ``/dev/shm`` when it is a
    writable RAM disk with at least 1 GiB free (clusters are created and
    written several times faster there than on a disk); else the default
    temp directory.
    """
    override = os.environ.get("SWITCHBOARD_TEST_TMPDIR")
    if override:
        Path(override).mkdir(parents=True, exist_ok=True)
        return Path(override)
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        st = os.statvfs(shm)
        if os.access(shm, os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize >= 1 << 30:
            return shm
    return Path(tempfile.gettempdir())


def _traversable_by(path: Path, uid: int) -> bool:
    """Whether user *uid* can reach *path* (execute bit on every ancestor)."""
    try:
        return all(
            (p.stat().st_mode & 0o001) or p.stat().st_uid == uid for p in [path, *path.parents]
        )
    except OSError:
        return False


_swept = False


def _service_dir(kind: str, *, for_postgres: bool = False) -> Path:
    """A new private directory ``switchboard-KIND-*`` for one service.

    It records our PID in ``owner.pid`` so that a later run can remove what
    a killed run left behind (see :func:`_sweep_orphans`). With
    *for_postgres* and running as root, the directory belongs to the
    ``postgres`` user and sits where that user can reach it.
    """
    global _swept
    base = _temp_base().resolve()
    if not _swept:
        _swept = True
        _sweep_orphans(base)
    identity = _pg_identity() if for_postgres else None
    if identity is not None and not _traversable_by(base, identity[0]):
        base = Path("/tmp")
    path = Path(tempfile.mkdtemp(prefix=f"switchboard-{kind}-", dir=base))
    (path / "owner.pid").write_text(str(os.getpid()))
    if identity is not None:
        os.chown(path, *identity)
    return path


def _process_named(pid: int, names: Sequence[str]) -> bool:
    """Whether live process *pid* runs one of the programs *names*."""
    if not _pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return os.path.basename(cmdline.split()[0] if cmdline else "") in names


def _sweep_orphans(base: Path) -> None:
    """Stop servers and delete directories whose owning process is gone.

    A test run that was SIGKILLed (e.g. by a CI timeout) never ran its
    atexit hook; its servers would otherwise live on, holding RAM and ports.
    """
    for path in base.glob("switchboard-*-*"):
        try:
            owner = int((path / "owner.pid").read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if owner == os.getpid() or _pid_alive(owner):
            continue
        pidfiles = {
            path / "data" / "postmaster.pid": ("postgres", "postmaster"),
            path / "redis.pid": ("redis-server",),
        }
        for pidfile, names in pidfiles.items():
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(pidfile.read_text().split()[0])
                if _process_named(pid, names):
                    os.kill(pid, signal.SIGQUIT if "postgres" in names else signal.SIGKILL)
                    if not _wait_pid_gone(pid, 5):
                        os.kill(pid, signal.SIGKILL)
                        _wait_pid_gone(pid, 5)
        _rmtree(path)


def _run_pg_tool(
    argv: Sequence[str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool (as the postgres user when we are root)."""
    identity = _pg_identity()
    kwargs: dict[str, Any] = {}
    if identity is not None:
        kwargs = {"user": identity[0], "group": identity[1], "extra_groups": []}
    return subprocess.run(
        list(argv),
        cwd=cwd,
        env=_pg_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def _pg_bindir() -> Path:
    """Directory holding initdb, pg_ctl and postgres of one PostgreSQL version."""
    initdb = find_binary("initdb")
    if initdb is None:
        raise ServiceError("PostgreSQL is not installed (initdb not found)")
    return Path(os.path.realpath(initdb)).parent


# A cluster made by initdb once per process; each server copies it, which is
# several times faster than running initdb again.
_pg_template: Path | None = None
_pg_template_lock = threading.Lock()


def _pg_template_datadir(bindir: Path) -> Path:
    global _pg_template
    with _pg_template_lock:
        if _pg_template is not None and (_pg_template / "data" / "PG_VERSION").exists():
            return _pg_template / "data"
        root = _service_dir("pgtemplate", for_postgres=True)
        result = _run_pg_tool(
            [
                str(bindir / "initdb"),
                "--pgdata",
                str(root / "data"),
                "--username",
                "postgres",
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            cwd=root,
            timeout=120,
        )
        if result.returncode != 0:
            _rmtree(root)
            raise ServiceError(
                f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        _pg_template = root
        return root / "data"


def _discard_pg_template() -> None:
    global _pg_template
    with _pg_template_lock:
        _rmtree(_pg_template)
        _pg_template = None


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class PostgresServer(_Service):
    """A throwaway PostgreSQL cluster on a free port of 127.0.0.1.

    ``start()`` makes a cluster (trust auth, superuser ``postgres``, UTF8,
    C locale, UTC, ``fsync`` and ``full_page_writes`` off: fast, and safe
    against a server crash but not an OS crash), starts it with ``pg_ctl`` and
    waits until it accepts connections, then creates database *dbname*.

    ``stop()`` shuts it down immediately and deletes its directory. The
    cluster can also be killed (``kill()``: immediate shutdown, data kept)
    and started again on the same port and data (``start()`` or
    ``restart()``), to test reconnection.

    *settings* are extra ``postgresql.conf`` entries, e.g.
    ``{"max_connections": "300"}``.
    """

    def __init__(
        self,
        dbname: str = "switchboard",
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.dbname = dbname
        self.user = "postgres"
        self.host = _LOOPBACK
        self._fixed_port = port is not None
        self.port: int = port if port is not None else free_port()
        self.settings: dict[str, str] = dict(settings or {})
        self.startup_timeout = startup_timeout
        self.root: Path | None = None
        self._bindir: Path | None = None
        self._running = False
        self._initialized = False
        self._started_once = False

    # -- addresses -------------------------------------------------------

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/DBNAME`` of the main database."""
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        """Connection URL for another database of this cluster."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (``PGDATA``)."""
        return self._require_root() / "data"

    @property
    def socket_dir(self) -> Path:
        """Directory of the server's Unix socket (``host=`` for libpq)."""
        return self._require_root()

    @property
    def log_path(self) -> Path:
        """The server log written by ``pg_ctl -l``."""
        return self._require_root() / "postgres.log"

    @property
    def running(self) -> bool:
        """Whether the postmaster is up (as far as this object knows)."""
        return self._running and self.pid is not None

    @property
    def pid(self) -> int | None:
        """PID of the postmaster, read from ``postmaster.pid``."""
        if self.root is None:
            return None
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def _require_root(self) -> Path:
        if self.root is None:
            raise ServiceError("PostgresServer has not been started")
        return self.root

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Self:
        """Create the cluster if needed, start it and wait until it is ready.

        Starting an already running server does nothing. After ``kill()``
        this starts the same data directory on the same port again.
        Returns ``self`` so that ``pg = PostgresServer().start()`` works.
        """
        if self.running:
            return self
        self._register()
        try:
            if not self._initialized:
                self._create_cluster()
            attempts = 1 if self._fixed_port or self._started_once else 4
            for attempt in range(attempts):
                error = self._pg_ctl_start()
                if error is None:
                    break
                port_taken = "could not bind" in error or "already in use" in error
                if not port_taken or attempt == attempts - 1:
                    raise ServiceError(f"PostgreSQL did not start on port {self.port}:\n{error}")
                self.port = free_port()
            self._running = True
            if not self._started_once:
                self._started_once = True
                self.create_database(self.dbname)
        except BaseException:
            self.stop()
            raise
        return self

    def _create_cluster(self) -> None:
        self._bindir = _pg_bindir()
        template = _pg_template_datadir(self._bindir)
        self.root = _service_dir("pg", for_postgres=True)
        shutil.copytree(template, self.data_dir, symlinks=True)
        identity = _pg_identity()
        if identity is not None:
            _chown_tree(self.data_dir, *identity)
        conf: dict[str, str] = {
            "listen_addresses": _quote_literal(_LOOPBACK),
            "unix_socket_directories": _quote_literal(str(self.socket_dir)),
            # Durability only against OS crashes is given up. synchronous_commit
            # stays on: with fsync off it costs a write() per commit, and off it
            # would lose the last commits on kill(), breaking restart tests.
            "fsync": "off",
            "full_page_writes": "off",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            "logging_collector": "off",
            # Keep dynamic shared memory inside the data dir, so it goes with it.
            "dynamic_shared_memory_type": "mmap",
        }
        conf.update(self.settings)
        lines = ["", "# switchboard tests/support/services.py"]
        lines += [f"{key} = {value}" for key, value in conf.items()]
        with (self.data_dir / "postgresql.conf").open("a") as fh:
            fh.write("\n".join(lines) + "\n")
        self._initialized = True

    def _pg_ctl(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        assert self._bindir is not None
        argv = [str(self._bindir / "pg_ctl"), "--pgdata", str(self.data_dir), *args]
        return _run_pg_tool(argv, cwd=self._require_root(), timeout=timeout)

    def _pg_ctl_start(self) -> str | None:
        """Run ``pg_ctl start``; return ``None`` on success, else an error text."""
        wait = max(1, round(self.startup_timeout))
        try:
            result = self._pg_ctl(
                "start",
                "--wait",
                "--timeout",
                str(wait),
                "--log",
                str(self.log_path),
                "--options",
                f"-p {int(self.port)}",
                timeout=wait + 15,
            )
        except subprocess.TimeoutExpired:
            return f"pg_ctl start timed out\n{_tail(self.log_path)}"
        if result.returncode == 0:
            return None
        # The postmaster may still be starting up or half-dead: make sure it is gone.
        self._shutdown("immediate")
        return f"{result.stdout}{result.stderr}\n--- server log ---\n{_tail(self.log_path)}"

    def _shutdown(self, mode: str) -> None:
        """Stop the postmaster with ``pg_ctl stop -m MODE``; SIGKILL as a fallback."""
        pid = self.pid
        if pid is None:
            self._running = False
            return
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self._pg_ctl("stop", "--mode", mode, "--wait", "--timeout", "30", timeout=45)
        if not _wait_pid_gone(pid, 5):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_pid_gone(pid, 10)
        self._running = False

    def kill(self) -> None:
        """Crash-stop the server (``pg_ctl stop -m immediate``), keeping its data.

        Clients lose their connections at once; the next ``start()`` runs
        crash recovery on the same data directory and port.
        """
        if self.root is not None:
            self._shutdown("immediate")

    def restart(self, *, crash: bool = False) -> None:
        """Stop and start again on the same port and data directory.

        With ``crash=True`` the stop is an immediate (crash-like) shutdown,
        otherwise a fast, clean one.
        """
        if self.root is not None:
            self._shutdown("immediate" if crash else "fast")
        self.start()

    def stop(self) -> None:
        """Stop the server immediately and delete its directory. Idempotent."""
        try:
            if self.root is not None:
                self._shutdown("immediate")
        finally:
            _rmtree(self.root)
            self.root = None
            self._initialized = False
            self._started_once = False
            self._running = False
            self._unregister()

    # -- databases -------------------------------------------------------

    def create_database(self, name: str) -> str:
        """Create database *name* (owned by ``postgres``) and return its URL."""
        if not self._running:
            raise ServiceError("PostgresServer is not running")
        self.execute(f"CREATE DATABASE {_quote_ident(name)}", dbname="postgres")
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database *name* (``WITH (FORCE)``: connected clients are cut off)."""
        self.execute(
            f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)", dbname="postgres"
        )

    def execute(self, sql: str, *, dbname: str | None = None) -> None:
        """Run one SQL statement in autocommit mode (no result is returned).

        Uses psycopg2 when it is importable, the cluster's ``psql`` otherwise.
        """
        database = dbname or self.dbname
        if importlib.util.find_spec("psycopg2") is not None:
            import psycopg2

            conn = psycopg2.connect(
                host=self.host,
                port=self.port,
                user=self.user,
                dbname=database,
                connect_timeout=10,
            )
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(sql)
            finally:
                conn.close()
            return
        assert self._bindir is not None
        subprocess.run(
            [
                str(self._bindir / "psql"),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                database,
                "-c",
                sql,
            ],
            env=_pg_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
            timeout=60,
        )

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<PostgresServer {self.url} {state}>"


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------


def _redis_server_pid(port: int, timeout: float = 0.5, password: str | None = None) -> int | None:
    """PID of the Redis server answering on 127.0.0.1:*port*, or ``None``.

    Asking for the PID (``INFO server``) rather than just sending PING tells
    our server apart from another one already holding the port.
    """
    auth = f"AUTH {password}\r\n".encode() if password else b""
    try:
        with socket.create_connection((_LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(auth + b"INFO server\r\n")
            reply = b""
            while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return None
    match = re.search(rb"process_id:(\d+)", reply)
    return int(match.group(1)) if match else None


class RedisServer(_Service):
    """A throwaway ``redis-server`` on a free port of 127.0.0.1.

    No persistence (``--save '' --appendonly no``), its own temp directory.
    ``kill()`` sends SIGKILL (a crash: all data is lost, clients see the
    connection drop); ``start()`` or ``restart()`` brings a new, empty
    server up on the same port. *extra_args* are appended to the command
    line, e.g. ``["--maxmemory", "64mb"]``.

    *password* sets ``requirepass``; *tls* adds a TLS listener on
    :attr:`tls_port` with a throwaway self-signed certificate for 127.0.0.1
    (:attr:`ca_path`; clients need no certificate of their own).
    :attr:`tls_url` is the ``rediss://`` URL with both.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
        password: str | None = None,
        tls: bool = False,
    ) -> None:
        self.host = _LOOPBACK
        self._fixed_port = port is not None
        self.port: int = port if port is not None else free_port()
        self.password = password
        self.tls = tls
        self.tls_port: int | None = free_port() if tls else None
        self.extra_args: list[str] = list(extra_args)
        self.startup_timeout = startup_timeout
        self.root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """URL of logical database *db*."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/{db}"

    @property
    def ca_path(self) -> Path:
        """The self-signed certificate clients trust (``tls=True``)."""
        if self.root is None:
            raise ServiceError("RedisServer has not been started")
        return self.root / "tls" / "cert.pem"

    @property
    def tls_url(self) -> str:
        """``rediss://[:password@]127.0.0.1:TLS_PORT/0?ssl_ca_certs=...``."""
        if not self.tls:
            raise ServiceError("RedisServer was not started with tls=True")
        auth = f":{self.password}@" if self.password else ""
        return f"rediss://{auth}{self.host}:{self.tls_port}/0?ssl_ca_certs={self.ca_path}"

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        cert, key = self.ca_path, self.ca_path.with_name("key.pem")
        if not cert.exists():
            openssl = find_binary("openssl")
            if openssl is None:
                raise ServiceError("openssl is not installed (needed for a TLS redis-server)")
            cert.parent.mkdir(exist_ok=True)
            subprocess.run(
                [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                 "-keyout", str(key), "-out", str(cert)],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        return ["--tls-port", str(self.tls_port), "--tls-cert-file", str(cert),
                "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                "--tls-auth-clients", "no"]  # fmt: skip

    @property
    def log_path(self) -> Path:
        """File receiving the server's stdout/stderr (its log)."""
        if self.root is None:
            raise ServiceError("RedisServer has not been started")
        return self.root / "redis.log"

    @property
    def pid(self) -> int | None:
        """PID of the running server process, if any."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server (again, on the same port) and wait for PING.

        Starting a running server does nothing. Returns ``self``.
        """
        if self.running:
            return self
        binary = find_binary("redis-server")
        if binary is None:
            raise ServiceError("redis-server is not installed")
        self._register()
        try:
            if self.root is None:
                self.root = _service_dir("redis")
            attempts = 1 if self._fixed_port or self._started_once else 4
            for attempt in range(attempts):
                error = self._spawn(binary)
                if error is None:
                    break
                if "already in use" not in error or attempt == attempts - 1:
                    raise ServiceError(f"redis-server did not start on port {self.port}:\n{error}")
                self.port = free_port()
            self._started_once = True
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, binary: str) -> str | None:
        """Launch redis-server and wait for PING; ``None`` or an error text."""
        assert self.root is not None
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.root),
            "--daemonize",
            "no",
            "--logfile",
            "",
            *(["--requirepass", self.password] if self.password else []),
            *self._tls_args(),
            *self.extra_args,
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        (self.root / "redis.pid").write_text(str(self._proc.pid))
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._reap()
                return _tail(self.log_path)
            if _redis_server_pid(self.port, password=self.password) == self._proc.pid:
                return None
            time.sleep(0.02)
        self._terminate(signal.SIGKILL)
        return f"no PING answer within {self.startup_timeout}s\n{_tail(self.log_path)}"

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)
            self._proc = None

    def _terminate(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server: a crash. ``start()`` brings it back, empty."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        """Kill the server and start a new one on the same port."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 10 s) and delete its directory."""
        try:
            self._terminate(signal.SIGTERM)
        finally:
            _rmtree(self.root)
            self.root = None
            self._started_once = False
            self._unregister()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state}>"
