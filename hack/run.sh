#!/usr/bin/env bash
# The main job: a single-node ClaudeFS server on a file-backed bdev, with its
# control socket. No NVMe, hugepages or VFIO needed.
#
#   hack/run.sh          build, start, show the bdevs, run until Ctrl-C
#   hack/run.sh --once   the same, then stop (a smoke test)
#
# Environment: CLAUDEFS_SOCKET (default /var/tmp/claudefs.sock),
# CLAUDEFS_CONFIG (default configs/single-node.json).
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
[ "${1:-}" = --once ] && once=true

hack/deps.sh run
cargo build --release --bin claudefs
bin=target/release/claudefs
sock=${CLAUDEFS_SOCKET:-/var/tmp/claudefs.sock}
config=${CLAUDEFS_CONFIG:-configs/single-node.json}
mkdir -p /var/tmp/claudefs

"$bin" server -c "$config" -r "$sock" &
pid=$!
stop() { kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
trap stop EXIT
trap 'exit 130' INT TERM

for _ in $(seq 1 200); do
  [ -S "$sock" ] && "$bin" rpc -s "$sock" framework_get_version >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { echo "hack/run.sh: the server exited; see its messages above" >&2; exit 1; }
  sleep 0.05
done

echo "== claudefs rpc -s $sock bdev_get_bdevs"
"$bin" rpc -s "$sock" bdev_get_bdevs
if $once; then
  echo "hack/run.sh: the server answers; stopping (--once)"
  exit 0
fi
cat <<MSG

ClaudeFS is running (pid $pid). Talk to it from another terminal:
  $bin rpc -s $sock rpc_get_methods
  $bin rpc -s $sock bdev_get_iostat
  $bin rpc -s $sock bdev_malloc_create --help
Ctrl-C stops it.
MSG
wait "$pid"
