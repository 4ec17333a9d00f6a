#!/usr/bin/env bash
# Prepares a machine for ClaudeFS's userspace NVMe driver, in the spirit of
# SPDK's scripts/setup.sh. As root:
#
#   hack/setup.sh [config]   reserve hugepages and hand NVMe controllers to vfio-pci
#   hack/setup.sh status     controllers, drivers, IOMMU groups, block devices, hugepages
#   hack/setup.sh reset      give the controllers back to the kernel's nvme driver
#
# Environment:
#   HUGEMEM=MiB        hugepage memory to reserve (default 2048; 2 MiB pages)
#   PCI_ALLOWED="BDF…" only these controllers (default: every NVMe controller not in use)
#   PCI_BLOCKED="BDF…" never these controllers
#
# A controller holding a mounted file system, active swap or a device-mapper/
# md holder is never taken: it is skipped with the reason, and if it was
# named in PCI_ALLOWED the script fails.
set -uo pipefail

cmd=${1:-config}
hugemem=${HUGEMEM:-2048}
allowed=${PCI_ALLOWED:-}
blocked=${PCI_BLOCKED:-}
NVME_CLASS=0x010802
devices=/sys/bus/pci/devices

die() { echo "setup.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (it writes to /sys and /proc)"

in_list() { local x; for x in $2; do [ "$x" = "$1" ] && return 0; done; return 1; }

nvme_controllers() {
  local d
  for d in "$devices"/*; do
    [ "$(cat "$d/class" 2>/dev/null)" = "$NVME_CLASS" ] && basename "$d"
  done
}

driver_of() { local l; l=$(readlink "$devices/$1/driver" 2>/dev/null) && basename "$l" || echo "-"; }
group_of() { local l; l=$(readlink "$devices/$1/iommu_group" 2>/dev/null) && basename "$l" || echo "-"; }

# The kernel block devices (namespaces and partitions) of a controller.
block_devices() {
  local ns
  for ns in "$devices/$1"/nvme/nvme*/nvme*n*; do
    [ -e "$ns" ] || continue
    basename "$ns"
    ls "$ns" | grep -E "^$(basename "$ns")p[0-9]+$" || true
  done
}

# Why a controller is in use, or nothing.
in_use() {
  local b reasons=()
  for b in $(block_devices "$1"); do
    local m
    m=$(awk -v dev="/dev/$b" '$1 == dev {print $2}' /proc/mounts | head -n1)
    [ -n "$m" ] && reasons+=("/dev/$b is mounted on $m")
    grep -q "^/dev/$b " /proc/swaps 2>/dev/null && reasons+=("/dev/$b is active swap")
    local sys=/sys/class/block/$b/holders
    [ -d "$sys" ] && [ -n "$(ls "$sys")" ] && reasons+=("/dev/$b is held by $(ls "$sys" | tr '\n' ' ')")
  done
  ((${#reasons[@]})) && printf '%s; ' "${reasons[@]}"
}

selected() {
  [ -n "$allowed" ] && ! in_list "$1" "$allowed" && return 1
  [ -n "$blocked" ] && in_list "$1" "$blocked" && return 1
  return 0
}

bind() { # bdf driver
  local bdf=$1 drv=$2 cur
  cur=$(driver_of "$bdf")
  [ "$cur" = "$drv" ] && return 0
  [ "$cur" != "-" ] && echo "$bdf" >"$devices/$bdf/driver/unbind"
  echo "$drv" >"$devices/$bdf/driver_override"
  echo "$bdf" >/sys/bus/pci/drivers_probe 2>/dev/null
  [ "$(driver_of "$bdf")" = "$drv" ]
}

reserve_hugepages() {
  local pages=$(((hugemem + 1) / 2))
  echo "$pages" >/proc/sys/vm/nr_hugepages || die "cannot write /proc/sys/vm/nr_hugepages"
  local got
  got=$(cat /proc/sys/vm/nr_hugepages)
  if [ "$got" -lt "$pages" ]; then
    echo "setup.sh: only $got of $pages hugepages could be reserved (memory is fragmented or short)" >&2
  fi
  echo "hugepages: $got x 2 MiB reserved ($((got * 2)) MiB; HUGEMEM=$hugemem)"
}

config() {
  reserve_hugepages
  if [ -z "$(ls /sys/kernel/iommu_groups 2>/dev/null)" ]; then
    die "no IOMMU groups: enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line)"
  fi
  modprobe vfio-pci 2>/dev/null || true
  [ -d /sys/bus/pci/drivers/vfio-pci ] || die "the vfio-pci driver is not loaded (modprobe vfio-pci)"
  local bdf failed=0 any=0
  for bdf in $(nvme_controllers); do
    selected "$bdf" || continue
    any=1
    local why
    why=$(in_use "$bdf")
    if [ -n "$why" ]; then
      echo "$bdf: in use, not binding it to vfio-pci: ${why%; }"
      in_list "$bdf" "$allowed" && failed=1
      continue
    fi
    if bind "$bdf" vfio-pci; then
      echo "$bdf: $(driver_of "$bdf") (IOMMU group $(group_of "$bdf"), /dev/vfio/$(group_of "$bdf"))"
    else
      echo "$bdf: binding to vfio-pci failed (driver now: $(driver_of "$bdf"))"
      failed=1
    fi
  done
  if [ -n "$allowed" ]; then
    for bdf in $allowed; do
      nvme_controllers | grep -qx "$bdf" || { echo "$bdf: no NVMe controller at this address"; failed=1; }
    done
  fi
  [ "$any" = 1 ] || echo "setup.sh: no NVMe controller selected"
  return "$failed"
}

reset() {
  modprobe nvme 2>/dev/null || true
  local bdf failed=0
  for bdf in $(nvme_controllers); do
    selected "$bdf" || continue
    [ "$(driver_of "$bdf")" = vfio-pci ] || continue
    echo "$bdf" >"$devices/$bdf/driver/unbind"
    echo >"$devices/$bdf/driver_override"
    echo "$bdf" >/sys/bus/pci/drivers_probe 2>/dev/null
    echo "$bdf: $(driver_of "$bdf")"
    [ "$(driver_of "$bdf")" = nvme ] || failed=1
  done
  return "$failed"
}

status() {
  local total free
  total=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages 2>/dev/null || echo 0)
  free=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages 2>/dev/null || echo 0)
  echo "hugepages (2 MiB): $total reserved, $free free"
  printf '%-14s %-11s %-10s %-6s %-24s %s\n' BDF VENDOR:DEV DRIVER GROUP "BLOCK DEVICES" "IN USE"
  local bdf
  for bdf in $(nvme_controllers); do
    local vd why
    vd="$(sed 's/0x//' "$devices/$bdf/vendor"):$(sed 's/0x//' "$devices/$bdf/device")"
    why=$(in_use "$bdf")
    printf '%-14s %-11s %-10s %-6s %-24s %s\n' "$bdf" "$vd" "$(driver_of "$bdf")" "$(group_of "$bdf")" \
      "$(block_devices "$bdf" | tr '\n' ' ')" "${why:--}"
  done
}

case "$cmd" in
  config) config ;;
  status) status ;;
  reset) reset ;;
  *) die "unknown command $cmd: use config (default), status or reset" ;;
esac
