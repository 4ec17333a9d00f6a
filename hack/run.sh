#!/usr/bin/env bash
# The main job: a single-node ClaudeFS on a file-backed device, mounted, with
# its control socket. No NVMe, hugepages or VFIO needed.
#
#   hack/run.sh          build, start, mount, run until Ctrl-C
#   hack/run.sh --once   the same, write and read a file, then stop (a smoke test)
#
# Environment: CLAUDEFS_SOCKET (default /var/tmp/claudefs.sock),
# CLAUDEFS_IMAGE (default /var/tmp/claudefs/disk0.img, created with 1 GiB),
# CLAUDEFS_MOUNT (default /mnt/claudefs, created if absent).
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
[ "${1:-}" = --once ] && once=true

hack/deps.sh run
cargo build --release --bin claudefs
bin=${CARGO_TARGET_DIR:-target}/release/claudefs
sock=${CLAUDEFS_SOCKET:-/var/tmp/claudefs.sock}
image=${CLAUDEFS_IMAGE:-/var/tmp/claudefs/disk0.img}
mnt=${CLAUDEFS_MOUNT:-/mnt/claudefs}
mkdir -p "$(dirname "$image")" "$mnt"

"$bin" up --image "$image" --size 1g --mount "$mnt" -r "$sock" &
pid=$!
stop() { "$bin" down -s "$sock" >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
trap stop EXIT
trap 'exit 130' INT TERM

for _ in $(seq 1 400); do
  [ -S "$sock" ] && "$bin" rpc -s "$sock" fs_get_mounts 2>/dev/null | grep -q "\"$mnt\"" && break
  kill -0 "$pid" 2>/dev/null || { echo "hack/run.sh: claudefs up exited; see its messages above" >&2; exit 1; }
  sleep 0.05
done

echo "== claudefs rpc -s $sock fs_get_stats"
"$bin" rpc -s "$sock" fs_get_stats
if $once; then
  echo "hello from ClaudeFS" > "$mnt/hello.txt"
  sync -f "$mnt/hello.txt"
  [ "$(cat "$mnt/hello.txt")" = "hello from ClaudeFS" ] || { echo "hack/run.sh: read back something else" >&2; exit 1; }
  rm "$mnt/hello.txt"
  echo "hack/run.sh: $mnt is mounted, a file was written, synced and read back; stopping (--once)"
  exit 0
fi
cat <<MSG

ClaudeFS is mounted on $mnt (server pid $pid). Use it like any directory:
  ls -la $mnt; cp -r /etc $mnt/; df -h $mnt
Talk to the server from another terminal:
  $bin rpc -s $sock fs_get_stats
  $bin rpc -s $sock rpc_get_methods
Ctrl-C (or $bin down -s $sock) unmounts and stops it.
MSG
wait "$pid"
