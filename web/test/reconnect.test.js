// Reconnection after a gateway restart: re-join with sinceSeq, recovered
// messages exactly once, the offline queue delivered once.
import { test } from "node:test";
import assert from "node:assert/strict";
import { newClientMsgId } from "../switchboard.js";
import { collect, connected, restartGateway, uid, until } from "./helpers.js";

test("after a restart the client reconnects, recovers missed messages once and sends its queue once", async () => {
  const [a, b] = [uid("alice"), uid("bob")];
  // Slow first retry (2–4 s) so bob's messages land while alice is away.
  const alice = await connected(a, { reconnect: { minDelayMs: 4000, maxDelayMs: 4000 } });
  const roomId = uid("room");
  await alice.emit("room:create", { roomId, name: "Restart" });
  await alice.emit("room:join", { roomId });
  const before = await alice.emit("message:send", { roomId, content: "before" });
  const got = collect(alice, "message:new");
  const states = collect(alice, "state");
  const reconnected = alice.once("client:reconnected", { timeoutMs: 20000 });

  await restartGateway();
  await until(() => alice.state === "reconnecting", { what: "reconnecting" });
  // Queued while offline; resolved once the reconnection has re-joined the room.
  const clientMsgId = newClientMsgId();
  const queued = alice.emit("message:send", { roomId, content: "sent while offline", clientMsgId });
  assert.equal(alice.queued, 1);
  await assert.rejects(alice.emit("system:ping"), { code: "OFFLINE" });

  const bob = await connected(b);
  await bob.emit("room:join", { roomId });
  const bobGot = collect(bob, "message:new");
  const missed = [];
  for (const content of ["m1", "m2", "m3"]) {
    missed.push((await bob.emit("message:send", { roomId, content })).message);
  }

  const info = await reconnected;
  assert.equal(alice.state, "connected");
  assert.deepEqual(states.map((s) => s.state), ["reconnecting", "connected"]);
  assert.equal(info.rooms[roomId].rejoined, true);
  assert.equal(info.rooms[roomId].missed, 3);
  assert.deepEqual(got.map((d) => [d.message.seq, d.message.content, d.recovered]), [
    [before.message.seq + 1, "m1", true],
    [before.message.seq + 2, "m2", true],
    [before.message.seq + 3, "m3", true],
  ]);

  const sent = await queued;
  assert.equal(sent.duplicate, false);
  assert.equal(sent.message.content, "sent while offline");
  await until(() => bobGot.length === 1, { what: "bob gets the queued message" });

  // Live traffic after recovery arrives once, and a retry of the queued
  // message (same clientMsgId) is answered as a duplicate.
  await bob.emit("message:send", { roomId, content: "live" });
  await until(() => got.length === 4, { what: "live message" });
  assert.equal(got[3].message.content, "live");
  assert.equal(got[3].recovered, undefined);
  const retry = await alice.emit("message:send", {
    roomId, content: "sent while offline", clientMsgId });
  assert.equal(retry.message.id, sent.message.id);
  assert.equal(retry.duplicate, true);
  await bob.emit("system:ping");
  assert.equal(bobGot.length, 1);
  const seqs = got.map((d) => d.message.seq);
  assert.equal(new Set(seqs).size, seqs.length, "no duplicates");
});
