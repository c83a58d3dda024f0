// Token expiry: refreshed through onTokenExpiring, or closed with 4401 and not retried.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Switchboard } from "../switchboard.js";
import { CHAT_URL, collect, token, uid, until } from "./helpers.js";

test("auth:expiring calls onTokenExpiring and refreshes; the connection outlives the first token", async () => {
  const user = uid("refresh");
  const asked = [];
  const sb = new Switchboard({
    url: CHAT_URL,
    token: await token(user, { ttl: 2 }),
    onTokenExpiring: async (info) => {
      asked.push(info);
      return token(user, { ttl: 600 });
    },
  });
  try {
    const refreshed = sb.once("auth:expiring", { timeoutMs: 4000 });
    await sb.connect();
    const first = sb.token;
    await refreshed;
    await until(() => sb.token !== first, { what: "token refresh", timeoutMs: 4000 });
    assert.equal(asked.length, 1);
    assert.equal(typeof asked[0].expiresIn, "number");
    await new Promise((r) => setTimeout(r, 2500)); // past the first token's exp
    assert.equal(sb.state, "connected");
    await sb.emit("system:ping");
  } finally {
    sb.close();
  }
});

test("an expired token closes with 4401: surfaced as an error, no reconnection", async () => {
  const sb = new Switchboard({
    url: CHAT_URL,
    token: await token(uid("expire"), { ttl: 2 }),
    reconnect: { minDelayMs: 10, maxDelayMs: 50 },
  });
  const errors = collect(sb, "error");
  const states = collect(sb, "state");
  const lost = collect(sb, "client:disconnected");
  try {
    await sb.connect();
    await until(() => sb.state === "offline", { what: "offline", timeoutMs: 6000 });
    assert.equal(sb.closeCode, 4401);
    assert.deepEqual(lost, [{ code: 4401, reason: lost[0].reason, willReconnect: false }]);
    assert.ok(errors.some((e) => e.code === "TOKEN_EXPIRED"), JSON.stringify(errors));
    assert.ok(errors.some((e) => e.closeCode === 4401));
    assert.ok(!states.some((s) => s.state === "reconnecting"));
    await assert.rejects(sb.emit("message:send", { roomId: "x", content: "y" }), { code: "OFFLINE" });
  } finally {
    sb.close();
  }
});
