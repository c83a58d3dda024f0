// A connection that silently stops answering (a frozen TCP proxy, as when a
// network drops without a FIN) is detected with system:ping and replaced.
import { test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { CLIENT_TIMEOUT_CLOSE } from "../switchboard.js";
import { HTTP, collect, connected, uid, until } from "./helpers.js";

/** A TCP proxy to the gateway whose current connections can be frozen. */
async function freezableProxy() {
  const target = new URL(HTTP);
  const pairs = new Set();
  const server = net.createServer((downstream) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    downstream.pipe(upstream);
    upstream.pipe(downstream);
    const pair = { downstream, upstream };
    pairs.add(pair);
    const drop = () => {
      pairs.delete(pair);
      downstream.destroy();
      upstream.destroy();
    };
    downstream.on("error", drop).on("close", drop);
    upstream.on("error", drop).on("close", drop);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `ws://127.0.0.1:${server.address().port}/ws/chat`,
    /** Stop moving bytes on every open connection; nothing is closed. */
    freeze() {
      for (const { downstream, upstream } of pairs) {
        downstream.unpipe(upstream);
        upstream.unpipe(downstream);
        downstream.pause();
        upstream.pause();
      }
      const frozen = [...pairs];
      pairs.clear();
      return frozen;
    },
    /** Stop listening and cut every connection (the gateway looks gone). */
    close() {
      server.close();
      for (const { downstream, upstream } of pairs) {
        downstream.destroy();
        upstream.destroy();
      }
    },
  };
}

test("an unanswered system:ping drops the connection and the client reconnects and recovers", async () => {
  const proxy = await freezableProxy();
  const [a, b] = [uid("alice"), uid("bob")];
  try {
    const alice = await connected(a, {
      url: proxy.url,
      livenessIntervalMs: 200,
      livenessTimeoutMs: 400,
      reconnect: { minDelayMs: 100, maxDelayMs: 200 },
    });
    const roomId = uid("room");
    await alice.emit("room:create", { roomId, name: "Liveness" });
    await alice.emit("room:join", { roomId });
    await until(() => alice.latencyMs !== null, { what: "a first liveness ping" });
    const lost = collect(alice, "client:disconnected");
    const got = collect(alice, "message:new");
    const reconnected = alice.once("client:reconnected", { timeoutMs: 5000 });

    const frozen = proxy.freeze();
    const bob = await connected(b);
    await bob.emit("room:join", { roomId });
    await bob.emit("message:send", { roomId, content: "while frozen" });

    await until(() => lost.length === 1, { what: "the frozen connection to be dropped" });
    assert.equal(lost[0].code, CLIENT_TIMEOUT_CLOSE);
    assert.equal(lost[0].willReconnect, true);
    await reconnected;
    assert.equal(alice.state, "connected");
    assert.deepEqual(got.map((d) => [d.message.content, d.recovered]), [["while frozen", true]]);
    for (const { downstream, upstream } of frozen) {
      downstream.destroy();
      upstream.destroy();
    }
  } finally {
    proxy.close();
  }
});

test("close() while reconnecting rejects queued sends with CLOSED and stops for good", async () => {
  const proxy = await freezableProxy();
  const alice = await connected(uid("alice"), {
    url: proxy.url,
    reconnect: { minDelayMs: 50, maxDelayMs: 100 },
  });
  const roomId = uid("room");
  await alice.emit("room:create", { roomId, name: "Closing" });
  await alice.emit("room:join", { roomId });
  const states = collect(alice, "state");
  proxy.close();
  await until(() => alice.state === "reconnecting", { what: "reconnecting" });
  const queued = alice.emit("message:send", { roomId, content: "never sent" });
  assert.equal(alice.queued, 1);
  await new Promise((r) => setTimeout(r, 300)); // a few refused attempts
  assert.equal(alice.state, "reconnecting");
  alice.close();
  await assert.rejects(queued, { code: "CLOSED" });
  assert.equal(alice.state, "offline");
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(states.map((s) => s.state), ["reconnecting", "offline"]);
});

test("a send before connect() is refused with OFFLINE, not queued for ever", async () => {
  const { client } = await import("./helpers.js");
  const sb = await client(uid("idle"));
  await assert.rejects(sb.emit("message:send", { roomId: "r", content: "x" }), { code: "OFFLINE" });
  assert.equal(sb.queued, 0);
});
