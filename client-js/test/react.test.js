// The React bindings (react.js) against the real gateway: components
// rendered with react-dom into a happy-dom document, clients of a --dev
// gateway moving presence under them.
//
// act() wraps what the test does to the tree (render, unmount), so the
// hooks' effects (their join, leave, watch, unwatch) have run when it
// returns; what the gateway pushes renders on its own, outside act, and
// the test waits for it in the DOM (a MutationObserver, bounded).
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Window } from "happy-dom";

import { client, open, startGateway, TEST, until, untilApi, WAIT_MS } from "./real-gateway.js";

// react-dom looks for a DOM when it is loaded: install happy-dom's first.
const window = new Window();
globalThis.window = window;
globalThis.document = window.document;
if (globalThis.navigator === undefined) globalThis.navigator = window.navigator;
const React = await import("react");
const { createRoot } = await import("react-dom/client");
const { PresenceProvider, useMyState, useOnline, usePresence } = await import("../react.js");

const h = React.createElement;

/** A react root in a fresh container; unmounted when the test ends. */
function mount(t) {
  const container = document.createElement("div");
  document.body.appendChild(container);
  const root = createRoot(container);
  const view = {
    container,
    async render(element) {
      await inAct(() => root.render(element));
    },
    async unmount() {
      await inAct(() => root.unmount());
    },
    /** Resolve when `check(container)` holds, re-checked on every DOM mutation; fail after WAIT_MS. */
    until(what, check) {
      return new Promise((resolve, reject) => {
        const observer = new window.MutationObserver(() => {
          if (check(container)) done();
        });
        const timer = setTimeout(
          () => done(new Error(`timed out after ${WAIT_MS} ms waiting for ${what}; the DOM: ${container.innerHTML}`)),
          WAIT_MS,
        );
        function done(err) {
          clearTimeout(timer);
          observer.disconnect();
          if (err) reject(err);
          else resolve();
        }
        observer.observe(container, { childList: true, subtree: true, characterData: true, attributes: true });
        if (check(container)) done();
      });
    },
  };
  t.after(() => view.unmount());
  return view;
}

async function inAct(fn) {
  globalThis.IS_REACT_ACT_ENVIRONMENT = true;
  try {
    await React.act(async () => fn());
  } finally {
    globalThis.IS_REACT_ACT_ENVIRONMENT = false;
  }
}

/** The rendered members list: "user=state" for each, in order. */
const shownMembers = (container) =>
  [...container.querySelectorAll("li[data-user]")].map((li) => li.textContent);

function Members({ room }) {
  const members = usePresence(room);
  return h("ul", null, members.map((m) =>
    h("li", { key: m.user, "data-user": m.user }, `${m.user}=${JSON.stringify(m.state ?? null)}`)));
}

/** The room's members and this user's own state; `controls.set` is its setState. */
function Doc({ room, controls }) {
  const [mine, setMine] = useMyState(room);
  controls.set = setMine;
  return h("div", null, h(Members, { room }), h("p", { id: "mine" }, JSON.stringify(mine ?? null)));
}

function Online({ user }) {
  const online = useOnline(user);
  return h("p", { id: "online" }, String(online));
}

const roomPath = (room) => `/v1/rooms/${encodeURIComponent(room)}`;

describe("React bindings against the real gateway", () => {
  test("usePresence and useMyState show the members and their live state; a member who leaves is gone", TEST, async (t) => {
    const gw = await startGateway(t);
    const viewer = client(t, gw, "viewer");
    await open(viewer);
    const controls = {};
    const page = mount(t);
    await page.render(h(PresenceProvider, { client: viewer }, h(Doc, { room: "doc:1", controls })));
    await page.until("the viewer listed in doc:1", (c) => shownMembers(c).join() === "viewer=null");

    const alice = client(t, gw, "alice");
    await open(alice);
    await alice.join("doc:1", { device: "phone" });
    await page.until("alice listed", (c) => shownMembers(c).join() === "alice=null,viewer=null");
    await alice.update("doc:1", { cursor: 1 });
    await page.until("alice's state", (c) => shownMembers(c).join() === 'alice={"cursor":1},viewer=null');
    await alice.update("doc:1", { cursor: 2 });
    await page.until("alice's next state", (c) => shownMembers(c).join() === 'alice={"cursor":2},viewer=null');

    // The hook's own state shows at once, before the gateway has it; alice
    // hears it as an updated.
    await inAct(() => controls.set({ typing: true }));
    assert.equal(page.container.querySelector("#mine").textContent, '{"typing":true}');
    const aliceRoom = alice.room("doc:1");
    await until("alice hears the viewer's state", [aliceRoom],
      () => JSON.stringify(aliceRoom.states.get("viewer")) === '{"typing":true}');
    await inAct(() => controls.set((prev) => ({ ...prev, typing: false })));
    assert.equal(page.container.querySelector("#mine").textContent, '{"typing":false}');
    await until("alice hears the viewer stop typing", [aliceRoom],
      () => JSON.stringify(aliceRoom.states.get("viewer")) === '{"typing":false}');

    await alice.leave("doc:1");
    // The client's own update() is not echoed to it: its own state in the
    // members list is what the gateway's snapshots said (none here).
    await page.until("alice gone", (c) => shownMembers(c).join() === "viewer=null");
  });

  test("useMyState starts from the state the room already holds for this user", TEST, async (t) => {
    const gw = await startGateway(t);
    const otherTab = client(t, gw, "viewer");
    await open(otherTab);
    await otherTab.join("doc:1");
    await otherTab.update("doc:1", { page: 3 });
    const viewer = client(t, gw, "viewer");
    await open(viewer);
    const page = mount(t);
    await page.render(h(PresenceProvider, { client: viewer }, h(Doc, { room: "doc:1", controls: {} })));
    await page.until("the state from the join snapshot", (c) => c.querySelector("#mine")?.textContent === '{"page":3}');
  });

  test("useOnline flips when the user connects and signs out; the last hook unwatches", TEST, async (t) => {
    const gw = await startGateway(t);
    const viewer = client(t, gw, "viewer");
    await open(viewer);
    const page = mount(t);
    const shown = (c) => c.querySelector("#online")?.textContent;
    await page.render(h(PresenceProvider, { client: viewer }, h(Online, { user: "bob" })));
    await page.until("bob offline", (c) => shown(c) === "false");

    const bob = client(t, gw, "bob");
    await open(bob);
    await page.until("bob online", (c) => shown(c) === "true");
    bob.close();
    await page.until("bob offline again", (c) => shown(c) === "false");

    await page.unmount();
    assert.equal(viewer.isOnline("bob"), undefined, "bob still watched after the last useOnline unmounted");
  });

  test("two components on one room: unmounting one keeps it joined, unmounting both leaves; a room the app joined stays", TEST, async (t) => {
    const gw = await startGateway(t);
    const viewer = client(t, gw, "viewer");
    await open(viewer);
    await viewer.join("lobby");
    const page = mount(t);
    const tree = (first, second) => h(PresenceProvider, { client: viewer },
      first ? h(Members, { room: "doc:1" }) : null,
      second ? h(Members, { room: "doc:1" }) : null,
      first ? h(Members, { room: "lobby" }) : null);
    const isMember = (r) => r.users.includes("viewer");

    await page.render(tree(true, true));
    await untilApi(gw, roomPath("doc:1"), isMember);

    await page.render(tree(false, true));
    // A leave sent by the unmount would be answered before this query (one
    // connection, frames in order), so the room page after it is settled.
    await viewer.query(["nobody"]);
    assert.ok(isMember(await (await fetch(`http://${gw.addr}${roomPath("doc:1")}`)).json()),
      "the viewer left doc:1 while a component still used it");
    assert.ok(isMember(await (await fetch(`http://${gw.addr}${roomPath("lobby")}`)).json()),
      "the hook left the lobby, which the application had joined itself");

    await page.render(tree(false, false));
    await untilApi(gw, roomPath("doc:1"), (r) => !isMember(r));
    assert.equal(viewer.room("doc:1").members.size, 0);
    assert.ok(isMember(await (await fetch(`http://${gw.addr}${roomPath("lobby")}`)).json()), "the lobby was left");
  });
});
