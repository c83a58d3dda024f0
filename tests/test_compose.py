"""Static checks of the deployment files: Prometheus, Grafana, compose, Dockerfile.

The image and every gateway service must run in production: their
environments (Dockerfile ``ENV`` plus the compose ``environment``, or the
``docker run`` line the Dockerfile documents) are fed to the real
:class:`Config` to show they start, and refuse to without a secret.

``promtool`` checks the Prometheus config and rules and runs the alert unit
tests; the Grafana dashboard is checked for the schema essentials Grafana
relies on; ``docker-compose.yml`` is checked structurally (and by Debian's
``docker-compose config`` when it is installed), including that every file
it mounts exists in the repository.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.core.config import Config, ConfigError
from tests.support.services import require_binary

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "prometheus"
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "switchboard.json"
COMPOSE = ROOT / "docker-compose.yml"
# Values the compose file requires from the environment (no defaults on purpose).
COMPOSE_ENV = {
    # Production refuses HS secrets under 32 bytes, so the stand-in is that long.
    "SWITCHBOARD_JWT_SECRET": "compose-test-secret-0123456789abcdef",
    "GRAFANA_ADMIN_PASSWORD": "test-password",
}
STACK_SERVICES = {"redis", "postgres", "gw1", "gw2", "prometheus", "grafana"}
DASHBOARD_ROWS = [
    "Overview",
    "Connections & auth",
    "Events & latency",
    "Delivery & slow consumers",
    "Rooms",
    "Rate limits",
    "Storage",
    "Redis mirror",
    "Runtime",
]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = require_binary("promtool", "promtool (Debian package prometheus) is not installed")
    return subprocess.run(
        [binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )


# -- Prometheus ---------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "recording.yml", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_gateway_service_and_itself() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {t for c in jobs["switchboard"]["static_configs"] for t in c["targets"]}
    compose = load_yaml(COMPOSE)["services"]
    gateways = {name for name, svc in compose.items() if svc.get("build")}
    assert targets == {f"{name}:8080" for name in gateways}
    assert jobs["prometheus"]["static_configs"][0]["targets"] == ["localhost:9090"]


def test_required_alerts_exist() -> None:
    alerts = {
        rule["alert"]
        for group in load_yaml(PROMETHEUS / "alerts.yml")["groups"]
        for rule in group["rules"]
    }
    assert alerts == {
        "SwitchboardNodeDown",
        "SwitchboardNoScrapes",
        "SwitchboardHighErrorRate",
        "SwitchboardHighEventLatencyP99",
        "SwitchboardEventLoopLag",
        "SwitchboardRedisMirrorDown",
        "SwitchboardSlowConsumerStorm",
        "SwitchboardAuthFailureSpike",
        "SwitchboardAcceptFailing",
    }


# -- Grafana ------------------------------------------------------------------------


def provisioned_datasource_uid() -> str:
    sources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert len(sources) == 1 and sources[0]["type"] == "prometheus"
    uid: str = sources[0]["uid"]
    return uid


def test_dashboard_json_is_what_the_generator_writes() -> None:
    module = runpy.run_path(str(GRAFANA / "build_dashboard.py"))
    assert DASHBOARD.read_text() == module["render"](), "rerun grafana/build_dashboard.py"


def test_dashboard_essentials() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "switchboard-gateway"
    assert isinstance(board["schemaVersion"], int) and board["title"]
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert [p["title"] for p in panels if p["type"] == "row"] == DASHBOARD_ROWS
    occupied: set[tuple[int, int]] = set()
    for p in panels:
        pos = p["gridPos"]
        assert set(pos) == {"h", "w", "x", "y"}, p["title"]
        assert all(isinstance(v, int) and v >= 0 for v in pos.values()), p["title"]
        assert pos["w"] >= 1 and pos["h"] >= 1 and pos["x"] + pos["w"] <= 24, p["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & occupied, f"{p['title']} overlaps another panel"
        occupied |= cells


def test_every_panel_and_variable_uses_the_provisioned_datasource() -> None:
    uid = provisioned_datasource_uid()
    board = json.loads(DASHBOARD.read_text())
    for p in board["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for target in p["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"instance", "namespace"}
    assert all(v["datasource"]["uid"] == uid for v in variables.values())


def test_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "switchboard.yml")["providers"][
        0
    ]
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = dict(_split_mount(m)[:2] for m in grafana["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    source = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    assert source["datasources"][0]["url"] == "http://prometheus:9090"


# -- docker compose -----------------------------------------------------------------


def _split_mount(mount: str) -> tuple[str, str, str]:
    source, target, *mode = mount.split(":")
    return source, target, mode[0] if mode else "rw"


def test_compose_services_images_healthchecks_and_dependencies() -> None:
    compose = load_yaml(COMPOSE)
    services: dict[str, Any] = compose["services"]
    assert set(services) == STACK_SERVICES
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"{name}: no image or build"
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}"
    for gw in ("gw1", "gw2"):
        env = services[gw]["environment"]
        assert env["SWITCHBOARD_DATABASE_URL"].startswith("postgresql://")
        assert "@postgres:5432/" in env["SWITCHBOARD_DATABASE_URL"]
        assert env["SWITCHBOARD_REDIS_URL"] == "redis://redis:6379/0"
        assert env["SWITCHBOARD_NODE_ID"] == gw
        assert "/health/ready" in " ".join(services[gw]["healthcheck"]["test"])
        assert {"postgres", "redis"} <= set(services[gw]["depends_on"])
    assert "prometheus" in services["grafana"]["depends_on"]
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${GRAFANA_ADMIN_PASSWORD")
    # PostgreSQL keeps its data in a named volume.
    pg_volumes = [_split_mount(v) for v in services["postgres"]["volumes"]]
    assert ("pgdata", "/var/lib/postgresql/data", "rw") in pg_volumes
    assert "pgdata" in compose["volumes"]


def test_compose_mounts_exist_in_the_repository() -> None:
    compose = load_yaml(COMPOSE)
    named = set(compose.get("volumes") or {})
    binds = []
    for name, svc in compose["services"].items():
        for mount in svc.get("volumes", []):
            source, _, _ = _split_mount(mount)
            if source in named:
                continue
            assert source.startswith("./"), f"{name}: {mount} is neither named nor relative"
            binds.append(source)
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        build = svc.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            assert (ROOT / context / "Dockerfile").is_file()
    assert binds, "expected the Prometheus and Grafana bind mounts"
    # Everything Prometheus loads is mounted next to its config.
    prom_mounts = {
        _split_mount(m)[1] for m in compose["services"]["prometheus"]["volumes"]
    }  # fmt: skip
    for rule_file in load_yaml(PROMETHEUS / "prometheus.yml")["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in prom_mounts


def test_docker_compose_config_validates() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (Debian package docker-compose) is not installed")
    env = {**os.environ, **COMPOSE_ENV}
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # Without the required secrets the stack refuses to start.
    bare = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
    refused = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT, env=bare, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0 and "SWITCHBOARD_JWT_SECRET" in refused.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    health = re.search(r"^HEALTHCHECK .*?CMD (.+)$", text, re.M | re.S)
    assert health and "/health" in health.group(1)
    for source in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY source {path} missing"


def test_data_files_ship_with_the_packages() -> None:
    """Files of the packages that are not their Python modules (Redis Lua scripts,
    migrations) are package data, so ``pip install .`` (the Dockerfile's) installs
    them, and the Docker build context keeps them."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    package_data = {pkg: globs.split() for pkg, globs in setup["options.package_data"].items()}
    ignored = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    data = []
    for top in ("server", "handlers", "models"):
        for path in (ROOT / top).rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if path.suffix == ".py" and (path.parent / "__init__.py").is_file():
                continue  # a module: `packages = find:` ships it
            data.append(path)
    assert any(path.suffix == ".lua" for path in data), "no Lua script found"
    for path in data:
        package_dir = path.parent
        while not (package_dir / "__init__.py").is_file():
            package_dir = package_dir.parent
        package = ".".join(package_dir.relative_to(ROOT).parts)
        inside = path.relative_to(package_dir).as_posix()
        globs = package_data.get(package, [])
        assert any(fnmatch(inside, g) for g in globs), f"{path} is not package data of {package}"
        parts = path.relative_to(ROOT).parts
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            assert not any(fnmatch(prefix, p) for p in ignored), f".dockerignore drops {prefix}"


# -- production by default ------------------------------------------------------------


def dockerfile_env() -> dict[str, str]:
    """Every ``ENV`` of the Dockerfile, continuation lines joined, later ones winning."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV\s+(.+)$", text, re.M):
        for pair in shlex.split(line):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def documented_docker_run_env() -> dict[str, str]:
    """The ``-e`` settings of the ``docker run`` line in the Dockerfile's header comment."""
    comment = "".join(
        line.lstrip("#").strip() + " " for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("#")
    )  # fmt: skip
    run = re.search(r"docker run (.+?) switchboard\b", comment.replace("\\ ", ""))
    assert run, "the Dockerfile documents a docker run line"
    env = dict(re.findall(r"-e\s+(\w+)=(\$\([^)]*\)|\S+)", run.group(1)))
    # $(openssl rand -hex 32) is 64 hex characters once the shell has run it.
    return {k: ("f" * 64 if v == "$(openssl rand -hex 32)" else v) for k, v in env.items()}


def compose_value(raw: Any) -> str:
    """``${VAR:?msg}`` / ``${VAR:-default}`` as compose substitutes them with COMPOSE_ENV."""

    def substitute(match: re.Match[str]) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if name in COMPOSE_ENV:
            return COMPOSE_ENV[name]
        assert op == ":-", f"{name} is required but not in COMPOSE_ENV"
        return rest

    return re.sub(r"\$\{(\w+)(:[?-])?([^}]*)\}", substitute, str(raw))


def test_dockerfile_sets_production_explicitly() -> None:
    env = dockerfile_env()
    assert env["SWITCHBOARD_ENV"] == "production"
    assert env["SWITCHBOARD_HOST"] == "0.0.0.0"
    # On its own the image refuses to start: no secret, no origins.
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    assert "SWITCHBOARD_JWT_SECRET" in str(info.value)


def test_documented_docker_run_line_starts_a_production_node() -> None:
    extra = documented_docker_run_env()
    assert {"SWITCHBOARD_JWT_SECRET", "SWITCHBOARD_ALLOWED_ORIGINS"} <= set(extra)
    config = Config.from_env({**dockerfile_env(), **extra})
    assert config.is_production and config.exposed
    assert "*" not in config.allowed_origins


def test_every_gateway_service_runs_production() -> None:
    services = load_yaml(COMPOSE)["services"]
    gateways = {name: svc for name, svc in services.items() if svc.get("build")}
    assert set(gateways) == {"gw1", "gw2"}
    for name, svc in gateways.items():
        compose_env = {k: compose_value(v) for k, v in svc["environment"].items()}
        assert compose_env["SWITCHBOARD_ENV"] == "production", name
        config = Config.from_env({**dockerfile_env(), **compose_env})
        assert config.is_production, name
        assert "*" not in config.allowed_origins, name
