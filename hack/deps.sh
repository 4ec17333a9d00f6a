#!/usr/bin/env bash
# Installs what a step needs on a fresh Debian machine, and nothing twice.
#   hack/deps.sh run     build and run a server
#   hack/deps.sh test    the test suite (adds cargo-nextest)
#   hack/deps.sh bench   the benchmarks (adds fio, valgrind, matplotlib)
#   hack/deps.sh vm      the QEMU guest of hack/vm-test.sh (qemu, busybox, cpio)
set -euo pipefail

step=${1:-run}

need_apt=()
want() { for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p"); done; }

want ca-certificates gcc libc6-dev pkg-config util-linux python3
case "$step" in
  run) ;;
  test) want qemu-system-x86 cpio busybox-static ;;
  vm) want qemu-system-x86 cpio busybox-static ;;
  bench) want fio valgrind python3-matplotlib ;;
  *) echo "usage: $0 run|test|vm|bench" >&2; exit 2 ;;
esac

if ((${#need_apt[@]})); then
  echo "hack/deps.sh: installing ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "hack/deps.sh: no Rust toolchain (cargo) found; install Rust 1.85 or newer with rustup first" >&2
  exit 1
fi
rust_minor=$(rustc -V | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
if [ "$rust_minor" -lt 85 ]; then
  echo "hack/deps.sh: $(rustc -V) is too old; ClaudeFS needs Rust 1.85 or newer (edition 2024)" >&2
  exit 1
fi

if [ "$step" = test ] && ! cargo nextest --version >/dev/null 2>&1; then
  echo "hack/deps.sh: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
