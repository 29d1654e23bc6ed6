// Type declarations of @agentcast/client (agentcast.js). Protocol: docs/protocol.md.

/** One event of a thread, as the server writes it (docs/protocol.md, "Events"). */
export interface AgentcastEvent {
  type: string;
  thread_id: string | null;
  run_id: string | null;
  seq: number | null;
  ts: number;
  data: Record<string, unknown> & { from_seq?: number };
}

/** A run in progress listed by a `subscribed` ack. */
export interface ActiveRun {
  run_id: string;
  first_seq: number;
}

/** The `subscribed` ack. */
export interface SubscribedFrame {
  type: "subscribed";
  thread_id: string;
  seq: number;
  epoch: string;
  recovered: boolean;
  active_runs?: ActiveRun[];
}

/** What `onResync` receives: events after `lastSeq` are lost to this client; reload the
 * thread from the application, then continue from `seq`. */
export interface Resync {
  threadId: string;
  seq: number;
  epoch: string;
  lastSeq: number | null;
}

export type RunStatus = "running" | "completed" | "error" | "cancelled";

/** What `onRun` receives: a run started (or was in progress at subscribe) or ended. */
export interface RunUpdate {
  runId: string;
  status: RunStatus;
  /** Seq of the run's first event while running, else null. */
  firstSeq: number | null;
  /** The event that changed it (null when known from an ack's `active_runs`). */
  event: AgentcastEvent | null;
}

export interface SubscriptionHandlers {
  /** Each event of the thread, once, in seq order. */
  onEvent?: (event: AgentcastEvent) => void;
  /** `recovered: false` after a resume: events were missed. */
  onResync?: (resync: Resync) => void;
  onRun?: (run: RunUpdate) => void;
}

/** Key-value storage for each thread's seq and epoch (the Web Storage subset used). */
export interface PositionStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export interface Backoff {
  /** First delay after a resumable close, ms (doubled per failed attempt). Default 500. */
  initial: number;
  /** First delay after 4029, ms. Default 5000. */
  throttleInitial: number;
  /** Largest delay, ms. Default 30000. */
  max: number;
  /** Open this long (ms) and the attempt count starts over. Default 10000. */
  stableAfter: number;
}

export interface ConnectOptions {
  /** Sent as the subprotocol `bearer.<token>`. */
  token?: string;
  /** Offer `agentcast.ndjson` (batched) instead of `agentcast.v1`. Default true. */
  batch?: boolean;
  /** Where each thread's position lives. Default sessionStorage (in memory without it). */
  storage?: PositionStorage;
  /** Called for a new token on `token_expiring` (then `refresh`), after a 4001 close, and
   * before retrying a handshake that failed (it may have been a 401). */
  getToken?: () => string | Promise<string>;
  backoff?: Partial<Backoff>;
  /** ms a handshake may take before it counts as failed (1006). Default 10000. */
  connectTimeout?: number;
  /** ms between client pings. Default 20000. */
  pingInterval?: number;
  /** ms to hear anything after a ping before dropping the connection. Default 10000. */
  pongTimeout?: number;
  /** Random numbers in [0, 1) for the jitter. Default Math.random. */
  random?: () => number;
  /** WebSocket constructor. Default globalThis.WebSocket. */
  WebSocket?: typeof WebSocket;
}

export interface OpenInfo { protocol: string }
export interface CloseInfo { code: number; reason: string; willReconnect: boolean }
export interface ReconnectingInfo { code: number; reason: string; delay: number; attempt: number }
export interface RefreshedInfo { expiresAt: number }
export interface ErrorFrame { type: "error"; code: string; message: string }
export interface LocalError { type: string; error?: unknown; handler?: string }

export interface ClientEvents {
  open: OpenInfo;
  close: CloseInfo;
  reconnecting: ReconnectingInfo;
  refreshed: RefreshedInfo;
  error: ErrorFrame | LocalError;
  /** Live-only events (thread_id and seq null). */
  event: AgentcastEvent;
}

export type ClientState = "connecting" | "open" | "reconnecting" | "closed";

export interface Subscription {
  readonly threadId: string;
  /** Seq of the last event applied; null before the first ack. */
  readonly seq: number | null;
  readonly epoch: string | null;
  /** Runs in progress: run id -> seq of its first event. */
  readonly activeRuns: Map<string, number>;
  unsubscribe(): void;
}

export interface ClientStats {
  frames: number;
  events: number;
  duplicates: number;
  reconnects: number;
}

export interface Client {
  readonly url: string;
  readonly state: ClientState;
  readonly stats: ClientStats;
  on<K extends keyof ClientEvents>(name: K, listener: (value: ClientEvents[K]) => void): () => void;
  subscribe(threadId: string, handlers?: SubscriptionHandlers): Subscription;
  /** Send a frame; queued (at most 64) while not connected. At most once: a frame sent as
   * the socket drops is lost (subscriptions are resent on every reconnect). */
  send(frame: Record<string, unknown>): void;
  cancelRun(runId: string): void;
  close(): void;
  /** Drop the connection as a network failure would, then reconnect and resume. */
  drop(): void;
}

export type CloseAction = "stop" | "refresh" | "throttle" | "resume";

export declare const CLOSE_POLICY: Readonly<Record<number, CloseAction>>;
export declare const DEFAULT_CLOSE_ACTION: CloseAction;
export declare const BACKOFF: Readonly<Backoff>;
export declare const PING_INTERVAL_MS: number;
export declare const PONG_TIMEOUT_MS: number;
export declare const CONNECT_TIMEOUT_MS: number;
export declare const MAX_QUEUED_FRAMES: number;
export declare const STORAGE_PREFIX: string;

export declare function connect(url: string, options?: ConnectOptions): Client;
export declare function closeAction(code: number, opts?: { canRefresh?: boolean }): CloseAction;
export declare function backoffDelay(
  attempt: number, action: Exclude<CloseAction, "stop">, random: number, backoff?: Backoff,
): number;
export declare function eventDecision(
  lastSeq: number, event: Pick<AgentcastEvent, "seq" | "data">,
): "apply" | "duplicate" | "gap";
export declare function ackDecision(
  requested: { seq: number; epoch: string } | null, ack: SubscribedFrame, rebuilding?: boolean,
): { kind: "resumed" | "resync" | "fresh"; seq: number; rebuildFrom: number | null };
