/**
 * presenced client: one WebSocket to a presenced gateway, kept alive.
 *
 * It owns the connection (backoff with full jitter, prompt reconnect when a
 * node drains, an application ping so a silently dead socket is noticed in
 * browsers too, the token refreshed before it expires), the requests
 * (numbered `ref`s matched to replies, with timeouts, paced under the
 * gateway's per-connection rate limit) and a local view of what the
 * application follows: the members of its rooms and the online state of the
 * users it watches. After a reconnect or a `sync` frame it rebuilds that
 * view from fresh snapshots and tells the application only what really
 * changed.
 *
 * It must never import anything: the gateway serves this exact file at
 * GET /client.js, so it is the whole package, with no build step.
 * Wire protocol: docs/protocol.md in the presenced repository.
 */

/** Default reconnect backoff bounds, milliseconds. */
export const DEFAULT_RECONNECT = Object.freeze({ minMs: 250, maxMs: 10000 });
/** Default time a request waits for its reply, milliseconds. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 10000;
/**
 * Default time a disappearance seen only in a snapshot (reconnect or `sync`)
 * waits before it is reported, milliseconds: after a gateway restart every
 * client reconnects at its own jittered moment, and a user whose tabs are
 * simply not back yet is not news.
 */
export const DEFAULT_RECONCILE_GRACE_MS = 2000;
/**
 * Room-state writes per room per second (the gateway's `--state-rate`
 * default): update() sends no more often, the latest state replacing one
 * that waits.
 */
export const DEFAULT_STATE_RATE = 10;
/** After close 1012 (node draining), reconnect within this many milliseconds. */
export const DRAIN_RECONNECT_MAX_MS = 100;
/** Longest `users` list the gateway accepts in one frame (`--max-ids`). */
export const MAX_IDS_PER_FRAME = 1000;
/** Default lead of the proactive token refresh before the token's `exp`, milliseconds. */
export const DEFAULT_REFRESH_AHEAD_MS = 60000;
/**
 * Default pace of the frames the client sends: the gateway refuses messages
 * over `--rate-limit` (20/s) with bursts of `--rate-burst` (50), and closes
 * with 4029 a client that keeps going. A burst of 40 leaves the gateway's
 * bucket 10 frames of slack for network jitter, so against a gateway with
 * default limits a reconnect that re-joins 100 rooms is slowed, not refused.
 */
export const DEFAULT_RATE_LIMIT = Object.freeze({ perSecond: 20, burst: 40 });
/**
 * A connection that lived this long after its `welcome` was a success: an
 * auth close (1008/4001) after it is a fresh failure (an expired token), so
 * getToken() may be asked again; a close 4029/4008 after it starts the
 * backoff over.
 */
const STABLE_CONNECTION_MS = 10000;
/** A failed proactive refresh is tried again only if the next try is at least this far off, milliseconds. */
const MIN_REFRESH_RETRY_MS = 1000;
/** Most presence events kept while waiting for a watch reply (a reply that never comes must not grow it forever). */
const MAX_HELD_EVENTS = 10000;
/** WebSocket readyState OPEN. */
const WS_OPEN = 1;

/** An error from the gateway (`code` as in docs/protocol.md) or from the client. */
export class PresenceError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    this.name = "PresenceError";
    this.code = code;
  }
}

/**
 * Delay before reconnect attempt number `attempt` (0 for the first):
 * full jitter, uniform in [0, min(maxMs, minMs * 2^attempt)).
 * @param {number} attempt
 * @param {{minMs: number, maxMs: number}} bounds
 * @param {() => number} [random]
 */
export function backoffDelay(attempt, bounds, random = Math.random) {
  const cap = Math.min(bounds.maxMs, bounds.minMs * 2 ** attempt);
  return random() * cap;
}

/**
 * The `exp` claim (Unix seconds) of a JWT, read from its payload without
 * verifying anything (the gateway does that); undefined for anything else.
 * @param {unknown} token
 * @returns {number|undefined}
 */
function tokenExpiry(token) {
  if (typeof token !== "string") return undefined;
  const payload = token.split(".")[1];
  if (!payload) return undefined;
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((payload.length + 3) % 4);
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    const exp = claims?.exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp : undefined;
  } catch {
    return undefined;
  }
}

/**
 * How long from `nowMs` until a token expiring at `exp` (Unix seconds)
 * should be refreshed: `aheadMs` before it, but after 3/4 of what is left
 * when the token is too short for that (less than 4 × `aheadMs` left), so a
 * 3 s token is refreshed after 2.25 s, not at once. Undefined once `exp` has
 * passed by this clock.
 */
function refreshDelay(exp, nowMs, aheadMs) {
  const left = exp * 1000 - nowMs;
  if (!(left > 0)) return undefined;
  return left - Math.min(aheadMs, left / 4);
}

/**
 * True for the failures after which the gateway may still have done the
 * request, or will be asked again on the next connection: no answer, the
 * socket dropped, the client closed.
 */
function isTransient(err) {
  return err.code === "timeout" || err.code === "connection_lost" || err.code === "closed";
}

/**
 * True for the failures of a re-join, re-watch or re-subscribe after a
 * reconnect that do not mean the gateway refuses it: it stays wanted and is
 * done again on the next connection (rate_limited: dropped for the pace,
 * not for what it asked).
 */
function keepsWish(err) {
  return isTransient(err) || err.code === "rate_limited";
}

/** One room the application joined (or asked about): its members as this client knows them. */
class Room {
  constructor(name) {
    this.name = name;
    /** @type {Map<string, object|undefined>} user → meta */
    this.members = new Map();
    /** @type {Map<string, object>} member → their room state (members who set one) */
    this.states = new Map();
    /** This client's update() pacing: when the next may go, the state waiting, its callers. */
    this._turn = { nextAt: 0, waiting: undefined, waiters: [], timer: null };
    /** True while the application wants to be in it (re-joined after reconnects). */
    this._desired = false;
    this._meta = undefined;
    /** Connection generation whose snapshot `members` reflects (0: none yet). */
    this._gen = 0;
    /** join() calls made while not connected, resolved by the next snapshot. */
    this._waiters = [];
    /** user → timer: gone from a snapshot, reported as left when the grace ends. */
    this._pendingLeft = new Map();
    /** joined/left that arrived on this socket before its snapshot (merged into it). */
    this._held = [];
    this._listeners = new Set();
  }

  /** Listen for "change" (members changed). */
  on(event, fn) {
    if (event === "change") this._listeners.add(fn);
    return this;
  }

  off(event, fn) {
    if (event === "change") this._listeners.delete(fn);
    return this;
  }

  _cancelLeft(user) {
    const timer = this._pendingLeft.get(user);
    if (timer === undefined) return;
    clearTimeout(timer);
    this._pendingLeft.delete(user);
  }

  _cancelAllLeft() {
    for (const timer of this._pendingLeft.values()) clearTimeout(timer);
    this._pendingLeft.clear();
  }

  _changed() {
    for (const fn of [...this._listeners]) {
      try {
        fn(this);
      } catch (err) {
        console.error("presenced: room change listener threw", err);
      }
    }
  }
}

export class PresenceClient {
  /**
   * @param {string} url  ws:// or wss:// URL of the gateway's /ws (relative URLs resolve against location in browsers)
   * @param {object} [options]
   */
  constructor(url, options = {}) {
    this.url = url;
    this._opts = options;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._random = options.random ?? Math.random;
    this._reconnect = { ...DEFAULT_RECONNECT, ...(options.reconnect ?? {}) };
    this._requestTimeoutMs = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    this._graceMs = options.reconcileGraceMs ?? DEFAULT_RECONCILE_GRACE_MS;
    this._stateEveryMs = 1000 / (options.stateRate ?? DEFAULT_STATE_RATE);
    this._refreshAheadMs = options.refreshAheadMs ?? DEFAULT_REFRESH_AHEAD_MS;
    /** @type {{perSecond: number, burst: number} | null} null: frames go out unpaced. */
    this._rate = options.rateLimit === false || options.rateLimit === null
      ? null
      : { ...DEFAULT_RATE_LIMIT, ...(options.rateLimit ?? {}) };

    /** @type {"idle"|"connecting"|"open"|"reconnecting"|"closed"} */
    this.state = "idle";
    /** From the last `welcome`. */
    this.user = undefined;
    this.node = undefined;
    this.conn = undefined;
    this.heartbeatMs = undefined;

    this._listeners = new Map();
    this._ws = null;
    /** Generation of the current socket; bumped for every socket created. */
    this._gen = 0;
    /** Bumped for every connection attempt, so a stale getToken() result is dropped. */
    this._attemptSeq = 0;
    /** Consecutive failed attempts since the last welcome (backoff exponent). */
    this._attempt = 0;
    this._everOpened = false;
    this._authRetried = false;
    this._welcomeAt = 0;
    /** The backoff exponent the last welcome reset (restored when that connection is closed 4029/4008 early). */
    this._attemptAtWelcome = 0;
    this._reconnectTimer = null;
    this._connectTimer = null;
    this._pingTimer = null;
    this._silenceTimer = null;

    /** The token for the next connection when there is no getToken (the last one refreshed, else options.token). */
    this._token = options.token;
    /** The token the current socket was opened with. */
    this._socketToken = undefined;
    /** `exp` (Unix seconds) of the current connection's token, when it is a readable JWT. */
    this._expiresAt = undefined;
    this._refreshTimer = null;

    /** Send credits left (see DEFAULT_RATE_LIMIT), refilled one per 1/perSecond s while below the burst. */
    this._credits = this._rate?.burst ?? 0;
    /** Frames of the current socket waiting for a credit, in order. */
    this._paced = [];
    this._refillTimer = null;

    this._nextRef = 1;
    /** ref → {resolve, reject, timer} for frames sent on the current socket. */
    this._inflight = new Map();
    /** Requests made while not open, sent after the next welcome. */
    this._queue = [];

    /** @type {Map<string, Room>} */
    this._rooms = new Map();
    /** @type {Map<string, {online: boolean|undefined, seq: number|undefined, gen: number}>} */
    this._watched = new Map();
    /** watch() calls made while not open, resolved once their users are confirmed. */
    this._watchWaiters = [];
    /** Presence events that arrived before their user's watch reply on this socket. */
    this._held = [];
    /** user → timer: offline seen in a snapshot, reported when the grace ends. */
    this._pendingOffline = new Map();
    /** True while the application wants the global feed (re-subscribed after reconnects). */
    this._feed = false;
    /** subscribeFeed() calls made while not open, settled by the next connection's subscribe. */
    this._feedWaiters = [];
  }

  // ---- events -------------------------------------------------------------

  on(event, fn) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(fn);
    return this;
  }

  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
    return this;
  }

  _emit(event, payload) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(payload);
      } catch (err) {
        if (event === "error") console.error("presenced: error listener threw", err);
        else this._emit("error", err);
      }
    }
  }

  _changed(what) {
    this._emit("change", what);
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", state);
    this._changed({ kind: "state", state });
  }

  // ---- public API ---------------------------------------------------------

  /** Start connecting (no-op if already connecting or open). */
  connect() {
    if (this.state === "connecting" || this.state === "open" || this.state === "reconnecting") return;
    this._attempt = 0;
    this._authRetried = false;
    this._setState("connecting");
    this._openSocket();
  }

  /**
   * Sign out: close with 1000, which the gateway takes as deliberate (no
   * offline grace: the user's offline and left go out at once), and do not
   * reconnect; pending requests reject with code "closed". Not for page
   * unload: a reload is meant to stay invisible through the grace.
   */
  close() {
    if (this.state === "closed") return;
    this._clearTimers();
    this._attemptSeq++;
    const ws = this._detachSocket();
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        // already closing
      }
    }
    this._failInflight("closed", "client closed");
    const err = () => new PresenceError("closed", "client closed");
    for (const req of this._queue.splice(0)) this._settle(req, null, err());
    for (const room of this._rooms.values()) {
      for (const w of room._waiters.splice(0)) this._settle(w, null, err());
    }
    for (const w of this._watchWaiters.splice(0)) this._settle(w, null, err());
    for (const w of this._feedWaiters.splice(0)) this._settle(w, null, err());
    for (const timer of this._pendingOffline.values()) clearTimeout(timer);
    this._pendingOffline.clear();
    for (const room of this._rooms.values()) room._cancelAllLeft();
    this._setState("closed");
  }

  /**
   * Join `room`; resolves with its members snapshot. Remembered: re-joined
   * after every reconnect until leave().
   * @returns {Promise<Array<{user: string, meta?: object}>>}
   */
  join(room, meta) {
    const r = this._room(room);
    const wasIn = r._desired && r._gen === this._gen;
    r._desired = true;
    if (this.state !== "open") {
      if (meta !== undefined) r._meta = meta;
      return this._waiter(r._waiters);
    }
    const frame = this._joinFrame(r);
    if (meta !== undefined) frame.meta = meta;
    return this._request(frame).then((reply) => {
      if (meta !== undefined) r._meta = meta;
      if (this._rooms.get(room) === r && r._desired) this._applyRoomSnapshot(r, reply.members ?? []);
      return reply.members ?? [];
    }, (err) => {
      // A refused join changes nothing on the gateway: a room we were in
      // (with its old meta) stays, one we were not in is forgotten.
      if (!wasIn && !isTransient(err)) r._desired = false;
      throw err;
    });
  }

  /**
   * Set this user's state in `room` (joined with join()); members hear
   * `updated`. Sent at most `stateRate` times a second per room: a state
   * given while one waits replaces it (latest wins), and every caller
   * waiting on it resolves when the state that replaced theirs is written.
   * @returns {Promise<void>}
   */
  update(room, state) {
    const r = this._rooms.get(room);
    if (!r || !r._desired) return Promise.reject(new PresenceError("not_joined", `not in room ${room}: join() it first`));
    const turn = r._turn;
    const done = new Promise((resolve, reject) => turn.waiters.push({ resolve, reject }));
    turn.waiting = state;
    if (turn.timer === null) {
      const wait = Math.max(0, turn.nextAt - Date.now());
      turn.timer = setTimeout(() => this._stateTurn(r), wait);
    }
    return done;
  }

  /** A room's waiting state, at its turn: one frame for every update() since the last. */
  _stateTurn(r) {
    const turn = r._turn;
    turn.timer = null;
    const waiters = turn.waiters.splice(0);
    const state = turn.waiting;
    turn.waiting = undefined;
    if (waiters.length === 0) return;
    turn.nextAt = Date.now() + this._stateEveryMs;
    this._request({ type: "update", room: r.name, state }, { unpaced: true }).then(
      () => waiters.forEach((w) => w.resolve()),
      (err) => waiters.forEach((w) => w.reject(err)),
    );
  }

  /** Leave `room` (and stop re-joining it). */
  async leave(room) {
    const r = this._rooms.get(room);
    if (r) {
      const wasDesired = r._desired;
      r._desired = false;
      r._gen = 0;
      r._held = [];
      clearTimeout(r._turn.timer);
      r._turn.timer = null;
      for (const w of r._turn.waiters.splice(0)) w.reject(new PresenceError("cancelled", `left ${room}`));
      r.states.clear();
      r._cancelAllLeft();
      for (const w of r._waiters.splice(0)) this._settle(w, null, new PresenceError("cancelled", `left ${room}`));
      if (r.members.size > 0) {
        r.members.clear();
        r._changed();
        this._changed({ kind: "room", room });
      }
      if (!wasDesired && this.state !== "open") return;
    }
    if (this.state !== "open") return;
    await this._request({ type: "leave", room });
  }

  /**
   * Watch `users`: online/offline events for them from now on. Resolves with
   * their current state. Remembered: re-watched after every reconnect.
   * @returns {Promise<Array<{user: string, online: boolean, seq: number}>>}
   */
  watch(users) {
    const list = [...new Set(users)];
    for (const user of list) {
      if (!this._watched.has(user)) this._watched.set(user, { online: undefined, seq: undefined, gen: 0 });
    }
    if (this.state !== "open") {
      const p = this._waiter(this._watchWaiters);
      this._watchWaiters[this._watchWaiters.length - 1].users = list;
      return p;
    }
    return this._requestUsers("watch", list).then((states) => {
      this._applyUserStates(states, false);
      return states;
    }, (err) => {
      if (!isTransient(err)) {
        for (const user of list) {
          if (this._watched.get(user)?.gen === 0) this._watched.delete(user);
        }
      }
      throw err;
    });
  }

  /** Stop watching `users`. */
  async unwatch(users) {
    const list = [...new Set(users)];
    let changed = false;
    for (const user of list) {
      this._cancelOffline(user);
      changed = this._watched.delete(user) || changed;
    }
    this._held = this._held.filter((f) => this._watched.has(f.user));
    if (changed) this._changed({ kind: "presence" });
    if (this.state !== "open") return;
    await this._requestUsers("unwatch", list);
  }

  /**
   * One-off state of `users` (no watching).
   * @returns {Promise<Array<{user: string, online: boolean, seq: number}>>}
   */
  query(users) {
    return this._requestUsers("query", [...new Set(users)]);
  }

  /** The view of `name`: members (user → meta) and a "change" event. */
  room(name) {
    return this._room(name);
  }

  /** true/false for a watched user whose state is known, else undefined. */
  isOnline(user) {
    return this._watched.get(user)?.online;
  }

  /** Whether the application is in `room` (joined, not left; re-joined after reconnects). */
  isJoined(room) {
    return this._rooms.get(room)?._desired === true;
  }

  /** Whether the application watches `user` (watched, not unwatched). */
  isWatching(user) {
    return this._watched.has(user);
  }

  /**
   * Replace the connection's token with `token` (same user) before it
   * expires; resolves with its expiry (Unix seconds) and emits "token". With
   * a `getToken` option the client does this by itself.
   * @param {string} token
   * @returns {Promise<{expiresAt: number}>}  expiresAt: the token's exp, Unix seconds
   */
  refresh(token) {
    return this._request({ type: "refresh", token }).then((reply) => {
      const expiresAt = typeof reply.expires_at === "number" ? reply.expires_at : tokenExpiry(token);
      this._token = token;
      this._expiresAt = expiresAt;
      this._armRefresh();
      this._emit("token", { expiresAt });
      return { expiresAt };
    });
  }

  /**
   * Receive every user's online/offline (the token needs `feed: true`),
   * through the "online"/"offline" events. Remembered: subscribed again
   * after every reconnect until unsubscribeFeed().
   * @returns {Promise<void>}
   */
  subscribeFeed() {
    this._feed = true;
    if (this.state !== "open") return this._waiter(this._feedWaiters);
    return this._request({ type: "subscribe_feed" }).then(() => undefined, (err) => {
      if (!isTransient(err)) this._feed = false;
      throw err;
    });
  }

  /** Stop the feed (and stop subscribing to it after reconnects). */
  async unsubscribeFeed() {
    this._feed = false;
    for (const w of this._feedWaiters.splice(0)) this._settle(w, null, new PresenceError("cancelled", "feed unsubscribed"));
    if (this.state !== "open") return;
    await this._request({ type: "unsubscribe_feed" });
  }

  // ---- requests -----------------------------------------------------------

  _room(name) {
    let r = this._rooms.get(name);
    if (!r) this._rooms.set(name, (r = new Room(name)));
    return r;
  }

  _joinFrame(r) {
    const frame = { type: "join", room: r.name };
    if (r._meta !== undefined) frame.meta = r._meta;
    return frame;
  }

  /** A promise settled later by whoever owns `list`, or by its own timeout. */
  _waiter(list) {
    return new Promise((resolve, reject) => {
      const w = { resolve, reject, timer: null };
      w.timer = setTimeout(() => {
        const i = list.indexOf(w);
        if (i >= 0) list.splice(i, 1);
        reject(new PresenceError("timeout", `no reply within ${this._requestTimeoutMs} ms`));
      }, this._requestTimeoutMs);
      list.push(w);
    });
  }

  _settle(w, value, err) {
    clearTimeout(w.timer);
    if (err) w.reject(err);
    else w.resolve(value);
  }

  /**
   * Send `frame` with a fresh ref (or queue it until open); resolves with
   * the reply. `unpaced`: not held to the client's message pacing (an
   * `update`, which the gateway counts apart).
   */
  _request(frame, { unpaced = false } = {}) {
    return new Promise((resolve, reject) => {
      const req = { frame, resolve, reject, timer: null, ref: 0, unpaced };
      req.timer = setTimeout(() => {
        if (req.ref) this._inflight.delete(req.ref);
        const i = this._queue.indexOf(req);
        if (i >= 0) this._queue.splice(i, 1);
        reject(new PresenceError("timeout", `no reply to ${frame.type} within ${this._requestTimeoutMs} ms`));
      }, this._requestTimeoutMs);
      if (this.state === "open") this._sendRequest(req);
      else this._queue.push(req);
    });
  }

  _sendRequest(req) {
    req.ref = this._nextRef++;
    this._inflight.set(req.ref, req);
    this._send({ ...req.frame, ref: req.ref }, req.unpaced);
  }

  /** A users request split into frames of at most MAX_IDS_PER_FRAME; resolves with the joined `users`. */
  async _requestUsers(type, users) {
    const chunks = [];
    for (let i = 0; i < users.length; i += MAX_IDS_PER_FRAME) chunks.push(users.slice(i, i + MAX_IDS_PER_FRAME));
    if (chunks.length === 0) chunks.push([]);
    const replies = await Promise.all(chunks.map((chunk) => this._request({ type, users: chunk })));
    return replies.flatMap((r) => r.users ?? []);
  }

  _failInflight(code, message) {
    const reqs = [...this._inflight.values()];
    this._inflight.clear();
    for (const req of reqs) this._settle(req, null, new PresenceError(code, message));
  }

  /** Send `frame` on the current socket, now or (over the rate) as soon as a send credit comes back. */
  _send(frame, unpaced = false) {
    const ws = this._ws;
    if (!ws || ws.readyState !== WS_OPEN) return;
    // Unpaced frames still queue behind paced ones already waiting, so a
    // re-join goes out before an update of its room.
    if (!this._rate || (unpaced && this._paced.length === 0)) {
      ws.send(JSON.stringify(frame));
      return;
    }
    this._paced.push(frame);
    this._sendPaced();
  }

  _sendPaced() {
    const ws = this._ws;
    if (!ws || ws.readyState !== WS_OPEN) {
      this._paced = [];
      return;
    }
    while (this._paced.length > 0 && this._credits >= 1) {
      this._credits--;
      ws.send(JSON.stringify(this._paced.shift()));
    }
    // Credits come back by a timer, not by reading a clock: a timer that
    // fires late only makes the client slower than the gateway's bucket.
    if (this._credits < this._rate.burst && this._refillTimer === null) {
      this._refillTimer = setInterval(() => {
        this._credits = Math.min(this._rate.burst, this._credits + 1);
        if (this._credits >= this._rate.burst) this._stopRefill();
        if (this._paced.length > 0) this._sendPaced();
      }, 1000 / this._rate.perSecond);
    }
  }

  _stopRefill() {
    clearInterval(this._refillTimer);
    this._refillTimer = null;
  }

  /** A fresh socket: a full bucket (the gateway's starts full too) and nothing waiting. */
  _resetPacing() {
    this._stopRefill();
    this._paced = [];
    this._credits = this._rate?.burst ?? 0;
  }

  // ---- connection ---------------------------------------------------------

  async _openSocket() {
    const attempt = ++this._attemptSeq;
    const { getToken } = this._opts;
    let token = this._token;
    if (getToken) {
      try {
        token = await getToken();
      } catch (err) {
        if (attempt !== this._attemptSeq || this.state === "closed") return;
        this._emit("error", err instanceof Error ? err : new PresenceError("token", String(err)));
        this._scheduleReconnect(this._nextBackoff());
        return;
      }
      if (attempt !== this._attemptSeq || this.state === "closed") return;
    }
    let ws;
    try {
      if (!this._WebSocket) throw new PresenceError("no_websocket", "no WebSocket implementation: pass options.WebSocket");
      ws = new this._WebSocket(this._buildUrl(token));
    } catch (err) {
      this._emit("error", err);
      if (err instanceof PresenceError) {
        this._setState("closed");
        return;
      }
      this._scheduleReconnect(this._nextBackoff());
      return;
    }
    const gen = ++this._gen;
    this._ws = ws;
    this._socketToken = token;
    const info = { opened: false, timedOut: false, usedToken: token !== undefined && token !== null };
    // A handshake that brings no welcome (a black-holed address, a stuck
    // proxy) is given up after the request timeout.
    this._connectTimer = setTimeout(() => {
      if (this._ws !== ws || this._gen !== gen) return;
      info.timedOut = true;
      this._onClose(1006, info);
      try {
        ws.close();
      } catch {
        // a socket still connecting may refuse close() in some implementations
      }
    }, this._requestTimeoutMs);
    ws.onopen = () => {
      if (this._ws === ws) info.opened = true;
    };
    ws.onmessage = (ev) => {
      if (this._ws === ws) this._onMessage(ev.data);
    };
    // Browsers follow an error with a close; some Node versions do not when
    // the connection is refused, so an error before open ends the attempt.
    ws.onerror = () => {
      if (this._ws === ws && this._gen === gen && !info.opened) this._abandon(ws, gen, info);
    };
    ws.onclose = (ev) => {
      if (this._ws === ws && this._gen === gen) this._onClose(ev?.code ?? 1006, info);
    };
  }

  /** Give up on a socket that never opened, as if it closed with 1006. */
  _abandon(ws, gen, info) {
    if (this._ws !== ws || this._gen !== gen || info.opened) return;
    this._onClose(1006, info);
    try {
      ws.close();
    } catch {
      // a socket still connecting may refuse close() in some implementations
    }
  }

  _buildUrl(token) {
    const base = globalThis.location?.href;
    const url = base ? new URL(this.url, base) : new URL(this.url);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    const { user, meta } = this._opts;
    if (user !== undefined) url.searchParams.set("user", user);
    if (token !== undefined && token !== null) url.searchParams.set("token", token);
    if (meta !== undefined) url.searchParams.set("meta", JSON.stringify(meta));
    return url.toString();
  }

  _detachSocket() {
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = null;
      ws.onmessage = null;
      ws.onclose = null;
      ws.onerror = () => {};
    }
    return ws;
  }

  _clearTimers() {
    clearTimeout(this._reconnectTimer);
    clearTimeout(this._connectTimer);
    clearInterval(this._pingTimer);
    clearTimeout(this._silenceTimer);
    clearTimeout(this._refreshTimer);
    this._reconnectTimer = this._connectTimer = this._pingTimer = this._silenceTimer = this._refreshTimer = null;
    this._resetPacing();
  }

  _nextBackoff() {
    return backoffDelay(this._attempt++, this._reconnect, this._random);
  }

  _scheduleReconnect(delayMs) {
    if (this.state === "closed") return;
    this._setState("reconnecting");
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (this.state !== "closed") this._openSocket();
    }, delayMs);
  }

  /** The socket ended without close() from the application. */
  _onClose(code, info) {
    this._detachSocket();
    clearTimeout(this._connectTimer);
    clearInterval(this._pingTimer);
    clearTimeout(this._silenceTimer);
    clearTimeout(this._refreshTimer);
    this._connectTimer = this._pingTimer = this._silenceTimer = this._refreshTimer = null;
    this._expiresAt = undefined;
    this._resetPacing();
    this._failInflight("connection_lost", `connection closed (${code})`);
    this._held = [];
    for (const r of this._rooms.values()) r._held = [];
    if (this.state === "closed") return;

    if (code === 1008 || code === 4001) {
      if (Date.now() - this._welcomeAt > STABLE_CONNECTION_MS) this._authRetried = false;
      this._authFailed(code, `gateway refused the credentials (close ${code})`);
      return;
    }
    if (!info.opened && !info.timedOut && info.usedToken && !this._everOpened) {
      // A refused handshake (HTTP 401) looks like this in browsers: closed
      // before open. Only the very first connect can tell it from an outage.
      this._authFailed(code, "connection refused before opening (bad token?)");
      return;
    }
    if (code === 1012) {
      this._attempt = 0;
      this._scheduleReconnect(this._random() * DRAIN_RECONNECT_MAX_MS);
      return;
    }
    if ((code === 4029 || code === 4008) && Date.now() - this._welcomeAt < STABLE_CONNECTION_MS) {
      // Rate limited or too slow a reader again soon after the welcome: that
      // welcome was no success, so the backoff keeps growing instead of
      // meeting the gateway with the same burst every few hundred ms.
      this._attempt = this._attemptAtWelcome;
    }
    this._scheduleReconnect(this._nextBackoff());
  }

  /** One more try with a fresh token if getToken can give one; otherwise stop. */
  _authFailed(code, message) {
    if (this._opts.getToken && !this._authRetried) {
      this._authRetried = true;
      this._scheduleReconnect(0);
      return;
    }
    this._emit("error", new PresenceError("unauthorized", message));
    this._clearTimers();
    this._setState("closed");
  }

  /** Heartbeat silence: the socket is dead even if the browser has not noticed. */
  _onSilence() {
    const ws = this._ws;
    if (!ws) return;
    this._onClose(4000, { opened: true, usedToken: false });
    try {
      ws.close(4000, "heartbeat timeout");
    } catch {
      // closing a dead socket may throw in some implementations
    }
  }

  _armSilence() {
    if (!this.heartbeatMs) return;
    clearTimeout(this._silenceTimer);
    this._silenceTimer = setTimeout(() => this._onSilence(), this.heartbeatMs * 2);
  }

  // ---- frames -------------------------------------------------------------

  _onMessage(data) {
    let frame;
    try {
      frame = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
    } catch {
      return;
    }
    if (!frame || typeof frame !== "object") return;
    this._armSilence();
    switch (frame.type) {
      case "welcome":
        return this._onWelcome(frame);
      case "reply":
      case "pong":
        return this._onReply(frame);
      case "error":
        return this._onError(frame);
      case "online":
      case "offline":
        return this._onPresence(frame);
      case "joined":
      case "left":
      case "updated":
        return this._onMember(frame);
      case "sync":
        return this._onSync(frame);
      default:
        return undefined;
    }
  }

  _onWelcome(frame) {
    this.user = frame.user;
    this.node = frame.node;
    this.conn = frame.conn;
    this.heartbeatMs = frame.heartbeat_ms;
    this._everOpened = true;
    this._attemptAtWelcome = this._attempt;
    this._attempt = 0;
    this._welcomeAt = Date.now();
    this._resetPacing();
    clearTimeout(this._connectTimer);
    this._connectTimer = null;
    clearInterval(this._pingTimer);
    if (this.heartbeatMs > 0) {
      this._pingTimer = setInterval(() => this._send({ type: "ping" }), this.heartbeatMs);
      this._armSilence();
    }
    this._setState("open");
    this._expiresAt = tokenExpiry(this._socketToken);
    this._armRefresh();
    this._resync();
    for (const req of this._queue.splice(0)) this._sendRequest(req);
  }

  // ---- token refresh ------------------------------------------------------

  /**
   * (Re)arm the proactive refresh for the current token; only with getToken
   * (nothing to refresh with otherwise) and a token whose `exp` is readable.
   * @param {number} [minDelayMs]  no timer if the refresh would be sooner (a retry after a failure)
   */
  _armRefresh(minDelayMs = 0) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (!this._opts.getToken || this._expiresAt === undefined || this.state !== "open") return;
    const delay = refreshDelay(this._expiresAt, Date.now(), this._refreshAheadMs);
    if (delay === undefined || delay < minDelayMs) return;
    this._refreshTimer = setTimeout(() => {
      this._refreshTimer = null;
      this._autoRefresh();
    }, delay);
  }

  /**
   * A fresh token from getToken() sent as `refresh`. A failure is reported
   * and tried again later while time is left; the connection stays (if the
   * token runs out the gateway closes it with 4001, and the auth path gets a
   * new token). Anything that comes back after this socket ended is dropped.
   */
  async _autoRefresh() {
    const gen = this._gen;
    const current = () => gen === this._gen && this.state === "open";
    let token;
    try {
      token = await this._opts.getToken();
    } catch (err) {
      if (!current()) return;
      this._emit("error", err instanceof Error ? err : new PresenceError("token", String(err)));
      this._armRefresh(MIN_REFRESH_RETRY_MS);
      return;
    }
    if (!current()) return;
    try {
      await this.refresh(token);
    } catch (err) {
      if (!current()) return;
      this._emit("error", err);
      this._armRefresh(MIN_REFRESH_RETRY_MS);
    }
  }

  /** Re-join every room and re-watch every user on the fresh socket. */
  _resync() {
    for (const r of this._rooms.values()) {
      if (!r._desired) continue;
      this._request(this._joinFrame(r)).then((reply) => {
        if (this._rooms.get(r.name) !== r || !r._desired) return;
        const members = reply.members ?? [];
        this._applyRoomSnapshot(r, members);
        for (const w of r._waiters.splice(0)) this._settle(w, members, null);
      }, (err) => {
        if (err.code === "connection_lost" || err.code === "closed") return;
        if (!keepsWish(err)) {
          r._desired = false;
          for (const w of r._waiters.splice(0)) this._settle(w, null, err);
        }
        this._emit("error", err);
      });
    }
    const users = [...this._watched.keys()];
    if (users.length === 0) {
      for (const w of this._watchWaiters.splice(0)) this._settle(w, [], null);
    } else {
      this._requestUsers("watch", users).then((states) => {
        this._applyUserStates(states, true);
        this._resolveWatchWaiters(new Map(states.map((st) => [st.user, st])));
      }, (err) => {
        if (err.code === "connection_lost" || err.code === "closed") return;
        if (!keepsWish(err)) {
          for (const w of this._watchWaiters.splice(0)) this._settle(w, null, err);
        }
        this._emit("error", err);
      });
    }
    if (this._feed) {
      this._request({ type: "subscribe_feed" }).then(() => {
        for (const w of this._feedWaiters.splice(0)) this._settle(w, undefined, null);
      }, (err) => {
        if (err.code === "connection_lost" || err.code === "closed") return;
        if (!keepsWish(err)) {
          this._feed = false;
          for (const w of this._feedWaiters.splice(0)) this._settle(w, null, err);
        }
        this._emit("error", err);
      });
    }
  }

  /** Settle the watch() calls made while not open with this reconnect's reply. */
  _resolveWatchWaiters(replied) {
    const pending = [];
    for (const w of this._watchWaiters) {
      const watched = w.users.filter((user) => this._watched.has(user));
      if (watched.every((user) => replied.has(user))) {
        this._settle(w, watched.map((user) => replied.get(user)), null);
      } else {
        pending.push(w);
      }
    }
    this._watchWaiters = pending;
  }

  _onReply(frame) {
    const req = frame.ref === undefined ? undefined : this._inflight.get(frame.ref);
    if (!req) return;
    this._inflight.delete(frame.ref);
    this._settle(req, frame, null);
  }

  _onError(frame) {
    const err = new PresenceError(frame.code ?? "error", frame.message ?? "error");
    const req = frame.ref === undefined ? undefined : this._inflight.get(frame.ref);
    if (req) {
      this._inflight.delete(frame.ref);
      this._settle(req, null, err);
    } else {
      this._emit("error", err);
    }
  }

  _onPresence(frame) {
    const entry = this._watched.get(frame.user);
    if (!entry) {
      if (this._feed) this._onFeedPresence(frame);
      return;
    }
    if (entry.gen !== this._gen) {
      // Before this socket's watch reply: keep it until the reply says
      // where the user's seq stands on this connection.
      if (this._held.length >= MAX_HELD_EVENTS) this._held.shift();
      this._held.push(frame);
      return;
    }
    if (typeof frame.seq === "number" && typeof entry.seq === "number" && frame.seq <= entry.seq) return;
    if (typeof frame.seq === "number") entry.seq = frame.seq;
    // A live event supersedes an offline still in its grace: online means it
    // was never news; offline is reported now, with its real reason.
    this._cancelOffline(frame.user);
    const online = frame.type === "online";
    if (entry.online === online) return;
    entry.online = online;
    const event = { user: frame.user, seq: frame.seq };
    if (frame.last_seen !== undefined) event.last_seen = frame.last_seen;
    if (frame.reason !== undefined) event.reason = frame.reason;
    this._emit(frame.type, event);
    this._changed({ kind: "presence", user: frame.user });
  }

  /**
   * A feed event for a user this client does not watch: passed on as it
   * came. The feed has no snapshot and is not kept in the local view (it may
   * be every user of the cluster); watch users to follow their state.
   */
  _onFeedPresence(frame) {
    const event = { user: frame.user, seq: frame.seq };
    if (frame.last_seen !== undefined) event.last_seen = frame.last_seen;
    if (frame.reason !== undefined) event.reason = frame.reason;
    this._emit(frame.type, event);
  }

  _onMember(frame) {
    const r = this._rooms.get(frame.room);
    if (!r || !r._desired) return;
    if (r._gen !== this._gen) {
      // Before this socket's snapshot of the room: the snapshot may or may
      // not include it, so it is merged in after the snapshot.
      if (r._held.length >= MAX_HELD_EVENTS) r._held.shift();
      r._held.push(frame);
      return;
    }
    if (frame.type === "updated") {
      if (!r.members.has(frame.user)) return;
      r.states.set(frame.user, frame.state);
      this._emit("updated", { room: r.name, user: frame.user, state: frame.state });
      r._changed();
      this._changed({ kind: "room", room: r.name });
      return;
    }
    r._cancelLeft(frame.user);
    if (frame.type === "joined") {
      if (r.members.has(frame.user)) return;
      r.members.set(frame.user, frame.meta);
      r.states.delete(frame.user);
      this._emit("joined", { room: r.name, user: frame.user });
    } else {
      if (!r.members.has(frame.user)) return;
      r.members.delete(frame.user);
      r.states.delete(frame.user);
      const event = { room: r.name, user: frame.user };
      if (frame.reason !== undefined) event.reason = frame.reason;
      this._emit("left", event);
    }
    r._changed();
    this._changed({ kind: "room", room: r.name });
  }

  _onSync(frame) {
    if (Array.isArray(frame.users)) this._applyUserStates(frame.users, true);
    if (typeof frame.room === "string" && Array.isArray(frame.members)) {
      const r = this._rooms.get(frame.room);
      if (r && r._desired) this._applyRoomSnapshot(r, frame.members);
    }
  }

  /**
   * Take `states` (a watch reply or a sync) as the truth for these users.
   * `replace`: a resync (new socket or `sync` frame): the seq baseline is
   * reset even if lower (a store that restarted empty), and an online user
   * now seen offline is reported only if still offline after the grace;
   * otherwise an older reply does not undo a newer event. Emits
   * online/offline only where the known state flips.
   */
  _applyUserStates(states, replace) {
    let changed = false;
    for (const s of states) {
      const entry = this._watched.get(s.user);
      if (!entry) continue;
      const current = entry.gen === this._gen;
      if (current && !replace && typeof entry.seq === "number" && s.seq < entry.seq) continue;
      entry.seq = s.seq;
      entry.gen = this._gen;
      changed = true;
      if (s.online) this._cancelOffline(s.user);
      if (entry.online === undefined) {
        entry.online = s.online;
      } else if (entry.online !== s.online) {
        if (!s.online && replace && this._graceMs > 0) {
          this._deferOffline(s.user);
        } else {
          entry.online = s.online;
          this._emit(s.online ? "online" : "offline", { user: s.user, seq: s.seq, sync: true });
        }
      }
    }
    if (changed) this._changed({ kind: "presence" });
    this._replayHeld();
  }

  _deferOffline(user) {
    if (this._pendingOffline.has(user)) return;
    const timer = setTimeout(() => {
      this._pendingOffline.delete(user);
      const entry = this._watched.get(user);
      if (!entry || entry.online !== true) return;
      entry.online = false;
      this._emit("offline", { user, seq: entry.seq, sync: true });
      this._changed({ kind: "presence", user });
    }, this._graceMs);
    this._pendingOffline.set(user, timer);
  }

  _cancelOffline(user) {
    const timer = this._pendingOffline.get(user);
    if (timer === undefined) return;
    clearTimeout(timer);
    this._pendingOffline.delete(user);
  }

  _replayHeld() {
    if (this._held.length === 0) return;
    const held = this._held;
    this._held = [];
    for (const frame of held) this._onPresence(frame);
  }

  /**
   * Make `r.members` equal `members` (a join reply or a sync), plus the
   * joined/left that arrived before it on this socket (events come in store
   * order, so replaying them over the snapshot ends in the truth), and tell
   * the application who joined or left since the previous view; the first
   * snapshot after join() is the starting point and fires no event. A member
   * missing from the snapshot stays for the grace and is reported as left
   * only if no snapshot or event brings them back meanwhile.
   */
  _applyRoomSnapshot(r, members) {
    const next = new Map(members.map((m) => [m.user, m.meta]));
    const states = new Map(members.filter((m) => m.state !== undefined).map((m) => [m.user, m.state]));
    const liveLeft = new Map();
    for (const f of r._held.splice(0)) {
      if (f.type === "updated") {
        if (next.has(f.user)) states.set(f.user, f.state);
      } else if (f.type === "joined") {
        if (!next.has(f.user)) {
          next.set(f.user, f.meta);
          states.delete(f.user);
        }
        liveLeft.delete(f.user);
      } else {
        next.delete(f.user);
        states.delete(f.user);
        liveLeft.set(f.user, f.reason);
      }
    }
    const statesBefore = r.states;
    r.states = states;
    const diff = r._gen !== 0;
    const before = new Map(r.members);
    const gone = diff ? [...before.keys()].filter((u) => !next.has(u)) : [];
    const joined = diff ? [...next.keys()].filter((u) => !before.has(u)) : [];
    r.members.clear();
    for (const [user, meta] of next) {
      r._cancelLeft(user);
      r.members.set(user, meta);
    }
    r._gen = this._gen;
    const left = [];
    for (const user of gone) {
      if (liveLeft.has(user)) {
        r._cancelLeft(user);
        const event = { room: r.name, user };
        if (liveLeft.get(user) !== undefined) event.reason = liveLeft.get(user);
        left.push(event);
      } else if (this._graceMs > 0) {
        r.members.set(user, before.get(user));
        if (statesBefore.has(user)) r.states.set(user, statesBefore.get(user));
        this._deferLeft(r, user);
      } else {
        left.push({ room: r.name, user, sync: true });
      }
    }
    for (const event of left) this._emit("left", event);
    for (const user of joined) this._emit("joined", { room: r.name, user, sync: true });
    if (diff) {
      for (const [user, state] of states) {
        if (JSON.stringify(statesBefore.get(user)) !== JSON.stringify(state)) {
          this._emit("updated", { room: r.name, user, state, sync: true });
        }
      }
    }
    r._changed();
    this._changed({ kind: "room", room: r.name });
  }

  _deferLeft(r, user) {
    if (r._pendingLeft.has(user)) return;
    const timer = setTimeout(() => {
      r._pendingLeft.delete(user);
      if (!r._desired || !r.members.has(user)) return;
      r.members.delete(user);
      r.states.delete(user);
      this._emit("left", { room: r.name, user, sync: true });
      r._changed();
      this._changed({ kind: "room", room: r.name });
    }, this._graceMs);
    r._pendingLeft.set(user, timer);
  }
}

export default PresenceClient;
