// @agentcast/client: the browser (and Node >= 20) client of an agentcast server.
//
// One dependency-free ES module. It keeps, per thread, the epoch of the last `subscribed` ack
// and the seq of the last event applied, persists both (sessionStorage by default, so a reload
// resumes), resubscribes with `since_seq` and `epoch` after every reconnect, drops duplicate
// seqs, reports `recovered: false` as a resync, splits batched messages on "\n", and decides
// by close code whether and how fast to reconnect. The decisions are the pure functions
// exported below (closeAction, backoffDelay, eventDecision, ackDecision); they follow the same
// tables as the Python client's `agentcast.client._policy` (tests compare the two).
//
// Protocol: docs/protocol.md of the agentcast repository.

/** What to do after a close code (docs/protocol.md, "Close codes"). */
export const CLOSE_POLICY = Object.freeze({
  1000: "stop", // closed on purpose by the server
  1002: "stop", // a frame broke RFC 6455: a client (library) bug
  1003: "stop", // a binary message: a client bug, reconnecting would loop
  1007: "stop", // invalid UTF-8: a client bug
  1008: "stop", // policy: a message in too many fragments
  1009: "stop", // a message over the size limit: a client bug
  4003: "stop", // revoked: log in again
  4001: "refresh", // token expired: a new token (getToken), then reconnect and resume
  4029: "throttle", // over the inbound rate: back off longer, then resume
  1001: "resume", // server going away / session closed
  1006: "resume", // dropped without a close frame (network, write deadline, dead peer)
  1011: "resume", // a fault in this user's session
  1012: "resume", // service restart (lost its Redis backplane)
  4008: "resume", // slow consumer
});

/** Action for a close code missing from CLOSE_POLICY: reconnect with backoff. */
export const DEFAULT_CLOSE_ACTION = "resume";

/** Backoff defaults, in milliseconds. */
export const BACKOFF = Object.freeze({
  /** First delay after a "resume" close (doubled per failed attempt). */
  initial: 500,
  /** First delay after a 4029 ("throttle"): the server asked us to slow down. */
  throttleInitial: 5000,
  /** No delay grows beyond this. */
  max: 30000,
  /** A connection open at least this long resets the attempt count. */
  stableAfter: 10000,
});

/** Seconds between client pings, and how long to wait for any answer before giving up. */
export const PING_INTERVAL_MS = 20000;
export const PONG_TIMEOUT_MS = 10000;
/** Longest wait for a handshake before it counts as failed (1006). */
export const CONNECT_TIMEOUT_MS = 10000;
/** Frames `send()` queues while disconnected; more throw. */
export const MAX_QUEUED_FRAMES = 64;
/** Prefix of the storage keys that hold each thread's seq and epoch. */
export const STORAGE_PREFIX = "agentcast:thread:";

const TERMINAL = new Set(["agent_completed", "agent_error", "agent_cancelled"]);
const RUN_STATUS = {
  agent_completed: "completed",
  agent_error: "error",
  agent_cancelled: "cancelled",
};

/**
 * What to do after a connection closed with `code`.
 * @param {number} code
 * @param {{canRefresh?: boolean}} [opts] canRefresh: a getToken callback exists
 * @returns {"stop"|"refresh"|"throttle"|"resume"}
 */
export function closeAction(code, { canRefresh = false } = {}) {
  const action = CLOSE_POLICY[code] ?? DEFAULT_CLOSE_ACTION;
  if (action === "refresh" && !canRefresh) return "stop";
  return action;
}

/**
 * Milliseconds to wait before reconnect attempt `attempt` (0 for the first), with "equal
 * jitter": half the exponential delay plus a random share of the other half, so clients that
 * lost the same server spread out and none reconnects at once in a loop.
 * @param {number} attempt
 * @param {"refresh"|"throttle"|"resume"} action
 * @param {number} random a number in [0, 1)
 * @param {typeof BACKOFF} [backoff]
 */
export function backoffDelay(attempt, action, random, backoff = BACKOFF) {
  const base = action === "throttle" ? backoff.throttleInitial : backoff.initial;
  const ceiling = Math.min(backoff.max, base * 2 ** Math.min(attempt, 30));
  return ceiling / 2 + (random * ceiling) / 2;
}

/**
 * Whether to apply an event of a thread whose last applied seq is `lastSeq`.
 * `data.from_seq` (a compacted replay of `agent_text`) says the event covers from_seq..seq.
 * seq <= lastSeq is a duplicate (dropped). A frame that overlaps (from_seq <= lastSeq < seq)
 * cannot be split, so applying it would repeat text: it is a "gap" too, and the client
 * subscribes again from lastSeq (the server's replay starts exactly at lastSeq + 1). A normal
 * resume never overlaps: its replay starts at since_seq + 1.
 * @param {number} lastSeq
 * @param {{seq: number, data?: {from_seq?: number}}} event
 * @returns {"apply"|"duplicate"|"gap"}
 */
export function eventDecision(lastSeq, event) {
  if (event.seq <= lastSeq) return "duplicate";
  const first = typeof event.data?.from_seq === "number" ? event.data.from_seq : event.seq;
  return first === lastSeq + 1 ? "apply" : "gap";
}

/**
 * What a `subscribed` ack means for a thread.
 * @param {{seq: number, epoch: string}|null} requested the since_seq/epoch sent, null if none
 * @param {{seq: number, epoch: string, recovered: boolean, active_runs?: {run_id: string, first_seq: number}[]}} ack
 * @param {boolean} [rebuilding] the subscribe was itself a rebuild (never rebuild twice)
 * @returns {{kind: "resumed"|"resync"|"fresh", seq: number, rebuildFrom: number|null}}
 *   seq: the last seq applied from now on; rebuildFrom: when a run is in progress and its
 *   events are not applied locally, subscribe again with since_seq = rebuildFrom.
 */
export function ackDecision(requested, ack, rebuilding = false) {
  const runs = Array.isArray(ack.active_runs) ? ack.active_runs : [];
  if (requested !== null && ack.recovered) {
    return { kind: "resumed", seq: requested.seq, rebuildFrom: null };
  }
  const kind = requested !== null ? "resync" : "fresh";
  if (rebuilding) return { kind, seq: ack.seq, rebuildFrom: null };
  const firsts = runs.map((run) => run.first_seq).filter((seq) => Number.isInteger(seq) && seq >= 1);
  const from = firsts.length ? Math.min(...firsts) - 1 : null;
  return { kind, seq: from ?? ack.seq, rebuildFrom: from };
}

/** A storage that lives as long as the page (used where sessionStorage does not exist). */
class MemoryStorage {
  #items = new Map();
  getItem(key) { return this.#items.has(key) ? this.#items.get(key) : null; }
  setItem(key, value) { this.#items.set(key, String(value)); }
  removeItem(key) { this.#items.delete(key); }
}

/** `promise`, or a rejection after `ms` (getToken is application code: bound it). */
function within(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took over ${ms} ms`)), ms);
  });
  return Promise.race([Promise.resolve(promise), timeout]).finally(() => clearTimeout(timer));
}

function defaultStorage() {
  try {
    if (globalThis.sessionStorage) return globalThis.sessionStorage;
  } catch { /* storage disabled (e.g. sandboxed iframe): fall through */ }
  return new MemoryStorage();
}

/** ws(s):// URL of the server's WebSocket endpoint; http(s) and a bare origin map to /ws. */
function socketUrl(url) {
  const parsed = new URL(url, globalThis.location?.href);
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (parsed.pathname === "/" || parsed.pathname === "") parsed.pathname = "/ws";
  return parsed.toString();
}

class Subscription {
  /** @internal */
  constructor(client, threadId, handlers, stored) {
    this.client = client;
    this.threadId = threadId;
    this.handlers = handlers;
    /** Seq of the last event applied (null before the first ack). */
    this.seq = stored?.seq ?? null;
    /** The stream's epoch from the last ack (null before the first ack). */
    this.epoch = stored?.epoch ?? null;
    /** Runs in progress on this thread: run id -> first seq. */
    this.activeRuns = new Map();
    /** @internal the since_seq/epoch of the subscribe in flight (null: none sent). */
    this.requested = null;
    /** @internal events are ignored between a gap's resubscribe and its ack. */
    this.awaitingAck = true;
    /** @internal the subscribe in flight replays the runs in progress. */
    this.rebuilding = false;
    this.closed = false;
  }

  /** Stop receiving this thread's events (and forget its stored position). */
  unsubscribe() {
    if (this.closed) return;
    this.closed = true;
    this.client._unsubscribe(this);
  }

  /** @internal the subscribe frame to send on (re)connect. */
  _frame() {
    const frame = { type: "subscribe", thread_id: this.threadId };
    if (this.seq !== null && this.epoch !== null) {
      frame.since_seq = this.seq;
      frame.epoch = this.epoch;
      this.requested = { seq: this.seq, epoch: this.epoch };
    } else {
      this.requested = null;
    }
    this.awaitingAck = true;
    return frame;
  }

  /** @internal */
  _ack(ack) {
    const decision = ackDecision(this.requested, ack, this.rebuilding);
    this.rebuilding = decision.rebuildFrom !== null;
    const lostFrom = this.seq;
    this.epoch = ack.epoch;
    this.seq = decision.seq;
    this.awaitingAck = false;
    this.activeRuns.clear();
    for (const run of Array.isArray(ack.active_runs) ? ack.active_runs : []) {
      this.activeRuns.set(run.run_id, run.first_seq);
    }
    this.client._store(this);
    if (decision.kind === "resync") {
      this._call("onResync", {
        threadId: this.threadId, seq: ack.seq, epoch: ack.epoch, lastSeq: lostFrom,
      });
    }
    for (const [runId, firstSeq] of this.activeRuns) {
      this._call("onRun", { runId, status: "running", firstSeq, event: null });
    }
    if (decision.rebuildFrom !== null) {
      // Replay the runs in progress: subscribe again from just before their first event.
      this.client._sendSubscribe(this);
    }
  }

  /** @internal */
  _event(event) {
    if (this.awaitingAck) return;
    const decision = eventDecision(this.seq, event);
    if (decision === "duplicate") {
      this.client.stats.duplicates += 1;
      return;
    }
    if (decision === "gap") {
      // Never happens per the protocol; if it does, ask for what is missing.
      this.client._sendSubscribe(this);
      return;
    }
    this.seq = event.seq;
    this.client._store(this);
    if (event.type === "agent_started" && event.run_id) {
      this.activeRuns.set(event.run_id, event.seq);
      this._call("onRun", { runId: event.run_id, status: "running", firstSeq: event.seq, event });
    } else if (TERMINAL.has(event.type) && event.run_id) {
      this.activeRuns.delete(event.run_id);
      this._call("onRun", { runId: event.run_id, status: RUN_STATUS[event.type], firstSeq: null, event });
    }
    this._call("onEvent", event);
  }

  _call(name, value) {
    const handler = this.handlers[name];
    if (typeof handler !== "function") return;
    try {
      handler(value);
    } catch (error) {
      // A handler bug must not break the stream for the other threads.
      this.client._emit("error", { type: "handler_error", handler: name, error });
    }
  }
}

class Client {
  /** @internal use connect() */
  constructor(url, options) {
    this.url = socketUrl(url);
    this.token = options.token ?? null;
    this.batch = options.batch ?? true;
    this.storage = options.storage ?? defaultStorage();
    this.getToken = options.getToken ?? null;
    this.backoff = { ...BACKOFF, ...(options.backoff ?? {}) };
    this.pingInterval = options.pingInterval ?? PING_INTERVAL_MS;
    this.pongTimeout = options.pongTimeout ?? PONG_TIMEOUT_MS;
    this.connectTimeout = options.connectTimeout ?? CONNECT_TIMEOUT_MS;
    this.random = options.random ?? Math.random;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new Error("no WebSocket implementation: pass options.WebSocket (Node < 22: run with --experimental-websocket)");
    }
    /** "connecting" | "open" | "reconnecting" | "closed" */
    this.state = "connecting";
    /** Counters: frames received, events applied, duplicates dropped, reconnects. */
    this.stats = { frames: 0, events: 0, duplicates: 0, reconnects: 0 };
    /** @type {Map<string, Subscription>} */
    this.subscriptions = new Map();
    this.listeners = new Map();
    this.queue = [];
    this.attempt = 0;
    this.ws = null;
    this.openedAt = 0;
    this.lastHeard = 0;
    this.pingId = 0;
    this.timers = new Set();
    this.refreshNext = false;
    this.dropping = false;
    queueMicrotask(() => this._open());
  }

  /**
   * Listen to "open" ({protocol}), "close" ({code, reason, willReconnect}), "reconnecting"
   * ({code, reason, delay, attempt}), "refreshed" ({expiresAt}), "error" (error frames and
   * handler errors) and "event" (live-only events, thread_id null). Returns an unsubscribe.
   */
  on(name, listener) {
    if (!this.listeners.has(name)) this.listeners.set(name, new Set());
    this.listeners.get(name).add(listener);
    return () => this.listeners.get(name)?.delete(listener);
  }

  /** Receive a thread's events; resumes from its stored seq and epoch if there are any. */
  subscribe(threadId, handlers = {}) {
    if (this.state === "closed") throw new Error("this client is closed; connect() again");
    if (this.subscriptions.has(threadId)) {
      throw new Error(`already subscribed to ${threadId}; unsubscribe() the first subscription`);
    }
    const sub = new Subscription(this, threadId, handlers, this._load(threadId));
    this.subscriptions.set(threadId, sub);
    if (this.state === "open") this._sendSubscribe(sub);
    return sub;
  }

  /** Send a frame (an object) to the server; queued while reconnecting. */
  send(frame) {
    if (this.state === "closed") throw new Error("this client is closed; connect() again");
    if (this.state === "open") {
      this._write(frame);
    } else if (this.queue.length < MAX_QUEUED_FRAMES) {
      this.queue.push(frame);
    } else {
      throw new Error(`not connected and ${MAX_QUEUED_FRAMES} frames already queued; wait for "open"`);
    }
  }

  /** Ask the server to cancel a run (it ends with `agent_cancelled`). */
  cancelRun(runId) {
    this.send({ type: "cancel_run", run_id: runId });
  }

  /** Close for good: no reconnect. Stored positions are kept, so a reload still resumes. */
  close() {
    if (this.state === "closed") return;
    this.state = "closed";
    this._clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      try { ws.close(1000, "client closed"); } catch { /* already closing */ }
    }
    this._emit("close", { code: 1000, reason: "client closed", willReconnect: false });
  }

  /** Drop the connection as a network failure would, then reconnect and resume (for demos
   * and tests: shows the resume happening). */
  drop() {
    if (this.ws && this.state === "open") {
      this.dropping = true;
      try { this.ws.close(4000, "dropped by client"); } catch { /* already closing */ }
    }
  }

  // ---- internals --------------------------------------------------------------------------

  _emit(name, value) {
    for (const listener of this.listeners.get(name) ?? []) {
      try { listener(value); } catch (error) { if (name !== "error") this._emit("error", { type: "listener_error", error }); }
    }
  }

  _timer(fn, ms) {
    const id = setTimeout(() => { this.timers.delete(id); fn(); }, ms);
    this.timers.add(id);
    return id;
  }

  _clearTimers() {
    for (const id of this.timers) clearTimeout(id);
    this.timers.clear();
  }

  async _open() {
    if (this.state === "closed") return;
    if (this.refreshNext && this.getToken) {
      this.refreshNext = false;
      try {
        this.token = await within(this.getToken(), this.connectTimeout, "getToken");
      } catch (error) {
        this._emit("error", { type: "get_token_failed", error });
        this._retry(1006, "getToken failed", "resume");
        return;
      }
      if (this.state === "closed") return;
    }
    const protocols = [this.batch ? "agentcast.ndjson" : "agentcast.v1"];
    if (this.token) protocols.push(`bearer.${this.token}`);
    let ws;
    try {
      ws = new this.WebSocket(this.url, protocols);
    } catch (error) {
      this._emit("error", { type: "bad_url", error });
      this._finish(1006, String(error?.message ?? error));
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this._clearTimers(); // the handshake deadline
      this.state = "open";
      this.openedAt = Date.now();
      this.lastHeard = this.openedAt;
      this._emit("open", { protocol: ws.protocol });
      for (const sub of this.subscriptions.values()) {
        sub.rebuilding = false;
        this._sendSubscribe(sub);
      }
      const queued = this.queue.splice(0);
      for (const frame of queued) this._write(frame);
      this._schedulePing(ws);
    };
    ws.onmessage = (message) => {
      this.lastHeard = Date.now();
      if (typeof message.data !== "string") return; // the server only sends text
      for (const line of message.data.split("\n")) {
        if (!line) continue;
        let frame;
        try { frame = JSON.parse(line); } catch { continue; }
        this.stats.frames += 1;
        this._frame(frame);
      }
    };
    const lost = (code, reason) => {
      if (this.ws !== ws) return; // already handled (browsers send error, then close)
      this.ws = null;
      this._clearTimers();
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      const dropped = this.dropping;
      this.dropping = false;
      if (this.state === "closed") return;
      if (opened && Date.now() - this.openedAt >= this.backoff.stableAfter) this.attempt = 0;
      const action = dropped ? "resume" : closeAction(code, { canRefresh: Boolean(this.getToken) });
      if (!opened && this.getToken && action !== "stop") this.refreshNext = true; // maybe a 401
      if (action === "refresh") this.refreshNext = true;
      if (action === "stop") {
        this._finish(code, reason);
        return;
      }
      this._retry(code, reason, action);
    };
    ws.onclose = (event) => lost(event.code, event.reason);
    // A handshake that fails fires error (and in browsers then close 1006; Node 20's
    // WebSocket fires no close at all): a failure before open is a 1006 either way.
    ws.onerror = () => { if (!opened) lost(1006, "connection failed"); };
    this._timer(() => {
      if (opened) return;
      try { ws.close(); } catch { /* not open yet */ }
      lost(1006, "handshake timed out");
    }, this.connectTimeout);
  }

  _retry(code, reason, action) {
    const delay = action === "refresh" && this.attempt === 0 ? 0
      : backoffDelay(this.attempt, action, this.random(), this.backoff);
    this.attempt += 1;
    this.state = "reconnecting";
    this.stats.reconnects += 1;
    this._emit("close", { code, reason, willReconnect: true });
    this._emit("reconnecting", { code, reason, delay, attempt: this.attempt });
    this._timer(() => this._open(), delay);
  }

  _finish(code, reason) {
    this.state = "closed";
    this._clearTimers();
    this._emit("close", { code, reason, willReconnect: false });
  }

  _schedulePing(ws) {
    this._timer(() => {
      if (this.ws !== ws) return;
      const sentAt = Date.now();
      this._write({ type: "ping", id: ++this.pingId });
      this._timer(() => {
        if (this.ws !== ws) return;
        if (this.lastHeard < sentAt) {
          // Nothing heard since the ping: the peer or the path is dead.
          this.dropping = true;
          try { ws.close(4000, "no answer to ping"); } catch { /* closing */ }
          return;
        }
        this._schedulePing(ws);
      }, this.pongTimeout);
    }, this.pingInterval);
  }

  _write(frame) {
    try {
      this.ws.send(JSON.stringify(frame));
    } catch (error) {
      this._emit("error", { type: "send_failed", error });
    }
  }

  _sendSubscribe(sub) {
    if (this.state === "open" && this.ws) this._write(sub._frame());
  }

  _unsubscribe(sub) {
    this.subscriptions.delete(sub.threadId);
    try { this.storage.removeItem(STORAGE_PREFIX + sub.threadId); } catch { /* storage full/disabled */ }
    if (this.state === "open") this._write({ type: "unsubscribe", thread_id: sub.threadId });
  }

  _load(threadId) {
    try {
      const raw = this.storage.getItem(STORAGE_PREFIX + threadId);
      if (!raw) return null;
      const { seq, epoch } = JSON.parse(raw);
      return Number.isInteger(seq) && seq >= 0 && typeof epoch === "string" ? { seq, epoch } : null;
    } catch {
      return null;
    }
  }

  _store(sub) {
    if (sub.seq === null || sub.epoch === null) return;
    try {
      this.storage.setItem(STORAGE_PREFIX + sub.threadId, JSON.stringify({ seq: sub.seq, epoch: sub.epoch }));
    } catch { /* storage full or disabled: resume still works within this page */ }
  }

  async _refresh() {
    if (!this.getToken) return;
    let token;
    try {
      token = await within(this.getToken(), this.connectTimeout, "getToken");
    } catch (error) {
      this._emit("error", { type: "get_token_failed", error });
      return;
    }
    this.token = token;
    if (this.state === "open") this._write({ type: "refresh", token });
  }

  _frame(frame) {
    switch (frame.type) {
      case "subscribed": {
        const sub = this.subscriptions.get(frame.thread_id);
        if (sub) sub._ack(frame);
        return;
      }
      case "pong":
      case "heartbeat":
      case "unsubscribed":
        return;
      case "token_expiring":
        this._refresh();
        return;
      case "refreshed":
        this._emit("refreshed", { expiresAt: frame.expires_at });
        return;
      case "error":
        this._emit("error", frame);
        return;
      default:
        break;
    }
    if (frame.thread_id == null || frame.seq == null) {
      this._emit("event", frame); // live-only: not numbered, never replayed
      return;
    }
    const sub = this.subscriptions.get(frame.thread_id);
    if (!sub) return;
    const before = sub.seq;
    sub._event(frame);
    if (sub.seq !== before) this.stats.events += 1;
  }
}

/**
 * Connect to an agentcast server. Returns at once; the client connects in the background,
 * and reconnects by close code until close().
 * @param {string} url ws(s)://host/ws, or http(s)://host (then /ws)
 * @param {object} [options] see agentcast.d.ts
 */
export function connect(url, options = {}) {
  return new Client(url, options);
}
