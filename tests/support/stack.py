"""The docker-compose topology, natively: Redis, PostgreSQL, gateways, Prometheus.

``scripts/stack`` runs it for local use; ``tests/test_observability.py``
starts it (without Redis or PostgreSQL) to check the dashboards and rules
against a real Prometheus. Every part is a real process on 127.0.0.1.

Example::

    with Stack(nodes=2, postgres=True, prometheus=True) as stack:
        print(stack.gateway_urls, stack.prometheus_url)

The Prometheus configuration is the repository's ``prometheus/prometheus.yml``
with the targets replaced by the local gateways, the rule files by absolute
paths to the repository's rules, and (optionally) shorter intervals.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

import yaml

from tests.support.services import (
    Managed,
    PostgresServer,
    RedisServer,
    ServiceError,
    find_binary,
    free_port,
)

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "prometheus"
STARTUP_TIMEOUT_SECS = 30.0


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET (also for 4xx/5xx), or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def prometheus_config(
    gateways: list[str],
    *,
    prometheus: str,
    scrape_interval: str | None = None,
) -> dict[str, Any]:
    """The repository's Prometheus config pointed at local processes."""
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    if scrape_interval is not None:
        config["global"]["scrape_interval"] = scrape_interval
        config["global"]["evaluation_interval"] = scrape_interval
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    for job in config["scrape_configs"]:
        targets = gateways if job["job_name"] == "switchboard" else [prometheus]
        job["static_configs"] = [{"targets": targets}]
    return config


class Process:
    """One child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=ROOT,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)


class Stack(Managed):
    """Starts and stops the whole topology; a context manager."""

    def __init__(
        self,
        *,
        nodes: int = 2,
        postgres: bool = True,
        redis: bool = True,
        prometheus: bool = True,
        scrape_interval: str | None = None,
        gateway_ports: list[int] | None = None,
        prometheus_port: int | None = None,
        env: str = "test",
        gateway_env: dict[str, str] | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.nodes = nodes
        self.use_postgres = postgres
        self.use_redis = redis
        self.use_prometheus = prometheus
        self.scrape_interval = scrape_interval
        self.gateway_ports = gateway_ports or [free_port() for _ in range(nodes)]
        self.prometheus_port = prometheus_port or free_port()
        self.env = env
        self.gateway_env = gateway_env or {}
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="switchboard-stack-"))
        self.pg: PostgresServer | None = None
        self.redis: RedisServer | None = None
        self.gateways: list[Process] = []
        self.prometheus: Process | None = None
        self.database_url = ""

    @property
    def gateway_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.gateway_ports]

    @property
    def gateway_targets(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.gateway_ports]

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def start(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        redis_url = None
        if self.use_redis:
            self.redis = RedisServer().start()
            redis_url = self.redis.url
        if self.use_postgres:
            self.pg = PostgresServer().start()
            self.database_url = self.pg.create_database("gateway")
        for i, port in enumerate(self.gateway_ports, start=1):
            self.gateways.append(self._start_gateway(i, port, redis_url))
        for gw, url in zip(self.gateways, self.gateway_urls, strict=True):
            self._wait(gw, f"{url}/health/ready")
        if self.use_prometheus:
            self.prometheus = self._start_prometheus()
            self._wait(self.prometheus, f"{self.prometheus_url}/-/ready")

    def _start_gateway(self, index: int, port: int, redis_url: str | None) -> Process:
        database_url = self.database_url or f"sqlite:///{self.workdir}/gw{index}.db"
        argv = [
            sys.executable, "-m", "server", "serve",
            "--env", self.env, "--host", "127.0.0.1", "--port", str(port),
            "--node-id", f"gw{index}", "--database-url", database_url,
        ]  # fmt: skip
        if redis_url is not None:
            argv += ["--redis-url", redis_url]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.gateway_env)
        return Process(f"gw{index}", argv, self.workdir / f"gw{index}.log", env)

    def _start_prometheus(self) -> Process:
        binary = find_binary("prometheus")
        if binary is None:
            raise ServiceError("prometheus is not installed")
        config = prometheus_config(
            self.gateway_targets,
            prometheus=f"127.0.0.1:{self.prometheus_port}",
            scrape_interval=self.scrape_interval,
        )
        path = self.workdir / "prometheus.yml"
        # JSON is YAML: no need to emit YAML.
        path.write_text(json.dumps(config, indent=2))
        argv = [
            binary, f"--config.file={path}",
            f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
            "--web.enable-lifecycle",
        ]  # fmt: skip
        return Process("prometheus", argv, self.workdir / "prometheus.log", dict(os.environ))

    def _wait(self, proc: Process, url: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECS
        while http_status(url) != 200:
            if not proc.alive() or time.monotonic() > deadline:
                raise ServiceError(f"{proc.name} did not become ready at {url}:\n{proc.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop everything (Prometheus, gateways, then the stores); idempotent."""
        if self.prometheus is not None:
            self.prometheus.stop()
            self.prometheus = None
        for gw in self.gateways:
            gw.stop()
        self.gateways = []
        for service in (self.pg, self.redis):
            if service is not None:
                with contextlib.suppress(Exception):
                    service.stop()
        self.pg = self.redis = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/stack", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--base-port", type=int, default=8080, help="first gateway port")
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--no-postgres", action="store_true", help="SQLite file per node")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--no-prometheus", action="store_true")
    parser.add_argument("--env", default="development", choices=["development", "test"])
    args = parser.parse_args(argv)
    stack = Stack(
        nodes=args.nodes,
        postgres=not args.no_postgres and find_binary("initdb") is not None,
        redis=not args.no_redis and find_binary("redis-server") is not None,
        prometheus=not args.no_prometheus,
        gateway_ports=[args.base_port + i for i in range(args.nodes)],
        prometheus_port=args.prometheus_port,
        env=args.env,
    )
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with stack:
        print(f"switchboard stack (logs in {stack.workdir})", flush=True)
        if stack.redis is not None:
            print(f"  redis       {stack.redis.url}", flush=True)
        print(f"  database    {stack.database_url or 'SQLite file per node'}", flush=True)
        for i, url in enumerate(stack.gateway_urls, start=1):
            print(f"  gw{i}         {url}  (ws: {url.replace('http', 'ws')}/ws/chat)", flush=True)
        if stack.prometheus is not None:
            print(f"  prometheus  {stack.prometheus_url}", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        while not stopping:
            for proc in [*stack.gateways, *([stack.prometheus] if stack.prometheus else [])]:
                if not proc.alive():
                    print(f"{proc.name} exited:\n{proc.log_tail()}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
