// Holes in a room's gapless seq: a message:new lost or reordered on the way
// is held back, fetched when needed, and delivered in order exactly once.
// The network is real; a WebSocket subclass plays the lossy link.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Switchboard } from "../switchboard.js";
import { CHAT_URL, connected, token, uid, until } from "./helpers.js";

/**
 * A WebSocket class whose incoming frames pass through `filter(frame, pass)`:
 * call `pass()` to let the frame through now, keep it to pass it later, or
 * drop it. Records every socket, every incoming frame and every sent event.
 */
function lossyWebSocket(filter) {
  const link = { sockets: [], frames: [], sent: [] };
  link.WebSocket = class extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      link.sockets.push(this);
    }
    set onmessage(fn) {
      // What the server could send on this socket, fed past the filter.
      link.inject = (frame) => fn(new MessageEvent("message", { data: JSON.stringify(frame) }));
      super.onmessage = fn && ((ev) => {
        const frame = JSON.parse(ev.data);
        link.frames.push(frame);
        filter(frame, () => fn(ev));
      });
    }
    get onmessage() {
      return super.onmessage;
    }
    send(data) {
      link.sent.push(JSON.parse(data).event);
      super.send(data);
    }
  };
  return link;
}

const content = (frame) => frame.event === "message:new" && frame.data.message.content;

async function lossyClient(userId, filter, options = {}) {
  const link = lossyWebSocket(filter);
  const sb = new Switchboard({ url: CHAT_URL, token: await token(userId), WebSocket: link.WebSocket, ...options });
  await sb.connect();
  return { sb, link };
}

async function roomWith(alice, bob) {
  const roomId = uid("room");
  await alice.emit("room:create", { roomId, name: "Holes" });
  await alice.emit("room:join", { roomId });
  await bob.emit("room:join", { roomId });
  return roomId;
}

/** Every message:new the application of `sb` sees, in order. */
function received(sb) {
  const got = [];
  sb.on("message:new", (d) => got.push(d));
  return got;
}

/** `sender` posts `texts` to `roomId` one after the other; the stored messages. */
async function post(sender, roomId, texts) {
  const sent = [];
  for (const text of texts) sent.push((await sender.emit("message:send", { roomId, content: text })).message);
  return sent;
}

test("a message lost on the way is fetched and delivered in order, once", async () => {
  const alice = await connected(uid("alice"));
  let dropped = 0;
  const { sb: bob, link } = await lossyClient(uid("bob"), (frame, pass) => {
    if (content(frame) === "m2" && dropped++ === 0) return; // lost once
    pass();
  }, { holeWaitMs: 50 });
  try {
    const roomId = await roomWith(alice, bob);
    const got = received(bob);
    const sent = await post(alice, roomId, ["m1", "m2", "m3"]);

    await until(() => got.length === 3, { what: "three messages" });
    await bob.emit("system:ping"); // barrier: nothing more is on its way
    assert.equal(dropped, 1);
    assert.deepEqual(got.map((d) => [d.message.seq, d.message.content]), sent.map((m) => [m.seq, m.content]));
    assert.equal(got[1].recovered, true, "the lost one came from history");
    assert.equal(got.length, 3, "exactly once");
    assert.equal(bob.contiguousSeq(roomId), sent[2].seq);
    assert.ok(link.sent.includes("room:get_messages"), "the hole was fetched");
  } finally {
    bob.close();
  }
});

test("several holes are fetched together, in one request", async () => {
  const alice = await connected(uid("alice"));
  const lost = new Set(["m2", "m4"]);
  const { sb: bob, link } = await lossyClient(uid("bob"), (frame, pass) => {
    if (!lost.delete(content(frame))) pass();
  }, { holeWaitMs: 300 });
  try {
    const roomId = await roomWith(alice, bob);
    const got = received(bob);
    const sent = [];
    for (const text of ["m1", "m2", "m3", "m4", "m5"]) {
      sent.push((await alice.emit("message:send", { roomId, content: text })).message);
    }
    await until(() => got.length === 5, { what: "five messages" });
    await bob.emit("system:ping");
    assert.deepEqual(got.map((d) => [d.message.seq, d.message.content]), sent.map((m) => [m.seq, m.content]));
    assert.deepEqual(got.map((d) => d.recovered), [undefined, true, undefined, true, undefined]);
    assert.equal(link.sent.filter((e) => e === "room:get_messages").length, 1);
    assert.equal(bob.contiguousSeq(roomId), sent[4].seq);
  } finally {
    bob.close();
  }
});

test("a gap that closes by itself costs no fetch and keeps the order", async () => {
  const alice = await connected(uid("alice"));
  let late = null;
  const { sb: bob, link } = await lossyClient(uid("bob"), (frame, pass) => {
    if (content(frame) === "m2") {
      late = pass; // overtaken by m3
      return;
    }
    pass();
    if (content(frame) === "m3") late();
  }, { holeWaitMs: 60_000 });
  try {
    const roomId = await roomWith(alice, bob);
    const got = [];
    bob.on("message:new", (d) => got.push(d.message.content));
    for (const text of ["m1", "m2", "m3"]) await alice.emit("message:send", { roomId, content: text });
    await until(() => got.length === 3, { what: "three messages" });
    await bob.emit("system:ping");
    assert.deepEqual(got, ["m1", "m2", "m3"]);
    assert.ok(!link.sent.includes("room:get_messages"));
  } finally {
    bob.close();
  }
});

test("a reconnect recovers from the highest contiguous seq, not the highest seen", async () => {
  const alice = await connected(uid("alice"));
  const { sb: bob, link } = await lossyClient(uid("bob"), (frame, pass) => {
    if (content(frame) !== "m2") pass(); // lost, and never fetched before the drop
  }, { holeWaitMs: 60_000, reconnect: { minDelayMs: 10, maxDelayMs: 50 } });
  try {
    const roomId = await roomWith(alice, bob);
    const got = received(bob);
    const sent = await post(alice, roomId, ["m1", "m2", "m3"]);
    await until(() => link.frames.some((f) => content(f) === "m3"), { what: "m3 on the wire" });
    assert.deepEqual(got.map((d) => d.message.content), ["m1"], "m3 is held behind the hole");
    assert.equal(bob.contiguousSeq(roomId), sent[0].seq);

    const reconnected = bob.once("client:reconnected", { timeoutMs: 10_000 });
    link.sockets.at(-1).close(4000, "link dropped");
    const info = await reconnected;
    assert.equal(info.rooms[roomId].missed, 2);
    await bob.emit("system:ping");
    assert.deepEqual(got.map((d) => [d.message.seq, d.message.content]), sent.map((m) => [m.seq, m.content]));
    assert.deepEqual(got.map((d) => d.recovered), [undefined, true, true]);
    assert.equal(bob.contiguousSeq(roomId), sent[2].seq);

    await alice.emit("message:send", { roomId, content: "m4" });
    await until(() => got.length === 4, { what: "live m4" });
    assert.equal(got[3].message.content, "m4");
  } finally {
    bob.close();
  }
});

test("room:resync fetches what the server's bounded catch-up left out, without waiting for the next message", async () => {
  const alice = await connected(uid("alice"));
  // The catch-up stopped after m1: m2 and m3 never reach bob live.
  const { sb: bob, link } = await lossyClient(uid("bob"), (frame, pass) => {
    if (content(frame) === "m2" || content(frame) === "m3") return;
    pass();
  }, { holeWaitMs: 3_600_000 });
  try {
    const roomId = await roomWith(alice, bob);
    const got = received(bob);
    const sent = await post(alice, roomId, ["m1", "m2", "m3"]);
    await until(() => got.length === 1, { what: "m1" });
    await bob.emit("system:ping"); // barrier: m2 and m3 were dropped, not late
    assert.equal(got.length, 1);

    link.inject({ event: "room:resync", data: { roomId, afterSeq: sent[0].seq } });
    await until(() => got.length === 3, { what: "m2 and m3 from history" });
    await bob.emit("system:ping");
    assert.deepEqual(got.map((d) => [d.message.seq, d.message.content, d.recovered === true]),
      sent.map((m, i) => [m.seq, m.content, i > 0]));
    assert.equal(bob.contiguousSeq(roomId), sent[2].seq);
  } finally {
    bob.close();
  }
});
