// Types for presenced.js, the presenced gateway client (hand-written; keep in step with it).

/** Connection state of a PresenceClient. */
export type PresenceState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

/** Why a user went offline or left a room (docs/protocol.md). */
export type PresenceReason = "closed" | "timeout" | "node_lost" | "shutdown" | (string & {});

/** A JSON object of connection metadata. */
export type Meta = Record<string, unknown>;

/** The minimal WebSocket surface the client uses (browser WebSocket, Node's, or `ws`). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code?: number; reason?: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ReconnectOptions {
  /** Base of the exponential backoff, ms (default 250). */
  minMs?: number;
  /** Cap of the backoff, ms (default 10000). */
  maxMs?: number;
}

/** The client's own pace for the frames it sends (kept under the gateway's --rate-limit / --rate-burst). */
export interface RateLimitOptions {
  /** Sustained frames per second (default 20). */
  perSecond?: number;
  /** Frames that may go out at once on a fresh connection (default 40). */
  burst?: number;
}

export interface PresenceClientOptions {
  /** --dev only: the user id, sent as ?user=. */
  user?: string;
  /** A token sent as ?token=. */
  token?: string;
  /**
   * Called before every connection attempt (its result is sent as ?token=,
   * winning over `token`) and before the connection's token expires (its
   * result is sent as `refresh`).
   */
  getToken?: () => string | Promise<string>;
  /**
   * With `getToken`: refresh the token this long before its `exp`, ms
   * (default 60000); a token with less than 4× that left is refreshed after
   * 3/4 of what is left.
   */
  refreshAheadMs?: number;
  /**
   * Pace of the frames the client sends (default { perSecond: 20, burst: 40 },
   * under the gateway's defaults); `false` or `null`: no pacing.
   */
  rateLimit?: RateLimitOptions | false | null;
  /** Connection metadata, sent as ?meta=<JSON>. */
  meta?: Meta;
  /** WebSocket implementation (default globalThis.WebSocket). */
  WebSocket?: WebSocketConstructor | (new (url: string) => unknown);
  /** Backoff bounds: delay = random(0, min(maxMs, minMs * 2 ** attempt)). */
  reconnect?: ReconnectOptions;
  /** How long a request waits for its reply (and a handshake for its welcome), ms (default 10000). */
  requestTimeoutMs?: number;
  /**
   * How long an offline/left seen only in a snapshot (reconnect or `sync`)
   * waits to be reported, ms (default 2000; 0: at once). A user back within
   * it was never reported gone.
   */
  reconcileGraceMs?: number;
  /** Most update() frames per room per second (default 10, the gateway's --state-rate). */
  stateRate?: number;
  /** Random source in [0, 1) for the backoff jitter (default Math.random). */
  random?: () => number;
}

export interface Member {
  user: string;
  meta?: Meta;
  /** The member's room state, once they set one (update()). */
  state?: Record<string, unknown>;
}

export interface UserState {
  user: string;
  online: boolean;
  seq: number;
}

export interface PresenceEvent {
  user: string;
  seq: number;
  /** Unix ms, on offline events from the gateway. */
  last_seen?: number;
  reason?: PresenceReason;
  /** true when derived from a snapshot (reconnect or `sync`) rather than a live event. */
  sync?: boolean;
}

export interface MemberEvent {
  room: string;
  user: string;
  reason?: PresenceReason;
  /** true when derived from a snapshot (reconnect or `sync`) rather than a live event. */
  sync?: boolean;
}

export interface UpdatedEvent {
  room: string;
  user: string;
  /** The member's new room state. */
  state: Record<string, unknown>;
  /** true when derived from a snapshot (reconnect or `sync`) rather than a live event. */
  sync?: boolean;
}

export interface TokenEvent {
  /** The new token's `exp`, Unix seconds (as the gateway's `expires_at`). */
  expiresAt: number;
}

export type ChangeInfo =
  | { kind: "state"; state: PresenceState }
  | { kind: "room"; room: string }
  | { kind: "presence"; user?: string };

export interface PresenceEvents {
  online: PresenceEvent;
  offline: PresenceEvent;
  joined: MemberEvent;
  left: MemberEvent;
  /** A member's room state changed (not sent for this connection's own update()). */
  updated: UpdatedEvent;
  state: PresenceState;
  /** The connection's token was replaced by a refresh. */
  token: TokenEvent;
  error: PresenceError | Error;
  change: ChangeInfo;
}

/**
 * An error from the gateway (code from docs/protocol.md: "invalid_room",
 * "forbidden", "rate_limited", "invalid_token", ...) or the client
 * ("timeout", "connection_lost", "closed", "cancelled", "unauthorized").
 */
export class PresenceError extends Error {
  constructor(code: string, message: string);
  readonly code: string;
}

/** A room as this client sees it. */
export interface RoomView {
  readonly name: string;
  /** user → meta (undefined when the user has none or it is not known yet). */
  readonly members: Map<string, Meta | undefined>;
  /** member → their room state, for members who set one (update()). */
  readonly states: Map<string, Record<string, unknown>>;
  on(event: "change", fn: (room: RoomView) => void): this;
  off(event: "change", fn: (room: RoomView) => void): this;
}

export declare const DEFAULT_RECONNECT: Readonly<Required<ReconnectOptions>>;
export declare const DEFAULT_REQUEST_TIMEOUT_MS: number;
export declare const DEFAULT_RECONCILE_GRACE_MS: number;
export declare const DEFAULT_STATE_RATE: number;
export declare const DRAIN_RECONNECT_MAX_MS: number;
export declare const MAX_IDS_PER_FRAME: number;
export declare const DEFAULT_REFRESH_AHEAD_MS: number;
export declare const DEFAULT_RATE_LIMIT: Readonly<Required<RateLimitOptions>>;

/** Full-jitter backoff delay for attempt `attempt` (0 for the first). */
export declare function backoffDelay(
  attempt: number,
  bounds: Required<ReconnectOptions>,
  random?: () => number,
): number;

export class PresenceClient {
  constructor(url: string, options?: PresenceClientOptions);
  readonly url: string;
  readonly state: PresenceState;
  /** From the last `welcome`. */
  readonly user: string | undefined;
  readonly node: string | undefined;
  readonly conn: string | undefined;
  readonly heartbeatMs: number | undefined;

  connect(): void;
  /**
   * Sign out: close with 1000 (the gateway sends this user's offline and
   * left at once, with no offline grace) and do not reconnect. Not for page
   * unload: a reload should keep the user online through the grace.
   */
  close(): void;
  join(room: string, meta?: Meta): Promise<Member[]>;
  leave(room: string): Promise<void>;
  /**
   * Set this user's state in a joined room (rejects "not_joined" otherwise);
   * at most `stateRate` frames a second per room, the latest state winning.
   * Resolves once the state (or a later one that replaced it) is written.
   */
  update(room: string, state: Record<string, unknown>): Promise<void>;
  watch(users: string[]): Promise<UserState[]>;
  unwatch(users: string[]): Promise<void>;
  query(users: string[]): Promise<UserState[]>;
  room(name: string): RoomView;
  isOnline(user: string): boolean | undefined;
  /** Whether the application is in `room` (joined and not left). */
  isJoined(room: string): boolean;
  /** Whether the application watches `user` (watched and not unwatched). */
  isWatching(user: string): boolean;
  /** Replace the connection's token (same user); rejects with the gateway's code ("invalid_token", "forbidden", ...). */
  refresh(token: string): Promise<TokenEvent>;
  /** Every user's online/offline through the "online"/"offline" events (token claim `feed: true`); remembered across reconnects. */
  subscribeFeed(): Promise<void>;
  unsubscribeFeed(): Promise<void>;

  on<E extends keyof PresenceEvents>(event: E, fn: (payload: PresenceEvents[E]) => void): this;
  off<E extends keyof PresenceEvents>(event: E, fn: (payload: PresenceEvents[E]) => void): this;
}

export default PresenceClient;
