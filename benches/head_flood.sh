#!/usr/bin/env bash
# What endless request heads cost the gateway: CONNECTIONS sockets each send
# BYTES of a request head that never ends, and hold the socket for HOLD_S
# seconds (or until the gateway closes it). Prints the gateway's RSS before,
# at its peak during the flood, and after it (VmRSS, sampled every 20 ms).
#
#   benches/head_flood.sh [CONNECTIONS] [BYTES] [HOLD_S]
#
# GATEWAY=path/to/presenced measures another build (default: the release
# build of this checkout); extra gateway flags go in GATEWAY_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
connections=${1:-500}
bytes=${2:-389120}
hold=${3:-5}
gateway=${GATEWAY:-./target/release/presenced}
[ -z "${GATEWAY:-}" ] && cargo build --release --quiet --bin presenced
ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d)
cleanup() {
  [ -n "${gw_pid:-}" ] && kill "$gw_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# shellcheck disable=SC2086
"$gateway" --dev --listen 127.0.0.1:0 ${GATEWAY_ARGS:-} >"$work/gw.out" 2>"$work/gw.err" &
gw_pid=$!
for _ in $(seq 100); do grep -q listening "$work/gw.out" 2>/dev/null && break; sleep 0.1; done
port=$(grep -o '[0-9]*$' "$work/gw.out")

echo "gateway: $gateway ${GATEWAY_ARGS:-}"
echo "flood: $connections connections x $bytes bytes of an unfinished head, held ${hold} s"
python3 - "$gw_pid" "$port" "$connections" "$bytes" "$hold" <<'EOF'
import asyncio, sys

pid, port, connections, size, hold = (int(a) for a in sys.argv[1:6])
head = b"GET /ws?user=flood HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * size

def rss_kib():
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

async def one(answers):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    try:
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(64), hold)
        answers.append(answer.split(b"\r\n", 1)[0].decode() or "closed, no answer")
    except asyncio.TimeoutError:
        answers.append("still open")
    except OSError as error:
        answers.append(type(error).__name__)
    writer.close()

async def main():
    before = rss_kib()
    peak = before
    answers = []
    flood = asyncio.gather(*(one(answers) for _ in range(connections)))
    while not flood.done():
        peak = max(peak, rss_kib())
        await asyncio.sleep(0.02)
    await flood
    after = rss_kib()
    mib = lambda kib: f"{kib / 1024:.1f} MiB"
    print(f"RSS before {mib(before)}, peak {mib(peak)} (+{mib(peak - before)}), "
          f"after {mib(after)}")
    for answer in sorted(set(answers)):
        print(f"  {answers.count(answer)} connections: {answer}")

asyncio.run(main())
EOF
