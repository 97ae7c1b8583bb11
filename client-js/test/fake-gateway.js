// A fake WebSocket class whose instances the test drives as the gateway
// would: open, welcome, replies matched to the last request's ref, events,
// and closes with any code. Nothing here touches the network.

/** Resolve after pending promise callbacks ran (setImmediate is not mocked). */
export const flush = () => new Promise((resolve) => setImmediate(resolve));

/** A fresh fake WebSocket class and the list of sockets it created. */
export function fakeWebSocket() {
  const sockets = [];

  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedByClient = undefined;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      sockets.push(this);
    }

    // ---- the client's side ----
    send(data) {
      if (this.readyState !== 1) throw new Error("send on a socket that is not open");
      this.sent.push(JSON.parse(data));
    }

    // A close() with no code sends none (the gateway sees 1005, not the
    // sign-out 1000): recorded as null, told apart from never closed.
    close(code) {
      this.closedByClient = code ?? null;
      this.readyState = 3;
    }

    // ---- the gateway's side ----
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }

    frame(obj) {
      this.onmessage?.({ data: JSON.stringify(obj) });
    }

    welcome(fields = {}) {
      this.open();
      this.frame({ type: "welcome", conn: `c${sockets.length}`, user: "me", node: "n1", heartbeat_ms: 25000, ...fields });
    }

    /** The frames of `type` the client sent. */
    sentOf(type) {
      return this.sent.filter((f) => f.type === type);
    }

    /** Answer the last `type` request with `fields`. */
    reply(type, fields = {}) {
      const req = this.sentOf(type).at(-1);
      if (!req) throw new Error(`no ${type} request sent; sent: ${JSON.stringify(this.sent)}`);
      this.frame({ type: "reply", ref: req.ref, ok: true, ...fields });
      return req;
    }

    /** Answer a watch request with the states in `states` (user → [online, seq]). */
    replyWatch(states, index = -1) {
      const req = this.sentOf("watch").at(index);
      const users = req.users.map((user) => {
        const [online, seq] = states[user] ?? [false, 0];
        return { user, online, seq };
      });
      this.frame({ type: "reply", ref: req.ref, ok: true, users });
    }

    /** The gateway (or the network) ends the connection. */
    drop(code = 1006) {
      this.readyState = 3;
      this.onclose?.({ code });
    }
  }

  return { WebSocket: FakeSocket, sockets };
}

/**
 * A JWT-shaped token carrying `claims`, signed with nothing real: the client
 * only reads `exp` from it, the fake gateway verifies nothing.
 */
export function fakeJwt(claims) {
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  return `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}.c2lnbmF0dXJl`;
}

/** Record every application event of `client` in arrival order. */
export function recordEvents(client) {
  const log = [];
  for (const event of ["online", "offline", "joined", "left", "error"]) {
    client.on(event, (payload) => log.push([event, payload]));
  }
  return log;
}

/** Only the presence and membership events, as compact strings ("offline bob closed"). */
export function summary(log) {
  return log
    .filter(([event]) => event !== "error")
    .map(([event, p]) => [event, p.room, p.user, p.reason].filter((x) => x !== undefined).join(" "));
}
