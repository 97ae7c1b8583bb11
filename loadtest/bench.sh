#!/usr/bin/env bash
# presenced-load's standard set (issue 7), on this machine, from scratch:
# builds the release gateway and load tool, starts its own redis-server
# (free port, no persistence) and fresh gateways (--dev, on that Redis) for
# each run, runs
#   hold    15,000 tabs (3,000 users x 5) on one node: gateway KiB per tab
#   storm   15,000 tabs (3,000 users x 5) on one node: tabs/s until every
#           observer saw every online; Redis MULTI/EXEC per 1,000 connects
#   churn   4,000 tab opens+closes/s for 20 s across 2 nodes: cross-node
#           offline latency p50/p99; missed/duplicated events
#   50k     50,000 tabs (10,000 users x 5) held on 3 nodes from 4 worker
#           processes and 4 source addresses: presence exact
#   fanout  100 rooms of 20 users x 2 tabs on 2 nodes, 1,000 leaves+joins/s
#           for 15 s: fan-out rate and member latencies (no target)
# (all of these on gateways with --offline-grace-ms 0: every offline at
# once, as the latency targets were set), and for issue 13
#   reload-grace / reload-nograce
#           the same churn of reloads (1,000 users x 1 tab on 2 nodes, half
#           of them in 50 rooms, 500 actions/s for 15 s, half the picks of
#           an open tab a reload of 300 ms) on gateways with a 5 s grace,
#           then with none: flaps
#           observers saw (0 with the grace, one per reload of a last tab
#           without)
#   nodeloss
#           5,000 tabs (one per user) on 3 nodes (5 s grace, default 5 s
#           lease), kill -9 of one, 80 % of its users back on the others
#           within 2 s: their offlines (target 0) and kill -> offline of
#           the others (lease + reaper tick + grace)
# and for issue 14
#   cursors 50 rooms of 10 members (one tab each) on 2 nodes, every member
#           sending 30 room-state updates/s for 15 s (the gateway writes
#           10/s per member, --state-rate): updated deliveries/s, p99
#           latency, gateway CPU per delivery, Redis commands/s
# and writes the results (measured, target, met or missed by how much) as
# a new dated section of BENCHMARKS.md.
#
#   loadtest/bench.sh [--quick] [--out FILE] [--no-build] [--only NAME]
#     --quick     small sizes (under a minute, at most 2,400 tabs): checks
#                 that the whole chain works; prints the section instead of
#                 writing it unless --out is given
#     --out FILE  where to append the section (default: BENCHMARKS.md, or
#                 none with --quick)
#     --no-build  use the release binaries already in target/release
#     --only NAME run only the run NAME of the set (e.g. cursors); the
#                 section then has that run's rows only
#
# Gateways get only the flags the load needs (and the grace the run is
# about), and the section lists them:
# --max-watch (and --max-rooms) at least what an observer watches (joins),
# and --rate-limit/--rate-burst raised only where the observer's setup and
# check requests (one per 1,000 users and one per room) would exceed the
# default burst of 50. About 5 minutes of runs (plus the release build,
# about 6 minutes from scratch on this machine).
set -euo pipefail
cd "$(dirname "$0")/.."

command="loadtest/bench.sh${*:+ $*}"
quick=0
out=""
build=1
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --out) out="$2"; shift ;;
    --no-build) build=0 ;;
    --only) only="$2"; shift ;;
    *) echo "usage: loadtest/bench.sh [--quick] [--out FILE] [--no-build] [--only NAME]" >&2; exit 2 ;;
  esac
  shift
done
[ "$quick" = 0 ] && out=${out:-BENCHMARKS.md}

if [ "$build" = 1 ]; then
  cargo build --release --quiet --workspace --bins
fi
ulimit -n "$(ulimit -Hn)"
gateway_bin=target/release/presenced
load_bin=target/release/presenced-load

work=$(mktemp -d)
gateway_pids=()
lease_flags=""
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
stop_gateways() {
  for pid in "${gateway_pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${gateway_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  gateway_pids=()
}
cleanup() {
  stop_gateways
  [ -f "$work/redis.pid" ] && kill "$(cat "$work/redis.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

redis_port=$(free_port)
redis_url="redis://127.0.0.1:$redis_port/"
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  --daemonize yes --pidfile "$work/redis.pid" --logfile "$work/redis.log"
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

# start_gateways N FLAGS...: N fresh gateways on the Redis; sets $targets.
start_gateways() {
  local n=$1
  shift
  targets=""
  for i in $(seq "$n"); do
    local log="$work/gateway-$RANDOM-$i"
    PRESENCED_LOG=warn "$gateway_bin" --dev --listen 127.0.0.1:0 --redis "$redis_url" "$@" \
      >"$log.out" 2>"$log.err" &
    gateway_pids+=("$!")
    local addr=""
    for _ in $(seq 100); do
      addr=$(sed -n 's/^presenced listening on //p' "$log.out")
      [ -n "$addr" ] && break
      sleep 0.1
    done
    [ -n "$addr" ] || { echo "gateway did not start:" >&2; cat "$log.err" >&2; exit 1; }
    targets="${targets:+$targets,}ws://$addr/ws"
  done
}

# flags_for USERS ROOMS: the gateway flags an observer of USERS users and
# ROOMS rooms needs.
flags_for() {
  local users=$1 rooms=$2
  local flags=()
  [ "$users" -gt 1000 ] && flags+=(--max-watch "$users")
  [ "$rooms" -gt 100 ] && flags+=(--max-rooms "$rooms")
  # watch + query: one request per 1,000 users; join + a room page: one
  # per room.
  if [ $(((users + 999) / 1000 + rooms)) -gt 40 ]; then
    flags+=(--rate-limit 1000 --rate-burst 1000)
  fi
  echo "${flags[@]}"
}

# run NAME NODES SCENARIO ARGS...: fresh gateways, one load run, JSON kept.
# The gateways get the grace the tool is told (--offline-grace-ms, 0 when
# not given) and $lease_flags; a nodeloss run is handed the pid of its
# --kill-target.
run() {
  local name=$1 nodes=$2 scenario=$3
  shift 3
  [ -n "$only" ] && [ "$name" != "$only" ] && return 0
  local users=0 rooms=0 room_size=0 grace=0 kill_target="" args=("$@")
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
      --users) users=${args[$((i + 1))]} ;;
      --rooms) rooms=${args[$((i + 1))]} ;;
      --room-size) room_size=${args[$((i + 1))]} ;;
      --offline-grace-ms) grace=${args[$((i + 1))]} ;;
      --kill-target) kill_target=${args[$((i + 1))]} ;;
    esac
  done
  case "$scenario" in fanout | cursors) users=$((rooms * room_size)) ;; esac
  local flags
  flags="$(flags_for "$users" "$rooms") --offline-grace-ms $grace${lease_flags:+ $lease_flags}"
  # cursors: the observer is in every room and gets every `updated` of the
  # run (5,000/s at full size, a member 90/s), in bursts when the members'
  # paced writes line up: its outbox must hold a burst.
  [ "$scenario" = cursors ] && flags="$flags --outbox-messages 16384 --outbox-bytes 16777216"
  flags=${flags# }
  # shellcheck disable=SC2086
  start_gateways "$nodes" $flags
  local kill=()
  [ -n "$kill_target" ] && kill=(--kill-pid "${gateway_pids[$kill_target]}")
  echo "== $name: presenced-load $scenario $* (gateways: $flags)" >&2
  local rc=0
  "$load_bin" "$scenario" --targets "$targets" --redis "$redis_url" "$@" "${kill[@]}" --json \
    >"$work/$name.json" 2>"$work/$name.err" || rc=$?
  stop_gateways
  if [ ! -s "$work/$name.json" ]; then
    echo "   failed (exit $rc):" >&2
    tail -5 "$work/$name.err" >&2
    echo '{}' >"$work/$name.json"
  elif jq -e '.failure' "$work/$name.json" >/dev/null; then
    # A run that could not finish printed one line saying why.
    echo "   FAILED: $(jq -r '.failure' "$work/$name.json")" >&2
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$nodes" "$scenario" "$*" "$flags" >>"$work/runs.tsv"
  echo "   $(jq -r '"\(.scenario // "-") correct=\(if .checks then ([.checks[] | .observers_settled and .presence_mismatches == 0 and .room_mismatches == 0] | all) and .presence.missed + .presence.duplicated + .presence.out_of_order + .room.missed + .room.duplicated + .room.out_of_order + ([.offline_checks[]] | add) == 0 else false end) connects=\(.connects // 0) errors=\(.errors // {} | tostring)\(if .reload then " flaps=\(.reload.flaps)/\(.reload.reloads_of_last_tab)" else "" end)\(if .nodeloss then " returned_offlines=\(.nodeloss.returned_offlines) kill_to_offline_p99_ms=\(.nodeloss.time_to_offline.p99_ms)" else "" end)\(if .cursors then " deliveries_per_s=\(.cursors.deliveries_per_s | floor) unconverged=\(.cursors.unconverged) refused=\(.cursors.updates.refused)" else "" end)"' "$work/$name.json")" >&2
}

started=$(date +%s)
if [ "$quick" = 1 ]; then
  run hold 1 hold --users 200 --tabs 5 --rate 1000 --duration 2
  run storm 1 storm --users 200 --tabs 5
  run churn 2 churn --users 200 --tabs 2 --rate 400 --duration 4
  # Past 1,000 users and past 40 observer requests, so the raised
  # --max-watch and --rate-limit paths run too.
  run 50k 3 hold --users 1200 --tabs 2 --rate 1000 --duration 2 --procs 2 \
    --source-addrs 127.0.0.2,127.0.0.3
  run fanout 2 fanout --rooms 50 --room-size 4 --tabs 2 --rate 200 --duration 3
  run reload-grace 2 churn --users 200 --tabs 1 --rate 200 --duration 4 --reload-ms 300 \
    --offline-grace-ms 2000
  run reload-nograce 2 churn --users 200 --tabs 1 --rate 200 --duration 4 --reload-ms 300 \
    --offline-grace-ms 0
  lease_flags="--node-lease-ms 1000"
  run nodeloss 3 nodeloss --users 600 --tabs 1 --offline-grace-ms 2000 --kill-target 1 \
    --return-fraction 0.8 --return-within-ms 1000
  lease_flags=""
  run cursors 2 cursors --rooms 10 --room-size 5 --rate 30 --duration 3
else
  run hold 1 hold --users 3000 --tabs 5 --rate 2000 --duration 15
  run storm 1 storm --users 3000 --tabs 5
  run churn 2 churn --users 2000 --tabs 2 --rate 4000 --duration 20
  run 50k 3 hold --users 10000 --tabs 5 --rate 2500 --duration 10 --procs 4 \
    --source-addrs 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5
  run fanout 2 fanout --rooms 100 --room-size 20 --tabs 2 --rate 1000 --duration 15
  run reload-grace 2 churn --users 1000 --tabs 1 --rooms 50 --room-size 10 --rate 500 \
    --duration 15 --reload-ms 300 --offline-grace-ms 5000
  run reload-nograce 2 churn --users 1000 --tabs 1 --rooms 50 --room-size 10 --rate 500 \
    --duration 15 --reload-ms 300 --offline-grace-ms 0
  run nodeloss 3 nodeloss --users 5000 --tabs 1 --rate 2000 --offline-grace-ms 5000 \
    --kill-target 1 --return-fraction 0.8 --return-within-ms 2000
  run cursors 2 cursors --rooms 50 --room-size 10 --rate 30 --duration 15
fi
elapsed=$(($(date +%s) - started))

export BENCH_WORK="$work" BENCH_QUICK="$quick" BENCH_COMMAND="$command" BENCH_ELAPSED="$elapsed"
export BENCH_COMMIT
BENCH_COMMIT="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src loadtest Cargo.toml Cargo.lock || echo ' (with uncommitted changes)')"
export BENCH_MACHINE
BENCH_MACHINE="nproc $(nproc); $(free -g | awk '/Mem:/{print $2}') GiB; CPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); Linux $(uname -r); $(redis-server --version | cut -d' ' -f1-3)"
section=$(python3 loadtest/bench_report.py)
if [ -n "$out" ]; then
  printf '\n%s\n' "$section" >>"$out"
  echo "appended to $out" >&2
else
  printf '%s\n' "$section"
fi
