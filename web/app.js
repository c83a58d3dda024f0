// The Switchboard web app: sign-in, rooms, messages, typing, presence.
//
// Everything the server sends is untrusted text: it is rendered with
// textContent / element properties, never innerHTML.
import { Switchboard, newClientMsgId } from "./switchboard.js";
import { $, clock, el } from "./dom.js";
import { mountAdmin } from "./admin.js";
import { mountLogs } from "./logs.js";
import { mountNotifications } from "./notifications.js";

const HISTORY_PAGE = 50;
const TYPING_IDLE_MS = 2500; // stop announcing typing after this much quiet
const TYPING_RESEND_MS = 2000; // the server auto-stops after 3 s
const TYPING_SHOW_MS = 4000; // hide someone's indicator if no stop arrives
const QUICK_REACTIONS = ["👍", "❤️", "😂"];
const TOKEN_KEY = "switchboard.token";
const DEV_USER_KEY = "switchboard.devUser";

const app = {
  /** @type {Switchboard|null} */ sb: null,
  me: null,
  /** @type {Map<string, object>} */ rooms: new Map(),
  /** @type {Set<string>} rooms this connection joined */ joined: new Set(),
  current: null,
  /** @type {Map<string, Map<number, object>>} roomId → seq → message */ messages: new Map(),
  /** @type {Map<string, boolean>} */ hasMore: new Map(),
  /** @type {Map<string, Map<string, object>>} roomId → userId → member */ members: new Map(),
  /** @type {Map<string, Map<string, {name: string, timer: any}>>} */ typing: new Map(),
  replyTo: null,
  token: null,
  refresh: undefined,
  /** @type {Switchboard[]} connections to the other namespaces */ extras: [],
  loadingHistory: false,
  typingSentAt: 0,
  typingTimer: null,
};

// --------------------------------------------------------------- sign-in

function wsUrl(namespace = "chat") {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/${namespace}`;
}

/** A Switchboard for another namespace, with the chat connection's token and refresh. */
function createConnection(namespace) {
  const token = app.sb ? app.sb.token : app.token; // refreshed by now, maybe
  const sb = new Switchboard({ url: wsUrl(namespace), token, onTokenExpiring: app.refresh });
  sb.on("error", (err) => {
    if (err.closeCode && $("banner").hidden) banner(`${namespace}: disconnected (${err.code})`);
  });
  app.extras.push(sb);
  return sb;
}

function banner(text) {
  $("banner").textContent = text;
  $("banner").hidden = !text;
}

const ctx = {
  create: createConnection,
  openRoom: (roomId) => {
    showView("chat");
    openRoom(roomId);
  },
  get me() {
    return app.me;
  },
};

async function devToken(userId, displayName, role = "user") {
  const request = { userId, roles: role === "user" ? ["user"] : ["user", role] };
  if (displayName) request.displayName = displayName;
  const res = await fetch("/dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(request),
  });
  if (res.status === 404) throw new Error("This gateway does not mint tokens (not in development). Paste a token.");
  const body = await res.json();
  if (!res.ok) throw new Error(body.error ? `${body.error.code}: ${JSON.stringify(body.error.details)}` : res.statusText);
  return body.token;
}

async function signIn(token, devUser = null) {
  $("signin-error").textContent = "";
  if (app.sb) app.sb.close();
  // In development a fresh token can be minted; otherwise let it expire (4401 → signed out).
  app.refresh = devUser ? () => devToken(devUser.userId, devUser.displayName, devUser.role) : undefined;
  app.token = token;
  const sb = new Switchboard({ url: wsUrl(), token, onTokenExpiring: app.refresh });
  app.sb = sb;
  sb.on("state", ({ state }) => showState(state));
  sb.on("error", (err) => {
    if (err.closeCode && [4401, 4403, 4429].includes(err.closeCode) && $("banner").hidden) {
      banner(`Disconnected: ${err.code} ${err.message}`);
    }
  });
  sb.on("system:kicked", ({ reason, kickedBy }) => banner(`You were removed by ${kickedBy}${reason ? `: ${reason}` : ""}.`));
  sb.on("admin:broadcast", ({ message, from }) => banner(`Announcement from ${from}: ${message}`));
  wireEvents(sb);
  let welcome;
  try {
    welcome = await sb.connect();
  } catch (err) {
    app.sb = null;
    showState("offline");
    $("signin-error").textContent = `Could not connect: ${err.message}`;
    sessionStorage.removeItem(TOKEN_KEY);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  if (devUser) sessionStorage.setItem(DEV_USER_KEY, JSON.stringify(devUser));
  app.me = welcome.user;
  $("me").textContent = welcome.user.displayName || welcome.user.userId;
  for (const id of ["me", "my-status", "sign-out"]) $(id).hidden = false;
  $("signin").hidden = true;
  const roles = new Set(welcome.user.roles || []);
  navButton("admin").hidden = !(roles.has("admin") || roles.has("moderator"));
  navButton("logs").hidden = !(roles.has("admin") || roles.has("logs"));
  $("nav").hidden = navButton("admin").hidden && navButton("logs").hidden;
  showView("chat");
  mountNotifications(ctx).catch((err) => banner(`Notifications unavailable: ${err.message}`));
  await refreshRooms();
}

function navButton(view) {
  return document.querySelector(`#nav button[data-view="${view}"]`);
}

const VIEWS = { chat: "chat", admin: "admin-view", logs: "logs-view" };
const mounted = new Map();

/** Show one page; the admin and log pages connect the first time they open. */
function showView(view) {
  for (const [name, id] of Object.entries(VIEWS)) $(id).hidden = name !== view;
  for (const button of document.querySelectorAll("#nav button")) button.classList.toggle("active", button.dataset.view === view);
  const mount = { admin: mountAdmin, logs: mountLogs }[view];
  if (mount && !mounted.has(view)) {
    mounted.set(view, mount(ctx).catch((err) => {
      mounted.delete(view);
      $(`${view}-error`).textContent = `${err.code || "ERROR"}: ${err.message}`;
    }));
  }
}

function signOut() {
  for (const extra of app.extras) extra.close();
  if (app.sb) app.sb.close();
  app.sb = null;
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(DEV_USER_KEY);
  location.reload();
}

function showState(state) {
  const badge = $("conn-state");
  badge.dataset.state = state;
  badge.textContent = { idle: "signed out", connecting: "connecting…", connected: "connected",
    reconnecting: "reconnecting…", offline: "offline" }[state] || state;
  // While reconnecting, sends are queued by the client and go out afterwards.
  const usable = app.current !== null && state !== "offline" && state !== "idle";
  $("composer-input").disabled = $("send").disabled = !usable;
}

// ---------------------------------------------------------------- rooms

async function refreshRooms() {
  try {
    const { rooms } = await app.sb.emit("room:list", { limit: 100 });
    app.rooms = new Map(rooms.map((r) => [r.id, r]));
    renderRooms();
  } catch (err) {
    $("rooms-error").textContent = err.message;
  }
}

function renderRooms() {
  const list = $("room-list");
  list.replaceChildren(
    ...[...app.rooms.values()].map((room) =>
      el("li", { dataset: { room: room.id }, className: room.id === app.current ? "active" : "" },
        el("button", { type: "button", onclick: () => openRoom(room.id) },
          el("span", { className: "room-name", text: room.name }),
          el("span", { className: "room-meta", text: `${room.type}${room.hasPassword ? " 🔒" : ""}` }))),
    ),
  );
}

async function openRoom(roomId, password) {
  $("room-error").textContent = $("rooms-error").textContent = "";
  const sb = app.sb;
  try {
    if (!app.joined.has(roomId)) {
      const data = { roomId };
      if (password) data.password = password;
      const { room, members } = await sb.emit("room:join", data);
      app.joined.add(roomId);
      app.rooms.set(room.id, room);
      setMembers(roomId, members);
    }
    app.current = roomId;
    const room = app.rooms.get(roomId);
    $("room-title").textContent = room ? room.name : roomId;
    $("room-id").textContent = roomId;
    $("leave-room").hidden = $("toggle-members").hidden = false;
    document.body.classList.remove("show-rooms");
    renderRooms();
    $("messages").replaceChildren();
    if (!app.messages.has(roomId)) await loadHistory(roomId);
    renderAllMessages();
    renderMembers();
    renderTyping();
    showState(sb.state);
    $("composer-input").focus();
  } catch (err) {
    const target = app.current === roomId || !app.current ? "room-error" : "rooms-error";
    $(target).textContent = err.code === "ROOM_ACCESS_DENIED" ? "Access denied (private room, or a password is needed)." : err.message;
    $("rooms-error").textContent = $(target).textContent;
  }
}

async function leaveRoom() {
  const roomId = app.current;
  if (!roomId) return;
  try {
    await app.sb.emit("room:leave", { roomId });
  } catch (err) {
    $("room-error").textContent = err.message;
    return;
  }
  app.joined.delete(roomId);
  app.messages.delete(roomId);
  app.current = null;
  $("room-title").textContent = "No room selected";
  $("room-id").textContent = "";
  $("messages").replaceChildren();
  $("members").replaceChildren();
  $("leave-room").hidden = $("toggle-members").hidden = true;
  showState(app.sb.state);
  await refreshRooms();
}

// -------------------------------------------------------------- messages

function roomMessages(roomId) {
  let map = app.messages.get(roomId);
  if (!map) app.messages.set(roomId, (map = new Map()));
  return map;
}

async function loadHistory(roomId) {
  if (app.loadingHistory) return;
  const map = roomMessages(roomId);
  const request = { roomId, limit: HISTORY_PAGE };
  if (map.size) request.beforeSeq = Math.min(...map.keys());
  app.loadingHistory = true;
  try {
    const { messages, hasMore } = await app.sb.emit("room:get_messages", request);
    for (const m of messages) map.set(m.seq, m);
    app.hasMore.set(roomId, hasMore);
  } finally {
    app.loadingHistory = false;
  }
}

function renderAllMessages() {
  const list = $("messages");
  const map = app.messages.get(app.current) || new Map();
  const pending = [...list.querySelectorAll("li.pending")].filter((li) => li.dataset.room === app.current);
  list.replaceChildren(...[...map.values()].sort((a, b) => a.seq - b.seq).map(messageElement), ...pending);
  if (app.hasMore.get(app.current)) list.prepend(el("li", { className: "more", text: "Scroll up for older messages" }));
  list.scrollTop = list.scrollHeight;
}

function nearBottom(list) {
  return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
}

/** Insert or replace one message in the open room's list, keeping seq order. */
function upsertMessage(message) {
  roomMessages(message.roomId).set(message.seq, message);
  if (message.roomId !== app.current) return;
  const list = $("messages");
  const stick = nearBottom(list);
  const node = messageElement(message);
  const existing = list.querySelector(`li.message[data-seq="${message.seq}"]`);
  if (existing) {
    existing.replaceWith(node);
  } else {
    const later = [...list.querySelectorAll("li.message")].find((li) => Number(li.dataset.seq) > message.seq);
    const firstPending = list.querySelector("li.pending");
    list.insertBefore(node, later || firstPending || null);
  }
  if (stick) list.scrollTop = list.scrollHeight;
}

function findMessage(roomId, messageId) {
  for (const m of (app.messages.get(roomId) || new Map()).values()) if (m.id === messageId) return m;
  return null;
}

function messageElement(m) {
  const mine = app.me && m.senderId === app.me.userId;
  const li = el("li", { className: `message${mine ? " mine" : ""}${m.deleted ? " deleted" : ""}`,
    dataset: { seq: String(m.seq), id: m.id, sender: m.senderId } });
  li.append(el("div", { className: "meta" },
    el("span", { className: "author", text: m.senderName || m.senderId }),
    el("time", { dateTime: m.createdAt, text: clock(m.createdAt) }),
    m.editedAt && !m.deleted ? el("span", { className: "edited", text: "(edited)" }) : ""));
  if (m.parentMessageId) {
    const parent = findMessage(m.roomId, m.parentMessageId);
    li.append(el("div", { className: "quote",
      text: parent ? `↪ ${parent.senderName}: ${parent.deleted ? "(deleted)" : parent.content.slice(0, 80)}` : "↪ earlier message" }));
  }
  li.append(el("div", { className: "content", text: m.deleted ? "(message deleted)" : m.content }));
  if (m.deleted) return li;
  const reactions = el("div", { className: "reactions" });
  for (const [emoji, users] of Object.entries(m.reactions || {})) {
    if (!users.length) continue;
    const on = app.me && users.includes(app.me.userId);
    reactions.append(el("button", { type: "button", className: `reaction${on ? " on" : ""}`, title: users.join(", "),
      dataset: { emoji }, text: `${emoji} ${users.length}`, onclick: () => react(m, emoji, on ? "remove" : "add") }));
  }
  li.append(reactions);
  const actions = el("div", { className: "actions" },
    ...QUICK_REACTIONS.map((emoji) => el("button", { type: "button", className: "react", dataset: { emoji },
      "aria-label": `React ${emoji}`, text: emoji, onclick: () => react(m, emoji, "add") })),
    el("button", { type: "button", className: "reply", text: "Reply", onclick: () => startReply(m) }));
  if (mine) {
    actions.append(
      el("button", { type: "button", className: "edit", text: "Edit", onclick: () => startEdit(li, m) }),
      el("button", { type: "button", className: "delete", text: "Delete", onclick: () => deleteMessage(m) }));
  }
  li.append(actions);
  return li;
}

function pendingElement(roomId, content, clientMsgId) {
  return el("li", { className: "message mine pending", dataset: { clientMsgId, room: roomId } },
    el("div", { className: "meta" }, el("span", { className: "author", text: app.me.displayName || app.me.userId }),
      el("span", { className: "status", text: "sending…" })),
    el("div", { className: "content", text: content }));
}

async function sendMessage(roomId, content, clientMsgId = newClientMsgId(), pendingNode = null) {
  const data = { roomId, content, clientMsgId };
  if (app.replyTo) data.parentMessageId = app.replyTo.id;
  cancelReply();
  const list = $("messages");
  const node = pendingNode || pendingElement(roomId, content, clientMsgId);
  if (!pendingNode) list.append(node);
  list.scrollTop = list.scrollHeight;
  stopTyping();
  try {
    const { message } = await app.sb.emit("message:send", data);
    node.remove();
    upsertMessage(message);
  } catch (err) {
    node.classList.add("failed");
    const status = node.querySelector(".status");
    status.textContent = `not sent (${err.code}) `;
    // Retrying with the same clientMsgId can never store the message twice.
    status.append(el("button", { type: "button", className: "retry", text: "Retry", onclick: () => {
      node.classList.remove("failed");
      status.textContent = "sending…";
      sendMessage(roomId, content, clientMsgId, node);
    } }));
  }
}

async function react(m, emoji, action) {
  try {
    const { reactions } = await app.sb.emit("message:react", { messageId: m.id, emoji, action });
    upsertMessage({ ...m, reactions });
  } catch (err) {
    $("room-error").textContent = err.message;
  }
}

function startReply(m) {
  app.replyTo = m;
  $("replying-to").textContent = `${m.senderName}: ${m.content.slice(0, 60)}`;
  $("replying").hidden = false;
  $("composer-input").focus();
}

function cancelReply() {
  app.replyTo = null;
  $("replying").hidden = true;
}

function startEdit(li, m) {
  const content = li.querySelector(".content");
  const input = el("textarea", { className: "edit-input", value: m.content, maxLength: 4000, rows: 2 });
  const form = el("form", { className: "edit-form", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      const { message } = await app.sb.emit("message:edit", { messageId: m.id, content: input.value });
      upsertMessage(message);
    } catch (err) {
      $("room-error").textContent = err.message;
    }
  } }, input, el("button", { type: "submit", className: "save", text: "Save" }),
  el("button", { type: "button", text: "Cancel", onclick: () => upsertMessage(m) }));
  content.replaceWith(form);
  input.focus();
}

async function deleteMessage(m) {
  try {
    await app.sb.emit("message:delete", { messageId: m.id });
    upsertMessage({ ...m, deleted: true, content: "", reactions: {} });
  } catch (err) {
    $("room-error").textContent = err.message;
  }
}

// ------------------------------------------------------ typing, members

function onComposerInput() {
  if (!app.current) return;
  const now = Date.now();
  if (now - app.typingSentAt > TYPING_RESEND_MS) {
    app.sb.send("typing:start", { roomId: app.current });
    app.typingSentAt = now;
  }
  clearTimeout(app.typingTimer);
  app.typingTimer = setTimeout(stopTyping, TYPING_IDLE_MS);
}

function stopTyping() {
  clearTimeout(app.typingTimer);
  if (app.typingSentAt && app.current) app.sb.send("typing:stop", { roomId: app.current });
  app.typingSentAt = 0;
}

function setTyping(roomId, userId, name, on) {
  let room = app.typing.get(roomId);
  if (!room) app.typing.set(roomId, (room = new Map()));
  const old = room.get(userId);
  if (old) clearTimeout(old.timer);
  if (on) room.set(userId, { name, timer: setTimeout(() => setTyping(roomId, userId, name, false), TYPING_SHOW_MS) });
  else room.delete(userId);
  if (roomId === app.current) renderTyping();
}

function renderTyping() {
  const names = [...(app.typing.get(app.current) || new Map()).values()].map((t) => t.name);
  $("typing").textContent = names.length === 0 ? "" :
    names.length === 1 ? `${names[0]} is typing…` : `${names.join(", ")} are typing…`;
}

function setMembers(roomId, members) {
  app.members.set(roomId, new Map(members.map((m) => [m.userId, m])));
  if (roomId === app.current) renderMembers();
}

async function refreshMembers(roomId) {
  try {
    const { members } = await app.sb.emit("room:members", { roomId });
    setMembers(roomId, members);
  } catch {
    // Not a member any more (left, deleted): the room's own events say so.
  }
}

function renderMembers() {
  const members = [...(app.members.get(app.current) || new Map()).values()];
  const rank = { online: 0, busy: 1, away: 2, offline: 3 };
  members.sort((a, b) => (rank[a.status] ?? 4) - (rank[b.status] ?? 4) || a.displayName.localeCompare(b.displayName));
  $("members").replaceChildren(...members.map((m) =>
    el("li", { dataset: { user: m.userId, status: m.status } },
      el("span", { className: "presence", dataset: { status: m.status }, title: m.status }),
      el("span", { className: "name", text: m.displayName || m.username }),
      m.role !== "member" ? el("span", { className: "role", text: m.role }) : "")));
}

// ---------------------------------------------------------------- events

function wireEvents(sb) {
  sb.on("message:new", ({ message }) => {
    setTyping(message.roomId, message.senderId, "", false);
    upsertMessage(message);
  });
  sb.on("message:updated", ({ message }) => upsertMessage(message));
  sb.on("message:deleted", ({ messageId, roomId }) => {
    const m = findMessage(roomId, messageId);
    if (m) upsertMessage({ ...m, deleted: true, content: "", reactions: {} });
  });
  sb.on("message:reaction", ({ messageId, roomId, reactions }) => {
    const m = findMessage(roomId, messageId);
    if (m) upsertMessage({ ...m, reactions });
  });
  sb.on("user:typing", ({ roomId, userId, displayName, username }) => setTyping(roomId, userId, displayName || username, true));
  sb.on("user:stopped_typing", ({ roomId, userId }) => setTyping(roomId, userId, "", false));
  sb.on("room:user_joined", ({ roomId }) => refreshMembers(roomId));
  sb.on("room:user_left", ({ roomId }) => refreshMembers(roomId));
  sb.on("user:status_changed", ({ userId, status }) => {
    for (const [roomId, members] of app.members) {
      const m = members.get(userId);
      if (m) {
        m.status = status;
        if (roomId === app.current) renderMembers();
      }
    }
  });
  sb.on("room:deleted", ({ roomId }) => {
    app.joined.delete(roomId);
    app.rooms.delete(roomId);
    app.messages.delete(roomId);
    if (app.current === roomId) {
      app.current = null;
      $("room-title").textContent = "Room deleted";
      $("messages").replaceChildren();
    }
    renderRooms();
  });
  sb.on("room:updated", ({ room }) => {
    app.rooms.set(room.id, room);
    if (app.current === room.id) $("room-title").textContent = room.name;
    renderRooms();
  });
  // A room reset while away holds another history under its id: what the
  // page kept of it is stale; reloaded once the connection is back.
  const reset = new Set();
  sb.on("client:room_reset", ({ roomId }) => {
    app.messages.delete(roomId);
    reset.add(roomId);
  });
  sb.on("client:reconnected", async () => {
    refreshRooms();
    if (app.current) refreshMembers(app.current);
    const current = app.current;
    const reload = current !== null && reset.has(current);
    reset.clear();
    if (reload) {
      await loadHistory(current);
      if (app.current === current) renderAllMessages();
    }
  });
  sb.on("client:rejoin_failed", ({ roomId, error }) => {
    app.joined.delete(roomId);
    $("rooms-error").textContent = `Could not re-join ${roomId}: ${error.code}`;
  });
}

// ------------------------------------------------------------------ boot

function boot() {
  $("dev-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const userId = $("signin-user").value.trim();
    const displayName = $("signin-name").value.trim() || undefined;
    const role = $("signin-role").value;
    try {
      await signIn(await devToken(userId, displayName, role), { userId, displayName, role });
    } catch (err) {
      $("signin-error").textContent = err.message;
    }
  });
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn($("token-input").value.trim());
  });
  $("sign-out").addEventListener("click", signOut);
  $("my-status").addEventListener("change", (ev) => app.sb && app.sb.emit("user:status_update", { status: ev.target.value }).catch(() => {}));
  $("refresh-rooms").addEventListener("click", refreshRooms);
  $("create-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const data = { name: $("new-room-name").value.trim(), type: $("new-room-type").value };
    const password = $("new-room-password").value;
    if (password) data.password = password;
    try {
      const { room } = await app.sb.emit("room:create", data);
      app.rooms.set(room.id, room);
      ev.target.reset();
      await openRoom(room.id, password || undefined);
    } catch (err) {
      $("rooms-error").textContent = err.message;
    }
  });
  $("join-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    await openRoom($("join-room-id").value.trim(), $("join-room-password").value || undefined);
    if (!$("rooms-error").textContent) ev.target.reset();
  });
  $("leave-room").addEventListener("click", leaveRoom);
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("composer-input");
    const content = input.value.trim();
    if (!content || !app.current) return;
    input.value = "";
    sendMessage(app.current, content);
  });
  $("composer-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("composer-input").addEventListener("input", onComposerInput);
  $("cancel-reply").addEventListener("click", cancelReply);
  $("messages").addEventListener("scroll", async () => {
    const list = $("messages");
    const roomId = app.current;
    if (list.scrollTop > 40 || !roomId || !app.hasMore.get(roomId) || app.loadingHistory) return;
    const height = list.scrollHeight;
    await loadHistory(roomId);
    if (roomId !== app.current) return;
    renderAllMessages();
    list.scrollTop = list.scrollHeight - height; // keep the reader's place
  });
  for (const button of document.querySelectorAll("#nav button")) {
    button.addEventListener("click", () => showView(button.dataset.view));
  }
  $("toggle-rooms").addEventListener("click", () => document.body.classList.toggle("show-rooms"));
  $("toggle-members").addEventListener("click", () => document.body.classList.toggle("show-members"));

  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) {
    const dev = sessionStorage.getItem(DEV_USER_KEY);
    signIn(saved, dev ? JSON.parse(dev) : null);
  }
}

boot();
