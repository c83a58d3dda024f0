"""Render a PNG preview of the dashboard's main panels from a real Prometheus run.

Grafana is not available everywhere (not on the development machines), so
the README's picture is drawn with matplotlib from the same data Grafana
would show: the native stack (:mod:`tests.support.stack`: two gateway processes and
Prometheus with the repository's config and recording rules) runs for a
few minutes under synthetic chat traffic, then each chosen panel's own
query from ``grafana/dashboards/switchboard.json`` is asked for as a range
query and plotted with the panel's title, legend format and unit.

Usage (needs the Debian ``prometheus`` binary and ``pip install matplotlib``)::

    .venv/bin/python grafana/render_preview.py --out docs/dashboard.png --minutes 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "switchboard.json"
SCRAPE_INTERVAL_SECS = 2
# Stand-in for Grafana's $__rate_interval at this scrape interval (4 x scrape, rounded up).
RATE_INTERVAL = "15s"
STAT_PANELS = ("Nodes up", "Connections", "Messages/s", "Error rate", "p99 event latency",
               "Event-loop lag (max)")  # fmt: skip
GRAPH_PANELS = (
    "Open connections", "Events/s by event", "Event latency percentiles",
    "Errors by code", "Publish → deliver latency", "Rate-limited requests by bucket",
    "Messages persisted/s", "CPU", "Resident memory",
)  # fmt: skip
# Grafana's dark theme and classic palette.
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
           "#705da0", "#37872d", "#fade2a")  # fmt: skip
ROOMS = ("general", "random", "support", "ops")
FLOOD_EVERY_SECS, FLOOD_BURST_SECS = 60, 15
# A second of the minute well after a burst (and its 15 s rate window) has passed.
STEADY_SECOND = 55
USERS_PER_NODE = 8


# -- traffic --------------------------------------------------------------------------


def _flooding(now: float) -> bool:
    """The flooder bursts for 15 s of every minute (its rate limit shows as spikes)."""
    return now % FLOOD_EVERY_SECS < FLOOD_BURST_SECS


async def _create_rooms(url: str, token: str) -> None:
    from switchboard_client import Client

    client = Client(url, token)
    await client.connect()
    for room in ROOMS:
        await client.emit("room:create", {"roomId": room, "name": room.title()})
    await client.aclose(timeout=2.0)


async def _chatter(url: str, token_for: Any, user: str, stop: float, flood: bool) -> None:
    """One user: joins rooms, talks, types, sometimes errs; the flooder hits its limit."""
    from switchboard_client import Client, ClientError, ConnectionClosed

    rng = random.Random(user)
    while time.monotonic() < stop:
        client = Client(url, token_for(user))
        try:
            await client.connect()
            rooms = rng.sample(ROOMS, 2)
            for room in rooms:
                await client.emit("room:join", {"roomId": room})
            # Stay for a while, then reconnect: connection churn shows on the panels.
            session_end = min(stop, time.monotonic() + rng.uniform(40, 90))
            while time.monotonic() < session_end:
                room = rng.choice(rooms)
                try:
                    if rng.random() < 0.15:
                        await client.emit("typing:start", {"roomId": room})
                    await client.emit("message:send", {"roomId": room, "content": "hello"})
                    if rng.random() < 0.05:
                        await client.emit("nope:nothing", {})
                except ClientError:
                    pass  # rate limits and unknown events are part of the picture
                bursting = flood and _flooding(time.time())
                await asyncio.sleep(rng.uniform(0.1, 0.25) if bursting else rng.uniform(1.0, 4.0))
        except (ConnectionClosed, OSError, TimeoutError):
            await asyncio.sleep(1.0)
        finally:
            await client.aclose(timeout=2.0)


async def _bad_tokens(url: str, stop: float) -> None:
    from switchboard_client import Client, ClientError, ConnectionClosed, HandshakeError

    while time.monotonic() < stop:
        try:
            await Client(url, "not-a-token").connect()
        except (ClientError, ConnectionClosed, HandshakeError, OSError):
            pass
        await asyncio.sleep(random.uniform(3, 10))


async def drive(gateway_urls: list[str], seconds: float) -> None:
    from server.core.auth import mint_token
    from server.core.config import Config

    config = Config.from_env({}, env="test")
    stop = time.monotonic() + seconds
    jobs = []
    for n, base in enumerate(gateway_urls):
        url = base.replace("http://", "ws://") + "/ws/chat"
        await _create_rooms(url, mint_token(config, f"owner{n}"))
        for i in range(USERS_PER_NODE):
            user = f"user{n}-{i}"
            jobs.append(_chatter(url, lambda u: mint_token(config, u), user, stop, flood=(i == 0)))
        jobs.append(_bad_tokens(url, stop))
    await asyncio.gather(*jobs)


# -- Prometheus -----------------------------------------------------------------------


def query_range(base: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": SCRAPE_INTERVAL_SECS}
    )
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=30) as resp:
        body = json.load(resp)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def substitute(expr: str, targets: list[str]) -> str:
    return (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$instance", "(" + "|".join(targets) + ")")
        .replace("$namespace", "(chat)")
    )


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "")
    return text.strip() or ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__")


def formatter(unit: str) -> Any:
    def fmt(value: float, _pos: Any = None) -> str:
        if unit == "s":
            return f"{value * 1000:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
        if unit == "percentunit":
            return f"{value * 100:.3g} %"
        if unit == "bytes":
            return f"{value / 2**20:.0f} MiB"
        if unit in ("ops", "msg/s", "Bps"):
            suffix = {"ops": "/s", "msg/s": " msg/s", "Bps": " B/s"}[unit]
            return f"{value:.3g}{suffix}"
        return f"{value:.3g}"

    return fmt


# -- drawing --------------------------------------------------------------------------


def render(base: str, targets: list[str], start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    board = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in board["panels"] if p["type"] != "row"}
    plt.rcParams.update({"font.size": 8, "text.color": TEXT, "axes.labelcolor": TEXT,
                         "xtick.color": TEXT, "ytick.color": TEXT})  # fmt: skip
    fig = plt.figure(figsize=(15, 10.5), facecolor=BACKGROUND)
    grid = fig.add_gridspec(4, 6, height_ratios=(0.45, 1, 1, 1), hspace=0.45, wspace=0.35,
                            left=0.04, right=0.99, top=0.93, bottom=0.06)  # fmt: skip
    fig.suptitle(
        f"{board['title']} — {len(targets)} nodes, {round((end - start) / 60)} min of synthetic "
        "chat traffic (rendered from Prometheus; queries from the dashboard JSON)",
        color=TEXT, fontsize=11, x=0.04, ha="left",
    )  # fmt: skip
    for i, title in enumerate(STAT_PANELS):
        panel = panels[title]
        ax = fig.add_subplot(grid[0, i])
        ax.set_facecolor(PANEL)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color(GRID)
        series = query_range(base, substitute(panel["targets"][0]["expr"], targets), start, end)
        value = float(series[0]["values"][-1][1]) if series else float("nan")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.text(0.5, 0.62, formatter(unit)(value), ha="center", va="center", fontsize=20,
                color=PALETTE[0], transform=ax.transAxes, weight="bold")  # fmt: skip
        ax.text(0.5, 0.18, title, ha="center", va="center", fontsize=9, transform=ax.transAxes)
    for i, title in enumerate(GRAPH_PANELS):
        panel = panels[title]
        ax = fig.add_subplot(grid[1 + i // 3, (i % 3) * 2 : (i % 3) * 2 + 2])
        ax.set_facecolor(PANEL)
        ax.set_title(title, loc="left", color=TEXT, fontsize=9)
        ax.grid(color=GRID, linewidth=0.6)
        for spine in ax.spines.values():
            spine.set_color(GRID)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        color = 0
        for target in panel["targets"]:
            expr = substitute(target["expr"], targets)
            for series in query_range(base, expr, start, end):
                stamps = [datetime.fromtimestamp(float(t)) for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                ax.plot(stamps, values, linewidth=1.2, color=PALETTE[color % len(PALETTE)],
                        label=legend(target.get("legendFormat", ""), series["metric"]))  # fmt: skip
                color += 1
        ax.yaxis.set_major_formatter(formatter(unit))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.margins(x=0)
        # Headroom above the highest line for the legend, as Grafana leaves it.
        ax.set_ylim(0, max(ax.get_ylim()[1], 1e-9) * 1.25)
        if color:
            ax.legend(loc="upper left", fontsize=6.5, ncol=2, frameon=False,
                      labelcolor=TEXT)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, facecolor=BACKGROUND)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--minutes", type=float, default=4.0, help="traffic duration")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.support.stack import Stack

    with Stack(
        nodes=2, postgres=False, redis=False, prometheus=True,
        scrape_interval=f"{SCRAPE_INTERVAL_SECS}s",
        gateway_env={"SWITCHBOARD_RATE_LIMITS": "messages=40/1m,joins=50/1m,typing=200/1m"},
    ) as stack:  # fmt: skip
        start = time.time()
        seconds = args.minutes * 60
        asyncio.run(drive(stack.gateway_urls, seconds))
        time.sleep(3 * SCRAPE_INTERVAL_SECS)  # the last scrapes and rule evaluations
        # End the picture while the clients were still connected, not as they left,
        # and between two flood bursts, so the stat tiles show the steady state.
        end = start + seconds - 2 * SCRAPE_INTERVAL_SECS
        end -= (end - STEADY_SECOND) % FLOOD_EVERY_SECS
        render(stack.prometheus_url, stack.gateway_targets, start, end, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
