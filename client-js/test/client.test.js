// Unit tests of PresenceClient against a fake WebSocket driven as the gateway.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { PresenceClient, PresenceError, backoffDelay } from "../presenced.js";
import { fakeJwt, fakeWebSocket, flush, recordEvents, summary } from "./fake-gateway.js";

const URL_ = "ws://gateway.test/ws";

/**
 * A client on a fake gateway, with mocked timers; `random` fixed unless
 * given. With `now` (ms) the clock (Date) is mocked too, starting there.
 */
function setup(t, options = {}, { now } = {}) {
  if (now === undefined) t.mock.timers.enable({ apis: ["setTimeout", "setInterval"] });
  else t.mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"], now });
  const fake = fakeWebSocket();
  const client = new PresenceClient(URL_, { user: "me", WebSocket: fake.WebSocket, random: () => 0.5, ...options });
  const log = recordEvents(client);
  const states = [];
  client.on("state", (s) => states.push(s));
  t.after(() => client.close());
  return { client, log, states, sockets: fake.sockets, tick: (ms) => t.mock.timers.tick(ms) };
}

/** Connect and welcome; returns the socket. */
async function connected(env, fields) {
  env.client.connect();
  const ws = env.sockets.at(-1);
  ws.welcome(fields);
  await flush();
  return ws;
}

/** Connected, in room doc:1 with `members`, watching `users` with `states`. */
async function followed(env, { members = ["me", "bob"], states = { bob: [true, 1] } } = {}) {
  const ws = await connected(env);
  const joined = env.client.join("doc:1", { device: "phone" });
  ws.reply("join", { room: "doc:1", members: members.map((user) => ({ user })) });
  await joined;
  const watched = env.client.watch(Object.keys(states));
  ws.replyWatch(states);
  await watched;
  return ws;
}

describe("backoff", () => {
  test("full jitter: uniform in [0, min(maxMs, minMs * 2^attempt))", () => {
    const bounds = { minMs: 250, maxMs: 10000 };
    assert.equal(backoffDelay(0, bounds, () => 0), 0);
    assert.equal(backoffDelay(0, bounds, () => 0.999999), 0.999999 * 250);
    assert.equal(backoffDelay(3, bounds, () => 0.5), 1000);
    assert.equal(backoffDelay(6, bounds, () => 0.5), 5000);
    assert.equal(backoffDelay(7, bounds, () => 0.5), 5000, "capped at maxMs");
    assert.equal(backoffDelay(40, bounds, () => 1 - Number.EPSILON) < 10000, true);
    for (let attempt = 0; attempt < 20; attempt++) {
      const d = backoffDelay(attempt, bounds);
      assert.ok(d >= 0 && d < Math.min(10000, 250 * 2 ** attempt), `attempt ${attempt}: ${d}`);
    }
  });

  test("the client waits the jittered delay, doubling the cap per failed attempt", async (t) => {
    const env = setup(t, { reconnect: { minMs: 100, maxMs: 1000 }, random: () => 0.5 });
    const ws = await connected(env);
    ws.drop(1006);
    assert.equal(env.client.state, "reconnecting");
    const expected = [50, 100, 200, 400, 500, 500];
    for (const delay of expected) {
      const before = env.sockets.length;
      env.tick(delay - 1);
      await flush();
      assert.equal(env.sockets.length, before, `not before ${delay} ms`);
      env.tick(1);
      await flush();
      assert.equal(env.sockets.length, before + 1, `after ${delay} ms`);
      env.sockets.at(-1).drop(1006); // refused: the gateway is down
    }
    env.sockets.at(-1).welcome();
  });

  test("a welcome resets the backoff", async (t) => {
    const env = setup(t, { reconnect: { minMs: 100, maxMs: 1000 }, random: () => 0.5 });
    const ws = await connected(env);
    ws.drop();
    env.tick(50);
    env.sockets.at(-1).drop();
    env.tick(100);
    env.sockets.at(-1).welcome();
    await flush();
    env.sockets.at(-1).drop();
    env.tick(50);
    assert.equal(env.sockets.length, 4);
  });
});

describe("requests", () => {
  test("replies are matched by ref, whatever their order", async (t) => {
    const env = setup(t);
    const ws = await connected(env);
    const a = env.client.query(["alice"]);
    const b = env.client.query(["bob"]);
    const [qa, qb] = ws.sentOf("query");
    assert.notEqual(qa.ref, qb.ref);
    ws.frame({ type: "reply", ref: qb.ref, ok: true, users: [{ user: "bob", online: true, seq: 3 }] });
    ws.frame({ type: "reply", ref: qa.ref, ok: true, users: [{ user: "alice", online: false, seq: 0 }] });
    assert.deepEqual(await a, [{ user: "alice", online: false, seq: 0 }]);
    assert.deepEqual(await b, [{ user: "bob", online: true, seq: 3 }]);
  });

  test("an error frame rejects its request with the gateway's code", async (t) => {
    const env = setup(t);
    const ws = await connected(env);
    const p = env.client.join("bad room");
    const req = ws.sentOf("join").at(-1);
    ws.frame({ type: "error", ref: req.ref, code: "invalid_room", message: "room name must be ..." });
    await assert.rejects(p, (err) => err instanceof PresenceError && err.code === "invalid_room");
    // A refused join is not re-joined after a reconnect.
    ws.drop();
    env.tick(1000);
    env.sockets.at(-1).welcome();
    await flush();
    assert.equal(env.sockets.at(-1).sentOf("join").length, 0);
  });

  test("a refused join of a room already joined keeps the room and its old meta", async (t) => {
    const env = setup(t);
    const ws = await followed(env);
    const p = env.client.join("doc:1", { huge: "x".repeat(2000) });
    const req = ws.sentOf("join").at(-1);
    assert.equal(req.meta.huge.length, 2000);
    ws.frame({ type: "error", ref: req.ref, code: "limit_exceeded", message: "meta over 1024 bytes" });
    await assert.rejects(p, { code: "limit_exceeded" });
    ws.frame({ type: "joined", room: "doc:1", user: "carol" });
    assert.deepEqual(summary(env.log), ["joined doc:1 carol"]);
    ws.drop();
    env.tick(125);
    env.sockets.at(-1).welcome();
    assert.deepEqual(env.sockets.at(-1).sentOf("join").map((f) => f.meta), [{ device: "phone" }]);
  });

  test("an error without a known ref surfaces as an error event", async (t) => {
    const env = setup(t);
    const ws = await connected(env);
    ws.frame({ type: "error", code: "bad_request", message: "not JSON" });
    assert.equal(env.log.length, 1);
    assert.equal(env.log[0][0], "error");
    assert.equal(env.log[0][1].code, "bad_request");
  });

  test("a request without a reply times out", async (t) => {
    const env = setup(t, { requestTimeoutMs: 500 });
    await connected(env);
    const p = env.client.query(["bob"]);
    env.tick(500);
    await assert.rejects(p, { code: "timeout" });
  });

  test("a lost connection rejects the requests in flight", async (t) => {
    const env = setup(t);
    const ws = await connected(env);
    const p = env.client.query(["bob"]);
    ws.drop();
    await assert.rejects(p, { code: "connection_lost" });
  });

  test("requests made before the welcome are sent after it", async (t) => {
    const env = setup(t);
    const joined = env.client.join("doc:1");
    const watched = env.client.watch(["bob"]);
    const queried = env.client.query(["carol"]);
    env.client.connect();
    const ws = env.sockets[0];
    assert.deepEqual(ws.sent, []);
    ws.welcome();
    assert.deepEqual(ws.sent.map((f) => f.type), ["join", "watch", "query"]);
    ws.reply("join", { room: "doc:1", members: [{ user: "me" }] });
    ws.replyWatch({ bob: [true, 4] });
    ws.reply("query", { users: [{ user: "carol", online: false, seq: 0 }] });
    assert.deepEqual(await joined, [{ user: "me" }]);
    assert.deepEqual(await watched, [{ user: "bob", online: true, seq: 4 }]);
    assert.deepEqual(await queried, [{ user: "carol", online: false, seq: 0 }]);
    assert.equal(env.client.isOnline("bob"), true);
    assert.deepEqual([...env.client.room("doc:1").members.keys()], ["me"]);
  });

  test("user, token and meta go into the URL", async (t) => {
    const env = setup(t, { token: "t0k&n", meta: { device: "phone" } });
    env.client.connect();
    const url = new URL(env.sockets[0].url);
    assert.equal(url.pathname, "/ws");
    assert.equal(url.searchParams.get("user"), "me");
    assert.equal(url.searchParams.get("token"), "t0k&n");
    assert.deepEqual(JSON.parse(url.searchParams.get("meta")), { device: "phone" });
  });

  test("connect is idempotent and close stops for good", async (t) => {
    const env = setup(t);
    env.client.connect();
    env.client.connect();
    assert.equal(env.sockets.length, 1);
    env.sockets[0].welcome();
    env.client.connect();
    assert.equal(env.sockets.length, 1);
    assert.equal(env.client.state, "open");
    assert.deepEqual([env.client.user, env.client.node, env.client.conn], ["me", "n1", "c1"]);
    env.client.close();
    assert.equal(env.sockets[0].closedByClient, 1000);
    env.tick(60000);
    assert.equal(env.sockets.length, 1);
    assert.deepEqual(env.states, ["connecting", "open", "closed"]);
  });
});

describe("events", () => {
  test("events reach the application in the order their frames arrived", async (t) => {
    const env = setup(t);
    const ws = await followed(env, { members: ["me"], states: { bob: [false, 0], carol: [false, 2] } });
    ws.frame({ type: "online", user: "bob", seq: 1 });
    ws.frame({ type: "joined", room: "doc:1", user: "bob" });
    ws.frame({ type: "online", user: "carol", seq: 3 });
    ws.frame({ type: "left", room: "doc:1", user: "bob", reason: "closed" });
    ws.frame({ type: "offline", user: "bob", seq: 2, last_seen: 1795000000000, reason: "closed" });
    assert.deepEqual(summary(env.log), [
      "online bob",
      "joined doc:1 bob",
      "online carol",
      "left doc:1 bob closed",
      "offline bob closed",
    ]);
    assert.deepEqual(env.log[4][1], { user: "bob", seq: 2, last_seen: 1795000000000, reason: "closed" });
    assert.equal(env.client.isOnline("bob"), false);
    assert.equal(env.client.isOnline("carol"), true);
    assert.equal(env.client.isOnline("dave"), undefined);
  });

  test("an event whose seq is not above the known one is dropped", async (t) => {
    const env = setup(t);
    const ws = await followed(env, { states: { bob: [true, 7] } });
    ws.frame({ type: "online", user: "bob", seq: 7 });
    ws.frame({ type: "offline", user: "bob", seq: 6, reason: "closed" });
    assert.deepEqual(summary(env.log), []);
    ws.frame({ type: "offline", user: "bob", seq: 8, reason: "timeout" });
    ws.frame({ type: "offline", user: "bob", seq: 8, reason: "timeout" });
    ws.frame({ type: "online", user: "bob", seq: 9 });
    assert.deepEqual(summary(env.log), ["offline bob timeout", "online bob"]);
  });

  test("an event that arrives before the watch reply is held, then applied by seq", async (t) => {
    const env = setup(t);
    const ws = await connected(env);
    const watched = env.client.watch(["bob", "carol"]);
    ws.frame({ type: "online", user: "bob", seq: 5 }); // already in the reply: stale
    ws.frame({ type: "offline", user: "carol", seq: 3, reason: "closed" }); // newer than the reply
    ws.replyWatch({ bob: [true, 5], carol: [true, 2] });
    await watched;
    assert.deepEqual(summary(env.log), ["offline carol closed"]);
    assert.equal(env.client.isOnline("carol"), false);
  });

  test("membership follows joined/left; duplicates and unknown rooms change nothing", async (t) => {
    const env = setup(t);
    const ws = await followed(env, { members: ["me"] });
    const room = env.client.room("doc:1");
    let changes = 0;
    room.on("change", () => changes++);
    ws.frame({ type: "joined", room: "doc:1", user: "bob" });
    ws.frame({ type: "joined", room: "doc:1", user: "bob" });
    ws.frame({ type: "joined", room: "doc:2", user: "bob" });
    assert.deepEqual([...room.members.keys()], ["me", "bob"]);
    ws.frame({ type: "left", room: "doc:1", user: "bob", reason: "closed" });
    ws.frame({ type: "left", room: "doc:1", user: "bob", reason: "closed" });
    assert.deepEqual([...room.members.keys()], ["me"]);
    assert.equal(changes, 2);
    assert.deepEqual(summary(env.log), ["joined doc:1 bob", "left doc:1 bob closed"]);
  });

  test("leave and unwatch stop the events and the re-join/re-watch", async (t) => {
    const env = setup(t);
    const ws = await followed(env);
    const left = env.client.leave("doc:1");
    ws.reply("leave", { room: "doc:1" });
    await left;
    const unwatched = env.client.unwatch(["bob"]);
    ws.reply("unwatch");
    await unwatched;
    assert.equal(env.client.room("doc:1").members.size, 0);
    assert.equal(env.client.isOnline("bob"), undefined);
    ws.frame({ type: "offline", user: "bob", seq: 2 });
    ws.frame({ type: "left", room: "doc:1", user: "bob" });
    ws.drop();
    env.tick(1000);
    env.sockets.at(-1).welcome();
    assert.deepEqual(env.sockets.at(-1).sent, []);
    assert.deepEqual(summary(env.log), []);
  });
});

describe("reconnect", () => {
  test("re-joins every room (with its meta) and re-watches every user", async (t) => {
    const env = setup(t);
    const ws = await followed(env, { states: { bob: [true, 1], carol: [false, 0] } });
    ws.drop(1006);
    assert.equal(env.client.state, "reconnecting");
    env.tick(125);
    const ws2 = env.sockets.at(-1);
    assert.notEqual(ws2, ws);
    ws2.welcome();
    assert.deepEqual(ws2.sentOf("join").map(({ room, meta }) => ({ room, meta })), [
      { room: "doc:1", meta: { device: "phone" } },
    ]);
    assert.deepEqual(ws2.sentOf("watch").map((f) => f.users), [["bob", "carol"]]);
    assert.deepEqual(env.states, ["connecting", "open", "reconnecting", "open"]);
  });

  test("a reconnect that changes nothing emits nothing", async (t) => {
    const env = setup(t);
    const ws = await followed(env, { members: ["me", "bob"], states: { bob: [true, 1] } });
    ws.drop();
    env.tick(125);
    const ws2 = env.sockets.at(-1);
    ws2.welcome();
    // A memory gateway restarted: same truth, seq counted afresh.
    ws2.reply("join", { room: "doc:1", members: [{ user: "bob" }, { user: "me" }] });
    ws2.replyWatch({ bob: [true, 1] });
    await flush();
    assert.deepEqual(summary(env.log), []);
    assert.equal(env.client.isOnline("bob"), true);
    ws2.frame({ type: "offline", user: "bob", seq: 2, reason: "closed" });
    assert.deepEqual(summary(env.log), ["offline bob closed"]);
  });

  test("a user who went offline during the gap gives exactly one offline, and one left", async (t) => {
    const env = setup(t);
    const ws = await followed(env, { members: ["me", "bob"], states: { bob: [true, 5], carol: [true, 1] } });
    ws.drop();
    env.tick(125);
    const ws2 = env.sockets.at(-1);
    ws2.welcome();
    ws2.reply("join", { room: "doc:1", members: [{ user: "me" }] });
    ws2.replyWatch({ bob: [false, 6], carol: [true, 1] });
    await flush();
    // Reported once the reconcile grace is over (bob's tabs might just be slower to come back).
    assert.deepEqual(summary(env.log), []);
    assert.equal(env.client.isOnline("bob"), true);
    env.tick(1999);
    assert.deepEqual(summary(env.log), []);
    env.tick(1);
    assert.deepEqual(summary(env.log), ["left doc:1 bob", "offline bob"]);
    assert.equal(env.log[1][1].seq, 6);
    assert.equal(env.log[1][1].sync, true);
    assert.equal(env.client.isOnline("bob"), false);
    assert.deepEqual([...env.client.room("doc:1").members.keys()], ["me"]);
    // The live event for that transition, arriving late, is stale now.
    ws2.frame({ type: "offline", user: "bob", seq: 6, reason: "closed" });
    env.tick(10000);
    assert.equal(summary(env.log).length, 2);
  });

  test("a user missing from the snapshot who is back within the grace was never news", async (t) => {
    const env = setup(t);
    const ws = await followed(env, { members: ["me", "bob"], states: { bob: [true, 5] } });
    ws.drop();
    env.tick(125);
    const ws2 = env.sockets.at(-1);
    ws2.welcome();
    // The gateway restarted (memory store): bob's tab has not reconnected yet.
    ws2.reply("join", { room: "doc:1", members: [{ user: "me" }] });
    ws2.replyWatch({ bob: [false, 0] });
    await flush();
    env.tick(800);
    ws2.frame({ type: "online", user: "bob", seq: 1 });
    ws2.frame({ type: "joined", room: "doc:1", user: "bob" });
    env.tick(10000);
    assert.deepEqual(summary(env.log), []);
    assert.equal(env.client.isOnline("bob"), true);
    assert.deepEqual([...env.client.room("doc:1").members.keys()], ["me", "bob"]);
    // Live events after that are reported as usual.
    ws2.frame({ type: "offline", user: "bob", seq: 2, reason: "closed" });
    assert.deepEqual(summary(env.log), ["offline bob closed"]);
  });

  test("a live offline during the grace is reported at once, with its reason, and only once", async (t) => {
    const env = setup(t);
    const ws = await followed(env, { members: ["me", "bob"], states: { bob: [true, 5] } });
    ws.drop();
    env.tick(125);
    const ws2 = env.sockets.at(-1);
    ws2.welcome();
    ws2.reply("join", { room: "doc:1", members: [{ user: "me" }] });
    ws2.replyWatch({ bob: [false, 0] });
    await flush();
    ws2.frame({ type: "online", user: "bob", seq: 1 });
    ws2.frame({ type: "offline", user: "bob", seq: 2, reason: "timeout" });
    ws2.frame({ type: "left", room: "doc:1", user: "bob", reason: "timeout" });
    env.tick(10000);
    assert.deepEqual(summary(env.log), ["offline bob timeout", "left doc:1 bob timeout"]);
  });

  test("reconcileGraceMs: 0 reports snapshot differences at once", async (t) => {
    const env = setup(t, { reconcileGraceMs: 0 });
    const ws = await followed(env, { members: ["me", "bob"], states: { bob: [true, 5] } });
    ws.drop();
    env.tick(125);
    const ws2 = env.sockets.at(-1);
    ws2.welcome();
    ws2.reply("join", { room: "doc:1", members: [{ user: "me" }] });
    ws2.replyWatch({ bob: [false, 6] });
    await flush();
    assert.deepEqual(summary(env.log), ["left doc:1 bob", "offline bob"]);
  });

  test("member events that arrive before the new snapshot are merged into it", async (t) => {
    const env = setup(t);
    const ws = await followed(env, { members: ["me", "bob"] });
    ws.drop();
    env.tick(125);
    const ws2 = env.sockets.at(-1);
    ws2.welcome();
    // Both happened after the gateway registered the join: the snapshot was
    // read before bob's leave and after carol's join.
    ws2.frame({ type: "joined", room: "doc:1", user: "carol" });
    ws2.frame({ type: "left", room: "doc:1", user: "bob", reason: "closed" });
    ws2.reply("join", { room: "doc:1", members: [{ user: "bob" }, { user: "carol" }, { user: "me" }] });
    await flush();
    assert.deepEqual(summary(env.log), ["left doc:1 bob closed", "joined doc:1 carol"]);
    assert.deepEqual([...env.client.room("doc:1").members.keys()], ["carol", "me"]);
    env.tick(10000);
    assert.equal(env.log.length, 2);
  });

  test("a member joining while the first join is in flight is in the members", async (t) => {
    const env = setup(t);
    const ws = await connected(env);
    const joined = env.client.join("doc:1");
    ws.frame({ type: "joined", room: "doc:1", user: "dan" });
    ws.reply("join", { room: "doc:1", members: [{ user: "me" }] });
    await joined;
    assert.deepEqual([...env.client.room("doc:1").members.keys()], ["me", "dan"]);
  });

  test("close 1012 (node draining) reconnects within 100 ms, not after the backoff", async (t) => {
    const env = setup(t, { reconnect: { minMs: 5000, maxMs: 60000 }, random: () => 0.999 });
    const ws = await connected(env);
    ws.drop(1012);
    env.tick(100);
    assert.equal(env.sockets.length, 2);
  });

  test("heartbeat: the client pings every heartbeat_ms and reconnects after 2x silence", async (t) => {
    const env = setup(t);
    const ws = await connected(env, { heartbeat_ms: 1000 });
    env.tick(1000);
    assert.equal(ws.sentOf("ping").length, 1);
    ws.frame({ type: "pong" }); // traffic: the silence clock restarts
    env.tick(1999);
    assert.equal(env.sockets.length, 1);
    assert.equal(env.client.state, "open");
    env.tick(1);
    assert.equal(env.client.state, "reconnecting");
    assert.equal(ws.closedByClient, 4000);
    env.tick(125);
    assert.equal(env.sockets.length, 2);
  });

  test("heartbeat: any frame counts as traffic", async (t) => {
    const env = setup(t);
    const ws = await followed(env);
    ws.frame({ type: "welcome", conn: "c1", user: "me", node: "n1", heartbeat_ms: 1000 });
    for (let i = 0; i < 10; i++) {
      env.tick(1500);
      ws.frame({ type: "joined", room: "doc:1", user: `u${i}` });
    }
    assert.equal(env.client.state, "open");
    assert.equal(env.sockets.length, 1);
  });
});

describe("local view", () => {
  test("change fires for the client and the room on every local change", async (t) => {
    const env = setup(t);
    const changes = [];
    env.client.on("change", (c) => changes.push(c.kind));
    const ws = await followed(env, { members: ["me"], states: { bob: [false, 0] } });
    const room = env.client.room("doc:1");
    assert.equal(env.client.room("doc:1"), room, "one view per room name");
    let roomChanges = 0;
    const onRoom = () => roomChanges++;
    room.on("change", onRoom);
    ws.frame({ type: "joined", room: "doc:1", user: "bob" });
    ws.frame({ type: "online", user: "bob", seq: 1 });
    room.off("change", onRoom);
    ws.frame({ type: "left", room: "doc:1", user: "bob" });
    assert.equal(roomChanges, 1);
    assert.deepEqual(changes, ["state", "state", "room", "presence", "room", "presence", "room"]);
  });

  test("a watch made while reconnecting resolves with the reply, the offline itself after the grace", async (t) => {
    const env = setup(t);
    const ws = await followed(env, { states: { bob: [true, 3] } });
    ws.drop();
    const p = env.client.watch(["bob", "carol"]);
    env.tick(125);
    const ws2 = env.sockets.at(-1);
    ws2.welcome();
    assert.deepEqual(ws2.sentOf("watch").map((f) => f.users), [["bob", "carol"]]);
    ws2.replyWatch({ bob: [false, 4], carol: [true, 9] });
    assert.deepEqual(await p, [
      { user: "bob", online: false, seq: 4 },
      { user: "carol", online: true, seq: 9 },
    ]);
    assert.equal(env.client.isOnline("carol"), true);
    assert.deepEqual(summary(env.log), []);
    env.tick(2000);
    assert.deepEqual(summary(env.log), ["offline bob"]);
  });

  test("more than 1,000 users go out in frames of at most 1,000", async (t) => {
    const env = setup(t);
    const ws = await connected(env);
    const users = Array.from({ length: 2500 }, (_, i) => `u${i}`);
    const p = env.client.query(users);
    const frames = ws.sentOf("query");
    assert.deepEqual(frames.map((f) => f.users.length), [1000, 1000, 500]);
    for (const f of frames) {
      ws.frame({ type: "reply", ref: f.ref, ok: true, users: f.users.map((user) => ({ user, online: false, seq: 0 })) });
    }
    assert.deepEqual((await p).map((s) => s.user), users);
  });

  test("a relative URL resolves against the page, http becoming ws", async (t) => {
    globalThis.location = { href: "https://app.example/chat/index.html" };
    t.after(() => delete globalThis.location);
    const fake = fakeWebSocket();
    const client = new PresenceClient("/ws", { user: "me", WebSocket: fake.WebSocket });
    t.after(() => client.close());
    client.connect();
    assert.equal(fake.sockets[0].url, "wss://app.example/ws?user=me");
  });
});

describe("sync", () => {
  test("a users sync replaces the watched state and resets the seq baseline", async (t) => {
    const env = setup(t);
    const ws = await followed(env, { states: { bob: [true, 41], carol: [false, 12] } });
    // Redis restarted empty: seqs start again from 1.
    ws.frame({ type: "sync", users: [{ user: "bob", online: true, seq: 1 }, { user: "carol", online: true, seq: 1 }] });
    assert.deepEqual(summary(env.log), ["online carol"]);
    assert.equal(env.log[0][1].sync, true);
    ws.frame({ type: "offline", user: "bob", seq: 1 });
    ws.frame({ type: "offline", user: "bob", seq: 2, reason: "closed" });
    assert.deepEqual(summary(env.log), ["online carol", "offline bob closed"]);
  });

  test("a room sync emits joined/left only for real differences", async (t) => {
    const env = setup(t);
    const ws = await followed(env, { members: ["me", "bob", "carol"] });
    ws.frame({ type: "sync", room: "doc:1", members: [{ user: "carol" }, { user: "dave" }, { user: "me" }] });
    assert.deepEqual(summary(env.log), ["joined doc:1 dave"]);
    env.tick(2000); // the reconcile grace
    assert.deepEqual(summary(env.log), ["joined doc:1 dave", "left doc:1 bob"]);
    assert.deepEqual([...env.client.room("doc:1").members.keys()], ["carol", "dave", "me"]);
    ws.frame({ type: "sync", room: "doc:1", members: [{ user: "carol" }, { user: "dave" }, { user: "me" }] });
    assert.equal(summary(env.log).length, 2);
  });
});

describe("auth", () => {
  test("close 4001 without getToken: one error, state closed, no reconnect", async (t) => {
    const env = setup(t, { token: "expired" });
    const ws = await connected(env);
    ws.drop(4001);
    env.tick(60000);
    assert.equal(env.sockets.length, 1);
    assert.equal(env.client.state, "closed");
    assert.deepEqual(env.log.map(([e, p]) => [e, p.code]), [["error", "unauthorized"]]);
  });

  test("close 1008 with getToken: one fresh token and one retry, then stop", async (t) => {
    let calls = 0;
    const env = setup(t, { getToken: async () => `token${++calls}` });
    env.client.connect();
    await flush();
    env.sockets[0].welcome();
    env.sockets[0].drop(1008);
    await flush();
    env.tick(0);
    await flush();
    assert.equal(calls, 2);
    assert.equal(env.sockets.length, 2);
    assert.equal(new URL(env.sockets[1].url).searchParams.get("token"), "token2");
    env.sockets[1].welcome();
    env.sockets[1].drop(1008);
    env.tick(60000);
    await flush();
    assert.equal(calls, 2);
    assert.equal(env.sockets.length, 2);
    assert.equal(env.client.state, "closed");
    assert.equal(env.log.filter(([e]) => e === "error").length, 1);
  });

  test("a first handshake refused (closed before open) with a static token stops", async (t) => {
    const env = setup(t, { token: "bad" });
    env.client.connect();
    env.sockets[0].drop(1006);
    env.tick(60000);
    assert.equal(env.sockets.length, 1);
    assert.equal(env.client.state, "closed");
    assert.equal(env.log[0][1].code, "unauthorized");
  });

  test("a first handshake refused with getToken: one more token, one retry, then stop", async (t) => {
    let calls = 0;
    const env = setup(t, { getToken: () => `token${++calls}` });
    env.client.connect();
    await flush();
    env.sockets[0].drop(1006);
    env.tick(0);
    await flush();
    assert.equal(env.sockets.length, 2);
    env.sockets[1].drop(1006);
    env.tick(60000);
    await flush();
    assert.equal(calls, 2);
    assert.equal(env.sockets.length, 2);
    assert.equal(env.client.state, "closed");
  });

  test("an error before open ends the attempt even if no close follows (Node's refused connect)", async (t) => {
    const env = setup(t);
    env.client.connect();
    env.sockets[0].onerror({}); // and never a close
    assert.equal(env.client.state, "reconnecting");
    env.tick(125);
    assert.equal(env.sockets.length, 2);
    env.sockets[0].drop(1006); // a late close of the abandoned socket changes nothing
    assert.equal(env.sockets.length, 2);
  });

  test("a handshake that hangs is given up after requestTimeoutMs", async (t) => {
    const env = setup(t, { requestTimeoutMs: 3000 });
    env.client.connect();
    env.tick(2999);
    assert.equal(env.client.state, "connecting");
    env.tick(1);
    assert.equal(env.client.state, "reconnecting");
    // Given up with no code: not a sign-out (that is close()'s 1000 alone).
    assert.equal(env.sockets[0].closedByClient, null);
    env.tick(125);
    assert.equal(env.sockets.length, 2);
  });

  test("a socket that opens but never sends welcome is given up too", async (t) => {
    const env = setup(t, { requestTimeoutMs: 3000 });
    env.client.connect();
    env.sockets[0].open();
    env.tick(3000);
    assert.equal(env.client.state, "reconnecting");
    env.tick(125);
    env.sockets[1].welcome();
    env.tick(10000); // past the handshake timeout, within the heartbeat
    assert.equal(env.client.state, "open");
    assert.equal(env.sockets.length, 2);
  });

  test("after a first success, a failed handshake with getToken is an outage: backoff, a fresh token each time", async (t) => {
    let calls = 0;
    const env = setup(t, { getToken: async () => `token${++calls}` });
    env.client.connect();
    await flush();
    env.sockets[0].welcome();
    env.sockets[0].drop(1006);
    for (let i = 1; i <= 4; i++) {
      env.tick(10000);
      await flush();
      assert.equal(env.sockets.length, i + 1);
      env.sockets[i].drop(1006); // refused while the gateway is away
    }
    assert.equal(env.client.state, "reconnecting");
    assert.equal(calls, 5);
    env.tick(10000);
    await flush();
    env.sockets.at(-1).welcome();
    assert.equal(env.client.state, "open");
    assert.equal(new URL(env.sockets.at(-1).url).searchParams.get("token"), "token6");
  });

  test("without a token, a gateway that is not up yet is retried with backoff", async (t) => {
    const env = setup(t);
    env.client.connect();
    env.sockets[0].drop(1006);
    assert.equal(env.client.state, "reconnecting");
    env.tick(125);
    assert.equal(env.sockets.length, 2);
    env.sockets[1].welcome();
    assert.equal(env.client.state, "open");
  });
});

/** A mocked clock's start, ms; tokens below expire a few seconds after it. */
const NOW_MS = 1_800_000_000_000;
const NOW_S = NOW_MS / 1000;

/** A getToken() handing out tokens valid `lifetimeS` from the (mocked) clock; `issued` lists them. */
function tokenSource(lifetimeS, claims = {}) {
  const issued = [];
  const getToken = () => {
    const token = fakeJwt({ sub: "me", exp: Math.floor(Date.now() / 1000) + lifetimeS, ...claims });
    issued.push(token);
    return token;
  };
  return { issued, getToken };
}

/** Connect a getToken client and welcome it without heartbeat (the fake gateway sends no pongs). */
async function connectedWithToken(env) {
  env.client.connect();
  await flush();
  const ws = env.sockets.at(-1);
  ws.welcome({ heartbeat_ms: 0 });
  await flush();
  return ws;
}

/** Record the client's "token" events. */
function tokenEvents(client) {
  const events = [];
  client.on("token", (e) => events.push(e));
  return events;
}

const errors = (log) => log.filter(([e]) => e === "error").map(([, err]) => err);

/** Each suite below is bounded: a promise that never settles fails it instead of hanging the run. */
const BOUNDED = { timeout: 10000 };

describe("token refresh", BOUNDED, () => {
  test("a short-lived token is refreshed after 3/4 of its life with a fresh getToken() token; the reply sets the next", async (t) => {
    // base64url's - and _ in the payload: the client must decode it as such.
    const source = tokenSource(8, { note: "??>>~~" });
    const env = setup(t, { getToken: source.getToken }, { now: NOW_MS });
    const tokens = tokenEvents(env.client);
    const ws = await connectedWithToken(env);
    assert.match(source.issued[0].split(".")[1], /[-_]/);

    env.tick(5999); // 8 s left: 3/4 of that, since 60 s ahead would be now
    await flush();
    assert.deepEqual(ws.sentOf("refresh"), []);
    env.tick(1);
    await flush();
    const [first] = ws.sentOf("refresh");
    assert.equal(source.issued.length, 2);
    assert.equal(first.token, source.issued[1]);

    ws.reply("refresh", { expires_at: NOW_S + 14 });
    await flush();
    assert.deepEqual(tokens, [{ expiresAt: NOW_S + 14 }]);
    env.tick(5999); // 8 s left again
    await flush();
    assert.equal(ws.sentOf("refresh").length, 1);
    env.tick(1);
    await flush();
    assert.equal(ws.sentOf("refresh").length, 2);
    assert.equal(env.sockets.length, 1);
    assert.deepEqual(env.states, ["connecting", "open"]);
    assert.deepEqual(env.log, []);
  });

  test("a long-lived token is refreshed refreshAheadMs before its exp", async (t) => {
    const source = tokenSource(3600);
    const env = setup(t, { getToken: source.getToken, refreshAheadMs: 120000 }, { now: NOW_MS });
    const ws = await connectedWithToken(env);
    env.tick(3600000 - 120000 - 1);
    await flush();
    assert.deepEqual(ws.sentOf("refresh"), []);
    env.tick(1);
    await flush();
    assert.equal(ws.sentOf("refresh").length, 1);
  });

  test("a refused refresh emits the gateway's error, keeps the socket, and is tried again while time is left", async (t) => {
    const source = tokenSource(3600);
    const env = setup(t, { getToken: source.getToken }, { now: NOW_MS });
    const tokens = tokenEvents(env.client);
    const ws = await connectedWithToken(env);
    env.tick(3540000);
    await flush();
    const req = ws.sentOf("refresh")[0];
    ws.frame({ type: "error", ref: req.ref, code: "invalid_token", message: "token_expired: the token has expired" });
    await flush();
    const [err] = errors(env.log);
    assert.ok(err instanceof PresenceError);
    assert.equal(err.code, "invalid_token");
    assert.match(err.message, /^token_expired/);
    assert.equal(ws.closedByClient, undefined);
    assert.equal(env.client.state, "open");

    env.tick(45000); // 60 s were left: again after 3/4 of them
    await flush();
    assert.equal(ws.sentOf("refresh").length, 2);
    ws.reply("refresh", { expires_at: NOW_S + 7200 });
    await flush();
    assert.deepEqual(tokens, [{ expiresAt: NOW_S + 7200 }]);
    assert.equal(env.sockets.length, 1);
  });

  test("getToken() failing at refresh time emits its error and keeps the socket", async (t) => {
    const source = tokenSource(100);
    let calls = 0;
    const getToken = () => {
      if (++calls === 2) throw new Error("token service down");
      return source.getToken();
    };
    const env = setup(t, { getToken }, { now: NOW_MS });
    const ws = await connectedWithToken(env);
    env.tick(75000);
    await flush();
    assert.deepEqual(errors(env.log).map((e) => e.message), ["token service down"]);
    assert.deepEqual(ws.sentOf("refresh"), []);
    assert.equal(env.client.state, "open");
    env.tick(18750); // a retry after 3/4 of the 25 s left
    await flush();
    assert.equal(calls, 3);
    assert.equal(ws.sentOf("refresh")[0].token, source.issued.at(-1));
  });

  test("the gateway's 4001 after a failed refresh still gets one retry with a fresh token", async (t) => {
    const source = tokenSource(8);
    const env = setup(t, { getToken: source.getToken }, { now: NOW_MS });
    const ws = await connectedWithToken(env);
    env.tick(6000);
    await flush();
    ws.frame({ type: "error", ref: ws.sentOf("refresh")[0].ref, code: "rate_limited", message: "slow down" });
    await flush();
    env.tick(2000);
    ws.drop(4001);
    env.tick(0);
    await flush();
    assert.equal(env.sockets.length, 2);
    assert.equal(new URL(env.sockets[1].url).searchParams.get("token"), source.issued.at(-1));
    assert.deepEqual(errors(env.log).map((e) => e.code), ["rate_limited"]);
  });

  test("refresh timers stop with their connection: nothing after close(), the new token's timer after a reconnect", async (t) => {
    const source = tokenSource(8);
    const env = setup(t, { getToken: source.getToken, reconnect: { minMs: 100, maxMs: 100 } }, { now: NOW_MS });
    const ws = await connectedWithToken(env);
    env.tick(5990);
    ws.drop(1006); // 10 ms before its refresh
    env.tick(50); // the backoff (0.5 × 100 ms) runs past the old refresh time
    await flush();
    assert.equal(source.issued.length, 2, "one token for the reconnect, none for the old socket's refresh");
    assert.deepEqual(ws.sentOf("refresh"), []);
    const ws2 = env.sockets[1];
    ws2.welcome({ heartbeat_ms: 0 }); // its token, issued at +6040 ms: exp NOW_S + 14
    await flush();
    env.tick(5969); // 3/4 of the 7960 ms left
    await flush();
    assert.deepEqual(ws2.sentOf("refresh"), []);
    env.tick(1);
    await flush();
    assert.equal(ws2.sentOf("refresh").length, 1);

    ws2.reply("refresh", { expires_at: Math.floor(Date.now() / 1000) + 8 });
    await flush();
    env.client.close();
    env.tick(600000);
    await flush();
    assert.equal(source.issued.length, 3);
    assert.equal(ws2.sentOf("refresh").length, 1);
    assert.equal(env.sockets.length, 2);
  });

  test("a getToken() answer or a refresh reply that comes after a reconnect is ignored", async (t) => {
    const pending = [];
    const source = tokenSource(8);
    let calls = 0;
    // The refresh's token (2nd call) and the 4th arrive only when the test says.
    const getToken = () => {
      calls++;
      if (calls === 2 || calls === 4) return new Promise((resolve) => pending.push(() => resolve(source.getToken())));
      return source.getToken();
    };
    const env = setup(t, { getToken, reconnect: { minMs: 100, maxMs: 100 } }, { now: NOW_MS });
    const tokens = tokenEvents(env.client);
    const ws = await connectedWithToken(env);
    env.tick(6000);
    await flush();
    assert.equal(pending.length, 1);
    ws.drop(1006);
    env.tick(50);
    await flush();
    const ws2 = env.sockets[1];
    ws2.welcome({ heartbeat_ms: 0 });
    pending.shift()(); // the old socket's refresh token arrives now
    await flush();
    assert.deepEqual(ws.sentOf("refresh"), []);
    assert.deepEqual(ws2.sentOf("refresh"), []);

    env.tick(6000); // ws2's own refresh
    await flush();
    pending.shift()();
    await flush();
    const req = ws2.sentOf("refresh")[0];
    assert.ok(req);
    ws2.drop(1006); // before its reply
    ws2.frame({ type: "reply", ref: req.ref, ok: true, expires_at: NOW_S + 100 });
    env.tick(50);
    await flush();
    env.sockets[2].welcome({ heartbeat_ms: 0 });
    await flush();
    assert.deepEqual(tokens, []);
    assert.deepEqual(env.log, [], "a refresh lost with its socket is no error");
  });

  test("refresh(token): resolves with expiresAt and emits token; a refusal rejects with the gateway's code", async (t) => {
    const env = setup(t, { token: "t1", user: undefined });
    const tokens = tokenEvents(env.client);
    const ws = await connected(env);
    const ok = env.client.refresh("t2");
    assert.equal(ws.sentOf("refresh")[0].token, "t2");
    ws.reply("refresh", { expires_at: 1795000000 });
    assert.deepEqual(await ok, { expiresAt: 1795000000 });
    assert.deepEqual(tokens, [{ expiresAt: 1795000000 }]);

    const refused = env.client.refresh("bobs-token");
    const req = ws.sentOf("refresh").at(-1);
    ws.frame({ type: "error", ref: req.ref, code: "forbidden", message: "the new token is for another user" });
    await assert.rejects(refused, (err) => err instanceof PresenceError && err.code === "forbidden");
    assert.equal(env.client.state, "open");
    assert.equal(tokens.length, 1);

    // The next connection opens with the token last accepted.
    ws.drop(1006);
    env.tick(125);
    assert.equal(new URL(env.sockets[1].url).searchParams.get("token"), "t2");
  });

  test("without getToken nothing is refreshed by itself", async (t) => {
    const env = setup(t, { token: fakeJwt({ sub: "me", exp: NOW_S + 8 }) }, { now: NOW_MS });
    const ws = await connected(env, { heartbeat_ms: 0 });
    env.tick(60000);
    await flush();
    assert.deepEqual(ws.sentOf("refresh"), []);
  });

  test("a token that is not a JWT is not refreshed by itself", async (t) => {
    const opaque = setup(t, { getToken: () => "opaque-session-token" });
    const ws2 = await connectedWithToken(opaque);
    opaque.tick(3600000);
    await flush();
    assert.deepEqual(ws2.sentOf("refresh"), []);
  });
});

describe("feed", BOUNDED, () => {
  test("subscribeFeed: online/offline of users nobody watches come through the usual events", async (t) => {
    const env = setup(t);
    const ws = await followed(env, { members: ["me"], states: { bob: [false, 0] } });
    const subscribed = env.client.subscribeFeed();
    ws.reply("subscribe_feed");
    assert.equal(await subscribed, undefined);
    ws.frame({ type: "online", user: "dave", seq: 1 });
    ws.frame({ type: "online", user: "bob", seq: 1 });
    ws.frame({ type: "offline", user: "dave", seq: 2, last_seen: 1795000000000, reason: "closed" });
    assert.deepEqual(summary(env.log), ["online dave", "online bob", "offline dave closed"]);
    assert.deepEqual(env.log[2][1], { user: "dave", seq: 2, last_seen: 1795000000000, reason: "closed" });
    assert.equal(env.client.isOnline("dave"), undefined, "the feed is not kept in the local view");
    assert.equal(env.client.isOnline("bob"), true);
  });

  test("the feed is subscribed again after a reconnect; unsubscribeFeed stops it", async (t) => {
    const env = setup(t);
    const ws = await connected(env);
    const subscribed = env.client.subscribeFeed();
    ws.reply("subscribe_feed");
    await subscribed;
    ws.drop(1006);
    env.tick(125);
    const ws2 = env.sockets[1];
    ws2.welcome();
    assert.equal(ws2.sentOf("subscribe_feed").length, 1);
    ws2.reply("subscribe_feed");
    await flush();

    const unsubscribed = env.client.unsubscribeFeed();
    ws2.reply("unsubscribe_feed");
    await unsubscribed;
    ws2.frame({ type: "online", user: "dave", seq: 1 }); // sent before the gateway read the unsubscribe
    assert.deepEqual(summary(env.log), []);
    ws2.drop(1006);
    env.tick(125);
    env.sockets[2].welcome();
    assert.deepEqual(env.sockets[2].sent, []);
  });

  test("subscribeFeed made while reconnecting resolves with the next connection's subscribe", async (t) => {
    const env = setup(t);
    const subscribed = env.client.subscribeFeed();
    env.client.connect();
    const ws = env.sockets[0];
    ws.welcome();
    ws.reply("subscribe_feed");
    assert.equal(await subscribed, undefined);
  });

  test("a feed the token does not allow rejects with forbidden and is not asked for again", async (t) => {
    const env = setup(t);
    const ws = await connected(env);
    const subscribed = env.client.subscribeFeed();
    const req = ws.sentOf("subscribe_feed")[0];
    ws.frame({ type: "error", ref: req.ref, code: "forbidden", message: "this token does not allow the global feed" });
    await assert.rejects(subscribed, { code: "forbidden" });
    ws.drop(1006);
    env.tick(125);
    env.sockets[1].welcome();
    assert.deepEqual(env.sockets[1].sentOf("subscribe_feed"), []);
  });
});

describe("close codes", BOUNDED, () => {
  for (const [code, why] of [[4029, "rate limited"], [4008, "slow consumer"]]) {
    test(`close ${code} (${why}) reconnects with backoff and the same credentials, not as an auth failure`, async (t) => {
      let calls = 0;
      const env = setup(t, { getToken: () => `token${++calls}`, reconnect: { minMs: 100, maxMs: 1000 } });
      env.client.connect();
      await flush();
      env.sockets[0].welcome();
      env.sockets[0].drop(code);
      assert.equal(env.client.state, "reconnecting");
      env.tick(49);
      await flush();
      assert.equal(env.sockets.length, 1);
      env.tick(1);
      await flush();
      assert.equal(env.sockets.length, 2);
      env.sockets[1].welcome();
      assert.equal(env.client.state, "open");
      assert.deepEqual(env.log, []);
    });
  }

  test("closed 4029 again right after each welcome: the backoff keeps growing", async (t) => {
    const env = setup(t, { reconnect: { minMs: 100, maxMs: 10000 } });
    await connected(env);
    for (const delay of [50, 100, 200, 400]) {
      env.sockets.at(-1).drop(4029);
      const before = env.sockets.length;
      env.tick(delay - 1);
      assert.equal(env.sockets.length, before, `not before ${delay} ms`);
      env.tick(1);
      assert.equal(env.sockets.length, before + 1);
      env.sockets.at(-1).welcome();
    }
    // Any other drop after a welcome starts over.
    env.sockets.at(-1).drop(1006);
    env.tick(50);
    assert.equal(env.sockets.length, 6);
  });
});

describe("pacing", BOUNDED, () => {
  test("frames past the burst wait for the rate: 40 at once, then 20 a second", async (t) => {
    const env = setup(t);
    const ws = await connected(env);
    const replies = Array.from({ length: 45 }, (_, i) => env.client.query([`u${i}`]));
    assert.equal(ws.sentOf("query").length, 40);
    env.tick(49);
    assert.equal(ws.sentOf("query").length, 40);
    env.tick(1);
    assert.equal(ws.sentOf("query").length, 41);
    env.tick(200);
    assert.deepEqual(ws.sentOf("query").map((f) => f.users[0]), replies.map((_, i) => `u${i}`), "in order");
    for (const f of ws.sentOf("query")) ws.frame({ type: "reply", ref: f.ref, ok: true, users: [] });
    await Promise.all(replies);
  });

  test("a reconnect re-joining 60 rooms is paced", async (t) => {
    const env = setup(t);
    const rooms = Array.from({ length: 60 }, (_, i) => `room${i}`);
    const joins = rooms.map((room) => env.client.join(room));
    env.client.connect();
    env.sockets[0].welcome();
    assert.equal(env.sockets[0].sentOf("join").length, 40);
    env.tick(1000);
    assert.equal(env.sockets[0].sentOf("join").length, 60);
    for (const f of env.sockets[0].sentOf("join")) env.sockets[0].frame({ type: "reply", ref: f.ref, ok: true, members: [] });
    await Promise.all(joins);
  });

  test("rateLimit: false sends everything at once", async (t) => {
    const rooms = Array.from({ length: 60 }, (_, i) => `room${i}`);
    const unpaced = setup(t, { rateLimit: false });
    for (const room of rooms) unpaced.client.join(room).catch(() => {});
    unpaced.client.connect();
    unpaced.sockets[0].welcome();
    assert.equal(unpaced.sockets[0].sentOf("join").length, 60);
  });

  test("a re-join refused as rate_limited stays wanted and is done again on the next connection", async (t) => {
    const env = setup(t);
    const ws = await followed(env);
    ws.drop(1006);
    env.tick(125);
    const ws2 = env.sockets[1];
    ws2.welcome();
    const req = ws2.sentOf("join")[0];
    ws2.frame({ type: "error", ref: req.ref, code: "rate_limited", message: "over 20 messages/s" });
    await flush();
    assert.deepEqual(errors(env.log).map((e) => e.code), ["rate_limited"]);
    ws2.drop(1006);
    env.tick(125);
    env.sockets[2].welcome();
    assert.deepEqual(env.sockets[2].sentOf("join").map((f) => f.room), ["doc:1"]);
  });
});
