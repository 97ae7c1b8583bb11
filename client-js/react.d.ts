// Types for react.js, the React bindings of the presenced client (hand-written; keep in step with it).

import type { ReactNode } from "react";
import type { Meta, PresenceClient } from "./presenced.js";

/** What a hook was doing when its request failed. */
export interface PresenceOp {
  op: "join" | "leave" | "watch" | "unwatch" | "update";
  room?: string;
  user?: string;
}

export interface PresenceProviderProps {
  /** A client the application created and connects (and closes); the provider does neither. */
  client: PresenceClient;
  /**
   * Hears the hooks' failed requests (not "cancelled", "connection_lost" or
   * "closed", which are no news); default console.error.
   */
  onError?: (err: Error, what: PresenceOp) => void;
  children?: ReactNode;
}

/** Puts `client` in context for the hooks below it. */
export declare function PresenceProvider(props: PresenceProviderProps): ReactNode;

/** The client of the nearest PresenceProvider (throws without one). */
export declare function usePresenceClient(): PresenceClient;

/** One member of a room, as usePresence lists them. */
export interface RoomMember {
  user: string;
  /** Their metadata; undefined when none is known. */
  meta: Meta | undefined;
  /**
   * Their room state, once they set one. This client's own update()s are
   * not echoed back to it: useMyState has its own state.
   */
  state: Record<string, unknown> | undefined;
}

/**
 * The members of `room`, sorted by user, live. Joins the room while
 * mounted (with `meta` when this hook is the one that joins it); the last
 * hook of this client on the room to unmount leaves it, unless the
 * application had joined it itself. The same array until something in it
 * changes.
 */
export declare function usePresence(room: string, meta?: Meta): readonly RoomMember[];

/**
 * `true`/`false` once known, `undefined` before: watches `user` while
 * mounted (the last hook unwatches, unless the application watches them
 * itself).
 */
export declare function useOnline(user: string): boolean | undefined;

export type StateSetter<S> = (next: S | ((prev: S | undefined) => S)) => void;

/**
 * This user's own state in `room` (joined while mounted, like usePresence):
 * the latest this hook set (at once, before the gateway has it), or before
 * that the state the room holds for this user. The setter calls
 * `client.update(room, next)`.
 */
export declare function useMyState<S extends Record<string, unknown> = Record<string, unknown>>(
  room: string,
): [S | undefined, StateSetter<S>];
