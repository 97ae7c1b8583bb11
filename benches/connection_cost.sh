#!/usr/bin/env bash
# Measures what one connection costs the gateway, with Redis, from outside:
#   - RSS growth per idle connection at N idle connections (default 10,000)
#   - server CPU per connect+welcome+close cycle, presence writes included
# Starts its own redis-server (free port, no persistence) and a release
# gateway; prints the figures recorded in BENCHMARKS.md.
#
#   benches/connection_cost.sh [IDLE_CONNECTIONS] [CYCLES] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."
idle=${1:-10000}
cycles=${2:-20000}
concurrency=${3:-64}

cargo build --release --quiet --bin presenced --example conn_bench
ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d)
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  --daemonize yes --pidfile "$work/redis.pid" --logfile "$work/redis.log"
cleanup() {
  [ -n "${gw_pid:-}" ] && kill "$gw_pid" 2>/dev/null || true
  [ -f "$work/redis.pid" ] && kill "$(cat "$work/redis.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

./target/release/presenced --dev --listen 127.0.0.1:0 --redis "redis://127.0.0.1:$redis_port" \
  >"$work/gw.out" 2>"$work/gw.err" &
gw_pid=$!
for _ in $(seq 100); do grep -q listening "$work/gw.out" 2>/dev/null && break; sleep 0.1; done
port=$(grep -o '[0-9]*$' "$work/gw.out")
url="ws://127.0.0.1:$port/ws"

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; commit $(git rev-parse --short HEAD)"
# Cycles first: the idle phase's 10,000 closes would still be processed
# (and counted) during a cycle phase that followed it.
./target/release/examples/conn_bench --pid "$gw_pid" --url "$url" cycle "$cycles" "$concurrency"
redis-cli -p "$redis_port" config resetstat >/dev/null
./target/release/examples/conn_bench --pid "$gw_pid" --url "$url" idle "$idle"
echo "redis: $(redis-cli -p "$redis_port" info commandstats | grep -o 'cmdstat_exec:calls=[0-9]*') during the idle phase"
