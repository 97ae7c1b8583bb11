/**
 * React bindings for the presenced client: a context that carries one
 * PresenceClient, and hooks that follow a room's members, a user's online
 * state and this user's own room state, re-rendering when they change.
 *
 * The hooks share the client's rooms and watches: per client, a room (or a
 * watched user) is joined (watched) when the first hook needs it and left
 * (unwatched) when the last hook that needed it unmounts, but only if a
 * hook joined (watched) it: what the application joined itself stays.
 *
 * It never creates, connects or closes the client (the application owns
 * its life), and never imports anything but `react`, a peer dependency:
 * the core module (presenced.js) stays dependency-free.
 */

import { createContext, createElement, useCallback, useContext, useEffect, useMemo, useRef, useState, useSyncExternalStore } from "react";

const PresenceContext = createContext(null);
PresenceContext.displayName = "PresenceContext";

/** What the hooks report a failed join/leave/watch/unwatch/update to, when the provider is given no onError. */
function logError(err, what) {
  console.error(`presenced: ${what.op} ${what.room ?? what.user ?? ""} failed`, err);
}

/**
 * Failures that are no news: a join overtaken by a leave, a request cut by
 * a dropped socket (a join/watch is redone on reconnect; a leave/unwatch was
 * already forgotten locally, so nothing rejoins) or by close().
 */
const QUIET = new Set(["cancelled", "connection_lost", "closed"]);

/** `promise`, its failure reported to `onError` unless it is in QUIET. */
function report(promise, onError, what) {
  promise.catch((err) => {
    if (!QUIET.has(err?.code)) onError(err, what);
  });
}

/**
 * Puts `client` (a PresenceClient the application created and connects) in
 * context for the hooks below it. `onError(err, {op, room?, user?})` hears
 * the hooks' failed requests (default: console.error).
 */
export function PresenceProvider({ client, onError, children }) {
  const value = useMemo(() => ({ client, onError: onError ?? logError }), [client, onError]);
  return createElement(PresenceContext.Provider, { value }, children);
}

function usePresenceContext(hook) {
  const ctx = useContext(PresenceContext);
  if (!ctx || !ctx.client) throw new Error(`${hook}: no <PresenceProvider client={...}> above this component`);
  return ctx;
}

/** The PresenceClient of the nearest PresenceProvider. */
export function usePresenceClient() {
  return usePresenceContext("usePresenceClient").client;
}

// ---- reference counts ----------------------------------------------------

/**
 * client → {rooms, users}: name → {count, ours}. `ours`: a hook joined
 * (watched) it, so the last hook to let go leaves (unwatches) it.
 * @type {WeakMap<object, {rooms: Map<string, {count: number, ours: boolean}>, users: Map<string, {count: number, ours: boolean}>}>}
 */
const holds = new WeakMap();

function holdsOf(client) {
  let h = holds.get(client);
  if (!h) holds.set(client, (h = { rooms: new Map(), users: new Map() }));
  return h;
}

const appJoined = (client, room) => client.isJoined(room);
const appWatches = (client, user) => client.isWatching(user);

/**
 * A hold on one name of `kind` ("rooms" or "users"); the returned function
 * lets go. Letting go of the last hold waits a microtask, so a component
 * that unmounts and mounts again at once (StrictMode, a key moved in a list)
 * does not leave and join again.
 */
function hold(client, kind, name, acquire, release, has) {
  const map = holdsOf(client)[kind];
  let entry = map.get(name);
  if (!entry) map.set(name, (entry = { count: 0, ours: false }));
  entry.count++;
  if (entry.count === 1 && !entry.ours && !has(client, name)) {
    entry.ours = true;
    acquire();
  }
  let held = true;
  return () => {
    if (!held) return;
    held = false;
    entry.count--;
    if (entry.count > 0) return;
    queueMicrotask(() => {
      if (entry.count > 0 || map.get(name) !== entry) return;
      map.delete(name);
      if (entry.ours && has(client, name)) release();
    });
  };
}

function holdRoom(ctx, room, meta) {
  const { client, onError } = ctx;
  return hold(client, "rooms", room,
    () => report(client.join(room, meta), onError, { op: "join", room }),
    () => report(client.leave(room), onError, { op: "leave", room }),
    appJoined);
}

function holdUser(ctx, user) {
  const { client, onError } = ctx;
  return hold(client, "users", user,
    () => report(client.watch([user]), onError, { op: "watch", user }),
    () => report(client.unwatch([user]), onError, { op: "unwatch", user }),
    appWatches);
}

// ---- hooks ----------------------------------------------------------------

const byUser = (a, b) => (a.user < b.user ? -1 : a.user > b.user ? 1 : 0);

/** The members of `view`, sorted by user: `previous` itself when nothing in it changed. */
function membersOf(view, previous) {
  const next = [...view.members].map(([user, meta]) => ({ user, meta, state: view.states.get(user) })).sort(byUser);
  const same = previous !== undefined && previous.length === next.length
    && next.every((m, i) => m.user === previous[i].user && m.meta === previous[i].meta && m.state === previous[i].state);
  return same ? previous : next;
}

/**
 * The members of `room`, live: `[{user, meta, state}]` sorted by user. Joins
 * the room while mounted (with `meta`, if this hook is the one that joins).
 */
export function usePresence(room, meta) {
  const ctx = usePresenceContext("usePresence");
  const { client } = ctx;
  const view = client.room(room);
  const metaRef = useRef(meta);
  metaRef.current = meta;
  useEffect(() => holdRoom(ctx, room, metaRef.current), [ctx, room]);

  const subscribe = useCallback((onChange) => {
    const onUpdated = (e) => {
      if (e.room === room) onChange();
    };
    view.on("change", onChange);
    client.on("updated", onUpdated);
    return () => {
      view.off("change", onChange);
      client.off("updated", onUpdated);
    };
  }, [client, view, room]);
  const cache = useRef({ view: null, members: undefined });
  const getSnapshot = () => {
    const c = cache.current;
    const members = membersOf(view, c.view === view ? c.members : undefined);
    c.view = view;
    c.members = members;
    return members;
  };
  return useSyncExternalStore(subscribe, getSnapshot, getSnapshot);
}

/** Whether `user` is online (`true`/`false`; `undefined` until known), live. Watches them while mounted. */
export function useOnline(user) {
  const ctx = usePresenceContext("useOnline");
  const { client } = ctx;
  useEffect(() => holdUser(ctx, user), [ctx, user]);
  const subscribe = useCallback((onChange) => {
    client.on("change", onChange);
    return () => client.off("change", onChange);
  }, [client]);
  const getSnapshot = () => client.isOnline(user);
  return useSyncExternalStore(subscribe, getSnapshot, getSnapshot);
}

const NOT_SET = Symbol("not set");

/**
 * `[state, setState]` for this user's own state in `room` (joined while
 * mounted). `setState(next)` (or `setState(prev => next)`) sends
 * `client.update(room, next)`; `state` is the latest this hook set, at once
 * (optimistic), and before the first set, this user's state as the room
 * knows it (from the join snapshot or another tab's update).
 */
export function useMyState(room) {
  const ctx = usePresenceContext("useMyState");
  const { client, onError } = ctx;
  const view = client.room(room);
  useEffect(() => holdRoom(ctx, room, undefined), [ctx, room]);

  const subscribe = useCallback((onChange) => {
    view.on("change", onChange);
    return () => view.off("change", onChange);
  }, [view]);
  const getSnapshot = () => (client.user === undefined ? undefined : view.states.get(client.user));
  const known = useSyncExternalStore(subscribe, getSnapshot, getSnapshot);

  const [mine, setMine] = useState({ room, state: NOT_SET });
  const current = mine.room === room && mine.state !== NOT_SET ? mine.state : known;
  const latest = useRef(current);
  latest.current = current;

  const setState = useCallback((next) => {
    const state = typeof next === "function" ? next(latest.current) : next;
    latest.current = state;
    setMine({ room, state });
    report(client.update(room, state), onError, { op: "update", room });
  }, [client, onError, room]);
  return [current, setState];
}
