"""A real Prometheus scraping two real gateway processes.

The module starts two ``switchboard serve`` processes and the Debian
``prometheus`` binary with the repository's config and rules (targets and
intervals adapted, see :mod:`tests.support.stack`), drives real traffic through
WebSocket clients, and then asks Prometheus's HTTP API:

- every metric family :class:`server.ops.metrics.Metrics` defines, plus the
  process and GC collectors, is present for both instances;
- every recording and alert rule evaluates without error (by Prometheus's
  own rule manager and as an ad-hoc query);
- every dashboard panel's query, with the template variables substituted,
  evaluates and returns data;
- stopping a node makes ``up`` drop and the node-down alert go pending.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from server.core.auth import mint_token
from server.core.config import Config
from server.ops.metrics import Metrics
from switchboard_client import Client, ClientError, ConnectionClosed, HandshakeError
from tests.support.services import require_binary
from tests.support.stack import Stack
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "switchboard.json"
RULE_FILES = [ROOT / "prometheus" / "recording.yml", ROOT / "prometheus" / "alerts.yml"]
SCRAPE_INTERVAL_SECS = 1.0
# Stand-in for Grafana's $__rate_interval: long enough to span many 1 s scrapes.
RATE_INTERVAL = "1m"

#: Families that come from prometheus_client's default collectors.
RUNTIME_SAMPLES = (
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "python_gc_collections_total",
    "python_gc_objects_collected_total",
    "python_info",
)


# -- Prometheus HTTP API --------------------------------------------------------------


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def query(base: str, expr: str) -> list[dict[str, Any]]:
    """Instant query; raises (HTTP 400) when the expression does not evaluate."""
    try:
        data = api(base, "query", query=expr)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{expr!r} failed: {exc.read().decode()}") from None
    result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [data]
    return result


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """:func:`eventually` for this module's synchronous tests (Prometheus scrapes every second)."""
    asyncio.run(eventually(check, timeout=timeout, interval=0.2, what=what))


def scrapes_after(base: str, targets: list[str], since: float) -> bool:
    """Whether every target has been scraped (successfully) after ``since`` (epoch secs)."""
    active = api(base, "targets")["activeTargets"]
    seen = {
        t["labels"]["instance"]: t
        for t in active
        if t["labels"]["job"] == "switchboard"
    }  # fmt: skip
    for target in targets:
        info = seen.get(target)
        if info is None or info["health"] != "up":
            return False
        scraped = info["lastScrape"]
        # RFC 3339 with nanoseconds; compare as epoch seconds.
        stamp = calendar.timegm(time.strptime(scraped[:19], "%Y-%m-%dT%H:%M:%S"))
        if stamp < since:
            return False
    return True


def wait_for_scrapes(stack: Stack, count: int = 2) -> None:
    """Wait until every gateway has been scraped ``count`` more times."""
    for _ in range(count):
        since = time.time() + 1.0  # whole seconds: the next scrape strictly after now
        wait_until(
            lambda since=since: scrapes_after(stack.prometheus_url, stack.gateway_targets, since),
            "a scrape of every gateway",
        )


# -- traffic ------------------------------------------------------------------------


async def drive_traffic(url: str, peer_url: str, config: Config, phase: str, tag: str) -> None:
    """Connections, a broadcast, an unknown event, a refused token, a rate-limit hit.

    Alice is on this node, bob on its peer: the broadcast crosses the Redis
    mirror (this node publishes, the peer receives). Users and rooms are
    ``tag``-ged so the two nodes' runs do not share rooms or rate limits.
    """
    ws = url.replace("http://", "ws://") + "/ws/chat"
    peer_ws = peer_url.replace("http://", "ws://") + "/ws/chat"
    alice = Client(ws, mint_token(config, f"alice-{tag}"))
    bob = Client(peer_ws, mint_token(config, f"bob-{tag}"))
    await alice.connect()
    await bob.connect()
    room_id = f"obs-{phase}-{tag}"
    await alice.emit("room:create", {"roomId": room_id, "name": "Observability"})
    await alice.emit("room:join", {"roomId": room_id})
    await bob.emit("room:join", {"roomId": room_id})
    await alice.emit("message:send", {"roomId": room_id, "content": f"hello {phase}"})
    await bob.next_event("message:new", timeout=5)
    await alice.emit("system:ping", {"t": time.time() * 1000})
    with pytest.raises(ClientError):
        await alice.emit("nope:nothing", {})
    with pytest.raises((ClientError, ConnectionClosed, HandshakeError)):
        await Client(ws, "not-a-token").connect()
    # The test environment allows 10 messages a minute per user: carry on until refused.
    if phase == "b":
        for i in range(20):
            try:
                await bob.emit("message:send", {"roomId": room_id, "content": f"flood {i}"})
            except ClientError as exc:
                assert exc.code == "RATE_LIMITED"
                break
        else:
            raise AssertionError("no rate limit hit")
    bob.close()
    await bob.wait_closed()
    if phase == "b":
        alice.close()
        await alice.wait_closed()
    else:
        # Stay connected so the connection gauges and room gauges are non-zero.
        _KEEP.append(alice)


_KEEP: list[Client] = []


async def _drive_all(stack: Stack, config: Config, phase: str) -> None:
    urls = stack.gateway_urls
    await asyncio.gather(*(
        drive_traffic(url, urls[(i + 1) % len(urls)], config, phase, str(i))
        for i, url in enumerate(urls)
    ))  # fmt: skip


def _run_phase(loop: asyncio.AbstractEventLoop, stack: Stack, config: Config, phase: str) -> None:
    loop.run_until_complete(_drive_all(stack, config, phase))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_binary("prometheus", "Prometheus (Debian package prometheus) is not installed")
    config = Config.from_env({}, env="test")
    # One event loop for the whole module, so the kept-open clients stay usable.
    loop = asyncio.new_event_loop()
    with Stack(
        # The compose topology: two nodes sharing PostgreSQL and Redis.
        nodes=2,
        postgres=True,
        redis=True,
        prometheus=True,
        scrape_interval=f"{SCRAPE_INTERVAL_SECS:g}s",
        # Opt in to per-room series so their family and panel are checked too.
        gateway_env={"SWITCHBOARD_METRICS_ROOM_SERIES": "5"},
    ) as running:
        wait_for_scrapes(running, 1)
        # Phase a creates the labelled series; phase b moves them between scrapes,
        # so rate() and the quantiles over them have real increases to show.
        _run_phase(loop, running, config, "a")
        wait_for_scrapes(running, 1)
        _run_phase(loop, running, config, "b")
        wait_for_scrapes(running, 2)
        # Recording rules run on the same 1 s interval: let them see the last scrape.
        wait_until(
            lambda: len(query(running.prometheus_url,
                              "instance:switchboard_messages_persisted:rate1m > 0")) == 2,
            "recorded message rates for both nodes",
        )  # fmt: skip
        yield running
        loop.run_until_complete(_close_kept())
    loop.close()


async def _close_kept() -> None:
    for client in _KEEP:
        await client.aclose(timeout=2.0)
    _KEEP.clear()


def expected_samples() -> list[str]:
    """One sample name per family the gateway defines, plus the runtime collectors."""
    registry = CollectorRegistry()
    Metrics(registry, "probe")
    suffix = {"counter": "_total", "histogram": "_count", "info": "_info", "gauge": ""}
    names = [family.name + suffix[family.type] for family in registry.collect()]
    return names + list(RUNTIME_SAMPLES)


def substitute(expr: str, stack: Stack) -> str:
    """Grafana's template variables, as Grafana would expand them for "All" of both nodes."""
    instances = "|".join(stack.gateway_targets)
    return (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$instance", f"({instances})")
        .replace("$namespace", "(chat)")
    )


def dashboard_targets() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [
        (f"{p['title']} [{t['refId']}]", t["expr"])
        for p in board["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]


def rule_expressions() -> list[tuple[str, str]]:
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                found.append((rule.get("record") or rule["alert"], rule["expr"]))
    return found


# -- tests --------------------------------------------------------------------------


def test_every_metric_family_is_present_for_both_instances(stack: Stack) -> None:
    missing = []
    for name in expected_samples():
        series = query(
            stack.prometheus_url, f'count by (instance) ({{__name__="{name}", job="switchboard"}})'
        )
        instances = {s["metric"].get("instance") for s in series}
        if instances != set(stack.gateway_targets):
            missing.append(f"{name}: {sorted(i or '' for i in instances)}")
    assert not missing, "\n".join(missing)


def test_traffic_shows_up_on_both_instances(stack: Stack) -> None:
    base = stack.prometheus_url
    for expr in (
        "switchboard_messages_persisted_total >= 2",
        'switchboard_rate_limited_total{bucket="messages"} >= 1',
        'switchboard_errors_total{code="UNKNOWN_EVENT"} >= 2',
        "switchboard_auth_failures_total >= 2",
        'switchboard_connections_closed_total{reason="client"} >= 2',
        'switchboard_connections{namespace="chat"} == 1',
        'switchboard_publish_deliver_seconds_count{namespace="chat"} >= 2',
        'switchboard_db_query_duration_seconds_count{operation="message.send"} >= 2',
        "switchboard_redis_up == 1",
        "switchboard_redis_published_total >= 2",
        "switchboard_redis_received_total >= 2",
        "switchboard_redis_pubsub_lag_seconds_count >= 2",
    ):
        instances = {s["metric"]["instance"] for s in query(base, expr)}
        assert instances == set(stack.gateway_targets), expr


def test_rules_are_loaded_and_healthy(stack: Stack) -> None:
    groups = api(stack.prometheus_url, "rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {name for name, _ in rule_expressions()}
    # Every rule has been evaluated at least once since the traffic ended.
    unhealthy = {n: r.get("lastError") for n, r in rules.items() if r["health"] != "ok"}
    assert not unhealthy


@pytest.mark.parametrize("name,expr", rule_expressions(), ids=[n for n, _ in rule_expressions()])
def test_rule_expression_evaluates(stack: Stack, name: str, expr: str) -> None:
    query(stack.prometheus_url, expr)


def test_recording_rules_produce_series_for_both_instances(stack: Stack) -> None:
    for group in yaml.safe_load(RULE_FILES[0].read_text())["groups"]:
        for rule in group["rules"]:
            series = query(stack.prometheus_url, rule["record"])
            instances = {s["metric"].get("instance") for s in series}
            assert instances == set(stack.gateway_targets), rule["record"]


@pytest.mark.parametrize("title,expr", dashboard_targets(), ids=[t for t, _ in dashboard_targets()])
def test_dashboard_query_returns_data(stack: Stack, title: str, expr: str) -> None:
    result = query(stack.prometheus_url, substitute(expr, stack))
    assert result, f"{title}: no data for {substitute(expr, stack)}"


def test_dashboard_variables_list_both_nodes(stack: Stack) -> None:
    board = json.loads(DASHBOARD.read_text())
    for variable in board["templating"]["list"]:
        # Grafana's label_values(metric, label) is the series API restricted to metric.
        inner = variable["query"]["query"].removeprefix("label_values(").removesuffix(")")
        metric, label = (part.strip() for part in inner.split(","))
        values = api(stack.prometheus_url, f"label/{label}/values", **{"match[]": metric})
        expected = set(stack.gateway_targets) if label == "instance" else {"chat"}
        assert set(values) == expected, variable["name"]


def test_node_down_drops_up_and_alert_goes_pending(stack: Stack) -> None:
    """Runs last in this module: it stops the second node."""
    down = stack.gateway_targets[1]
    stack.gateways[1].stop()
    wait_until(
        lambda: bool(query(stack.prometheus_url, f'up{{instance="{down}"}} == 0')),
        "up == 0 for the stopped node",
    )

    def pending() -> bool:
        alerts = api(stack.prometheus_url, "alerts")["alerts"]
        return any(
            a["labels"]["alertname"] == "SwitchboardNodeDown"
            and a["labels"]["instance"] == down
            and a["state"] in ("pending", "firing")
            for a in alerts
        )

    wait_until(pending, "SwitchboardNodeDown pending")
    nodes_up = query(stack.prometheus_url, 'sum(up{job="switchboard"})')
    assert float(nodes_up[0]["value"][1]) == 1
