// Reconnecting with room:resume: every room in one request, what was missed
// delivered once and in order, a room whose history changed reported and
// re-joined from scratch, and per-room room:join against older gateways.
// The gateway is real; a WebSocket subclass records (and may rewrite) frames.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Switchboard } from "../switchboard.js";
import { CHAT_URL, connected, token, uid, until } from "./helpers.js";

/**
 * A WebSocket class recording the events the page sends. `inbound(frame)`
 * may rewrite an incoming frame; `outbound(frame, socket)` may answer a
 * request itself (return true: not sent).
 */
function recordingWebSocket({ inbound = (f) => f, outbound = () => false } = {}) {
  const link = { sockets: [], sent: [] };
  link.WebSocket = class extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      link.sockets.push(this);
    }
    set onmessage(fn) {
      this._page = fn;
      super.onmessage = fn && ((ev) => fn(new MessageEvent("message", { data: JSON.stringify(inbound(JSON.parse(ev.data))) })));
    }
    get onmessage() {
      return super.onmessage;
    }
    send(data) {
      const frame = JSON.parse(data);
      link.sent.push(frame);
      if (!outbound(frame, this)) super.send(data);
    }
  };
  link.events = (event) => link.sent.filter((f) => f.event === event);
  return link;
}

/**
 * A client whose reconnection waits until `away.release()`: messages sent
 * meanwhile are missed for sure, whatever the machine's speed.
 */
async function awayClient(userId, link) {
  const tok = await token(userId);
  const away = { gate: null };
  away.hold = () => { away.gate = new Promise((r) => (away.release = r)); };
  const sb = new Switchboard({
    url: CHAT_URL, WebSocket: link.WebSocket, reconnect: { minDelayMs: 10, maxDelayMs: 50 },
    getToken: async () => { await away.gate; return tok; },
  });
  await sb.connect();
  return { sb, away };
}

async function drop(sb, link, away) {
  away.hold();
  const gone = sb.once("client:disconnected");
  link.sockets.at(-1).close(4000, "link dropped");
  await gone;
}

test("a reconnect resumes every room with one room:resume; what was missed arrives once, in order", async () => {
  const alice = await connected(uid("alice"));
  const link = recordingWebSocket();
  const { sb: bob, away } = await awayClient(uid("bob"), link);
  try {
    const rooms = [uid("r"), uid("r"), uid("r")];
    for (const roomId of rooms) {
      await alice.emit("room:create", { roomId, name: "Resume" });
      await alice.emit("room:join", { roomId });
      await bob.emit("room:join", { roomId });
    }
    const got = [];
    bob.on("message:new", (d) => got.push(d));
    await alice.emit("message:send", { roomId: rooms[0], content: "before" });
    await until(() => got.length === 1, { what: "live before" });

    await drop(bob, link, away);
    const sent = [];
    for (const roomId of rooms) {
      for (const n of [1, 2]) sent.push((await alice.emit("message:send", { roomId, content: `missed ${n}` })).message);
    }
    const before = link.sent.length;
    const reconnected = bob.once("client:reconnected", { timeoutMs: 10_000 });
    away.release();
    const info = await reconnected;

    const requests = link.sent.slice(before).map((f) => f.event).filter((e) => e !== "auth:connect");
    assert.deepEqual(requests, ["room:resume"], "one request brings every room back");
    const resume = link.events("room:resume")[0].data.rooms;
    assert.deepEqual(resume.map((r) => r.roomId), rooms);
    assert.deepEqual(resume.map((r) => r.sinceSeq), [1, 0, 0]);
    for (const roomId of rooms) assert.deepEqual(info.rooms[roomId], { rejoined: true, recovered: true, missed: 2 });
    const recovered = got.slice(1);
    for (const roomId of rooms) {
      const mine = recovered.filter((d) => d.message.roomId === roomId).map((d) => [d.message.id, d.recovered]);
      assert.deepEqual(mine, sent.filter((m) => m.roomId === roomId).map((m) => [m.id, true]));
    }

    // Live again in every room, once each.
    for (const roomId of rooms) await alice.emit("message:send", { roomId, content: "live" });
    await until(() => got.length === 1 + 6 + 3, { what: "live messages" });
    await bob.emit("system:ping");
    assert.equal(got.length, 10);
    for (const roomId of rooms) assert.equal(bob.contiguousSeq(roomId), roomId === rooms[0] ? 4 : 3);
  } finally {
    bob.close();
  }
});

test("a room whose history changed is reported reset and re-joined from scratch", async () => {
  const alice = await connected(uid("alice"));
  const roomId = uid("r");
  // The join ack the client keeps carries another epoch: what it holds is
  // another history than the room's (as after the room was recreated).
  const link = recordingWebSocket({
    inbound: (f) => (f.data && f.data.room && f.data.room.id === roomId ? { ...f, data: { ...f.data, room: { ...f.data.room, epoch: "before" } } } : f),
  });
  const { sb: bob, away } = await awayClient(uid("bob"), link);
  try {
    await alice.emit("room:create", { roomId, name: "Reset" });
    await alice.emit("room:join", { roomId });
    await bob.emit("room:join", { roomId });
    const resets = [];
    bob.on("client:room_reset", (d) => resets.push(d));
    const got = [];
    bob.on("message:new", (d) => got.push(d));

    await drop(bob, link, away);
    await alice.emit("message:send", { roomId, content: "while away" });
    const before = link.sent.length;
    const reconnected = bob.once("client:reconnected", { timeoutMs: 10_000 });
    away.release();
    const info = await reconnected;

    assert.deepEqual(resets, [{ roomId }]);
    assert.deepEqual(info.rooms[roomId], { reset: true, rejoined: true, recovered: false, missed: 0 });
    const requests = link.sent.slice(before).filter((f) => f.event !== "auth:connect");
    assert.deepEqual(requests.map((f) => f.event), ["room:resume", "room:join"]);
    assert.equal(requests[1].data.sinceSeq, undefined, "re-joined without sinceSeq");
    assert.deepEqual(bob.rooms, [roomId]);
    assert.equal(got.length, 0, "nothing replayed: the page reloads the room");
    // The room is live again from its current seq.
    const { message } = await alice.emit("message:send", { roomId, content: "after" });
    await until(() => got.length === 1, { what: "live after the reset" });
    assert.equal(got[0].message.id, message.id);
    assert.equal(bob.contiguousSeq(roomId), message.seq);
  } finally {
    bob.close();
  }
});

test("a gateway without room:resume gets one room:join with sinceSeq per room", async () => {
  const alice = await connected(uid("alice"));
  // An older gateway: room:resume is answered UNKNOWN_EVENT.
  const link = recordingWebSocket({
    outbound: (frame, socket) => {
      if (frame.event !== "room:resume") return false;
      const error = { code: "UNKNOWN_EVENT", message: "Unknown event" };
      setTimeout(() => socket._page(new MessageEvent("message", { data: JSON.stringify({ ack: frame.ack, ok: false, error }) })));
      return true;
    },
  });
  const { sb: bob, away } = await awayClient(uid("bob"), link);
  try {
    const rooms = [uid("r"), uid("r")];
    for (const roomId of rooms) {
      await alice.emit("room:create", { roomId, name: "Old" });
      await alice.emit("room:join", { roomId });
      await bob.emit("room:join", { roomId });
    }
    const got = [];
    bob.on("message:new", (d) => got.push(d));
    await drop(bob, link, away);
    for (const roomId of rooms) await alice.emit("message:send", { roomId, content: "missed" });
    const before = link.sent.length;
    const reconnected = bob.once("client:reconnected", { timeoutMs: 10_000 });
    away.release();
    const info = await reconnected;

    const requests = link.sent.slice(before).filter((f) => f.event !== "auth:connect");
    assert.deepEqual(requests.map((f) => f.event), ["room:resume", "room:join", "room:join"]);
    assert.deepEqual(requests.slice(1).map((f) => [f.data.roomId, f.data.sinceSeq]), rooms.map((r) => [r, 0]));
    for (const roomId of rooms) assert.equal(info.rooms[roomId].missed, 1);
    assert.deepEqual(got.map((d) => [d.message.roomId, d.recovered]), rooms.map((r) => [r, true]));
  } finally {
    bob.close();
  }
});
