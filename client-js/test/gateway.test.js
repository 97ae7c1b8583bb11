// Integration tests: PresenceClient against the real presenced binary
// (in-memory store; --dev, or --jwt-secret with HS256 tokens made here), with
// Node's WebSocket (--experimental-websocket).
// The binary is $PRESENCED_BIN, else ../target/debug/presenced (cargo build).
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { describe, test } from "node:test";

import { PresenceClient } from "../presenced.js";
import { recordEvents, summary } from "./fake-gateway.js";
import { client, FAST_RECONNECT, open, startGateway, TEST, until, untilApi, WAIT_MS } from "./real-gateway.js";

const JWT_SECRET = "client-js-test-secret";
/** A gateway that takes identity from tokens signed with JWT_SECRET, with no clock leeway. */
const JWT_ARGS = ["--jwt-secret", JWT_SECRET, "--jwt-leeway-s", "0"];

/** An HS256 JWT with `claims`, signed with `secret`. */
function jwt(claims, secret = JWT_SECRET) {
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const signed = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${signed}.${createHmac("sha256", secret).update(signed).digest("base64url")}`;
}

/** Unix seconds now. */
const nowS = () => Math.floor(Date.now() / 1000);

describe("against the real gateway", () => {
  test("three tabs of one user are one online; only the last close is an offline (reason closed)", TEST, async (t) => {
    const gw = await startGateway(t);
    const observer = client(t, gw, "observer");
    const log = recordEvents(observer);
    await open(observer);
    assert.deepEqual(await observer.watch(["alice"]), [{ user: "alice", online: false, seq: 0 }]);
    assert.equal(observer.isOnline("alice"), false);

    const tabs = [client(t, gw, "alice"), client(t, gw, "alice"), client(t, gw, "alice")];
    for (const tab of tabs) await open(tab);
    await until("alice online", [observer], () => observer.isOnline("alice") === true);
    await untilApi(gw, "/v1/users/alice", (u) => u.connections.length === 3);

    tabs[0].close();
    tabs[1].close();
    await untilApi(gw, "/v1/users/alice", (u) => u.connections.length === 1);
    assert.equal(observer.isOnline("alice"), true);

    tabs[2].close();
    await until("alice offline", [observer], () => observer.isOnline("alice") === false);
    assert.deepEqual(summary(log), ["online alice", "offline alice closed"]);
    const offline = log[1][1];
    assert.equal(offline.seq, 2);
    assert.equal(typeof offline.last_seen, "number");
  });

  test("a room's members Map follows joined and left", TEST, async (t) => {
    const gw = await startGateway(t);
    const observer = client(t, gw, "observer");
    const log = recordEvents(observer);
    await open(observer);
    const room = observer.room("doc:1");
    assert.deepEqual(await observer.join("doc:1", { device: "desk" }), [{ user: "observer", meta: { device: "desk" } }]);
    assert.deepEqual([...room.members], [["observer", { device: "desk" }]]);

    const alice = client(t, gw, "alice", { meta: { device: "phone" } });
    await open(alice);
    const snapshot = await alice.join("doc:1");
    assert.deepEqual(snapshot, [{ user: "alice", meta: { device: "phone" } }, { user: "observer", meta: { device: "desk" } }]);
    assert.deepEqual([...alice.room("doc:1").members.keys()], ["alice", "observer"]);
    await until("alice in doc:1", [room], () => room.members.has("alice"));

    const bob = client(t, gw, "bob");
    await open(bob);
    await bob.join("doc:1");
    await until("bob in doc:1", [room], () => room.members.has("bob"));
    await until("observer sees bob", [alice.room("doc:1")], () => alice.room("doc:1").members.has("bob"));

    await alice.leave("doc:1");
    await until("alice gone from doc:1", [room], () => !room.members.has("alice"));
    assert.equal(alice.room("doc:1").members.size, 0);
    bob.close();
    await until("bob gone from doc:1", [room], () => !room.members.has("bob"));
    assert.deepEqual([...room.members.keys()], ["observer"]);
    assert.deepEqual(summary(log), [
      "joined doc:1 alice",
      "joined doc:1 bob",
      "left doc:1 alice closed",
      "left doc:1 bob closed",
    ]);
    await assert.rejects(observer.leave("doc:1").then(() => observer.leave("doc:1")), { code: "not_joined" });
    await assert.rejects(observer.join("bad room!"), { code: "invalid_room" });
  });

  test("gateway killed and restarted on the same port: clients come back, only real changes are reported", TEST, async (t) => {
    const gw1 = await startGateway(t);
    // The observer reconnects only when the test lets it, so that the others
    // are back first and what it sees is settled, not a race.
    const gate = { open: true };
    class GatedWebSocket extends globalThis.WebSocket {
      constructor(url) {
        super(gate.open ? url : "ws://127.0.0.1:1/ws");
      }
    }
    const observer = client(t, gw1, "observer", { WebSocket: GatedWebSocket });
    const alice = client(t, gw1, "alice");
    const bob = client(t, gw1, "bob");
    for (const c of [observer, alice, bob]) await open(c);
    await alice.join("doc:1");
    await bob.join("doc:1");
    await observer.join("doc:1");
    const room = observer.room("doc:1");
    assert.deepEqual([...room.members.keys()], ["alice", "bob", "observer"]);
    const states = await observer.watch(["alice", "bob", "carol", "dave"]);
    assert.deepEqual(states.map((s) => [s.user, s.online]), [["alice", true], ["bob", true], ["carol", false], ["dave", false]]);

    const log = recordEvents(observer);
    gate.open = false;
    const down = Promise.all(
      [observer, alice, bob].map((c) => until("reconnecting", [c], () => c.state === "reconnecting", "state")),
    );
    await gw1.kill();
    await down;

    // While the gateway is away: bob quits for good, dave arrives.
    bob.close();
    const gw2 = await startGateway(t, gw1.port);
    const dave = client(t, gw2, "dave");
    await open(dave);
    await until("alice back", [alice], () => alice.state === "open", "state");
    await untilApi(gw2, "/v1/rooms/doc%3A1", (r) => r.users.includes("alice"));
    await untilApi(gw2, "/v1/users/alice", (u) => u.online);

    gate.open = true;
    await until("observer back", [observer], () => observer.state === "open", "state");
    await until("observer reconciled", [observer, room], () =>
      observer.isOnline("bob") === false && observer.isOnline("dave") === true && !room.members.has("bob"),
    );
    // One more round trip: anything still in flight for the observer has arrived.
    assert.deepEqual((await observer.query(["alice"]))[0].online, true);

    assert.equal(observer.isOnline("alice"), true);
    assert.equal(observer.isOnline("carol"), false);
    assert.deepEqual([...room.members.keys()], ["alice", "observer"]);
    assert.deepEqual(summary(log).sort(), ["left doc:1 bob", "offline bob", "online dave"]);
    assert.ok(log.every(([, e]) => e.sync === true), "all three come from the reconnect's snapshots");
    assert.notEqual(observer.node, undefined);

    // Live events flow again after the reconcile.
    alice.close();
    await until("alice offline", [observer], () => observer.isOnline("alice") === false);
    assert.deepEqual(summary(log).slice(3), ["left doc:1 alice closed", "offline alice closed"]);
  });
  test("gateway restarted, everyone back at their own jittered moment: no offline/online for those who stayed", TEST, async (t) => {
    const gw1 = await startGateway(t);
    const observer = client(t, gw1, "observer");
    const users = ["ann", "ben", "cid", "dot"];
    const tabs = users.map((u) => client(t, gw1, u));
    for (const c of [observer, ...tabs]) await open(c);
    for (const c of [observer, ...tabs]) await c.join("team");
    await observer.watch(users);
    const room = observer.room("team");
    await until("everyone in team", [room], () => room.members.size === 5);
    assert.ok(users.every((u) => observer.isOnline(u) === true));

    const log = recordEvents(observer);
    const everyone = [observer, ...tabs];
    const down = Promise.all(everyone.map((c) => until("reconnecting", [c], () => c.state === "reconnecting", "state")));
    await gw1.kill();
    await down;
    tabs[3].close(); // dot quits while the gateway is away
    const gw2 = await startGateway(t, gw1.port);
    await Promise.all(everyone.slice(0, 4).map((c) => until("back", [c], () => c.state === "open", "state")));
    await untilApi(gw2, "/v1/rooms/team", (r) => r.count === 4);
    await until("dot reported gone", [observer, room], () => observer.isOnline("dot") === false && !room.members.has("dot"));
    await observer.query(users);

    assert.deepEqual(summary(log).sort(), ["left team dot", "offline dot"]);
    assert.deepEqual([...room.members.keys()].sort(), ["ann", "ben", "cid", "observer"]);
    assert.ok(["ann", "ben", "cid"].every((u) => observer.isOnline(u) === true));
  });
});

describe("against the real gateway, with its offline grace", () => {
  // Longer than any wait here: an offline or left that shows up within a
  // test can only come from a sign-out, never from the grace running out.
  const LONG_GRACE = ["--dev", "--offline-grace-ms", "60000"];

  test("a dropped connection that reconnects within the grace is invisible: no offline, no online, no left, no joined, seq unchanged", TEST, async (t) => {
    const gw = await startGateway(t, 0, LONG_GRACE);
    const observer = client(t, gw, "observer");
    await open(observer);
    await observer.join("doc:1");
    const room = observer.room("doc:1");
    await observer.watch(["bob", "carol"]);
    // bob's reconnect waits its whole backoff bound, so the grace can be seen.
    const bob = client(t, gw, "bob", { reconnect: { minMs: 1000, maxMs: 1000 }, random: () => 1 });
    await open(bob);
    await bob.join("doc:1");
    await until("bob online and in doc:1", [observer, room], () => observer.isOnline("bob") === true && room.members.has("bob"));
    const seq = (await observer.query(["bob"]))[0].seq;
    const log = recordEvents(observer);

    // What a dropped network or the client's heartbeat timeout does: the
    // socket ends without a sign-out (4000, not 1000).
    bob._ws.close(4000, "test: the network dropped");
    await until("bob reconnecting", [bob], () => bob.state === "reconnecting", "state");
    const inGrace = await untilApi(gw, "/v1/users/bob", (u) => u.connections.length === 0);
    assert.equal(inGrace.online, true);
    assert.equal(typeof inGrace.grace_until_ms, "number");
    assert.deepEqual((await observer.query(["bob"]))[0], { user: "bob", online: true, seq });

    await until("bob back", [bob], () => bob.state === "open", "state");
    await untilApi(gw, "/v1/rooms/doc%3A1", (r) => r.users.includes("bob"));
    const back = await untilApi(gw, "/v1/users/bob", (u) => u.connections.length === 1);
    assert.equal(back.grace_until_ms, undefined, "the return ended the grace");
    // carol's online comes after anything bob's drop or return could have
    // caused for the observer (both were decided first).
    const carol = client(t, gw, "carol");
    await open(carol);
    await until("carol online", [observer], () => observer.isOnline("carol") === true);
    assert.deepEqual(summary(log), ["online carol"]);
    assert.deepEqual((await observer.query(["bob"]))[0], { user: "bob", online: true, seq });
    assert.ok(room.members.has("bob"));
  });

  test("close() is a sign-out: offline and left come at once, with reason closed, despite the grace", TEST, async (t) => {
    const gw = await startGateway(t, 0, LONG_GRACE);
    const observer = client(t, gw, "observer");
    await open(observer);
    await observer.join("doc:1");
    const room = observer.room("doc:1");
    await observer.watch(["bob"]);
    const bob = client(t, gw, "bob");
    await open(bob);
    await bob.join("doc:1");
    await until("bob in doc:1", [room], () => room.members.has("bob"));
    const log = recordEvents(observer);

    bob.close();
    await until("bob offline and gone from doc:1", [observer, room], () => observer.isOnline("bob") === false && !room.members.has("bob"));
    assert.deepEqual(summary(log), ["left doc:1 bob closed", "offline bob closed"]);
    const gone = await untilApi(gw, "/v1/users/bob", (u) => !u.online);
    assert.equal(gone.grace_until_ms, undefined);
  });
});

describe("against the real gateway: room state", () => {
  test("update() reaches the other members as updated, states follow snapshots and leaves, and calls are coalesced", TEST, async (t) => {
    const gw = await startGateway(t);
    const bob = client(t, gw, "bob");
    const alice = client(t, gw, "alice");
    for (const c of [bob, alice]) await open(c);
    await bob.join("doc:1");
    await alice.join("doc:1");
    const room = bob.room("doc:1");
    await until("alice in bob's doc:1", [room], () => room.members.has("alice"));
    const seen = [];
    bob.on("updated", (e) => seen.push(e));
    const ownEcho = [];
    alice.on("updated", (e) => ownEcho.push(e));

    // Twenty calls in one go: one frame now, then only the latest.
    const calls = [];
    for (let i = 0; i < 20; i++) calls.push(alice.update("doc:1", { i }));
    await Promise.all(calls);
    await until("bob has alice's final state", [room], () => room.states.get("alice")?.i === 19);
    assert.ok(seen.length <= 2, `at most two frames for twenty calls, bob saw ${seen.length}`);
    assert.deepEqual(seen.at(-1), { room: "doc:1", user: "alice", state: { i: 19 } });

    // A late joiner has it from the snapshot.
    const carol = client(t, gw, "carol");
    await open(carol);
    const members = await carol.join("doc:1");
    assert.deepEqual(members.find((m) => m.user === "alice"), { user: "alice", state: { i: 19 } });
    assert.deepEqual(carol.room("doc:1").states.get("alice"), { i: 19 });

    // Leaving drops it.
    await alice.leave("doc:1");
    await until("alice gone from bob's doc:1", [room], () => !room.members.has("alice"));
    assert.equal(room.states.has("alice"), false);
    await assert.rejects(alice.update("doc:1", { i: 20 }), (err) => err.code === "not_joined");
    assert.deepEqual(ownEcho, [], "a sender does not hear its own update");
  });
});

describe("against the real gateway, with tokens", () => {
  test("a 3 s token refreshed from getToken(): the connection outlives it, no reconnect", TEST, async (t) => {
    const gw = await startGateway(t, 0, JWT_ARGS);
    const issued = [];
    const getToken = () => {
      issued.push({ sub: "alice", exp: nowS() + 3 });
      return jwt(issued.at(-1));
    };
    const alice = client(t, gw, undefined, { getToken });
    const states = [];
    alice.on("state", (s) => states.push(s));
    const tokens = [];
    alice.on("token", (e) => tokens.push({ ...e, at: Date.now() }));
    await open(alice);
    const conn = alice.conn;
    assert.equal(alice.user, "alice");
    const firstExpMs = issued[0].exp * 1000;

    // The gateway checks expiry in whole seconds: one second past exp, a
    // connection still on the first token would be gone (4001).
    await until("a refresh after the first token's expiry", [alice], () => tokens.some((e) => e.at > firstExpMs + 1100), "token");
    assert.deepEqual((await alice.query(["alice"]))[0].online, true, "the socket still answers");
    assert.equal(alice.conn, conn, "the same connection: no reconnect");
    assert.deepEqual(states, ["connecting", "open"]);
    assert.ok(issued.length >= 3, `tokens issued: ${issued.length}`);
    for (const e of tokens) assert.ok(issued.some((claims) => claims.exp === e.expiresAt), "expiresAt is a token's exp");
  });

  test("refresh(): the gateway's refusals reject with its codes and keep the connection", TEST, async (t) => {
    const gw = await startGateway(t, 0, JWT_ARGS);
    const alice = client(t, gw, undefined, { token: jwt({ sub: "alice", exp: nowS() + 60 }) });
    const errors = [];
    alice.on("error", (e) => errors.push(e));
    await open(alice);
    const conn = alice.conn;
    await assert.rejects(alice.refresh(jwt({ sub: "alice", exp: nowS() - 5 })), (err) => {
      assert.equal(err.code, "invalid_token");
      assert.match(err.message, /^token_expired/);
      return true;
    });
    await assert.rejects(alice.refresh(jwt({ sub: "bob", exp: nowS() + 60 })), { code: "forbidden" });
    await assert.rejects(alice.refresh(jwt({ sub: "alice", exp: nowS() + 60 }, "another-secret")), { code: "invalid_token" });
    const exp = nowS() + 120;
    assert.deepEqual(await alice.refresh(jwt({ sub: "alice", exp })), { expiresAt: exp });
    assert.equal(alice.conn, conn);
    assert.equal(alice.state, "open");
    assert.deepEqual(errors, [], "a refused refresh() rejects; it is not also an error event");
  });

  test("subscribeFeed with a feed:true token hears a user it does not watch; without the claim: forbidden", TEST, async (t) => {
    const gw = await startGateway(t, 0, JWT_ARGS);
    const observer = client(t, gw, undefined, { token: jwt({ sub: "observer", exp: nowS() + 60, feed: true }) });
    const log = recordEvents(observer);
    await open(observer);
    assert.equal(await observer.subscribeFeed(), undefined);

    const alice = client(t, gw, undefined, { token: jwt({ sub: "alice", exp: nowS() + 60 }) });
    await open(alice);
    await until("alice online in the feed", [observer], () => summary(log).includes("online alice"), "online");
    alice.close();
    await until("alice offline in the feed", [observer], () => summary(log).includes("offline alice closed"), "offline");
    // The observer's own online may come through the feed as well (its
    // connection is written to the store after its welcome): not the point here.
    assert.deepEqual(summary(log).filter((e) => e.includes("alice")), ["online alice", "offline alice closed"]);
    assert.equal(observer.isOnline("alice"), undefined, "not watched: not in the local view");

    const plain = client(t, gw, undefined, { token: jwt({ sub: "plain", exp: nowS() + 60 }) });
    await open(plain);
    await assert.rejects(plain.subscribeFeed(), (err) => {
      assert.equal(err.code, "forbidden");
      return true;
    });
  });

  test("a handshake refused with 401: a static token stops at once; getToken gets one retry", TEST, async (t) => {
    const gw = await startGateway(t, 0, JWT_ARGS);
    const stale = client(t, gw, undefined, { token: jwt({ sub: "alice", exp: nowS() - 60 }) });
    const errors = [];
    stale.on("error", (e) => errors.push(e));
    stale.connect();
    await until("the stale token's client closed", [stale], () => stale.state === "closed", "state");
    assert.deepEqual(errors.map((e) => e.code), ["unauthorized"]);

    let calls = 0;
    const getToken = () => jwt({ sub: "alice", exp: ++calls === 1 ? nowS() - 60 : nowS() + 60 });
    const retried = client(t, gw, undefined, { getToken });
    await open(retried);
    assert.equal(calls, 2);
    assert.equal(retried.user, "alice");
  });
});
