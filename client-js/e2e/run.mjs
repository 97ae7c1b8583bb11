// Browser end-to-end test: the real gateway, a real Chromium, the demo page
// the gateway serves at / (which imports the client from /client.js), and a
// React page using the hooks of react.js (e2e/react-page.jsx, bundled with
// esbuild at test time and served by a small HTTP server of this script).
//
//   node e2e/run.mjs                  from client-js/, after `npm ci`
//   node e2e/run.mjs --update-docs    also copies the screenshot to ../docs/demo.png
//
// The gateway binary is $PRESENCED_BIN, else ../target/debug/presenced; the
// browser is /usr/bin/chromium (never downloaded). Every wait is bounded;
// the gateway and the browser are killed on any exit. Exit code 0 only when
// every check passed. Output (screenshot, gateway logs) goes to e2e/output/.

import { spawn } from "node:child_process";
import { copyFileSync, createWriteStream, existsSync, mkdirSync } from "node:fs";
import { createServer as createHttpServer } from "node:http";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const outputDir = join(here, "output");
const repoRoot = resolve(here, "..", "..");
const CHROMIUM = "/usr/bin/chromium";
const BIN = process.env.PRESENCED_BIN || join(repoRoot, "target", "debug", "presenced");

/** How long anything the protocol promises may take to show up. */
const EVENT_TIMEOUT_MS = 10_000;
/** How long "nothing happens" is watched for. */
const QUIET_WINDOW_MS = 1_000;
/** The whole run, so a hang fails instead of blocking CI. */
const RUN_TIMEOUT_MS = 120_000;

const started = Date.now();
const elapsed = () => `${((Date.now() - started) / 1000).toFixed(1)}s`;
const step = (message) => console.log(`[${elapsed()}] ${message}`);

function fail(message) {
  throw new Error(message);
}

// --- prerequisites ------------------------------------------------------

if (!existsSync(BIN)) {
  console.error(`e2e: gateway binary not found at ${BIN}: run \`cargo build\` or set PRESENCED_BIN`);
  process.exit(2);
}
if (!existsSync(CHROMIUM)) {
  console.error(`e2e: ${CHROMIUM} not found: apt-get install chromium`);
  process.exit(2);
}
let chromium;
let esbuild;
try {
  ({ chromium } = await import("playwright-core"));
  esbuild = await import("esbuild");
} catch (error) {
  console.error(`e2e: cannot load playwright-core or esbuild (${error.message}): cd client-js && npm ci`);
  process.exit(2);
}

// --- processes ----------------------------------------------------------

mkdirSync(outputDir, { recursive: true });
const cleanups = [];
let gateway = null;

async function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

/** Starts `presenced --dev` on `port`; resolves once it prints its listen line. */
function startGateway(port, run) {
  const log = createWriteStream(join(outputDir, `gateway-${run}.log`));
  const env = { ...process.env };
  for (const key of Object.keys(env)) if (key.startsWith("PRESENCED_")) delete env[key];
  const child = spawn(BIN, ["--dev", "--listen", `127.0.0.1:${port}`], {
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  child.stderr.pipe(log);
  const ready = new Promise((resolveReady, reject) => {
    let stdout = "";
    const timer = setTimeout(() => reject(new Error(`gateway did not listen within ${EVENT_TIMEOUT_MS} ms`)), EVENT_TIMEOUT_MS);
    child.stdout.on("data", (chunk) => {
      stdout += chunk;
      if (stdout.includes("presenced listening on ")) {
        clearTimeout(timer);
        resolveReady();
      }
    });
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`gateway exited before listening (code ${code}, signal ${signal}); see ${log.path}`));
    });
  });
  const exited = new Promise((resolveExit) => child.on("exit", resolveExit));
  gateway = { child, exited, port };
  return ready.then(() => gateway);
}

async function killGateway() {
  if (!gateway || gateway.child.exitCode !== null || gateway.child.signalCode !== null) return;
  gateway.child.kill("SIGKILL");
  await withTimeout(gateway.exited, 5_000, "killed gateway did not exit");
}

function withTimeout(promise, ms, message) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(message)), ms); }),
  ]).finally(() => clearTimeout(timer));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

process.on("exit", () => {
  if (gateway && gateway.child.exitCode === null && gateway.child.signalCode === null) {
    gateway.child.kill("SIGKILL");
  }
});
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => process.exit(130));
}

// --- page helpers -------------------------------------------------------

let base;

/** Opens the demo page as `user`, and waits until its client is open. */
async function openAs(context, user, { rooms = [], watch = [] } = {}) {
  const page = await context.newPage();
  page.on("pageerror", (error) => console.error(`  [${user}] page error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") console.error(`  [${user}] console: ${message.text()}`);
  });
  const query = new URLSearchParams({ user });
  if (rooms.length) query.set("rooms", rooms.join(","));
  if (watch.length) query.set("watch", watch.join(","));
  await page.goto(`${base}/?${query}`, { timeout: EVENT_TIMEOUT_MS });
  await waitForState(page, "open");
  return page;
}

/** Opens the demo page's sign-in form, signs in as `user`, watches `watch` through the form. */
async function signInThroughTheForm(context, user, watch) {
  const page = await context.newPage();
  page.on("pageerror", (error) => console.error(`  [${user}] page error: ${error.message}`));
  await page.goto(`${base}/`, { timeout: EVENT_TIMEOUT_MS });
  await page.fill("#signin-user", user, { timeout: EVENT_TIMEOUT_MS });
  await Promise.all([
    page.waitForURL(`${base}/?user=${user}`, { timeout: EVENT_TIMEOUT_MS }),
    page.click("#signin-form button", { timeout: EVENT_TIMEOUT_MS }),
  ]);
  await waitForState(page, "open");
  await page.fill("#watch-user", watch, { timeout: EVENT_TIMEOUT_MS });
  await page.press("#watch-user", "Enter", { timeout: EVENT_TIMEOUT_MS });
  return page;
}

async function waitForState(page, state) {
  await page.waitForSelector(`body[data-state="${state}"]`, { timeout: EVENT_TIMEOUT_MS, state: "attached" });
}

/** Waits until `fn(arg)`, evaluated in `page`, is true. */
async function until(page, what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: EVENT_TIMEOUT_MS, polling: 50 });
  } catch (error) {
    fail(`timed out after ${EVENT_TIMEOUT_MS} ms waiting for: ${what}`);
  }
}

/** The events of `type` about `user` that `page` received so far. */
function eventsOf(page, type, user) {
  return page.evaluate(
    ([type, user]) => window.presenceLog.filter((e) => e.type === type && e.user === user).length,
    [type, user],
  );
}

async function expectCount(page, type, user, expected) {
  const count = await eventsOf(page, type, user);
  if (count !== expected) fail(`expected ${expected} "${type}" event(s) for ${user}, saw ${count}`);
}

const isOnline = (user) => window.presence.isOnline(user) === true;
const isOffline = (user) => window.presence.isOnline(user) === false;
const roomIs = ([room, users]) => {
  const members = [...window.presence.room(room).members.keys()].sort();
  const shown = [...document.querySelectorAll(`[data-room="${room}"] [data-user]`)]
    .map((li) => li.dataset.user).sort();
  const want = [...users].sort();
  return JSON.stringify(members) === JSON.stringify(want) && JSON.stringify(shown) === JSON.stringify(want);
};
const dotIs = ([user, online]) =>
  document.querySelector(`#people [data-user="${user}"]`)?.dataset.online === String(online);

// --- the scenario -------------------------------------------------------

async function manyTabsOneUser(browser) {
  step("three tabs of one user: one online, one offline");
  const context = await browser.newContext();
  const observer = await signInThroughTheForm(context, "observer", "alice");
  await until(observer, "observer knows alice is offline", isOffline, "alice");
  await until(observer, "the dot of alice is grey", dotIs, ["alice", false]);

  const alice = [];
  for (let i = 0; i < 3; i++) alice.push(await openAs(context, "alice"));
  await until(observer, "observer sees alice online", isOnline, "alice");
  await until(observer, "the dot of alice turns green", dotIs, ["alice", true]);
  await sleep(QUIET_WINDOW_MS);
  await expectCount(observer, "online", "alice", 1);

  await alice[0].close();
  await alice[1].close();
  await sleep(QUIET_WINDOW_MS);
  await expectCount(observer, "offline", "alice", 0);
  if (!(await observer.evaluate(isOnline, "alice"))) fail("alice went offline with a tab still open");

  await alice[2].close();
  await until(observer, "observer sees alice offline", isOffline, "alice");
  await sleep(QUIET_WINDOW_MS);
  await expectCount(observer, "offline", "alice", 1);
  await expectCount(observer, "online", "alice", 1);
  await context.close();
}

async function reloadIsInvisible(browser) {
  step("a page reload within the offline grace: watchers and room members see nothing");
  const context = await browser.newContext();
  const observer = await openAs(context, "observer", { rooms: ["lobby"], watch: ["rita", "sam"] });
  const rita = await openAs(context, "rita", { rooms: ["lobby"] });
  await until(observer, "observer sees rita online", isOnline, "rita");
  await until(observer, "the lobby shows rita", roomIs, ["lobby", ["observer", "rita"]]);

  // The unload closes the socket without a sign-out (the page never calls
  // close()), so the gateway holds rita for its grace (5 s by default).
  await rita.reload({ timeout: EVENT_TIMEOUT_MS });
  await waitForState(rita, "open");
  await until(rita, "rita's reloaded page is back in the lobby", roomIs, ["lobby", ["observer", "rita"]]);
  // sam's online is decided after rita's return, so the observer has
  // everything rita's reload caused once it shows sam.
  const sam = await openAs(context, "sam");
  await until(observer, "observer sees sam online", isOnline, "sam");
  for (const type of ["offline", "left"]) await expectCount(observer, type, "rita", 0);
  for (const type of ["online", "joined"]) await expectCount(observer, type, "rita", 1);
  if (!(await observer.evaluate(roomIs, ["lobby", ["observer", "rita"]]))) fail("rita is missing from the lobby after her reload");

  // The demo's "sign out" is close(): a sign-out, no grace (that it is
  // at once, the node suite checks against a 60 s grace).
  await sam.click("#signout", { timeout: EVENT_TIMEOUT_MS });
  await until(observer, "observer sees sam offline after the sign-out", isOffline, "sam");
  await context.close();
}

async function roomStateIsLive(browser) {
  step("room state: what one page types in a room shows live on the other");
  const context = await browser.newContext();
  const observer = await openAs(context, "observer", { rooms: ["notes"] });
  const tess = await openAs(context, "tess", { rooms: ["notes"] });
  await until(observer, "the notes room shows tess", roomIs, ["notes", ["observer", "tess"]]);
  await tess.fill('[data-note="notes"]', "drawing the cover", { timeout: EVENT_TIMEOUT_MS });
  await until(observer, "observer sees what tess is doing", () =>
    document.querySelector('[data-room="notes"] [data-doing="tess"]')?.textContent === "drawing the cover");
  // A late joiner gets it from the snapshot.
  const uma = await openAs(context, "uma", { rooms: ["notes"] });
  await until(uma, "uma's snapshot shows what tess is doing", () =>
    document.querySelector('[data-room="notes"] [data-doing="tess"]')?.textContent === "drawing the cover");
  await context.close();
}

async function gatewayRestart(browser, port) {
  step("a room, a kill -9 and a restart on the same port");
  const context = await browser.newContext({ viewport: { width: 1000, height: 470 } });
  const observer = await openAs(context, "observer", { rooms: ["lobby", "doc:1"], watch: ["ann", "ben"] });
  const ann = await openAs(context, "ann", { rooms: ["lobby", "doc:1"] });
  const ben = await openAs(context, "ben", { rooms: ["lobby"] });
  const everyone = ["ann", "ben", "observer"];
  await until(observer, "ann and ben online", (users) => users.every((u) => window.presence.isOnline(u) === true), ["ann", "ben"]);
  await until(observer, "lobby shows all three", roomIs, ["lobby", everyone]);
  await until(ann, "ann's lobby shows all three", roomIs, ["lobby", everyone]);

  step("screenshot of the demo page");
  const shot = join(outputDir, "demo.png");
  await observer.screenshot({ path: shot });
  if (process.argv.includes("--update-docs")) {
    copyFileSync(shot, join(repoRoot, "docs", "demo.png"));
    step("copied to docs/demo.png");
  }

  step("SIGKILL the gateway");
  await killGateway();
  for (const [name, page] of [["observer", observer], ["ann", ann], ["ben", ben]]) {
    await until(page, `${name} notices the gateway is gone`, () => window.presence.state === "reconnecting");
  }

  step(`restart on port ${port}`);
  await startGateway(port, 2);
  for (const page of [observer, ann, ben]) await waitForState(page, "open");
  await until(observer, "ann and ben online again", (users) => users.every((u) => window.presence.isOnline(u) === true), ["ann", "ben"]);
  await until(observer, "the lobby is whole again", roomIs, ["lobby", everyone]);
  await until(ann, "ann's lobby is whole again", roomIs, ["lobby", everyone]);
  await until(observer, "ann's and ben's dots are green", (users) => users.every((u) =>
    document.querySelector(`#people [data-user="${u}"]`)?.dataset.online === "true"), ["ann", "ben"]);

  step("leave and join again through the page");
  await observer.click(`[data-room="doc:1"] header button`, { timeout: EVENT_TIMEOUT_MS });
  await until(ann, "ann sees the observer leave doc:1", roomIs, ["doc:1", ["ann"]]);
  await observer.fill("#join-room", "doc:1", { timeout: EVENT_TIMEOUT_MS });
  await observer.press("#join-room", "Enter", { timeout: EVENT_TIMEOUT_MS });
  await until(ann, "ann sees the observer back in doc:1", roomIs, ["doc:1", ["ann", "observer"]]);
  await until(observer, "the observer's doc:1 card is back", roomIs, ["doc:1", ["ann", "observer"]]);

  step("live events still flow after the restart");
  await ben.close();
  await until(observer, "observer sees ben offline", isOffline, "ben");
  await until(observer, "ben left the lobby", roomIs, ["lobby", ["ann", "observer"]]);
  await until(ann, "ann sees ben leave", roomIs, ["lobby", ["ann", "observer"]]);
  await context.close();
}

async function importFromAnotherOrigin(browser, port) {
  step("a page on another origin imports /client.js");
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${base}/`, { timeout: EVENT_TIMEOUT_MS });
  // localhost and 127.0.0.1 are two origins: this import is cross-origin.
  const url = `http://localhost:${port}/client.js`;
  const exported = await withTimeout(
    page.evaluate(async (url) => typeof (await import(url)).PresenceClient, url),
    EVENT_TIMEOUT_MS,
    `import(${url}) did not settle`,
  );
  if (exported !== "function") fail(`import(${url}) gave PresenceClient of type ${exported}`);
  await context.close();
}

/**
 * Bundles e2e/react-page.jsx (react, react-dom, the client and its hooks)
 * and serves it on a port of its own; resolves with its base URL.
 */
async function serveReactPage() {
  const built = await esbuild.build({
    entryPoints: [join(here, "react-page.jsx")],
    bundle: true,
    write: false,
    format: "esm",
    jsx: "automatic",
    define: { "process.env.NODE_ENV": '"development"' },
    logLevel: "silent",
  });
  const script = built.outputFiles[0].contents;
  const html = '<!doctype html><meta charset="utf-8"><title>presenced react</title><link rel="icon" href="data:,">'
    + '<div id="root"></div><script type="module" src="/page.js"></script>';
  const server = createHttpServer((req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    if (path === "/") res.writeHead(200, { "content-type": "text/html" }).end(html);
    else if (path === "/page.js") res.writeHead(200, { "content-type": "text/javascript" }).end(script);
    else res.writeHead(404).end();
  });
  await new Promise((resolveListen, reject) => {
    server.on("error", reject);
    server.listen(0, "127.0.0.1", resolveListen);
  });
  cleanups.push(() => new Promise((resolveClose) => server.close(resolveClose)));
  return `http://127.0.0.1:${server.address().port}`;
}

const memberState = ([user, state]) =>
  document.querySelector(`li[data-user="${user}"]`)?.dataset.state === state;
const members = (users) =>
  JSON.stringify([...document.querySelectorAll("li[data-user]")].map((li) => li.dataset.user)) === JSON.stringify(users);
const onlineIs = (online) => document.querySelector("#online")?.dataset.online === online;

async function reactHooks(browser, port) {
  step("a React page: usePresence, useMyState, useOnline");
  const pageBase = await serveReactPage();
  const context = await browser.newContext();
  const openReact = async (user, watch) => {
    const page = await context.newPage();
    page.on("pageerror", (error) => console.error(`  [react ${user}] page error: ${error.message}`));
    page.on("console", (message) => {
      if (message.type() === "error") console.error(`  [react ${user}] console: ${message.text()}`);
    });
    const query = new URLSearchParams({ gw: `127.0.0.1:${port}`, user, room: "react:1" });
    if (watch) query.set("watch", watch);
    await page.goto(`${pageBase}/?${query}`, { timeout: EVENT_TIMEOUT_MS });
    await waitForState(page, "open");
    return page;
  };
  const rachel = await openReact("rachel", "ron");
  await until(rachel, "rachel lists herself in react:1", members, ["rachel"]);
  await until(rachel, "ron shown offline", onlineIs, "false");

  const ron = await openReact("ron");
  await until(rachel, "rachel lists ron", members, ["rachel", "ron"]);
  await until(rachel, "ron shown online", onlineIs, "true");

  await ron.click("#bump", { timeout: EVENT_TIMEOUT_MS });
  await ron.click("#bump", { timeout: EVENT_TIMEOUT_MS });
  await until(ron, "ron's own state shows at once", () => document.querySelector("#mine")?.textContent === '{"count":2}');
  await until(rachel, "rachel sees ron's live state", memberState, ["ron", '{"count":2}']);

  // Unmounting ron's only usePresence/useMyState leaves the room; his
  // connection stays, so he is still online. (Users and room of their own:
  // the closed pages stay online for the gateway's grace.)
  await ron.click("#toggle", { timeout: EVENT_TIMEOUT_MS });
  await until(rachel, "ron gone from rachel's list", members, ["rachel"]);
  if (!(await rachel.evaluate(onlineIs, "true"))) fail("ron shown offline after leaving a room");
  await context.close();
}

async function main() {
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  step(`gateway ${BIN} on ${base}`);
  await startGateway(port, 1);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    // The machine's network is closed: no background calls home.
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
    ],
    timeout: 30_000,
  });
  cleanups.push(() => browser.close());
  await importFromAnotherOrigin(browser, port);
  await reactHooks(browser, port);
  await manyTabsOneUser(browser);
  await reloadIsInvisible(browser);
  await roomStateIsLive(browser);
  await gatewayRestart(browser, port);
}

const deadline = setTimeout(() => {
  console.error(`e2e: FAILED: the run took longer than ${RUN_TIMEOUT_MS} ms`);
  process.exit(1);
}, RUN_TIMEOUT_MS);

let code = 0;
try {
  await main();
  step("e2e: all checks passed");
} catch (error) {
  console.error(`e2e: FAILED after ${elapsed()}: ${error.stack || error}`);
  console.error(`gateway logs: ${outputDir}/gateway-*.log`);
  code = 1;
}
for (const cleanup of cleanups.reverse()) {
  await withTimeout(Promise.resolve().then(cleanup), 10_000, "cleanup timed out").catch(() => {});
}
await killGateway().catch(() => {});
clearTimeout(deadline);
process.exit(code);
