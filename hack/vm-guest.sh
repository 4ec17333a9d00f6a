#!/bin/bash
# The test plan inside the QEMU guest of hack/vm-test.sh (run chrooted into
# the host's root file system, read-only, with a tmpfs on /tmp). Every step
# prints "PASS name" or "FAIL name"; $VM_OUT/result says PASS only if all
# passed. Environment from vm-test.sh: CLAUDEFS_BIN (claudefs),
# CLAUDEFS_VFIO_TEST (the nvme crate's `vfio` integration tests), VM_OUT.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
exec >>"$VM_OUT/guest.log" 2>&1
bin=$CLAUDEFS_BIN
passed=0
failed=0
step() {
  local name=$1
  shift
  echo "== $name"
  if "$@"; then
    echo "PASS $name"
    passed=$((passed + 1))
  else
    echo "FAIL $name"
    failed=$((failed + 1))
  fi
}

# The controllers, found by the serial numbers vm-test.sh gave QEMU (the
# kernel's nvme driver has them at boot).
bdf_of() {
  local c
  for c in /sys/class/nvme/nvme*; do
    [ "$(tr -d ' ' <"$c/serial")" = "$1" ] && basename "$(readlink -f "$c/device")"
  done
}
ns_of() { basename "$(ls -d /sys/bus/pci/devices/"$1"/nvme/nvme*/nvme*n1 | head -n1)"; }
dual=$(bdf_of CFSNVME0)
small=$(bdf_of CFSNVME1)
kern=$(bdf_of CFSNVME2)
echo "controllers: dual=$dual small=$small in-use=$kern"

setup_status() { hack/setup.sh status; }

mount_fs() {
  mkdir -p /tmp/mnt && mkfs.minix "/dev/$(ns_of "$kern")" >/dev/null && mount -t minix "/dev/$(ns_of "$kern")" /tmp/mnt &&
    echo data >/tmp/mnt/file
}

refuses_mounted() {
  local out
  out=$(PCI_ALLOWED=$kern HUGEMEM=64 hack/setup.sh 2>&1)
  local rc=$?
  echo "$out"
  [ $rc -ne 0 ] && grep -q "$kern: in use, not binding it to vfio-pci: /dev/nvme.*n1 is mounted on /tmp/mnt" <<<"$out"
}

binds() {
  HUGEMEM=768 hack/setup.sh || return 1
  hack/setup.sh status
  [ "$(basename "$(readlink /sys/bus/pci/devices/$dual/driver)")" = vfio-pci ] &&
    [ "$(basename "$(readlink /sys/bus/pci/devices/$small/driver)")" = vfio-pci ] &&
    [ "$(basename "$(readlink /sys/bus/pci/devices/$kern/driver)")" = nvme ] &&
    [ "$(cat /tmp/mnt/file)" = data ]
}

integration_tests() {
  CLAUDEFS_NVME_DUAL=$dual CLAUDEFS_NVME_SMALL=$small CLAUDEFS_NVME_KERNEL=$kern \
    "$CLAUDEFS_VFIO_TEST" --test-threads=1 2>&1 | tail -n 40
  # The binary prints "test result: ok. N passed" only when every test passed.
  [ "${PIPESTATUS[0]}" -eq 0 ]
}

config=/tmp/nvme.json
cat >"$config" <<EOF
[
  {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "traddr": "$dual"}},
  {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme1", "traddr": "$small"}}
]
EOF

bdevperf_verify() {
  "$bin" bdevperf -c "$config" -q 16 -o 64k -w verify -t 4 -m 0x3 --hugepages require
}

# The blobstore on the driver: 16 KiB clusters and 48 KiB requests, so requests
# split into parts of one buffer at cluster boundaries (and at MDTS on Nvme1).
blob_verify() {
  "$bin" bdevperf -c "$config" -q 16 -o 48k -w verify -t 4 -m 0x3 --hugepages require --blobstore 16k -b Nvme0n1 -b Nvme1n1
}

rpc() { "$bin" rpc -s /tmp/cfs.sock "$@"; }

rpcs() {
  "$bin" server -c "$config" -m 0x3 --hugepages require -r /tmp/cfs.sock &
  local pid=$! ok=1
  for _ in $(seq 1 600); do rpc framework_get_version >/dev/null 2>&1 && break; sleep 0.1; done
  rpc bdev_nvme_get_controllers >/tmp/ctrls.json &&
    python3 - "$dual" "$small" <<'PY' || ok=0
import json, sys
c = json.load(open("/tmp/ctrls.json"))
assert [x["name"] for x in c] == ["Nvme0", "Nvme1"], c
assert c[0]["trid"]["traddr"] == sys.argv[1] and c[1]["trid"]["traddr"] == sys.argv[2]
assert (c[0]["serial"], c[1]["serial"]) == ("CFSNVME0", "CFSNVME1")
assert c[0]["model"].startswith("QEMU NVMe Ctrl")
assert [(n["bdev"], n["block_size"]) for n in c[0]["namespaces"]] == [("Nvme0n1", 512), ("Nvme0n2", 4096)]
assert c[1]["max_transfer_bytes"] == 16384
print("bdev_nvme_get_controllers: ok")
PY
  rpc bdev_nvme_get_controller_health_info --name Nvme0 >/tmp/health.json && head -n 12 /tmp/health.json &&
    python3 -c 'import json; h = json.load(open("/tmp/health.json"))["health"]; assert h["temperature_kelvin"] > 200, h' || ok=0
  rpc bdev_nvme_reset_controller --name Nvme0 || ok=0
  rpc bdev_nvme_get_controllers --name Nvme0 | grep -q '"resets": 1' || { echo "reset not counted"; ok=0; }
  rpc save_config >/tmp/saved.json &&
    python3 -c '
import json
calls = [c for c in json.load(open("/tmp/saved.json")) if c["method"] == "bdev_nvme_attach_controller"]
assert [c["params"]["name"] for c in calls] == ["Nvme0", "Nvme1"], calls
print("save_config: one attach per controller")' || ok=0
  rpc bdev_nvme_detach_controller --name Nvme1 || ok=0
  rpc bdev_get_bdevs | grep -q Nvme1n1 && { echo "Nvme1n1 survived the detach"; ok=0; }
  rpc bdev_nvme_attach_controller --name Nvme1 --traddr "$small" | grep -q Nvme1n1 || ok=0
  local err
  err=$(rpc bdev_nvme_attach_controller --name Nvme9 --traddr "$small" 2>&1) && ok=0
  echo "$err" | grep -q "already attached as Nvme1" || { echo "second attach: $err"; ok=0; }
  err=$(rpc bdev_nvme_attach_controller --name Nvme8 --traddr "$kern" 2>&1) && ok=0
  echo "$err" | grep -q "not to vfio-pci" || { echo "attach of a kernel-owned controller: $err"; ok=0; }
  rpc framework_shutdown >/dev/null
  wait "$pid" || ok=0
  [ $ok = 1 ]
}

gives_back() {
  umount /tmp/mnt
  hack/setup.sh reset || return 1
  [ "$(basename "$(readlink /sys/bus/pci/devices/$dual/driver)")" = nvme ] &&
    [ "$(basename "$(readlink /sys/bus/pci/devices/$small/driver)")" = nvme ]
}

step "setup.sh status" setup_status
step "a file system on the third controller" mount_fs
step "setup.sh refuses a controller with a mounted file system" refuses_mounted
step "setup.sh binds the free controllers to vfio-pci" binds
step "driver integration tests (nvme/tests/vfio.rs)" integration_tests
step "claudefs bdevperf -w verify on both controllers" bdevperf_verify
step "bdevperf -w verify through a blob on both controllers" blob_verify
step "bdev_nvme_* RPCs against a server" rpcs
step "setup.sh reset gives the controllers back to nvme" gives_back

echo "guest: $passed passed, $failed failed"
if [ "$failed" -eq 0 ]; then echo PASS >"$VM_OUT/result"; else echo FAIL >"$VM_OUT/result"; fi
