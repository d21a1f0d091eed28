// Herald client: one WebSocket, automatic reconnect with jittered
// exponential backoff, and resume with `since`/`epoch` so the application
// sees every event of a topic once, in order, across dropped networks,
// node restarts and moves to another node. Where WebSocket cannot connect
// (a proxy that refuses upgrades), it falls back to a Server-Sent Events
// stream for receiving and HTTP POST for publishing, with the same
// guarantees, and moves back once WebSocket works. No dependencies.

const STATES = ["connecting", "open", "reconnecting", "unauthorized", "closed"];
const TRANSPORTS = ["websocket", "sse"];
/** What the node takes as a topic (see docs/protocol.md). */
const TOPIC = /^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/;
const MAX_TOPIC_BYTES = 255;
/** A WebSocket that closes this soon after opening failed, as far as
 * falling back is concerned. */
const CUT_AT_ONCE = 1000;
/** A connection that lasted this long resets the reconnect backoff. */
const HEALTHY_AFTER = 5000;
/** The first WebSocket probe after falling back to the stream. */
const FIRST_PROBE = 2000;
/** Times a publish answered 429 is retried (after `Retry-After`) before it
 * is rejected with the node's error. */
const PUBLISH_RATE_RETRIES = 3;

/** Decodes a JWT's `exp` (seconds), or undefined. */
function tokenExpiry(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = JSON.parse(atob(payload.padEnd(payload.length + ((4 - (payload.length % 4)) % 4), "=")));
    return typeof json.exp === "number" ? json.exp : undefined;
  } catch {
    return undefined;
  }
}

function toBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i++) binary += String.fromCharCode(bytes[i]);
  return btoa(binary);
}

function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function randomKey() {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Compares two `sub`s in the order presence pages list them: by code
 * point (which is UTF-8 byte order), not by UTF-16 unit as `<` does. */
function compareSubs(a, b) {
  const x = a[Symbol.iterator]();
  const y = b[Symbol.iterator]();
  for (;;) {
    const i = x.next();
    const j = y.next();
    if (i.done || j.done) return i.done && j.done ? 0 : i.done ? -1 : 1;
    const d = i.value.codePointAt(0) - j.value.codePointAt(0);
    if (d !== 0) return d;
  }
}

/** Error codes that refuse a subscription for good. */
const REFUSALS = ["forbidden", "invalid_topic", "too_many_subscriptions", "unauthorized"];

function* memberList(members) {
  for (const [sub, info] of members) yield { sub, info };
}

/** Records what a presence `seq` says of `sub`, unless something later was
 * said already. */
function see(p, sub, present, seq, info) {
  const known = p.known.get(sub);
  if (!known || seq > known.seq) p.known.set(sub, { present, seq, info });
}

function applyDiff(p, diff) {
  for (const m of diff.joins) if (!stale(p, m.sub, diff.seq)) see(p, m.sub, true, diff.seq, m.info);
  for (const m of diff.leaves) if (!stale(p, m.sub, diff.seq)) see(p, m.sub, false, diff.seq);
}

/** A page covers the subs after `after` up to its last member (to the end
 * on the last page): listed ones are present, the others absent, as of its
 * `seq`. */
function applyPage(p, page, after) {
  const last = page.cursor ? page.members[page.members.length - 1].sub : undefined;
  const range = { after, last, seq: page.seq };
  p.pages.push(range);
  const listed = new Set(page.members.map((m) => m.sub));
  for (const sub of p.known.keys()) {
    if (covers(range, sub) && !listed.has(sub)) see(p, sub, false, page.seq);
  }
  for (const m of page.members) see(p, m.sub, true, page.seq, m.info);
}

/** Whether a page's range holds `sub`. */
function covers({ after, last }, sub) {
  return (after === undefined || compareSubs(sub, after) > 0) && (last === undefined || compareSubs(sub, last) <= 0);
}

/** Whether what `seq` says of `sub` was said already, by a diff or by
 * the page that covers it. */
function stale(p, sub, seq) {
  const known = p.known.get(sub);
  if (known) return seq <= known.seq;
  const page = (p.pages ?? []).find((r) => covers(r, sub));
  return page !== undefined && seq <= page.seq;
}

export class HeraldError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "HeraldError";
    this.code = code;
  }
}

export class Herald {
  /**
   * @param {object} options
   * @param {string} options.url  e.g. "wss://herald.example.com/ws"
   * @param {string} [options.token]  a JWT
   * @param {() => Promise<string>|string} [options.getToken]  called at each connect and before the token expires
   * @param {typeof WebSocket} [options.WebSocket]  constructor to use (e.g. the `ws` package in Node.js 20)
   * @param {string[]} [options.transports]  in order of preference: "websocket", "sse"
   */
  constructor({
    url,
    token,
    getToken,
    WebSocket: Socket = globalThis.WebSocket,
    fetch: fetchFn = globalThis.fetch?.bind(globalThis),
    transports = TRANSPORTS,
    httpUrl,
    minDelay = 250,
    maxDelay = 15000,
    refreshBefore = 30000,
    connectTimeout = 10000,
    fallbackAfter = 2,
    websocketRetry = 30000,
    streamIdleTimeout = 60000,
  }) {
    if (!url) throw new TypeError("Herald: `url` is required");
    if (!token && !getToken) throw new TypeError("Herald: `token` or `getToken` is required");
    if (transports.length === 0 || transports.some((t) => !TRANSPORTS.includes(t))) {
      throw new TypeError(`Herald: \`transports\` lists some of ${TRANSPORTS.join(", ")}`);
    }
    if (transports.includes("websocket") && !Socket) {
      throw new TypeError("Herald: no WebSocket here; pass `WebSocket` (e.g. from the `ws` package)");
    }
    if (transports.includes("sse") && !fetchFn) throw new TypeError("Herald: no fetch here; pass `fetch`");
    this._url = url;
    // `wss://host/prefix/ws` → `https://host/prefix`: where the HTTP API is.
    this._httpUrl = (httpUrl ?? url.replace(/^ws/, "http").replace(/\/ws\/?(\?.*)?$/, "")).replace(/\/$/, "");
    this._fetch = fetchFn;
    this._transports = transports;
    this._fallbackAfter = fallbackAfter;
    this._websocketRetry = websocketRetry;
    this._streamIdleTimeout = streamIdleTimeout;
    this._wsFailures = 0;
    this._fallback = transports[0] === "sse";
    this._getToken = getToken ?? (() => token);
    this._Socket = Socket;
    this._minDelay = minDelay;
    this._maxDelay = maxDelay;
    this._refreshBefore = refreshBefore;
    this._connectTimeout = connectTimeout;
    this._state = "connecting";
    this._listeners = new Map();
    this._topics = new Map(); // topic -> { handlers: Set, last, epoch }
    this._pending = new Map(); // id -> { resolve, reject, frame, resend }
    this._nextId = 1;
    this._attempt = 0;
    this._closed = false;
    this._connect();
  }

  /** connecting | open | reconnecting | unauthorized | closed */
  get state() {
    return this._state;
  }

  /** Why the node refused the token, while `state` is "unauthorized": a
   * HeraldError with the node's code and message. */
  get refusal() {
    return this._refusal;
  }

  /** Connects again after "unauthorized" (e.g. once the user signed in
   * again): `getToken` is asked for a token afresh. */
  reconnect() {
    if (this._closed || this._state !== "unauthorized") return;
    this._refusal = undefined;
    this._authRetried = false;
    this._attempt = 0;
    this._setState("connecting");
    this._connect();
  }

  /** The transport in use while open: "websocket" or "sse". */
  get transport() {
    return this._transport;
  }

  /**
   * Listens to "state" (state, { transport }), "truncated" ({ topic, epoch }), "error" (HeraldError).
   * Returns a function that removes the listener.
   */
  on(event, listener) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(listener);
    return () => this._listeners.get(event)?.delete(listener);
  }

  /**
   * Calls `onEvent(data, { topic, offset, ts })` for every event of `topic`.
   * `since` (with its `epoch`) replays what was published after that offset.
   * Returns a function that unsubscribes.
   */
  subscribe(topic, onEvent, { since, epoch } = {}) {
    let entry = this._topics.get(topic);
    if (!entry) {
      entry = { handlers: new Set(), last: since, epoch };
      this._topics.set(topic, entry);
      if (this._state === "open") this._subscribeNow(topic, entry);
    }
    entry.handlers.add(onEvent);
    return () => {
      entry.handlers.delete(onEvent);
      this._release(topic, entry);
    };
  }

  /**
   * Joins `topic`'s presence as this token's user and keeps its members:
   * `view.members` is a Map of `sub` to `info` (the `presence_info` claim),
   * kept exact across reconnects (a page of members, then the diffs after
   * it, ordered by `seq`; see docs/protocol.md). `onChange(members,
   * { joins, leaves })` is called once the members are known and on every
   * change after; a reconnect calls it only for what really changed
   * meanwhile. `view.close()` leaves.
   */
  presence(topic, onChange = () => {}) {
    let entry = this._topics.get(topic);
    const created = !entry;
    if (created) {
      entry = { handlers: new Set(), last: undefined, epoch: undefined };
      this._topics.set(topic, entry);
    }
    if (!entry.presence) {
      entry.presence = { watchers: new Set(), members: new Map(), known: new Map(), ready: false, generation: 0 };
      // Joins (again, if subscribed already: a repeated subscribe replays
      // nothing). A stream has no presence: it waits for a WebSocket.
      if (this._state === "open" && this._transport === "websocket") this._sendSubscribe(topic, entry);
      else if (this._state === "open" && created) this._subscribeNow(topic, entry);
    }
    const p = entry.presence;
    p.watchers.add(onChange);
    if (p.ready) queueMicrotask(() => p.watchers.has(onChange) && onChange(p.members, { joins: [...memberList(p.members)], leaves: [] }));
    return {
      get members() {
        return p.members;
      },
      get count() {
        return p.members.size;
      },
      close: () => {
        p.watchers.delete(onChange);
        if (p.watchers.size > 0 || entry.presence !== p) return;
        clearTimeout(p.retry);
        entry.presence = undefined;
        if (entry.handlers.size > 0 && this._topics.get(topic) === entry && this._state === "open" && this._transport === "websocket") {
          // Leave the presence, keep the events.
          this._request({ op: "subscribe", topic, presence: false }).catch(() => {});
        }
        this._release(topic, entry);
      },
    };
  }

  /**
   * Publishes `data` (any JSON value, or a Uint8Array for binary) and
   * resolves with its offset. Retried across reconnects with the same
   * idempotency key, so it is published once.
   */
  publish(topic, data, { key = randomKey() } = {}) {
    const frame = { op: "publish", topic, key };
    if (data instanceof Uint8Array) frame.data_b64 = toBase64(data);
    else frame.data = data === undefined ? null : data;
    return this._request(frame, { resend: true }).then((reply) => reply.offset);
  }

  /** Closes the connection for good. */
  close() {
    this._closed = true;
    clearTimeout(this._retryTimer);
    clearTimeout(this._refreshTimer);
    clearTimeout(this._probeTimer);
    clearTimeout(this._healthyTimer);
    for (const { reject } of this._pending.values()) reject(new HeraldError("closed", "client closed"));
    this._pending.clear();
    this._socket?.close(1000);
    this._dropStream();
    this._transport = undefined;
    this._setState("closed");
  }

  // ---- internals ----

  /** Unsubscribes `topic` once nothing (events or presence) needs it. */
  _release(topic, entry) {
    if (entry.handlers.size > 0 || entry.presence || this._topics.get(topic) !== entry) return;
    this._topics.delete(topic);
    if (this._state !== "open") return;
    if (this._transport === "sse") this._restartStream();
    else this._request({ op: "unsubscribe", topic }).catch(() => {});
  }

  /** Subscribes `topic` on the open connection: a subscribe over
   * WebSocket, or a new stream that includes it. */
  _subscribeNow(topic, entry) {
    if (this._transport === "sse") this._restartStream();
    else this._sendSubscribe(topic, entry);
  }

  /** Takes every page of `topic`'s presence into its view (diffs keep
   * arriving meanwhile), then tells the watchers what changed. */
  async _syncPresence(topic, entry) {
    const p = entry.presence;
    if (!p) return;
    const generation = ++p.generation;
    p.syncing = true;
    p.known = new Map();
    p.pages = [];
    p.epoch = undefined;
    p.buffered = [];
    p.lastSeq = undefined;
    clearTimeout(p.retry);
    let cursor;
    let after;
    try {
      for (;;) {
        const frame = { op: "presence", topic };
        if (cursor !== undefined) frame.cursor = cursor;
        const page = await this._request(frame);
        if (entry.presence !== p || generation !== p.generation) return;
        if (p.epoch === undefined) {
          p.epoch = page.epoch;
          const buffered = p.buffered;
          p.buffered = undefined;
          for (const diff of buffered) {
            if (diff.epoch !== p.epoch) return this._syncPresence(topic, entry);
            p.lastSeq = Math.max(p.lastSeq ?? 0, diff.seq);
            applyDiff(p, diff);
          }
        } else if (page.epoch !== p.epoch) {
          return this._syncPresence(topic, entry);
        }
        applyPage(p, page, after);
        p.lastSeq = Math.max(p.lastSeq ?? 0, page.seq);
        if (page.cursor === null || page.cursor === undefined) break;
        after = page.members[page.members.length - 1].sub;
        cursor = page.cursor;
      }
    } catch (e) {
      // Disconnected: the reconnect syncs again. A passing refusal
      // (rate limit, Redis away): again in a moment. Diffs wait meanwhile.
      if (e.code === "disconnected" || entry.presence !== p || generation !== p.generation) return;
      p.buffered = [];
      if (e.code === "rate_limited" || e.code === "unavailable") {
        p.retry = setTimeout(() => this._syncPresence(topic, entry), 1000 + Math.random() * 1000);
      } else {
        this._emit("error", Object.assign(e, { topic }));
      }
      return;
    }
    p.syncing = false;
    const next = new Map();
    for (const [sub, k] of p.known) if (k.present) next.set(sub, k.info);
    const joins = [];
    const leaves = [];
    for (const [sub, info] of next) if (!p.members.has(sub)) joins.push({ sub, info });
    for (const [sub, info] of p.members) if (!next.has(sub)) leaves.push({ sub, info });
    p.members = next;
    const first = !p.ready;
    p.ready = true;
    if (first || joins.length > 0 || leaves.length > 0) this._tellPresence(p, { joins, leaves });
  }

  _onPresenceDiff(frame) {
    const p = this._topics.get(frame.topic)?.presence;
    if (!p) return;
    if (p.buffered) return void p.buffered.push(frame);
    if (frame.epoch !== p.epoch) return void this._syncPresence(frame.topic, this._topics.get(frame.topic));
    if (p.syncing) {
      p.lastSeq = Math.max(p.lastSeq ?? 0, frame.seq);
      return void applyDiff(p, frame);
    }
    // `seq` grows by one per change: a gap means diffs were missed (the
    // node lost its link to Redis meanwhile): take the pages again.
    if (p.lastSeq !== undefined && frame.seq > p.lastSeq + 1) {
      return void this._syncPresence(frame.topic, this._topics.get(frame.topic));
    }
    // One the pages already include may still come late (below): it is
    // checked, not counted.
    p.lastSeq = Math.max(p.lastSeq ?? 0, frame.seq);
    // A diff the pages already include (it travelled another way than
    // their replies and came later) changes nothing. Once one comes that
    // is newer than every page, so are all after it.
    const checked = p.pages !== undefined && frame.seq <= Math.max(0, ...p.pages.map((r) => r.seq));
    if (!checked) {
      p.pages = undefined;
      p.known = new Map();
    }
    const joins = [];
    const leaves = [];
    for (const m of frame.joins) {
      if (checked && stale(p, m.sub, frame.seq)) continue;
      if (checked) see(p, m.sub, true, frame.seq, m.info);
      if (!p.members.has(m.sub)) joins.push({ sub: m.sub, info: m.info });
      p.members.set(m.sub, m.info);
    }
    for (const m of frame.leaves) {
      if (checked && stale(p, m.sub, frame.seq)) continue;
      if (checked) see(p, m.sub, false, frame.seq);
      if (p.members.has(m.sub)) leaves.push({ sub: m.sub, info: p.members.get(m.sub) });
      p.members.delete(m.sub);
    }
    if (joins.length > 0 || leaves.length > 0) this._tellPresence(p, { joins, leaves });
  }

  _tellPresence(p, change) {
    for (const watcher of p.watchers) {
      try {
        watcher(p.members, change);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  _emit(event, value) {
    for (const listener of this._listeners.get(event) ?? []) {
      try {
        listener(value);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  /** Reports the state, and the transport with it: a move from one
   * transport to the other while open is reported as "open" again. */
  _setState(state) {
    if (!STATES.includes(state)) return;
    const transport = state === "open" ? this._transport : undefined;
    if (this._state === state && this._reportedTransport === transport) return;
    this._state = state;
    this._reportedTransport = transport;
    for (const listener of this._listeners.get("state") ?? []) {
      try {
        listener(state, { transport });
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  async _connect() {
    let token;
    try {
      token = await this._getToken();
    } catch (e) {
      this._emit("error", new HeraldError("token", `getToken failed: ${e?.message ?? e}`));
      return this._retry();
    }
    if (this._closed) return;
    this._token = token;
    if (this._fallback) return this._openStream(token);
    const socket = this._newSocket(token);
    if (!socket) return this._retry();
    this._socket = socket;
    // Implementations differ in what they fire when a connection fails or
    // drops: `close`, `error`, both, in either order (Node 20's built-in
    // WebSocket fires only `error` for a refused connection), or nothing
    // while a handshake hangs. Any of them ends this socket, once.
    const connectTimer = setTimeout(() => this._lost(socket, "timeout"), this._connectTimeout);
    socket.onopen = () => {
      clearTimeout(connectTimer);
      if (socket !== this._socket) return;
      this._adoptSocket(socket, token);
    };
    this._watchSocket(socket, connectTimer);
  }

  /** A WebSocket to the node with `token`, or undefined (reported). */
  _newSocket(token) {
    const separator = this._url.includes("?") ? "&" : "?";
    try {
      return new this._Socket(`${this._url}${separator}token=${encodeURIComponent(token)}`, "herald.json");
    } catch (e) {
      this._emit("error", new HeraldError("connect", `cannot open a WebSocket: ${e?.message ?? e}`));
      return undefined;
    }
  }

  /** Routes an adopted socket's frames and its end to this client. */
  _watchSocket(socket, connectTimer) {
    socket.onmessage = (message) => {
      if (socket === this._socket) this._onFrame(message.data);
    };
    socket.onclose = (event) => {
      clearTimeout(connectTimer);
      this._lost(socket, event?.code);
    };
    socket.onerror = () => {
      clearTimeout(connectTimer);
      this._lost(socket, "error");
    };
  }

  /** `socket` is open: subscribe everything (resuming), resend what waits. */
  _adoptSocket(socket, token) {
    socket.opened = Date.now();
    this._authRetried = false;
    this._healthy();
    this._wsFailures = 0;
    this._fallback = false;
    this._probeDelay = undefined;
    clearTimeout(this._probeTimer);
    this._probeTimer = undefined;
    this._transport = "websocket";
    this._setState("open");
    this._scheduleRefresh(token);
    for (const [topic, entry] of this._topics) this._sendSubscribe(topic, entry);
    for (const [id, pending] of this._pending) {
      if (pending.resend) socket.send(JSON.stringify({ ...pending.frame, id }));
    }
  }

  /** `socket` failed or closed: fail what cannot be resent and reconnect,
   * once per socket whatever events led here. */
  _lost(socket, why) {
    if (socket !== this._socket) return;
    this._socket = undefined;
    try {
      socket.close();
    } catch {
      // Already closed or never opened.
    }
    // A browser's WebSocket does not say why its handshake failed: the
    // same request without the upgrade does (401/403 with the node's
    // reason). A refused token is no reason to fall back. (A handshake
    // left unanswered is not a refusal: the node answers those at once.)
    if (!socket.opened && why !== "timeout" && this._fetch) {
      const asked = this._token;
      return void this._whyRefused(asked).then((refusal) => {
        if (this._closed || this._socket || this._stream) return;
        if (refusal) return this._refused(refusal);
        this._countFailure(socket, why);
      });
    }
    this._countFailure(socket, why);
  }

  /** The node's refusal of `token` at the handshake, if it refuses it:
   * asks `GET /ws` without the upgrade, which runs the same checks. */
  async _whyRefused(token) {
    const timeout = new AbortController();
    const timer = setTimeout(() => timeout.abort(), this._connectTimeout);
    try {
      const separator = this._url.includes("?") ? "&" : "?";
      const url = `${this._url.replace(/^ws/, "http")}${separator}token=${encodeURIComponent(token)}`;
      const response = await this._fetch(url, { signal: timeout.signal });
      if (response.status !== 401 && response.status !== 403) return undefined;
      const body = await response.json().catch(() => ({}));
      return new HeraldError(body.error ?? "unauthorized", body.message ?? `the node answered ${response.status}`);
    } catch {
      return undefined; // unreachable: the socket's failure stands
    } finally {
      clearTimeout(timer);
    }
  }

  /** The node refused the token (401/403 at the handshake or the stream's
   * request): `getToken` is asked again once, at once; refused again, the
   * client stops in state "unauthorized" with the node's reason, and what
   * waits to be published is rejected with it. */
  _refused(error) {
    this._transport = undefined;
    if (!this._authRetried) {
      this._authRetried = true;
      return void this._connect();
    }
    this._authRetried = false;
    this._refusal = error;
    clearTimeout(this._refreshTimer);
    clearTimeout(this._probeTimer);
    this._probeTimer = undefined;
    for (const pending of this._pending.values()) pending.reject(error);
    this._pending.clear();
    this._setState("unauthorized");
    this._emit("error", error);
  }

  /** A WebSocket that failed for another reason than its token: counts
   * toward falling back to the stream, and reconnects. */
  _countFailure(socket, why) {
    // A WebSocket that never opens (or is cut at once), again and again:
    // something on the way (a proxy) refuses it. Streams may still pass.
    const failed = !socket.opened || Date.now() - socket.opened < CUT_AT_ONCE;
    if (failed && this._transports.includes("sse")) {
      // A handshake that hangs for `connectTimeout` is enough: another one
      // would keep the app waiting as long again.
      this._wsFailures += why === "timeout" ? this._fallbackAfter : 1;
      if (this._wsFailures >= this._fallbackAfter) this._fallback = true;
    }
    this._disconnected(why);
  }

  /** The connection (either transport) is gone: reconnect. */
  _disconnected(why) {
    this._transport = undefined;
    clearTimeout(this._refreshTimer);
    clearTimeout(this._probeTimer);
    clearTimeout(this._healthyTimer);
    this._probeTimer = undefined;
    for (const [id, pending] of this._pending) {
      if (!pending.resend) {
        this._pending.delete(id);
        pending.reject(new HeraldError("disconnected", `connection closed (${why})`));
      }
    }
    if (this._closed) return;
    this._retry();
  }

  /** The backoff starts again only once a connection has lasted: one that
   * opens and drops at once (a proxy cutting it) keeps backing off. */
  _healthy() {
    clearTimeout(this._healthyTimer);
    this._healthyTimer = setTimeout(() => {
      this._attempt = 0;
    }, HEALTHY_AFTER);
  }

  _retry() {
    if (this._closed) return;
    this._setState("reconnecting");
    const ceiling = Math.min(this._maxDelay, this._minDelay * 2 ** this._attempt);
    this._attempt += 1;
    // Full jitter: clients that lost the same node do not return together.
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this._retryTimer = setTimeout(() => this._connect(), delay);
  }

  // ---- the stream transport: SSE for receiving, HTTP for publishing ----

  /** Opens one SSE stream of every topic subscribed, each resuming after
   * its last event (`since=topic:offset:epoch`), or live from its head. */
  _openStream(token) {
    const stream = { controller: new AbortController(), opened: false, resuming: new Map() };
    // Settled once every topic's `subscribed` came (or the stream ended):
    // a publish waits for it, so that it comes after the subscribe, as on
    // a WebSocket.
    stream.ready = new Promise((resolve) => (stream.settle = resolve));
    this._stream = stream;
    // A name the node would refuse would refuse the whole stream: it is
    // refused here, as a WebSocket subscribe of it is.
    for (const [topic, entry] of this._topics) {
      if (TOPIC.test(topic) && topic.length <= MAX_TOPIC_BYTES) continue;
      this._topics.delete(topic);
      if (entry.presence) entry.presence = undefined;
      const error = new HeraldError("invalid_topic", `topic ${JSON.stringify(topic)} is not a valid topic`);
      error.topic = topic;
      this._emit("error", error);
    }
    const topics = [...this._topics.keys()];
    stream.waiting = new Set(topics);
    if (topics.length === 0) {
      // Nothing to receive yet: open once the node takes the token, and
      // stream once something is to be received.
      stream.opened = true;
      stream.settle();
      return void this._whyRefused(token).then((refusal) => {
        if (this._stream !== stream) return;
        if (refusal) {
          this._dropStream();
          return this._refused(refusal);
        }
        this._adoptStream(token);
      });
    }
    const query = new URLSearchParams();
    for (const topic of topics) {
      const entry = this._topics.get(topic);
      query.append("topic", topic);
      const resuming = entry.last !== undefined;
      stream.resuming.set(topic, resuming);
      if (resuming) query.append("since", entry.epoch === undefined ? `${topic}:${entry.last}` : `${topic}:${entry.last}:${entry.epoch}`);
    }
    const connectTimer = setTimeout(() => this._streamLost(stream, "timeout"), this._connectTimeout);
    this._fetch(`${this._httpUrl}/api/v1/stream?${query}`, {
      headers: { authorization: `Bearer ${token}`, accept: "text/event-stream" },
      signal: stream.controller.signal,
    })
      .then(async (response) => {
        clearTimeout(connectTimer);
        if (this._stream !== stream) return;
        if (!response.ok) return this._streamRefused(stream, response);
        if (!response.body?.getReader) {
          this._emit("error", new HeraldError("connect", "this fetch cannot read a response as it arrives; no stream"));
          return this._streamLost(stream, "no streaming body");
        }
        stream.opened = true;
        this._adoptStream(token);
        await this._readStream(stream, response.body);
        this._streamLost(stream, stream.end?.reason ?? "end");
      })
      .catch((e) => {
        clearTimeout(connectTimer);
        this._streamLost(stream, e?.name ?? "error");
      });
  }

  /** The stream is open: publish what waits over HTTP, and try WebSocket
   * again from time to time. */
  _adoptStream(token) {
    this._authRetried = false;
    this._healthy();
    this._transport = "sse";
    this._setState("open");
    this._scheduleRefresh(token);
    // Subscribed while the request was on its way: stream those too.
    const streamed = this._stream?.resuming;
    if (streamed && (streamed.size !== this._topics.size || [...this._topics.keys()].some((t) => !streamed.has(t)))) {
      this._restartStream();
    }
    for (const [id, pending] of this._pending) if (pending.resend) this._publishHttp(id);
    if (this._probeTimer === undefined) this._scheduleProbe();
  }

  /** Reads SSE messages until the response ends. */
  async _readStream(stream, body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let raw = "";
    // The node sends a heartbeat when idle: a stream silent for longer is
    // gone (a NAT forgot it, the laptop slept).
    const idle = () => {
      clearTimeout(stream.idleTimer);
      stream.idleTimer = setTimeout(() => this._streamLost(stream, "idle"), this._streamIdleTimeout);
    };
    idle();
    for (;;) {
      const { value, done } = await reader.read();
      if (done || this._stream !== stream) return;
      idle();
      // Line ends: CRLF, CR or LF; a CR at a chunk's end waits for the next
      // chunk, which may start with its LF.
      raw += decoder.decode(value, { stream: true });
      const cut = raw.endsWith("\r") ? raw.length - 1 : raw.length;
      buffer += raw.slice(0, cut).replace(/\r\n?/g, "\n");
      raw = raw.slice(cut);
      let at;
      while ((at = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, at);
        buffer = buffer.slice(at + 2);
        this._onStreamMessage(stream, block);
        if (this._stream !== stream) return;
      }
    }
  }

  /** One SSE message: an event (the WebSocket event frame), where a
   * topic stands (`subscribed`), or why the stream ends (`end`). */
  _onStreamMessage(stream, block) {
    let type = "message";
    let data;
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") type = value;
      else if (field === "data") data = data === undefined ? value : `${data}\n${value}`;
    }
    if (data === undefined) return;
    if (type === "message") return this._onFrame(data);
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (type === "subscribed") {
      const entry = this._topics.get(frame.topic);
      if (entry) this._onSubscribed(frame.topic, entry, frame, stream.resuming.get(frame.topic), false);
      stream.waiting.delete(frame.topic);
      if (stream.waiting.size === 0) stream.settle();
    } else if (type === "end") {
      stream.end = frame;
    } else if (type === "skipped") {
      const error = new HeraldError("unencodable", frame.message);
      error.topic = frame.topic;
      this._emit("error", error);
    }
    // `truncated` repeats what `subscribed` says.
  }

  /** The node refused the stream: a topic the token does not grant is
   * dropped (as a refused subscribe is) and the rest streamed again at
   * once; anything else is retried. */
  async _streamRefused(stream, response) {
    const body = await response.json().catch(() => ({}));
    if (this._stream !== stream) return;
    const error = new HeraldError(body.error ?? "http", body.message ?? `the stream answered ${response.status}`);
    if (body.topic) error.topic = body.topic;
    const tokenRefused = response.status === 401 || (response.status === 403 && !body.topic);
    if (!tokenRefused) this._emit("error", error);
    if (response.status === 403 && body.topic && this._topics.has(body.topic)) {
      this._topics.delete(body.topic);
      this._dropStream();
      return this._openStream(this._token);
    }
    // The node refused this token: no transport helps. Anything else (a
    // path that is not Herald's, a proxy's error) may be the stream's
    // fault: WebSocket gets its turn.
    if (tokenRefused) {
      this._dropStream();
      return this._refused(error);
    }
    this._streamLost(stream, response.status);
  }

  /** The stream failed or ended: reconnect. A stream that never opened
   * leaves the next attempt to WebSocket (when allowed), and so on in
   * turn until one works. */
  _streamLost(stream, why) {
    if (this._stream !== stream) return;
    this._dropStream();
    if (!stream.opened && this._transports.includes("websocket")) {
      this._fallback = false;
      this._wsFailures = 0;
    }
    this._disconnected(why);
  }

  /** Stops the stream, if any, without reconnecting. */
  _dropStream() {
    const stream = this._stream;
    this._stream = undefined;
    if (!stream) return;
    stream.controller.abort();
    clearTimeout(stream.idleTimer);
    stream.settle();
  }

  /** Streams the topics as they now are (several changes at once make one
   * new stream); each resumes after its last event, so nothing is lost or
   * repeated for a topic with history. */
  _restartStream() {
    if (this._restarting) return;
    this._restarting = true;
    queueMicrotask(() => {
      this._restarting = false;
      if (this._closed || this._transport !== "sse" || this._state !== "open") return;
      this._dropStream();
      this._openStream(this._token);
    });
  }

  /** Publishes a waiting publish over HTTP, with its idempotency key:
   * retried (once a second, while on the stream) until answered. */
  async _publishHttp(id) {
    const pending = this._pending.get(id);
    if (!pending || pending.http) return;
    pending.http = true;
    const { frame } = pending;
    const binary = frame.data_b64 !== undefined;
    let wait = 1000;
    const timeout = new AbortController();
    const timer = setTimeout(() => timeout.abort(), this._connectTimeout);
    try {
      // After the subscribes before it: a restart queued in this tick
      // starts in a microtask, then its topics' `subscribed` come.
      await Promise.resolve();
      await this._stream?.ready;
      const response = await this._fetch(`${this._httpUrl}/api/v1/topics/${encodeURIComponent(frame.topic)}/events`, {
        method: "POST",
        headers: {
          authorization: `Bearer ${this._token}`,
          "content-type": binary ? "application/octet-stream" : "application/json",
          "idempotency-key": frame.key,
        },
        body: binary ? fromBase64(frame.data_b64) : JSON.stringify(frame.data),
        signal: timeout.signal,
      });
      const body = await response.json().catch(() => ({}));
      if (this._pending.get(id) !== pending) return;
      if (response.status === 201) {
        this._pending.delete(id);
        return pending.resolve({ op: "published", offset: body.offset });
      }
      const refusal = new HeraldError(body.error ?? "http", body.message ?? `publish answered ${response.status}`);
      // Expired meanwhile: a fresh token, and the same publish again, once.
      // Past its retries a rate limit is the answer too.
      const fresh = response.status === 401 && !pending.tokenRetried ? await this._getToken() : undefined;
      const limited = response.status === 429 && (pending.limited = (pending.limited ?? 0) + 1) <= PUBLISH_RATE_RETRIES;
      if (fresh !== undefined && fresh !== this._token) {
        pending.tokenRetried = true;
        this._token = fresh;
        wait = 0;
      } else if (limited || response.status >= 500) {
        const after = Number(response.headers.get("retry-after"));
        if (after > 0) wait = after * 1000;
      } else if (response.status === 401) {
        // Refused again with a fresh token: the client's token is.
        return this._refused(refusal);
      } else {
        this._pending.delete(id);
        return pending.reject(refusal);
      }
    } catch {
      // The network, or no answer in time: retried below.
    } finally {
      clearTimeout(timer);
      pending.http = false;
    }
    if (this._pending.get(id) === pending && this._transport === "sse") {
      setTimeout(() => this._transport === "sse" && this._publishHttp(id), wait);
    }
  }

  /** While on the stream, tries a WebSocket again: soon at first (the
   * node may just have restarted), then less often, up to every
   * `websocketRetry` ms. Not when the stream is the preferred transport. */
  _scheduleProbe() {
    clearTimeout(this._probeTimer);
    this._probeTimer = undefined;
    if (this._transports[0] !== "websocket" || this._closed) return;
    this._probeDelay = Math.min(this._websocketRetry, this._probeDelay === undefined ? FIRST_PROBE : this._probeDelay * 2);
    this._probeTimer = setTimeout(() => {
      this._probeTimer = undefined;
      this._probe();
    }, this._probeDelay);
  }

  /** Opens a WebSocket beside the stream; once it opens, every topic
   * moves to it (resuming after its last event) and the stream ends. */
  _probe() {
    if (this._closed || this._transport !== "sse" || this._state !== "open") return;
    const token = this._token;
    const socket = this._newSocket(token);
    if (!socket) return this._scheduleProbe();
    let settled = false;
    const failed = () => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      try {
        socket.close();
      } catch {
        // Never opened.
      }
      this._scheduleProbe();
    };
    const timer = setTimeout(failed, this._connectTimeout);
    socket.onerror = failed;
    socket.onclose = failed;
    socket.onopen = () => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (this._closed || this._transport !== "sse" || this._state !== "open") return void socket.close();
      this._dropStream();
      this._socket = socket;
      this._watchSocket(socket);
      this._adoptSocket(socket, token);
    };
  }

  _scheduleRefresh(token) {
    clearTimeout(this._refreshTimer);
    const exp = tokenExpiry(token);
    if (exp === undefined) return;
    // setTimeout fires at once past 2^31-1 ms (about 24.8 days).
    const wait = Math.min(Math.max(0, exp * 1000 - Date.now() - this._refreshBefore), 2 ** 31 - 1);
    this._refreshTimer = setTimeout(async () => {
      try {
        const fresh = await this._getToken();
        const freshExp = tokenExpiry(fresh);
        // The same (or an older) token again: nothing to refresh, and
        // rescheduling would spin. The node closes with 4001 at expiry and
        // the reconnect asks getToken again.
        if (freshExp === undefined || freshExp <= exp) return;
        if (this._transport === "sse") {
          // A stream's token is its request's: stream again with the new
          // one, resuming where the old one was.
          this._token = fresh;
          this._restartStream();
        } else {
          await this._request({ op: "refresh", token: fresh });
          this._token = fresh;
        }
        this._scheduleRefresh(fresh);
      } catch (e) {
        this._emit("error", e instanceof HeraldError ? e : new HeraldError("refresh", String(e?.message ?? e)));
      }
    }, wait);
  }

  _sendSubscribe(topic, entry) {
    const frame = { op: "subscribe", topic };
    if (entry.presence) frame.presence = true;
    const resuming = entry.last !== undefined;
    if (resuming) {
      frame.since = entry.last;
      if (entry.epoch !== undefined) frame.epoch = entry.epoch;
    }
    // Applied synchronously when the reply is read, before the replayed
    // events that follow it in the same read (a promise callback could run
    // after them).
    const onReply = (reply) => {
      if (this._topics.get(topic) !== entry || reply.op !== "subscribed") return;
      this._onSubscribed(topic, entry, reply, resuming, frame.presence);
    };
    this._request(frame, { onReply }).catch((e) => {
      if (e.code === "disconnected") return;
      e.topic = topic;
      if (e.code === "presence_disabled" && entry.presence) {
        // The events may still be wanted: subscribe without presence.
        entry.presence = undefined;
        this._emit("error", e);
        if (entry.handlers.size > 0) this._sendSubscribe(topic, entry);
        else this._release(topic, entry);
        return;
      }
      // Refused for good (not a passing outage): forget it, so reconnects
      // do not ask again.
      if (REFUSALS.includes(e.code) && this._topics.get(topic) === entry) this._topics.delete(topic);
      this._emit("error", e);
    });
  }

  /** Where a topic stands once subscribed (a WebSocket's reply, or a
   * stream's `subscribed` message): the position to resume from later. */
  _onSubscribed(topic, entry, reply, resuming, presence) {
    // Diffs come from here on: take the pages now.
    if (presence && entry.presence) this._syncPresence(topic, entry);
    if (reply.truncated) this._emit("truncated", { topic, epoch: reply.epoch });
    if (reply.epoch === undefined) {
      // No history: offsets are not comparable across reconnects.
      entry.last = undefined;
      entry.epoch = undefined;
      return;
    }
    entry.epoch = reply.epoch;
    if (!resuming) entry.last = reply.offset; // live from the head on
    else if (reply.truncated) entry.last = 0; // replay restarts at the oldest retained event
  }

  _request(frame, { resend = false, onReply } = {}) {
    return new Promise((resolve, reject) => {
      if (this._state === "unauthorized") return void reject(this._refusal);
      const id = this._nextId++;
      this._pending.set(id, { resolve, reject, frame, resend, onReply });
      if (this._state !== "open") return;
      if (this._transport === "websocket") return void this._socket.send(JSON.stringify({ ...frame, id }));
      if (frame.op === "publish") return void this._publishHttp(id);
      // Presence and the like need a WebSocket: they wait for one.
      this._pending.delete(id);
      reject(new HeraldError("disconnected", `${frame.op} needs a WebSocket; the client is on its stream`));
    });
  }

  _onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (frame.op === "event") return this._onEvent(frame);
    if (frame.op === "presence_diff") return this._onPresenceDiff(frame);
    if (frame.op === "presence_resync") {
      const entry = this._topics.get(frame.topic);
      if (entry?.presence) this._syncPresence(frame.topic, entry);
      return;
    }
    if (frame.id !== undefined && this._pending.has(frame.id)) {
      const pending = this._pending.get(frame.id);
      this._pending.delete(frame.id);
      if (frame.op === "error") {
        pending.reject(new HeraldError(frame.code, frame.message));
      } else {
        pending.onReply?.(frame);
        pending.resolve(frame);
      }
      return;
    }
    if (frame.op === "error") {
      if (frame.topic) {
        // The subscription was dropped (a refresh revoked it): its
        // members are unknown from now on, so they leave the view.
        const p = this._topics.get(frame.topic)?.presence;
        if (p) {
          clearTimeout(p.retry);
          const leaves = [...memberList(p.members)];
          p.members = new Map();
          if (leaves.length > 0) this._tellPresence(p, { joins: [], leaves });
        }
        this._topics.delete(frame.topic);
      }
      this._emit("error", new HeraldError(frame.code, frame.message));
    }
  }

  _onEvent(frame) {
    const entry = this._topics.get(frame.topic);
    if (!entry) return;
    // Offsets of a topic with history drop what a replay already delivered.
    // A topic without history has no replay to overlap with, and its
    // numbering may start again from 1 (a cluster's Redis restarted): every
    // event it sends is new.
    if (entry.epoch !== undefined) {
      if (entry.last !== undefined && frame.offset <= entry.last) return;
      entry.last = frame.offset;
    }
    const data = frame.data_b64 !== undefined ? fromBase64(frame.data_b64) : frame.data;
    const meta = { topic: frame.topic, offset: frame.offset, ts: frame.ts };
    for (const handler of entry.handlers) {
      try {
        handler(data, meta);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}
