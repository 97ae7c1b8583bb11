#!/usr/bin/env bash
# Measures a two-node cluster on one Redis, from outside:
#   - reap time: a node killed with SIGKILL → its users' last `offline`
#     (node_lost) at a watcher on the surviving node, over RUNS runs
#   - cross-node event latency under steady churn: tabs open and close on
#     node A at RATE new users a second for SECONDS; a watcher on node B
#     times each `online` (from the tab's welcome) and `offline` (from the
#     tab's Close), and counts missed and doubled events
# examples/cluster_bench.rs starts its own redis-server (free port, no
# persistence) and the release gateways with default flags; prints the
# figures recorded in BENCHMARKS.md.
#
#   benches/cluster.sh [RUNS] [CHURN] [HOLD_MS] [GATEWAY_FLAGS]
#     RUNS           kill -9 runs (default 7; 0 skips the phase), 200 tabs of 100 users each
#     CHURN          RATE:SECONDS[,RATE:SECONDS...] (default 500:10,2000:10; "" skips)
#     HOLD_MS        MIN:MAX time a churn tab stays open (default 200:800)
#     GATEWAY_FLAGS  extra flags for every gateway, e.g. "--batch-linger-ms 1"
#                    (default none: the gateway's defaults)
# About 90 s with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-7}
churn=${2-500:10,2000:10}
hold=${3:-200:800}
flags=${4:-}

cargo build --release --quiet --bin presenced --example cluster_bench
ulimit -n "$(ulimit -Hn)"

echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)), $(free -g | awk '/Mem:/{print $2}') GiB; commit $(git rev-parse --short HEAD); $(redis-server --version | cut -d' ' -f1-3)"
./target/release/examples/cluster_bench --gateway target/release/presenced \
  --runs "$runs" --users 100 --tabs 200 --churn "$churn" --hold-ms "$hold" \
  --gateway-flags "$flags"
