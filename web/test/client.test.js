// Connecting, acks and errors, events, dedupe by clientMsgId.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Switchboard, SwitchboardError } from "../switchboard.js";
import { CHAT_URL, HTTP, client, collect, connected, token, uid, until } from "./helpers.js";

test("connect resolves with the welcome and emit with the ack data", async () => {
  const user = uid("alice");
  const sb = await client(user);
  const states = collect(sb, "state");
  const welcome = await sb.connect();
  assert.equal(welcome.userId, user);
  assert.equal(welcome.namespace, "chat");
  assert.equal(sb.state, "connected");
  assert.deepEqual(states.map((s) => s.state), ["connecting", "connected"]);
  const pong = await sb.emit("system:ping", { t: Date.now() });
  assert.equal(typeof pong.serverTime, "string");
  assert.equal(typeof pong.latencyMs, "number");
});

test("a failed ack rejects with a SwitchboardError carrying code and details", async () => {
  const sb = await connected(uid("alice"));
  await assert.rejects(sb.emit("room:join", { roomId: "no-such-room-here" }), (err) => {
    assert.ok(err instanceof SwitchboardError);
    assert.equal(err.code, "ROOM_NOT_FOUND");
    assert.equal(err.event, "room:join");
    return true;
  });
  await assert.rejects(sb.emit("room:create", { name: "" }), (err) => {
    assert.equal(err.code, "VALIDATION_ERROR");
    assert.ok(Array.isArray(err.details.name), JSON.stringify(err.details));
    return true;
  });
  await assert.rejects(sb.emit("no:such_event"), { code: "UNKNOWN_EVENT" });
});

test("a bad token is refused with UNAUTHORIZED / 4401 and no reconnection", async () => {
  const sb = new Switchboard({ url: CHAT_URL, token: "not-a-jwt", reconnect: { minDelayMs: 10 } });
  await assert.rejects(sb.connect(), (err) => {
    assert.equal(err.code, "UNAUTHORIZED");
    assert.equal(err.closeCode, 4401);
    return true;
  });
  assert.equal(sb.state, "offline");
  await assert.rejects(sb.emit("system:ping"), { code: "OFFLINE" });
});

/** A WebSocket class that records the URL of every socket it opens. */
function recordingWebSocket(urls) {
  return class extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      urls.push(String(url));
    }
  };
}

test("the token travels in an auth:connect frame by default, never in the URL", async () => {
  const user = uid("frame");
  const urls = [];
  const sb = new Switchboard({ url: CHAT_URL, token: await token(user), WebSocket: recordingWebSocket(urls) });
  try {
    assert.equal(sb.tokenIn, "frame");
    assert.equal((await sb.connect()).userId, user);
    await sb.emit("system:ping");
    assert.deepEqual(urls, [CHAT_URL]);
  } finally {
    sb.close();
  }
});

test("tokenIn: 'query' puts the token in the URL instead", async () => {
  const user = uid("query");
  const urls = [];
  const secret = await token(user);
  const sb = new Switchboard({ url: CHAT_URL, token: secret, tokenIn: "query", WebSocket: recordingWebSocket(urls) });
  try {
    assert.equal((await sb.connect()).userId, user);
    assert.equal(new URL(urls[0]).searchParams.get("token"), secret);
  } finally {
    sb.close();
  }
  assert.throws(() => new Switchboard({ url: CHAT_URL, tokenIn: "header" }), TypeError);
});

test("getToken() supplies the token at connect time", async () => {
  const user = uid("gt");
  const sb = new Switchboard({ url: CHAT_URL, getToken: () => token(user) });
  try {
    assert.equal((await sb.connect()).userId, user);
  } finally {
    sb.close();
  }
});

test("events reach on() listeners and stop after off()", async () => {
  const [a, b] = [uid("alice"), uid("bob")];
  const alice = await connected(a);
  const bob = await connected(b);
  const roomId = uid("room");
  await alice.emit("room:create", { roomId, name: "Events" });
  await alice.emit("room:join", { roomId });
  const joined = alice.once("room:user_joined", { predicate: (d) => d.user.userId === b });
  await bob.emit("room:join", { roomId });
  await joined;

  const got = [];
  const listener = (data, frame) => got.push([frame.event, data.message.content]);
  bob.on("message:new", listener);
  const any = collect(bob, "*");
  const sent = await alice.emit("message:send", { roomId, content: "hello bob" });
  assert.equal(sent.duplicate, false);
  await until(() => got.length === 1, { what: "message:new" });
  assert.deepEqual(got[0], ["message:new", "hello bob"]);
  assert.ok(any.some((d) => d.message && d.message.content === "hello bob"));
  assert.equal(bob.lastSeq(roomId), sent.message.seq);

  const typing = bob.once("user:typing");
  assert.equal(alice.send("typing:start", { roomId }), true);
  assert.equal((await typing).userId, a);

  bob.off("message:new", listener);
  await alice.emit("message:send", { roomId, content: "unheard" });
  await until(() => any.some((d) => d.message && d.message.content === "unheard"), { what: "second" });
  assert.equal(got.length, 1);
});

test("message:send retries with the same clientMsgId are never duplicated", async () => {
  const alice = await connected(uid("alice"));
  const bob = await connected(uid("bob"));
  const roomId = uid("room");
  await alice.emit("room:create", { roomId, name: "Dedupe" });
  await alice.emit("room:join", { roomId });
  await bob.emit("room:join", { roomId });
  const bobGot = collect(bob, "message:new");

  const first = await alice.emit("message:send", { roomId, content: "once" });
  assert.equal(first.duplicate, false);
  const generated = await alice.emit("message:send", { roomId, content: "twice?" });
  assert.notEqual(generated.message.id, first.message.id, "each send gets a fresh clientMsgId");

  const clientMsgId = "fixed-id-" + uid();
  const a1 = await alice.emit("message:send", { roomId, content: "retry me", clientMsgId });
  const a2 = await alice.emit("message:send", { roomId, content: "retry me", clientMsgId });
  assert.equal(a1.duplicate, false);
  assert.equal(a2.duplicate, true);
  assert.equal(a2.message.id, a1.message.id);
  await bob.emit("system:ping"); // ordered after any broadcast
  await until(() => bobGot.length >= 3, { what: "bob's messages" });
  assert.deepEqual(bobGot.map((d) => d.message.content), ["once", "twice?", "retry me"]);
});

test("/dev/token exists in development and validates its input", async () => {
  const bad = await fetch(`${HTTP}/dev/token`, { method: "POST", body: JSON.stringify({ userId: "a b" }) });
  assert.equal(bad.status, 400);
  assert.equal((await bad.json()).error.code, "VALIDATION_ERROR");
});
