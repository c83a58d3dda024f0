// Shared by the web/test/*.test.js files: the live gateway's URLs, dev
// tokens and clients that are closed when the test ends.
import { after } from "node:test";
import { Switchboard } from "../switchboard.js";

export const HTTP = process.env.SWITCHBOARD_TEST_URL;
export const CONTROL = process.env.SWITCHBOARD_CONTROL_URL;
if (!HTTP) throw new Error("SWITCHBOARD_TEST_URL is not set (run through tests/test_web_client.py)");
export const CHAT_URL = `${HTTP.replace(/^http/, "ws")}/ws/chat`;

const opened = [];
after(() => {
  for (const sb of opened) sb.close();
});

/** A unique user id per call, so tests never share rate buckets or rooms. */
export function uid(prefix = "u") {
  return `${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
}

/** Mint a token with the gateway's development endpoint. */
export async function token(userId, body = {}) {
  const res = await fetch(`${HTTP}/dev/token`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ userId, ...body }),
  });
  if (!res.ok) throw new Error(`/dev/token: ${res.status} ${await res.text()}`);
  return (await res.json()).token;
}

/** A Switchboard for `userId` (not connected yet), closed after the file's tests. */
export async function client(userId, options = {}) {
  const sb = new Switchboard({ url: CHAT_URL, token: await token(userId), ...options });
  opened.push(sb);
  return sb;
}

/** A connected Switchboard for `userId`. */
export async function connected(userId, options = {}) {
  const sb = await client(userId, options);
  await sb.connect();
  return sb;
}

/** Collect `event` data into an array (for counting duplicates). */
export function collect(sb, event) {
  const seen = [];
  sb.on(event, (data) => seen.push(data));
  return seen;
}

/** Wait until `check()` is truthy, polling every 20 ms. */
export async function until(check, { timeoutMs = 5000, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Ask the pytest side to restart the gateway on the same port; resolves once it listens. */
export async function restartGateway() {
  const res = await fetch(`${CONTROL}/restart`, { method: "POST" });
  if (!res.ok) throw new Error(`restart: ${res.status}`);
  return res.json();
}
