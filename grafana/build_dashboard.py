"""Writes grafana/dashboards/switchboard.json, the provisioned dashboard.

The JSON is generated so that panel ids, grid positions and the datasource
reference stay consistent; edit the panel list here and rerun::

    .venv/bin/python grafana/build_dashboard.py

``tests/test_compose.py`` checks the committed JSON matches this output, and
``tests/test_observability.py`` runs every panel's query against a real
Prometheus scraping two gateway processes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Must match grafana/provisioning/datasources/prometheus.yml.
DATASOURCE_UID = "switchboard-prometheus"
DASHBOARD_UID = "switchboard-gateway"
OUTPUT = Path(__file__).resolve().parent / "dashboards" / "switchboard.json"

DS = {"type": "prometheus", "uid": DATASOURCE_UID}
# Selectors every query carries: the template variables.
I = 'instance=~"$instance"'  # noqa: E741 - short on purpose, used in every query
IN = f'{I}, namespace=~"$namespace"'
W = "$__rate_interval"


def q(expr: str, legend: str = "") -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend}


def panel(
    title: str,
    queries: list[dict[str, Any]],
    *,
    unit: str = "short",
    kind: str = "timeseries",
    width: int = 8,
    height: int = 8,
    description: str = "",
) -> dict[str, Any]:
    return {
        "title": title,
        "type": kind,
        "description": description,
        "queries": queries,
        "unit": unit,
        "w": width,
        "h": height,
    }


def stat(title: str, expr: str, unit: str = "short", description: str = "") -> dict[str, Any]:
    return panel(
        title, [q(expr)], unit=unit, kind="stat", width=4, height=4, description=description
    )


ROWS: list[tuple[str, list[dict[str, Any]]]] = [
    (
        "Overview",
        [
            stat("Nodes up", f'sum(up{{job="switchboard", {I}}})'),
            stat("Connections", f"sum(instance:switchboard_connections:sum{{{I}}})"),
            stat(
                "Messages/s",
                f"sum(instance:switchboard_messages_persisted:rate1m{{{I}}})",
                "msg/s",
            ),
            stat(
                "Error rate",
                f"sum(rate(switchboard_errors_total{{{I}}}[{W}]))"
                f" / clamp_min(sum(rate(switchboard_events_received_total{{{I}}}[{W}])), 1e-9)",
                "percentunit",
                "Errors answered / events received",
            ),
            stat(
                "p99 event latency",
                f"max(instance_namespace:switchboard_event_duration_seconds:p99_5m{{{IN}}})",
                "s",
            ),
            stat(
                "Event-loop lag (max)",
                f"max(switchboard_event_loop_lag_seconds{{{I}}})",
                "s",
            ),
            panel(
                "Nodes",
                [q(f"switchboard_build_info{{{I}}}", "{{node}} {{version}}")],
                kind="table",
                width=24,
                height=5,
                description="One line per node: version, node id, Redis mirror",
            ),
        ],
    ),
    (
        "Connections & auth",
        [
            panel(
                "Open connections",
                [
                    q(
                        f"sum by (instance, namespace) (switchboard_connections{{{IN}}})",
                        "{{instance}} {{namespace}}",
                    )
                ],
            ),
            panel(
                "Connections opened / closed",
                [
                    q(
                        f"sum by (namespace) "
                        f"(rate(switchboard_connections_opened_total{{{IN}}}[{W}]))",
                        "opened {{namespace}}",
                    ),
                    q(
                        f"sum by (reason) "
                        f"(rate(switchboard_connections_closed_total{{{IN}}}[{W}]))",
                        "closed: {{reason}}",
                    ),
                ],
                unit="ops",
            ),
            panel(
                "Auth failures by reason",
                [
                    q(
                        f"sum by (reason) (rate(switchboard_auth_failures_total{{{I}}}[{W}]))",
                        "{{reason}}",
                    )
                ],
                unit="ops",
            ),
        ],
    ),
    (
        "Events & latency",
        [
            panel(
                "Events/s by event",
                [
                    q(
                        f"sum by (namespace, event) "
                        f"(rate(switchboard_events_received_total{{{IN}}}[{W}]))",
                        "{{namespace}} {{event}}",
                    )
                ],
                unit="ops",
            ),
            panel(
                "Event latency percentiles",
                [
                    q(
                        f"max by (namespace) "
                        f"(instance_namespace:switchboard_event_duration_seconds:{p}_5m{{{IN}}})",
                        f"{p} {{{{namespace}}}}",
                    )
                    for p in ("p50", "p95", "p99")
                ],
                unit="s",
            ),
            panel(
                "p99 latency by event",
                [
                    q(
                        f"histogram_quantile(0.99, sum by (event, le) "
                        f"(rate(switchboard_event_duration_seconds_bucket{{{IN}}}[{W}])))",
                        "{{event}}",
                    )
                ],
                unit="s",
            ),
            panel(
                "Errors by code",
                [
                    q(
                        f"sum by (code) (rate(switchboard_errors_total{{{I}}}[{W}]))",
                        "{{code}}",
                    )
                ],
                unit="ops",
            ),
            panel(
                "Frames/s in and out",
                [
                    q(f"sum(rate(switchboard_frames_received_total{{{I}}}[{W}]))", "in"),
                    q(f"sum(rate(switchboard_frames_sent_total{{{I}}}[{W}]))", "out"),
                ],
                unit="ops",
            ),
            panel(
                "Bytes/s in and out",
                [
                    q(f"sum(rate(switchboard_received_bytes_total{{{I}}}[{W}]))", "in"),
                    q(f"sum(rate(switchboard_sent_bytes_total{{{I}}}[{W}]))", "out"),
                ],
                unit="Bps",
            ),
        ],
    ),
    (
        "Delivery & slow consumers",
        [
            panel(
                "Broadcast deliveries/s",
                [
                    q(
                        f"sum by (instance) "
                        f"(instance:switchboard_broadcast_deliveries:rate1m{{{I}}})",
                        "{{instance}}",
                    )
                ],
                unit="ops",
            ),
            panel(
                "Publish → deliver latency",
                [
                    q(
                        f"histogram_quantile({quantile}, sum by (le) "
                        f"(rate(switchboard_publish_deliver_seconds_bucket{{{IN}}}[{W}])))",
                        f"p{label}",
                    )
                    for quantile, label in (("0.5", "50"), ("0.99", "99"))
                ],
                unit="s",
            ),
            panel(
                "Slow consumers closed",
                [
                    q(
                        f"sum by (instance) "
                        f"(increase(switchboard_slow_consumers_total{{{I}}}[{W}]))",
                        "{{instance}}",
                    )
                ],
            ),
            panel(
                "Notifications created/s",
                [
                    q(
                        f"sum by (category) "
                        f"(rate(switchboard_notifications_created_total{{{I}}}[{W}]))",
                        "{{category}}",
                    )
                ],
                unit="ops",
            ),
            panel(
                "Live log entries/s",
                [
                    q(f"sum(rate(switchboard_log_entries_streamed_total{{{I}}}[{W}]))", "streamed"),
                    q(f"sum(rate(switchboard_log_entries_dropped_total{{{I}}}[{W}]))", "dropped"),
                ],
                unit="ops",
            ),
        ],
    ),
    (
        "Rooms",
        [
            panel(
                "Active rooms",
                [q(f"sum by (instance) (switchboard_rooms_active{{{I}}})", "{{instance}}")],
                width=12,
            ),
            panel(
                "Room subscriptions",
                [q(f"sum by (instance) (switchboard_room_subscriptions{{{I}}})", "{{instance}}")],
                width=12,
                description="Connection-room pairs on each node",
            ),
            panel(
                "Busiest rooms",
                [
                    q(
                        f"topk(10, sum by (room) (switchboard_room_subscribers{{{I}}}))",
                        "{{room}}",
                    )
                ],
                width=24,
                description="Local subscribers per room; needs SWITCHBOARD_METRICS_ROOM_SERIES > 0",
            ),
        ],
    ),
    (
        "Rate limits",
        [
            panel(
                "Rate-limited requests by bucket",
                [
                    q(
                        f"sum by (bucket) (rate(switchboard_rate_limited_total{{{I}}}[{W}]))",
                        "{{bucket}}",
                    )
                ],
                unit="ops",
                width=12,
            ),
            panel(
                "Rate-limited share of events",
                [
                    q(
                        f"sum(rate(switchboard_rate_limited_total{{{I}}}[{W}]))"
                        f" / clamp_min(sum(rate(switchboard_events_received_total{{{I}}}[{W}])),"
                        f" 1e-9)",
                        "refused",
                    )
                ],
                unit="percentunit",
                width=12,
            ),
        ],
    ),
    (
        "Storage",
        [
            panel(
                "Messages persisted/s",
                [
                    q(
                        f"sum by (instance) "
                        f"(instance:switchboard_messages_persisted:rate1m{{{I}}})",
                        "{{instance}}",
                    )
                ],
                unit="ops",
            ),
            panel(
                "Database queries/s by operation",
                [
                    q(
                        f"sum by (operation) "
                        f"(rate(switchboard_db_query_duration_seconds_count{{{I}}}[{W}]))",
                        "{{operation}}",
                    )
                ],
                unit="ops",
            ),
            panel(
                "Database p99 by operation",
                [
                    q(
                        f"max by (operation) "
                        f"(instance_operation:switchboard_db_query_duration_seconds:p99_5m{{{I}}})",
                        "{{operation}}",
                    )
                ],
                unit="s",
            ),
        ],
    ),
    (
        "Redis mirror",
        [
            panel(
                "Redis mirror up",
                [q(f"switchboard_redis_up{{{I}}}", "{{instance}}")],
                width=6,
                description="0 on a node without Redis (see the Nodes table)",
            ),
            panel(
                "Published / received per second",
                [
                    q(f"sum(rate(switchboard_redis_published_total{{{I}}}[{W}]))", "published"),
                    q(f"sum(rate(switchboard_redis_received_total{{{I}}}[{W}]))", "received"),
                ],
                unit="ops",
                width=6,
            ),
            panel(
                "Reconnects",
                [
                    q(
                        f"sum by (instance) "
                        f"(increase(switchboard_redis_reconnects_total{{{I}}}[{W}]))",
                        "{{instance}}",
                    )
                ],
                width=6,
            ),
            panel(
                "Pub/sub lag p99",
                [
                    q(
                        f"histogram_quantile(0.99, sum by (instance, le) "
                        f"(rate(switchboard_redis_pubsub_lag_seconds_bucket{{{I}}}[{W}])))",
                        "{{instance}}",
                    )
                ],
                unit="s",
                width=6,
            ),
        ],
    ),
    (
        "Runtime",
        [
            panel(
                "Event-loop lag",
                [q(f"switchboard_event_loop_lag_seconds{{{I}}}", "{{instance}}")],
                unit="s",
                width=6,
            ),
            panel(
                "CPU",
                [
                    q(
                        f'rate(process_cpu_seconds_total{{job="switchboard", {I}}}[{W}])',
                        "{{instance}}",
                    )
                ],
                unit="percentunit",
                width=6,
            ),
            panel(
                "Resident memory",
                [
                    q(
                        f'process_resident_memory_bytes{{job="switchboard", {I}}}',
                        "{{instance}}",
                    )
                ],
                unit="bytes",
                width=6,
            ),
            panel(
                "GC collections/s",
                [
                    q(
                        f"sum by (instance, generation) "
                        f"(rate(python_gc_collections_total{{{I}}}[{W}]))",
                        "{{instance}} gen {{generation}}",
                    )
                ],
                unit="ops",
                width=6,
            ),
        ],
    ),
]


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def build() -> dict[str, Any]:
    """The dashboard document: rows of panels laid out on Grafana's 24-column grid."""
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        x = 0
        line_height = 0
        for spec in row_panels:
            if x + spec["w"] > 24:
                x, y, line_height = 0, y + line_height, 0
            targets = [
                {"refId": chr(ord("A") + i), "datasource": DS, **query}
                for i, query in enumerate(spec["queries"])
            ]
            item: dict[str, Any] = {
                "id": next_id,
                "type": spec["type"],
                "title": spec["title"],
                "description": spec["description"],
                "datasource": DS,
                "gridPos": {"h": spec["h"], "w": spec["w"], "x": x, "y": y},
                "targets": targets,
                "fieldConfig": {"defaults": {"unit": spec["unit"]}, "overrides": []},
                "options": {},
            }
            if spec["type"] == "table":
                for target in targets:
                    target["format"] = "table"
                    target["instant"] = True
            if spec["type"] == "stat":
                item["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}}
            panels.append(item)
            next_id += 1
            x += spec["w"]
            line_height = max(line_height, spec["h"])
        y += line_height
    return {
        "uid": DASHBOARD_UID,
        "title": "Switchboard gateway",
        "description": "Connections, events, delivery, rooms, limits, storage, Redis and runtime",
        "tags": ["switchboard"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                _variable("instance", "Node", "label_values(switchboard_build_info, instance)"),
                _variable(
                    "namespace", "Namespace", "label_values(switchboard_connections, namespace)"
                ),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}")
