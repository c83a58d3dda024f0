// The notification bell: unread count and a list, over /ws/notifications.
import { $, clock, el } from "./dom.js";

/**
 * @param {{create: (ns: string) => import("./switchboard.js").Switchboard,
 *          openRoom: (roomId: string) => void}} ctx
 */
export async function mountNotifications(ctx) {
  const items = new Map(); // id → notification, newest first by id
  const sb = ctx.create("notifications");

  const setCount = (count) => {
    $("bell-count").textContent = String(count);
    $("bell-count").hidden = count === 0;
    $("bell").setAttribute("aria-label", `Notifications (${count} unread)`);
  };
  const render = () => {
    const sorted = [...items.values()].sort((a, b) => Number(b.id) - Number(a.id));
    $("notification-list").replaceChildren(...sorted.map(item));
    $("notifications-empty").hidden = sorted.length > 0;
  };
  const item = (n) =>
    el("li", { className: `notification ${n.read ? "read" : "unread"} ${n.category}`, dataset: { id: n.id } },
      el("button", { type: "button", className: "open", onclick: () => open(n) },
        el("span", { className: "title", text: n.title }),
        el("span", { className: "body", text: n.message || "" }),
        el("time", { dateTime: n.createdAt, text: clock(n.createdAt) })),
      el("button", { type: "button", className: "dismiss", "aria-label": "Delete notification", text: "✕",
        onclick: () => sb.emit("notifications:delete", { notificationId: n.id }).catch(() => {}) }));
  const open = async (n) => {
    if (!n.read) await sb.emit("notifications:read", { notificationId: n.id }).catch(() => {});
    if (n.data && n.data.roomId) {
      $("notifications-panel").hidden = true;
      ctx.openRoom(n.data.roomId);
    }
  };
  const upsert = (n) => {
    items.set(n.id, n);
    render();
  };

  sb.on("notification:unread_count", ({ count }) => setCount(count));
  sb.on("notification:recent", ({ notifications }) => notifications.forEach((n) => items.set(n.id, n)) || render());
  sb.on("notification:created", ({ notification }) => upsert(notification));
  sb.on("notification:updated", ({ notification }) => upsert(notification));
  sb.on("notification:deleted", ({ notificationId }) => items.delete(notificationId) && render());
  sb.on("notification:read", ({ notificationId, all, notificationIds }) => {
    for (const id of all ? notificationIds || [...items.keys()] : [notificationId]) {
      const n = items.get(id);
      if (n) n.read = true;
    }
    render();
  });
  // Listeners first: the unread count and the recent list follow the welcome.
  await sb.connect();

  $("bell").hidden = false;
  $("bell").addEventListener("click", () => ($("notifications-panel").hidden = !$("notifications-panel").hidden));
  $("read-all").addEventListener("click", () => sb.emit("notifications:read_all").then(({ unreadCount }) => setCount(unreadCount)));
  return sb;
}
