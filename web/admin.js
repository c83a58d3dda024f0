// The admin page: live metrics:update figures with small charts, online
// users, kick / ban / mute, over /ws/admin.
import { $, el } from "./dom.js";

const HISTORY_POINTS = 60;
const SVG = "http://www.w3.org/2000/svg";

/** @param {{create: (ns: string) => import("./switchboard.js").Switchboard, me: object}} ctx */
export async function mountAdmin(ctx) {
  const sb = ctx.create("admin");
  const history = { connections: [], messages: [], latency: [] };
  let updates = 0;

  sb.on("metrics:update", (m) => {
    updates += 1;
    renderFigures(m, updates);
    push(history.connections, m.connections.total);
    push(history.messages, m.messages.perMinute);
    push(history.latency, m.performance.p95Ms ?? 0);
    chart("chart-connections", history.connections);
    chart("chart-messages", history.messages);
    chart("chart-latency", history.latency);
    refreshUsers();
  });
  sb.on("health:status", (h) => figure("health", "Health", h.status));

  async function refreshUsers() {
    try {
      const { users } = await sb.emit("admin:online_users", { limit: 100 });
      $("online-users").tBodies[0].replaceChildren(...users.map(userRow));
    } catch (err) {
      $("admin-error").textContent = err.message;
    }
  }

  function userRow(u) {
    const self = u.userId === ctx.me.userId;
    const act = (label, run) => el("button", { type: "button", className: label.toLowerCase(), text: label, disabled: self,
      onclick: () => moderate(label, u, run) });
    return el("tr", { dataset: { user: u.userId } },
      el("td", {}, el("span", { className: "name", text: u.displayName || u.username }), " ", el("code", { text: u.userId })),
      el("td", {}, el("span", { className: "presence", dataset: { status: u.status } }), " ", u.status),
      el("td", { text: String(u.connections.total) }),
      el("td", { className: "row-actions" },
        act("Kick", (base) => sb.emit("admin:kick", base)),
        act("Mute", (base) => sb.emit("admin:mute", { ...base, roomId: $("mod-room").value.trim(), durationSeconds: duration() })),
        act("Ban", (base) => sb.emit("admin:ban", { ...base, durationSeconds: duration() }))));
  }

  function duration() {
    return Math.max(1, Number($("mod-duration").value) || 300);
  }

  async function moderate(label, user, run) {
    $("admin-error").textContent = "";
    const base = { userId: user.userId };
    const reason = $("mod-reason").value.trim();
    if (reason) base.reason = reason;
    try {
      await run(base);
      $("admin-status").textContent = `${label}: ${user.userId} done`;
      refreshUsers();
    } catch (err) {
      $("admin-error").textContent = `${label} ${user.userId}: ${err.code} ${err.message}`;
    }
  }

  await sb.connect();
  await refreshUsers();
  return sb;
}

function push(series, value) {
  series.push(Number(value) || 0);
  if (series.length > HISTORY_POINTS) series.shift();
}

function figure(key, label, value) {
  let card = document.querySelector(`#admin-figures [data-figure="${key}"]`);
  if (!card) {
    card = el("div", { className: "figure", dataset: { figure: key } },
      el("span", { className: "label", text: label }), el("strong", { className: "value" }));
    $("admin-figures").append(card);
  }
  card.querySelector(".value").textContent = String(value);
}

function renderFigures(m, updates) {
  figure("connections", "Connections", m.connections.total);
  figure("messagesPerSecond", "Messages / s", m.messages.perSecond.toFixed(2));
  figure("messagesPerMinute", "Messages / min", m.messages.perMinute);
  figure("p95", "p95 ms", m.performance.p95Ms === null ? "–" : m.performance.p95Ms.toFixed(1));
  figure("errorRate", "Error rate", `${(100 * m.performance.errorRate).toFixed(1)} %`);
  figure("loopLag", "Loop lag ms", Number(m.performance.eventLoopLagMs).toFixed(1));
  figure("rooms", "Active rooms", m.rooms.active);
  figure("memory", "Memory MiB", (m.memoryBytes / 1048576).toFixed(0));
  figure("updates", "Updates", updates);
}

/** A sparkline: one polyline scaled to the series' own maximum. */
function chart(id, series) {
  const svg = $(id);
  const peak = Math.max(1, ...series);
  const max = peak * 1.25; // headroom: a flat series is drawn below the top edge
  const step = 120 / Math.max(1, series.length - 1);
  const points = series.map((v, i) => `${(i * step).toFixed(1)},${(38 - (36 * v) / max).toFixed(1)}`).join(" ");
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points);
  line.setAttribute("class", "line");
  const label = document.createElementNS(SVG, "title");
  label.textContent = `latest ${series[series.length - 1]}, max ${peak}`;
  svg.replaceChildren(label, line);
}
