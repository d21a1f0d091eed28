/** "unauthorized": the node refused the token (401/403) even after asking
 * `getToken` again; see `refusal`, and `reconnect()` to try again. */
export type HeraldState = "connecting" | "open" | "reconnecting" | "unauthorized" | "closed";

/** How the client talks to the node: a WebSocket, or a Server-Sent Events
 * stream for receiving and HTTP POST for publishing. */
export type HeraldTransport = "websocket" | "sse";

export interface EventMeta {
  topic: string;
  /** The event's offset in its topic: 1, 2, 3 … For a topic without
   * history the numbering may start again from 1 (after its cluster's
   * Redis restarted, say); every event is still delivered once. */
  offset: number;
  /** Publish time, Unix milliseconds. */
  ts: number;
}

/** JSON data, or the bytes of a binary payload. */
export type EventData = unknown | Uint8Array;

export interface HeraldOptions {
  /** The node's WebSocket URL, e.g. "wss://herald.example.com/ws". */
  url: string;
  /** A JWT. Give this or `getToken`. */
  token?: string;
  /** Called at every connect and before the token expires (then sent with `refresh`). */
  getToken?: () => string | Promise<string>;
  /** WebSocket constructor; defaults to the global one (pass the `ws` package's in Node.js 20). */
  WebSocket?: unknown;
  /** The transports to use, in order of preference (default ["websocket", "sse"]); with "sse" first, no WebSocket is tried. */
  transports?: HeraldTransport[];
  /** fetch, for the stream and HTTP publishing; defaults to the global one. */
  fetch?: typeof fetch;
  /** The node's HTTP base URL; by default `url` with `ws`→`http` and without its `/ws` path. */
  httpUrl?: string;
  /** WebSocket attempts that fail without ever opening before the client falls back to SSE (default 2); one that hangs for `connectTimeout` is enough. */
  fallbackAfter?: number;
  /** While on SSE, try WebSocket again: after 2 s, then less often, up to every this many ms (default 30000). */
  websocketRetry?: number;
  /** A stream silent this long (the node sends a heartbeat every 20 s by default) is taken as lost and reopened (default 60000). */
  streamIdleTimeout?: number;
  /** First reconnect delay in ms (default 250); doubles per attempt, with jitter. */
  minDelay?: number;
  /** Largest reconnect delay in ms (default 15000). */
  maxDelay?: number;
  /** Refresh the token this many ms before it expires (default 30000). */
  refreshBefore?: number;
  /** Give up on a connection attempt that neither opens nor fails within this many ms, and retry (default 10000). */
  connectTimeout?: number;
}

export interface SubscribeOptions {
  /** Replay events published after this offset … */
  since?: number;
  /** … in this epoch of the topic's log. */
  epoch?: string;
}

export interface PublishOptions {
  /** Idempotency key; a random one by default, reused across retries. */
  key?: string;
}

export interface Truncated {
  topic: string;
  epoch?: string;
}

/** A member of a topic's presence: a user (token `sub`) and its `presence_info`. */
export interface Member {
  sub: string;
  info?: unknown;
}

export interface PresenceChange {
  joins: Member[];
  leaves: Member[];
}

export interface PresenceView {
  /** The topic's members: `sub` → `info`, exact (see docs/protocol.md). */
  readonly members: Map<string, unknown>;
  readonly count: number;
  /** Leaves the topic's presence (its events stay subscribed if `subscribe` asked for them). */
  close(): void;
}

export declare class HeraldError extends Error {
  /** Herald's error code, e.g. "forbidden", "invalid_topic", "rate_limited". */
  code: string;
  /** The topic of a refused subscription (which the client then forgets). */
  topic?: string;
}

export declare class Herald {
  constructor(options: HeraldOptions);
  readonly state: HeraldState;
  /** While "unauthorized": the node's reason (code and message). */
  readonly refusal: HeraldError | undefined;
  /** After "unauthorized": connects again, asking `getToken` afresh. */
  reconnect(): void;
  /** The transport in use while open. */
  readonly transport: HeraldTransport | undefined;
  /** Called on every change of state, and of transport while open ("open" again). */
  on(event: "state", listener: (state: HeraldState, info: { transport?: HeraldTransport }) => void): () => void;
  /** A resume could not be complete: events were pruned or the log was recreated. */
  on(event: "truncated", listener: (info: Truncated) => void): () => void;
  on(event: "error", listener: (error: HeraldError) => void): () => void;
  /** Returns a function that unsubscribes. */
  subscribe(
    topic: string,
    onEvent: (data: EventData, meta: EventMeta) => void,
    options?: SubscribeOptions,
  ): () => void;
  /** Joins the topic's presence and keeps its members; `onChange` is called once they are known, then on every change. */
  presence(
    topic: string,
    onChange?: (members: Map<string, unknown>, change: PresenceChange) => void,
  ): PresenceView;
  /** Resolves with the event's offset; rejects with the node's error when
   * it refuses the publish (400, 403, 413, 401 after a fresh token, 429 after
   * its retries) or the token ("unauthorized"). */
  publish(topic: string, data: unknown | Uint8Array, options?: PublishOptions): Promise<number>;
  close(): void;
}
