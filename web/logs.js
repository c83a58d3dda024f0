// The live log page: level / service / text filters over /ws/logs.
import { $, clock, el } from "./dom.js";

const MAX_ROWS = 500;

/** @param {{create: (ns: string) => import("./switchboard.js").Switchboard}} ctx */
export async function mountLogs(ctx) {
  const sb = ctx.create("logs");
  const list = $("log-list");

  const row = (e) =>
    el("li", { className: `log ${e.level.toLowerCase()}`, dataset: { level: e.level, service: e.service } },
      el("time", { dateTime: e.timestamp, text: clock(e.timestamp, true) }),
      el("span", { className: "level", text: e.level }),
      el("span", { className: "service", text: e.service }),
      el("span", { className: "context", text: e.context || "" }),
      el("span", { className: "text", text: e.message }),
      e.stack ? el("pre", { className: "stack", text: e.stack }) : "");
  const append = (...rows) => {
    const stick = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.append(...rows);
    while (list.children.length > MAX_ROWS) list.firstElementChild.remove();
    if (stick) list.scrollTop = list.scrollHeight;
  };
  for (const event of ["log:entry", "log:warning", "log:error"]) sb.on(event, (e) => append(row(e)));
  sb.on("log:dropped", ({ count }) => append(el("li", { className: "log dropped", text: `… ${count} entries dropped (too fast)` })));

  async function apply() {
    $("logs-error").textContent = "";
    const level = $("log-level").value;
    const services = $("log-services").value.split(",").map((s) => s.trim()).filter(Boolean);
    const contains = $("log-contains").value.trim();
    const filter = { level };
    if (services.length) filter.services = services;
    if (contains) filter.contains = contains;
    try {
      await sb.emit("logs:subscribe", filter);
      const recent = { limit: 100, level };
      if (services.length === 1) recent.service = services[0];
      const { entries } = await sb.emit("logs:recent", recent);
      const shown = contains ? entries.filter((e) => e.message.toLowerCase().includes(contains.toLowerCase())) : entries;
      list.replaceChildren();
      append(...shown.filter((e) => !services.length || services.includes(e.service)).map(row));
    } catch (err) {
      $("logs-error").textContent = `${err.code}: ${err.message}`;
    }
  }

  $("log-filter").addEventListener("submit", (ev) => {
    ev.preventDefault();
    apply();
  });
  $("log-clear").addEventListener("click", () => list.replaceChildren());
  // After a reconnect the subscription is gone with the old connection.
  sb.on("client:reconnected", apply);
  await sb.connect();
  await apply();
  return sb;
}
