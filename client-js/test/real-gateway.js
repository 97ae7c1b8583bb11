// The real presenced binary for the integration tests: started with --dev
// (or the arguments given) on a port of its own, killed when the test ends,
// and clients of it, with bounded waits on their events.
// The binary is $PRESENCED_BIN, else ../target/debug/presenced (cargo build).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { once } from "node:events";
import { fileURLToPath } from "node:url";

import { PresenceClient } from "../presenced.js";

export const BIN = process.env.PRESENCED_BIN || fileURLToPath(new URL("../../target/debug/presenced", import.meta.url));
export const WAIT_MS = 10000;
export const TEST = { timeout: 60000 };
export const FAST_RECONNECT = { minMs: 50, maxMs: 200 };

// Gateways still running when this process ends for any reason (a crash
// included) are killed; t.after() does it for each test that finishes.
const running = new Set();
process.on("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});

/** Start a gateway (`args`: --dev unless given) on `port` (0: any); killed when the test ends. */
export async function startGateway(t, port = 0, args = ["--dev"]) {
  assert.ok(
    existsSync(BIN),
    `presenced binary not found at ${BIN}: run \`cargo build\` in the repository root or set PRESENCED_BIN`,
  );
  assert.equal(typeof globalThis.WebSocket, "function", "run with node --experimental-websocket (npm test does)");
  // The port of a gateway just killed can take a moment to be free again.
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    try {
      return await spawnGateway(t, port, args);
    } catch (err) {
      if (port === 0 || Date.now() > deadline) throw err;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
}

async function spawnGateway(t, port, args) {
  const child = spawn(BIN, [...args, "--listen", `127.0.0.1:${port}`], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, PRESENCED_LOG: process.env.PRESENCED_LOG ?? "warn" },
  });
  running.add(child);
  const exited = once(child, "exit").then(() => running.delete(child));
  const gateway = {
    child,
    addr: "",
    port: 0,
    async kill() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGKILL");
        await exited;
      }
    },
  };
  t.after(() => gateway.kill());
  let stderr = "";
  child.stderr.on("data", (d) => {
    stderr = (stderr + d).slice(-4000);
  });
  gateway.addr = await new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`gateway did not start within ${WAIT_MS} ms:\n${stderr}`)), WAIT_MS);
    child.stdout.on("data", (d) => {
      out += d;
      const m = /presenced listening on (\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`gateway exited (${code ?? signal}) before listening:\n${stderr}`));
    });
  });
  gateway.port = Number(gateway.addr.split(":").at(-1));
  return gateway;
}

/** A client of `gateway` as `user`; closed when the test ends. */
export function client(t, gateway, user, options = {}) {
  const c = new PresenceClient(`ws://127.0.0.1:${gateway.port}/ws`, {
    user,
    WebSocket: globalThis.WebSocket,
    reconnect: FAST_RECONNECT,
    requestTimeoutMs: WAIT_MS,
    ...options,
  });
  t.after(() => c.close());
  return c;
}

/** Resolve when `check()` holds, re-checked on every `event` of the emitters; fail after WAIT_MS. */
export function until(what, emitters, check, event = "change") {
  return new Promise((resolve, reject) => {
    const listeners = [];
    const done = (err) => {
      clearTimeout(timer);
      for (const [em, fn] of listeners) em.off(event, fn);
      if (err) reject(err);
      else resolve();
    };
    const timer = setTimeout(() => done(new Error(`timed out after ${WAIT_MS} ms waiting for ${what}`)), WAIT_MS);
    for (const em of emitters) {
      const fn = () => {
        if (check()) done();
      };
      listeners.push([em, fn]);
      em.on(event, fn);
    }
    if (check()) done();
  });
}

/** Connect and wait for the welcome. */
export async function open(c) {
  c.connect();
  await until(`${c.url} open`, [c], () => c.state === "open");
}

/** Poll a /v1 endpoint of `gateway` until `check(body)` holds (the HTTP API has no push). */
export async function untilApi(gateway, path, check) {
  const deadline = Date.now() + WAIT_MS;
  let body;
  while (Date.now() < deadline) {
    body = await (await fetch(`http://${gateway.addr}${path}`)).json();
    if (check(body)) return body;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  throw new Error(`timed out waiting on ${path}; last answer ${JSON.stringify(body)}`);
}
