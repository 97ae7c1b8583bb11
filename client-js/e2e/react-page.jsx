// The React test page for e2e/run.mjs, bundled with esbuild when the test
// runs: the hooks of ../react.js on a client of the gateway named by ?gw=.
//
//   /?gw=HOST:PORT&user=NAME&room=ROOM[&watch=USER]
//
// For the test: li[data-user][data-state] per member, #mine this user's own
// state, #online[data-online] the watched user, #bump sets a new state,
// #toggle unmounts (and mounts again) the room's component.
import { useState } from "react";
import { createRoot } from "react-dom/client";

import { PresenceClient } from "../presenced.js";
import { PresenceProvider, useMyState, useOnline, usePresence } from "../react.js";

const query = new URLSearchParams(location.search);
const client = new PresenceClient(`ws://${query.get("gw")}/ws`, { user: query.get("user") });
client.on("state", (state) => { document.body.dataset.state = state; });
client.connect();
window.presence = client;

function Room({ room }) {
  const members = usePresence(room);
  const [mine, setMine] = useMyState(room);
  return (
    <section data-room={room}>
      <ul>
        {members.map((m) => (
          <li key={m.user} data-user={m.user} data-state={JSON.stringify(m.state ?? null)}>
            {m.user} {m.state ? JSON.stringify(m.state) : ""}
          </li>
        ))}
      </ul>
      <button id="bump" onClick={() => setMine((prev) => ({ count: (prev?.count ?? 0) + 1 }))}>bump</button>
      <output id="mine">{JSON.stringify(mine ?? null)}</output>
    </section>
  );
}

function Online({ user }) {
  const online = useOnline(user);
  return <p id="online" data-online={String(online)}>{user}: {String(online)}</p>;
}

function App() {
  const [inRoom, setInRoom] = useState(true);
  const watch = query.get("watch");
  return (
    <PresenceProvider client={client}>
      <button id="toggle" onClick={() => setInRoom((v) => !v)}>toggle</button>
      {inRoom && <Room room={query.get("room")} />}
      {watch && <Online user={watch} />}
    </PresenceProvider>
  );
}

createRoot(document.getElementById("root")).render(<App />);
