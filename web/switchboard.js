// Switchboard browser client: one WebSocket connection to a gateway namespace.
//
// Plain ES module, no dependencies. Mirrors switchboard_client/ (the Python
// client): acks as Promises, capped jittered exponential backoff, resuming
// every room in one `room:resume` after a reconnect (per-room `room:join`
// with `sinceSeq` on gateways without it) and replaying the missed messages as
// `message:new` (deduplicated by roomId + seq), repairing holes in a room's
// gapless seq (a message that arrives after a gap is held back until the
// missing range is fetched from history, so `message:new` stays in order and
// exactly once), token refresh on
// `auth:expiring`, and `message:send` queued while offline with a
// `clientMsgId` so a retry is answered `duplicate: true` instead of storing
// the message twice.
//
// Example:
//
//   import { Switchboard } from "./switchboard.js";
//   const sb = new Switchboard({ url: "ws://127.0.0.1:8080/ws/chat", token });
//   // The token goes in an auth:connect frame, not in the URL (tokenIn: "query" for that).
//   sb.on("state", ({ state }) => console.log(state));
//   sb.on("message:new", ({ message }) => console.log(message.seq, message.content));
//   await sb.connect();
//   await sb.emit("room:join", { roomId: "general" });
//   const { message } = await sb.emit("message:send", { roomId: "general", content: "hi" });
//
// Local events (besides the server's own): `state` {state, previous};
// `error` (a SwitchboardError: system:error frames without an ack, refused
// reconnections); `client:disconnected` {code, reason, willReconnect};
// `client:reconnected` {attempts, welcome, rooms}; `client:rejoin_failed`
// {roomId, error}; `client:room_reset` {roomId} (the room's history changed
// while away: what the page shows of it is stale, reload it; the client has
// re-joined it); `client:reconnect_failed` {code, message, closeCode, attempts}.

/** Close codes after which reconnecting is pointless: auth, ban/kick, limits. */
export const FATAL_CLOSE_CODES = Object.freeze(new Set([4401, 4403, 4429]));

/** Where the token travels: the first frame (default) or the URL's `?token=`. */
const TOKEN_LOCATIONS = Object.freeze(["frame", "query"]);

/** Events that are queued while offline and retried after a reconnect. */
const QUEUED_EVENTS = new Set(["message:send"]);

const DEFAULT_ACK_TIMEOUT_MS = 10_000;
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
const DEFAULT_MIN_DELAY_MS = 250;
const DEFAULT_MAX_DELAY_MS = 10_000;
const DEFAULT_MAX_QUEUE = 200;
// Recovery beyond the server's 500-message window pages history; stop
// somewhere so a long outage in a busy room cannot loop for ever.
const HISTORY_PAGE = 100;
const MAX_RECOVERED = 5000;
// Rooms one room:resume may name (the server's bound); more go in several.
const MAX_RESUME_ROOMS = 500;
// Seq numbers remembered per room for deduplication.
const SEEN_KEEP = 1024;
// A gap in a room's seq may close by itself (two nodes' broadcasts can cross
// on the way); wait this long for the missing message before fetching it.
const DEFAULT_HOLE_WAIT_MS = 500;
// Messages held behind one gap; beyond this the gap is repaired at once.
const MAX_HELD = 1000;
// Browsers answer the server's WebSocket pings without telling the page, so
// a silently dead network is only noticed by asking: a system:ping every
// heartbeat interval, and a reconnect when its ack does not come back.
const DEFAULT_LIVENESS_TIMEOUT_MS = 10_000;
/** Local close code for "the connection stopped answering" (never sent by the server). */
export const CLIENT_TIMEOUT_CLOSE = 4000;

/**
 * @typedef {"idle"|"connecting"|"connected"|"reconnecting"|"offline"} ConnectionState
 * @typedef {{minDelayMs?: number, maxDelayMs?: number, maxAttempts?: number}} ReconnectOptions
 * @typedef {{
 *   url: string,
 *   token?: string,
 *   getToken?: () => string | Promise<string>,
 *   tokenIn?: "frame" | "query",
 *   reconnect?: boolean | ReconnectOptions,
 *   onTokenExpiring?: (info: {expiresIn: number}) => (string | null | undefined | Promise<string | null | undefined>),
 *   ackTimeoutMs?: number,
 *   connectTimeoutMs?: number,
 *   maxQueue?: number,
 *   livenessIntervalMs?: number,
 *   livenessTimeoutMs?: number,
 *   holeWaitMs?: number,
 *   WebSocket?: typeof WebSocket,
 * }} SwitchboardOptions
 * @typedef {(data: any, frame: {event: string, data: any}) => void} Listener
 */

/** An error reported by the server (failed ack, system:error) or by the client. */
export class SwitchboardError extends Error {
  /**
   * @param {string} code e.g. "VALIDATION_ERROR", or client-side "OFFLINE", "TIMEOUT",
   *   "CONNECTION_LOST", "CLOSED", "QUEUE_FULL", "CONNECT_FAILED"
   * @param {string} [message]
   * @param {{details?: object, event?: string|null, closeCode?: number|null}} [extra]
   */
  constructor(code, message = "", { details = {}, event = null, closeCode = null } = {}) {
    super(message ? `${code}: ${message}` : code);
    this.name = "SwitchboardError";
    /** @type {string} */ this.code = code;
    /** @type {object} */ this.details = details || {};
    /** @type {string|null} */ this.event = event;
    /** @type {number|null} */ this.closeCode = closeCode;
  }

  /** @param {any} body an ack `error` object or `system:error` data */
  static from(body, event = null, closeCode = null) {
    const b = body && typeof body === "object" ? body : {};
    return new SwitchboardError(String(b.code || "UNKNOWN_ERROR"), String(b.message || ""), {
      details: b.details && typeof b.details === "object" ? b.details : {},
      event: typeof b.event === "string" ? b.event : event,
      closeCode,
    });
  }
}

/** @returns {string} a random id, unique enough for clientMsgId (1–64 chars). */
export function newClientMsgId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}-${Math.random().toString(36).slice(2)}`;
}

const isInt = (v) => typeof v === "number" && Number.isInteger(v);

export class Switchboard {
  /** @param {SwitchboardOptions} options */
  constructor(options) {
    const { url, token, getToken, reconnect = true, onTokenExpiring, tokenIn = "frame" } = options;
    if (!url) throw new TypeError("Switchboard: url is required");
    if (!TOKEN_LOCATIONS.includes(tokenIn)) {
      throw new TypeError(`Switchboard: tokenIn must be "frame" or "query", not ${JSON.stringify(tokenIn)}`);
    }
    /**
     * "frame": the token is sent as `auth:connect` right after the upgrade, so
     * it never appears in a URL (proxy and server access logs, browser
     * history). "query": as `?token=`, for gateways older than the auth frame.
     * @type {"frame"|"query"}
     */
    this.tokenIn = tokenIn;
    /** @type {string} */
    this.url = url.replace(/^http/, "ws");
    /** @type {string|undefined} */
    this.token = token;
    this.getToken = getToken;
    this.onTokenExpiring = onTokenExpiring;
    const rc = typeof reconnect === "object" && reconnect !== null ? reconnect : {};
    /** @type {boolean} */
    this.reconnect = reconnect !== false;
    this.minDelayMs = rc.minDelayMs ?? DEFAULT_MIN_DELAY_MS;
    this.maxDelayMs = rc.maxDelayMs ?? DEFAULT_MAX_DELAY_MS;
    this.maxAttempts = rc.maxAttempts ?? Infinity;
    this.ackTimeoutMs = options.ackTimeoutMs ?? DEFAULT_ACK_TIMEOUT_MS;
    this.connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    this.maxQueue = options.maxQueue ?? DEFAULT_MAX_QUEUE;
    /** Ping period; default: the welcome's heartbeatInterval. 0 turns it off. */
    this.livenessIntervalMs = options.livenessIntervalMs ?? null;
    this.livenessTimeoutMs = options.livenessTimeoutMs ?? DEFAULT_LIVENESS_TIMEOUT_MS;
    /** How long a gap in a room's seq waits to close by itself before it is fetched. */
    this.holeWaitMs = options.holeWaitMs ?? DEFAULT_HOLE_WAIT_MS;
    /** Round trip of the latest liveness ping, in ms. */
    this.latencyMs = null;
    this._liveness = null;
    this._abortOpen = null;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    if (!this._WebSocket) throw new TypeError("Switchboard: no WebSocket implementation available");

    /** @type {ConnectionState} */
    this.state = "idle";
    /** `data` of the latest system:welcome. */
    this.welcome = null;
    /** Successful reconnections so far. */
    this.reconnects = 0;
    /** Close code of the latest connection loss. */
    this.closeCode = null;

    /** @type {Map<string, Set<Listener>>} */
    this._listeners = new Map();
    /** @type {WebSocket|null} */
    this._ws = null;
    this._ackId = 0;
    /** @type {Map<number, {event: string, resolve: Function, reject: Function, timer: any, onResult?: Function, entry?: object}>} */
    this._pending = new Map();
    /** Queued message:send entries: {data, resolve, reject}. */
    this._queue = [];
    /** @type {Map<string, object>} room join payloads (without sinceSeq) for re-joining */
    this._rooms = new Map();
    /** @type {Map<string, number>} */
    this._lastSeq = new Map();
    /** @type {Map<string, Set<number>>} */
    this._seen = new Map();
    /** @type {Map<string, number>} highest seq up to which every message was delivered */
    this._contig = new Map();
    /** @type {Map<string, string>} each joined room's epoch (from the join ack), for room:resume */
    this._epochs = new Map();
    /** False once this connection's gateway answered room:resume UNKNOWN_EVENT (older). */
    this._canResume = true;
    /** @type {Map<string, Map<number, object>>} message:new data held behind a gap */
    this._held = new Map();
    /** @type {Map<string, any>} pending hole-repair timers per room */
    this._repairs = new Map();
    this._closing = false;
    this._reconnectTimer = null;
    this._looping = false;
    this._wakeReconnect = null;
    this._onOnline = () => this._wakeReconnect && this._wakeReconnect();
  }

  // ------------------------------------------------------------------ events

  /**
   * Call `listener(data, frame)` for each `event` ("*" for every event).
   * @param {string} event
   * @param {Listener} listener
   * @returns {() => void} a function that removes the listener
   */
  on(event, listener) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => this.off(event, listener);
  }

  /**
   * Remove `listener` (or every listener) for `event`.
   * @param {string} event
   * @param {Listener} [listener]
   */
  off(event, listener) {
    if (!listener) {
      this._listeners.delete(event);
      return;
    }
    const set = this._listeners.get(event);
    if (set) {
      set.delete(listener);
      if (set.size === 0) this._listeners.delete(event);
    }
  }

  /**
   * Resolve with the data of the next `event` matching `predicate`.
   * @param {string} event
   * @param {{timeoutMs?: number, predicate?: (data: any) => boolean}} [opts]
   * @returns {Promise<any>}
   */
  once(event, { timeoutMs = 5000, predicate } = {}) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        off();
        reject(new SwitchboardError("TIMEOUT", `no ${event} within ${timeoutMs} ms`));
      }, timeoutMs);
      const off = this.on(event, (data) => {
        if (predicate && !predicate(data)) return;
        clearTimeout(timer);
        off();
        resolve(data);
      });
    });
  }

  /** @param {string} event @param {any} data */
  _dispatch(event, data) {
    const frame = { event, data };
    for (const key of [event, "*"]) {
      const set = this._listeners.get(key);
      if (!set) continue;
      for (const listener of [...set]) {
        try {
          listener(data, frame);
        } catch (err) {
          // A broken listener must not break the connection or its siblings.
          console.error(`switchboard: ${event} listener failed`, err);
        }
      }
    }
  }

  /** @param {ConnectionState} state */
  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this._dispatch("state", { state, previous });
  }

  // --------------------------------------------------------------- lifecycle

  /** True while a socket is open and welcomed. */
  get connected() {
    return this.state === "connected";
  }

  /** Room ids joined through emit("room:join"), re-joined after a reconnect. */
  get rooms() {
    return [...this._rooms.keys()];
  }

  /**
   * Highest message seq seen in `roomId` (events, acks, history), or null.
   * @param {string} roomId
   */
  lastSeq(roomId) {
    return this._lastSeq.has(roomId) ? this._lastSeq.get(roomId) : null;
  }

  /**
   * Highest seq up to which every message of `roomId` was delivered (no hole
   * below it), or null. Reconnect recovery starts from here, so a message lost
   * on the way is fetched again even when later ones arrived.
   * @param {string} roomId
   */
  contiguousSeq(roomId) {
    return this._contig.has(roomId) ? this._contig.get(roomId) : null;
  }

  /**
   * Open the connection; resolves with the system:welcome data. Rejects with a
   * SwitchboardError (closeCode 4401 for a bad token, …) if the first attempt fails.
   * @returns {Promise<object>}
   */
  async connect() {
    if (this.state !== "idle" && this.state !== "offline") {
      throw new Error(`Switchboard.connect() while ${this.state}`);
    }
    this._closing = false;
    this._setState("connecting");
    let opened;
    try {
      opened = await this._open();
    } catch (err) {
      this._setState("offline");
      this._failQueue(err);
      throw err;
    }
    if (this._closing) {
      opened.ws.close(1000);
      throw new SwitchboardError("CLOSED", "closed while connecting");
    }
    this._attach(opened.ws, opened.welcome);
    if (globalThis.addEventListener) globalThis.addEventListener("online", this._onOnline);
    this._setState("connected");
    this._flushQueue();
    return opened.welcome;
  }

  /** Close for good (no reconnection); pending and queued requests reject with CLOSED. */
  close(code = 1000, reason = "") {
    this._closing = true;
    clearTimeout(this._reconnectTimer);
    clearInterval(this._liveness);
    if (this._wakeReconnect) this._wakeReconnect();
    if (this._abortOpen) this._abortOpen();
    if (globalThis.removeEventListener) globalThis.removeEventListener("online", this._onOnline);
    const ws = this._ws;
    this._ws = null;
    const err = new SwitchboardError("CLOSED", "client closed");
    this._failPending(err);
    this._failQueue(err);
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        ws.close();
      }
    }
    this._setState("offline");
  }

  // ----------------------------------------------------------------- sending

  /**
   * Send `event` and resolve with the ack's data; reject with a SwitchboardError.
   *
   * `message:send` gets a `clientMsgId` when it has none and is queued while
   * offline (and retried after a reconnect if the ack was lost); other events
   * reject with code OFFLINE while not connected.
   * @param {string} event
   * @param {object} [data]
   * @param {{timeoutMs?: number}} [opts]
   * @returns {Promise<any>}
   */
  emit(event, data = {}, { timeoutMs } = {}) {
    if (QUEUED_EVENTS.has(event)) {
      const payload = { ...data, clientMsgId: data.clientMsgId || newClientMsgId() };
      return new Promise((resolve, reject) => {
        const entry = { event, data: payload, resolve, reject, timeoutMs };
        if (this.state === "connected") {
          this._queue.push(entry);
          this._flushQueue();
        } else if (this._closing || this.state === "idle" || this.state === "offline") {
          reject(new SwitchboardError("OFFLINE", "not connected", { event }));
        } else if (this._queue.length >= this.maxQueue) {
          reject(new SwitchboardError("QUEUE_FULL", "too many messages waiting", { event }));
        } else {
          this._queue.push(entry);
        }
      });
    }
    if (this.state !== "connected" || !this._ws) {
      return Promise.reject(new SwitchboardError("OFFLINE", "not connected", { event }));
    }
    return this._request(this._ws, event, data, {
      timeoutMs,
      onResult: (result) => this._trackAck(event, data, result),
    });
  }

  /**
   * Fire and forget (no ack): failures come back as an `error` event. For
   * typing indicators; dropped silently while not connected.
   * @param {string} event
   * @param {object} [data]
   */
  send(event, data = {}) {
    if (this.state !== "connected" || !this._ws) return false;
    this._ws.send(JSON.stringify({ event, data }));
    return true;
  }

  /**
   * Send auth:refresh and use `token` for later reconnections too.
   * @param {string} token
   */
  async refreshToken(token) {
    const result = await this.emit("auth:refresh", { token });
    this.token = token;
    return result;
  }

  /** Number of message:send requests waiting for a connection. */
  get queued() {
    return this._queue.length;
  }

  _sendQueued(entry) {
    const ws = this._ws;
    this._request(ws, entry.event, entry.data, {
      timeoutMs: entry.timeoutMs,
      entry,
      onResult: (result) => this._trackAck(entry.event, entry.data, result),
    }).then(entry.resolve, (err) => {
      if (err instanceof SwitchboardError && err.code === "CONNECTION_LOST" && !this._closing && this.reconnect) {
        // The server may or may not have stored it: the retry after the
        // reconnect carries the same clientMsgId, so it is never doubled.
        this._queue.unshift(entry);
      } else {
        entry.reject(err);
      }
    });
  }

  _flushQueue() {
    const queue = this._queue;
    this._queue = [];
    for (const entry of queue) this._sendQueued(entry);
  }

  _failQueue(err) {
    const queue = this._queue;
    this._queue = [];
    for (const entry of queue) entry.reject(err);
  }

  _failPending(err) {
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(err);
    }
  }

  /**
   * @param {WebSocket} ws
   * @param {string} event
   * @param {any} data
   * @param {{timeoutMs?: number, onResult?: (result: any) => void, entry?: object}} opts
   *   onResult runs synchronously when the ack frame is handled, before any
   *   later frame, so seq bookkeeping sees the ack before the next message:new.
   */
  _request(ws, event, data, { timeoutMs, onResult, entry } = {}) {
    const ack = ++this._ackId;
    const limit = timeoutMs ?? this.ackTimeoutMs;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(ack);
        reject(new SwitchboardError("TIMEOUT", `no ack for ${event} within ${limit} ms`, { event }));
      }, limit);
      this._pending.set(ack, { event, resolve, reject, timer, onResult, entry });
      try {
        ws.send(JSON.stringify({ event, data, ack }));
      } catch (err) {
        clearTimeout(timer);
        this._pending.delete(ack);
        reject(new SwitchboardError("CONNECTION_LOST", String(err && err.message), { event }));
      }
    });
  }

  // ---------------------------------------------------------------- receiving

  /** Open a socket and wait for system:welcome (or the refusal). */
  async _open() {
    const token = this.getToken ? await this.getToken() : this.token;
    if (this.getToken) this.token = token;
    const url = new URL(this.url);
    if (token && this.tokenIn === "query") url.searchParams.set("token", token);
    const WS = this._WebSocket;
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WS(url.toString());
      } catch (err) {
        reject(new SwitchboardError("CONNECT_FAILED", String(err && err.message)));
        return;
      }
      let refusal = null;
      let done = false;
      const finish = (fn, value) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (this._abortOpen === abort) this._abortOpen = null;
        fn(value);
      };
      // close() during the handshake ends it now rather than at the timeout.
      const abort = () => {
        try {
          ws.close();
        } catch {
          /* not open yet */
        }
        finish(reject, new SwitchboardError("CLOSED", "closed while connecting"));
      };
      this._abortOpen = abort;
      const timer = setTimeout(() => {
        try {
          ws.close();
        } catch {
          /* already closing */
        }
        finish(reject, new SwitchboardError("TIMEOUT", `no system:welcome within ${this.connectTimeoutMs} ms`));
      }, this.connectTimeoutMs);
      if (token && this.tokenIn === "frame") {
        // The server waits for this as the first frame (SWITCHBOARD_AUTH_TIMEOUT, 5 s).
        ws.onopen = () => ws.send(JSON.stringify({ event: "auth:connect", data: { token } }));
      }
      ws.onmessage = (ev) => {
        const frame = parse(ev.data);
        if (!frame) return;
        if (frame.event === "system:welcome") {
          ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
          finish(resolve, { ws, welcome: frame.data || {} });
        } else if (frame.event === "system:error") {
          refusal = frame.data;
        }
      };
      ws.onerror = () => {};
      ws.onclose = (ev) => {
        const err = refusal
          ? SwitchboardError.from(refusal, null, ev.code)
          : new SwitchboardError("CONNECT_FAILED", ev.reason || `connection closed (${ev.code})`, {
              closeCode: ev.code,
            });
        finish(reject, err);
      };
    });
  }

  _attach(ws, welcome) {
    this._ws = ws;
    this.welcome = welcome;
    ws.onmessage = (ev) => this._onRaw(ev.data);
    ws.onerror = () => {};
    ws.onclose = (ev) => this._lost(ws, ev.code, ev.reason);
    const interval = this.livenessIntervalMs ?? welcome.heartbeatInterval;
    clearInterval(this._liveness);
    if (interval > 0) this._liveness = setInterval(() => this._checkAlive(ws), interval);
  }

  async _checkAlive(ws) {
    if (ws !== this._ws) return;
    const sent = Date.now();
    try {
      await this._request(ws, "system:ping", { t: sent }, { timeoutMs: this.livenessTimeoutMs });
      this.latencyMs = Date.now() - sent;
    } catch (err) {
      if (err.code !== "TIMEOUT" || ws !== this._ws) return;
      // A dead TCP connection can take minutes to report its close: drop it now.
      ws.onmessage = ws.onclose = null;
      try {
        ws.close(CLIENT_TIMEOUT_CLOSE, "no answer");
      } catch {
        /* already closing */
      }
      this._lost(ws, CLIENT_TIMEOUT_CLOSE, "no answer to system:ping");
    }
  }

  _onRaw(raw) {
    const frame = parse(raw);
    if (!frame) return;
    if (typeof frame.event === "string") {
      this._onEvent(frame.event, frame.data ?? {});
    } else if (isInt(frame.ack)) {
      const p = this._pending.get(frame.ack);
      if (!p) return;
      this._pending.delete(frame.ack);
      clearTimeout(p.timer);
      if (frame.ok === true) {
        const result = frame.data ?? {};
        if (p.onResult) p.onResult(result);
        p.resolve(result);
      } else {
        p.reject(SwitchboardError.from(frame.error, p.event));
      }
    }
  }

  _onEvent(event, data) {
    if (event === "message:new" && data && data.message) {
      this._receive(data);
      return;
    } else if (event === "room:deleted" && data && data.roomId != null) {
      this._rooms.delete(String(data.roomId));
      this._forget(String(data.roomId));
    } else if (event === "room:resync" && data && data.roomId != null) {
      this._resync(data.roomId).catch((err) => this._dispatch("error", err));
    } else if (event === "auth:expiring") {
      this._refreshOnExpiring(data);
    } else if (event === "system:error") {
      this._dispatch("error", SwitchboardError.from(data));
    }
    this._dispatch(event, data);
  }

  async _refreshOnExpiring(data) {
    let token = null;
    try {
      if (this.onTokenExpiring) token = await this.onTokenExpiring({ expiresIn: data.expiresIn });
      else if (this.getToken) token = await this.getToken();
      if (token) await this.refreshToken(token);
    } catch (err) {
      this._dispatch("error", err instanceof SwitchboardError ? err : new SwitchboardError("REFRESH_FAILED", String(err)));
    }
  }

  // ----------------------------------------------------- rooms and seq numbers

  /** Record a message's (roomId, seq); false if it was seen before. */
  _note(message) {
    if (!message || message.roomId == null || !isInt(message.seq)) return true;
    const room = String(message.roomId);
    let seen = this._seen.get(room);
    if (!seen) this._seen.set(room, (seen = new Set()));
    if (seen.has(message.seq)) return false;
    seen.add(message.seq);
    if (seen.size > 2 * SEEN_KEEP) {
      this._seen.set(room, new Set([...seen].sort((a, b) => a - b).slice(-SEEN_KEEP)));
    }
    if (message.seq > (this._lastSeq.get(room) ?? -1)) this._lastSeq.set(room, message.seq);
    return true;
  }

  /** Dispatch a message:new unless its (roomId, seq) was seen before. */
  _deliver(data) {
    if (this._note(data.message)) this._dispatch("message:new", data);
  }

  /** A live message:new: deliver it in seq order, holding it back behind a gap. */
  _receive(data) {
    const message = data.message;
    if (message.roomId == null || !isInt(message.seq)) {
      this._dispatch("message:new", data);
      return;
    }
    const room = String(message.roomId);
    const seen = this._seen.get(room);
    if (seen && seen.has(message.seq)) return; // already seen (recovery or history)
    const contig = this._contig.get(room);
    // The first message of a room this client never joined starts its sequence.
    if (contig === undefined) this._contig.set(room, message.seq - 1);
    if (contig === undefined || message.seq <= contig + 1) {
      this._deliver(data);
      this._advance(room);
      return;
    }
    let held = this._held.get(room);
    if (!held) this._held.set(room, (held = new Map()));
    held.set(message.seq, data);
    this._scheduleRepair(room, held.size >= MAX_HELD ? 0 : this.holeWaitMs);
  }

  /** Move the room's contiguous seq forward, delivering held messages that now fit. */
  _advance(room) {
    let contig = this._contig.get(room);
    if (contig === undefined) return;
    const seen = this._seen.get(room);
    const held = this._held.get(room);
    if (held) {
      // Held below the line (the line jumped: a repair gave up, a re-join hint): late, not lost.
      for (const seq of [...held.keys()].filter((s) => s <= contig).sort((a, b) => a - b)) {
        this._deliver(held.get(seq));
        held.delete(seq);
      }
    }
    for (;;) {
      const next = contig + 1;
      if (held && held.has(next)) {
        const data = held.get(next);
        held.delete(next);
        this._deliver(data);
      } else if (!(seen && seen.has(next))) {
        break;
      }
      contig = next;
    }
    this._contig.set(room, contig);
    if (held && held.size === 0) {
      this._held.delete(room);
      clearTimeout(this._repairs.get(room));
      this._repairs.delete(room);
    }
  }

  _scheduleRepair(room, delayMs) {
    if (this._repairs.has(room)) {
      if (delayMs > 0) return;
      clearTimeout(this._repairs.get(room));
    }
    this._repairs.set(room, setTimeout(() => {
      this._repairs.delete(room);
      this._repair(room).catch((err) => this._dispatch("error", err));
    }, delayMs));
  }

  /**
   * Fetch every message missing below the highest held one, in one round
   * (`afterSeq` + `beforeSeq`, paged newest first), and deliver in order:
   * during an outage every other message of a busy room can be missing, and
   * one fetch per gap would fall behind.
   */
  async _repair(room) {
    const ws = this._ws;
    const held = this._held.get(room);
    const from = this._contig.get(room);
    if (!ws || !held || !held.size || from === undefined) return;
    const last = Math.max(...held.keys());
    const found = [];
    try {
      await this._pageHistory(ws, room, from, last, found);
    } catch (err) {
      // Lost: the reconnect recovers from the contiguous seq. Refused (left the
      // room, rate limited): deliver what is held rather than stall the room.
      if (ws !== this._ws) return;
    }
    if (ws !== this._ws || this._held.get(room) !== held) return;
    for (const message of found) {
      if (!held.has(message.seq)) held.set(message.seq, { message, recovered: true });
    }
    // Everything up to the highest held message is accounted for, found or not
    // (a seq the history no longer has would otherwise stall the room for ever).
    for (const seq of [...held.keys()].filter((s) => s <= last).sort((a, b) => a - b)) {
      this._deliver(held.get(seq));
      held.delete(seq);
    }
    if (last > this._contig.get(room)) this._contig.set(room, last);
    this._advance(room);
    if (this._held.has(room)) this._scheduleRepair(room, this.holeWaitMs);
  }

  /**
   * room:resync: the server's catch-up stopped at its bound. Fetch the rest
   * now; the hole repair would only start at the room's next message, which
   * in a quiet room may be much later.
   */
  async _resync(roomId) {
    const ws = this._ws;
    const room = String(roomId);
    if (!ws || !this._rooms.has(room)) return;
    let found;
    try {
      found = await this._pageHistory(ws, roomId, this._since(room));
    } catch (err) {
      // Lost: the reconnect recovers from the contiguous seq. Refused or slow:
      // the next message's hole repair tries again.
      if (err.code === "CONNECTION_LOST" || err.code === "TIMEOUT") return;
      throw err;
    }
    if (ws === this._ws) this._feed(found);
  }

  /** Drop a room's hole bookkeeping (left, deleted, or connection lost). */
  _forget(room, { keepLine = false } = {}) {
    clearTimeout(this._repairs.get(room));
    this._repairs.delete(room);
    this._held.delete(room);
    if (!keepLine) {
      this._contig.delete(room);
      this._epochs.delete(room);
    }
  }

  _trackAck(event, request, result) {
    if (!result || typeof result !== "object") return;
    if (request && request.roomId != null) {
      const room = String(request.roomId);
      if (event === "room:join") {
        const { sinceSeq, ...payload } = request;
        this._rooms.set(room, payload);
        const hint = result.room && result.room.lastSeq;
        // Messages before the join are history, not "missed" on a reconnect.
        if (isInt(hint) && hint > (this._lastSeq.get(room) ?? -1)) this._lastSeq.set(room, hint);
        if (isInt(hint) && hint > (this._contig.get(room) ?? -1)) this._contig.set(room, hint);
        const epoch = result.room && result.room.epoch;
        if (typeof epoch === "string") this._epochs.set(room, epoch);
      } else if (event === "room:leave" || event === "room:delete") {
        this._rooms.delete(room);
        this._forget(room);
      }
    }
    const rooms = new Set();
    for (const field of ["missed", "messages"]) {
      if (!Array.isArray(result[field])) continue;
      for (const m of result[field]) if (this._note(m) && m.roomId != null) rooms.add(String(m.roomId));
    }
    if (result.message && this._note(result.message) && result.message.roomId != null) {
      rooms.add(String(result.message.roomId));
    }
    for (const room of rooms) this._advance(room);
  }

  // ------------------------------------------------------------- reconnection

  _lost(ws, code, reason) {
    if (ws !== this._ws) return;
    this._ws = null;
    clearInterval(this._liveness);
    this.closeCode = code;
    // Held messages come back with the recovery from the contiguous seq.
    for (const room of [...this._held.keys()]) this._forget(room, { keepLine: true });
    this._failPending(new SwitchboardError("CONNECTION_LOST", `connection closed (${code})`, { closeCode: code }));
    if (this._closing) return;
    const fatal = FATAL_CLOSE_CODES.has(code);
    const willReconnect = this.reconnect && !fatal;
    this._dispatch("client:disconnected", { code, reason, willReconnect });
    if (fatal) {
      this._dispatch("error", new SwitchboardError("CONNECTION_CLOSED", reason || `closed with ${code}`, { closeCode: code }));
    }
    if (!willReconnect) {
      this._giveUp(new SwitchboardError("OFFLINE", `connection closed (${code})`, { closeCode: code }));
      return;
    }
    this._setState("reconnecting");
    // Lost while a reconnect loop was re-joining: that loop notices and retries.
    if (!this._looping) this._reconnectLoop();
  }

  _giveUp(err) {
    this._closing = true;
    this._failQueue(err);
    if (globalThis.removeEventListener) globalThis.removeEventListener("online", this._onOnline);
    this._setState("offline");
  }

  _backoff(attempt) {
    const ceiling = Math.min(this.maxDelayMs, this.minDelayMs * 2 ** Math.min(attempt, 30));
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  _sleep(ms) {
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(this._reconnectTimer);
        this._wakeReconnect = null;
        resolve();
      };
      this._wakeReconnect = wake;
      this._reconnectTimer = setTimeout(wake, ms);
    });
  }

  async _reconnectLoop() {
    this._looping = true;
    try {
      await this._reconnectAttempts();
    } finally {
      this._looping = false;
    }
  }

  async _reconnectAttempts() {
    let attempt = 0;
    while (!this._closing) {
      await this._sleep(this._backoff(attempt));
      attempt += 1;
      if (this._closing) return;
      let opened;
      try {
        opened = await this._open();
      } catch (err) {
        if (err instanceof SwitchboardError && FATAL_CLOSE_CODES.has(err.closeCode)) {
          this._dispatch("client:reconnect_failed", {
            code: err.code, message: err.message, closeCode: err.closeCode, attempts: attempt,
          });
          this._dispatch("error", err);
          this._giveUp(err);
          return;
        }
        if (attempt >= this.maxAttempts) {
          this._giveUp(new SwitchboardError("OFFLINE", "gave up reconnecting"));
          return;
        }
        continue;
      }
      if (this._closing) {
        opened.ws.close(1000);
        return;
      }
      const { ws, welcome } = opened;
      this._attach(ws, welcome);
      let rooms;
      try {
        rooms = await this._rejoin(ws);
      } catch {
        if (this._ws !== ws) continue; // lost again while re-joining; _lost started no loop
        rooms = {};
      }
      if (this._ws !== ws) continue;
      this.reconnects += 1;
      this._setState("connected");
      this._flushQueue();
      this._dispatch("client:reconnected", { attempts: attempt, welcome, rooms });
      return;
    }
  }

  /**
   * Bring every joined room back after a reconnect; returns the report per
   * room. Rooms with an epoch go in one room:resume (per 500); the others,
   * and all of them on a gateway without room:resume, are re-joined one by one.
   */
  async _rejoin(ws) {
    const report = {};
    let single = [...this._rooms.keys()];
    // Asked again on every reconnect: a rolling upgrade may have reached this node.
    this._canResume = true;
    const resumable = single.filter((room) => this._epochs.has(room));
    single = single.filter((room) => !this._epochs.has(room));
    for (let i = 0; i < resumable.length; i += MAX_RESUME_ROOMS) {
      const rooms = resumable.slice(i, i + MAX_RESUME_ROOMS);
      single.push(...(this._canResume ? await this._resume(ws, rooms, report) : rooms));
    }
    for (const room of single) {
      if (this._rooms.has(room)) await this._rejoinRoom(ws, room, report);
    }
    return report;
  }

  /** From the highest contiguous seq, not the highest seen: a message lost
   * before the connection dropped is recovered with the rest. */
  _since(room) {
    return this._contig.get(room) ?? this._lastSeq.get(room) ?? 0;
  }

  /** One room:resume for `rooms`; returns the rooms to re-join one by one instead. */
  async _resume(ws, rooms, report) {
    const since = new Map(rooms.map((room) => [room, this._since(room)]));
    const entries = rooms.map((room) => ({
      roomId: this._rooms.get(room).roomId, sinceSeq: since.get(room), epoch: this._epochs.get(room),
    }));
    let result;
    try {
      result = await this._request(ws, "room:resume", { rooms: entries }, {
        // Synchronously, before the live frames the server releases after the ack.
        onResult: (r) => {
          for (const answer of Array.isArray(r.rooms) ? r.rooms : []) {
            if (answer.status === "resumed" && answer.recovered !== false) {
              report[String(answer.roomId)] = { rejoined: true, recovered: true, missed: this._feed(answer.missed || []) };
            }
          }
        },
      });
    } catch (err) {
      if (err.code === "CONNECTION_LOST" || err.code === "TIMEOUT") throw err;
      // An older gateway (UNKNOWN_EVENT), or refused as a whole: room by room.
      if (err.code === "UNKNOWN_EVENT") this._canResume = false;
      return rooms;
    }
    const again = [];
    for (const answer of Array.isArray(result.rooms) ? result.rooms : []) {
      const room = String(answer.roomId);
      if (!this._rooms.has(room)) continue;
      if (answer.status === "resumed" && answer.recovered === false) {
        // More missed than the server replays: page back through history.
        const found = await this._pageHistory(ws, answer.roomId, since.get(room));
        report[room] = { rejoined: true, recovered: true, missed: this._feed(found) };
      } else if (answer.status === "reset") {
        // Another history under the same id: what is held of the room is void.
        this._forget(room);
        this._seen.delete(room);
        this._lastSeq.delete(room);
        this._dispatch("client:room_reset", { roomId: answer.roomId });
        report[room] = { reset: true };
        again.push(room);
      } else if (answer.status !== "resumed") {
        this._dropRoom(room, {
          code: answer.status === "gone" ? "ROOM_NOT_FOUND" : "ROOM_ACCESS_DENIED",
          message: `room:resume answered ${answer.status}`, details: { roomId: answer.roomId },
        }, report);
      }
    }
    return again;
  }

  /** Re-join one room with room:join (sinceSeq when its history is still the client's). */
  async _rejoinRoom(ws, room, report) {
    const payload = this._rooms.get(room);
    const since = this._contig.has(room) || this._lastSeq.has(room) ? this._since(room) : null;
    const request = since === null ? { ...payload } : { ...payload, sinceSeq: since };
    let result;
    try {
      result = await this._request(ws, "room:join", request, {
        // Synchronously, before any later frame: live message:new frames
        // that follow the ack are then deduplicated against `missed`.
        onResult: (r) => {
          const epoch = r.room && r.room.epoch;
          if (typeof epoch === "string") this._epochs.set(room, epoch);
          if (since === null) {
            // A fresh start (the room was reset): the join's lastSeq is the line.
            this._trackAck("room:join", request, r);
            report[room] = { ...report[room], rejoined: true, recovered: false, missed: 0 };
          } else if (r.recovered !== false) report[room] = { rejoined: true, recovered: true, missed: this._feed(r.missed || []) };
        },
      });
    } catch (err) {
      if (err.code === "CONNECTION_LOST" || err.code === "TIMEOUT") throw err;
      this._dropRoom(room, { code: err.code, message: err.message, details: err.details }, report);
      return;
    }
    if (since !== null && result.recovered === false) {
      // More missed than the server replays: page back through history.
      const found = await this._pageHistory(ws, payload.roomId, since);
      report[room] = { rejoined: true, recovered: true, missed: this._feed(found) };
    }
  }

  _dropRoom(room, error, report) {
    const payload = this._rooms.get(room);
    this._rooms.delete(room);
    this._forget(room);
    this._dispatch("client:rejoin_failed", { roomId: payload.roomId, error });
    report[room] = { rejoined: false, error: error.code };
  }

  /**
   * Messages of `roomId` with `since < seq < before`, newest pages first.
   * Without `before`: everything after `since` (a re-join answered
   * `recovered: false`). With it: the holes below a held message, bounded on
   * both sides so a one-message hole costs a one-message page. Pages are
   * added to `found` as they arrive: what came before an error is kept.
   */
  async _pageHistory(ws, roomId, since, before = null, found = []) {
    while (found.length < MAX_RECOVERED && (before === null || before - 1 > since)) {
      const request = { roomId, limit: HISTORY_PAGE };
      if (before !== null) {
        // afterSeq only with beforeSeq: alone it would page from the oldest.
        Object.assign(request, { beforeSeq: before, afterSeq: since, limit: Math.min(HISTORY_PAGE, before - 1 - since) });
      }
      const page = await this._request(ws, "room:get_messages", request);
      const messages = (page.messages || []).filter((m) => isInt(m.seq));
      if (!messages.length) break;
      found.push(...messages.filter((m) => m.seq > since && (before === null || m.seq < before)));
      const lowest = Math.min(...messages.map((m) => m.seq));
      if (lowest <= since + 1 || !page.hasMore) break;
      before = lowest;
    }
    return found;
  }


  /** Deliver recovered messages oldest first as message:new; returns how many. */
  _feed(messages) {
    let delivered = 0;
    const rooms = new Set();
    for (const message of [...messages].sort((a, b) => a.seq - b.seq)) {
      if (!this._note(message)) continue;
      this._dispatch("message:new", { message, recovered: true });
      delivered += 1;
      if (message.roomId != null) rooms.add(String(message.roomId));
    }
    for (const room of rooms) this._advance(room);
    return delivered;
  }
}

function parse(raw) {
  if (typeof raw !== "string") return null;
  try {
    const frame = JSON.parse(raw);
    return frame && typeof frame === "object" && !Array.isArray(frame) ? frame : null;
  } catch {
    return null;
  }
}
