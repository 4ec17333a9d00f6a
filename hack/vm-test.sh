#!/usr/bin/env bash
# Runs the NVMe/VFIO driver for real: boots a QEMU guest (software emulation)
# with three emulated NVMe controllers behind an emulated Intel IOMMU, binds
# them to vfio-pci with hack/setup.sh inside the guest, and runs there
# hack/vm-guest.sh: the driver's integration tests (nvme/tests/vfio.rs),
# `claudefs bdevperf -w verify` and the bdev_nvme_* RPCs against a server.
#
#   hack/vm-test.sh            build, boot, test; exit status 0 only if all passed
#   hack/vm-test.sh --shell    boot to a shell on the console instead (debugging)
#
# The guest shares the host's root file system read-only over 9p, so it runs
# the binaries built here without copying anything; results come back
# through a second, writable 9p share. The guest kernel is Debian's
# linux-image-amd64 (6.1), fetched with apt-get download and unpacked into
# $VM_CACHE (default target/vm, ignored by git).
#
# Controllers (QEMU `nvme` device model):
#   nvme0  serial CFSNVME0, namespaces 1 (512 B LBAs, 64 MiB) and 2 (4 KiB LBAs, 32 MiB)
#   nvme1  serial CFSNVME1, MDTS 2 (16 KiB per command: larger transfers are split), 32 MiB
#   nvme2  serial CFSNVME2, 8 MiB, holds a mounted file system: setup.sh must refuse it
#
# The emulated IOMMU gets a 48-bit address width (aw-bits=48; QEMU's default
# is 39): the driver maps DMA memory with IOVA = virtual address, and user
# space addresses need 47 bits.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

shell=false
[ "${1:-}" = --shell ] && shell=true

hack/deps.sh vm || exit 1
export CARGO_TERM_COLOR=never
target=${CARGO_TARGET_DIR:-$root/target}
cache=${VM_CACHE:-$target/vm}
mkdir -p "$cache"

# --- the guest kernel -------------------------------------------------------
kdir=$cache/kernel
if ! ls "$kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
  echo "vm-test: fetching the guest kernel (Debian linux-image-amd64)" >&2
  rm -rf "$kdir" "$cache/debs" && mkdir -p "$cache/debs" && (
    cd "$cache/debs" &&
      { apt-get download linux-image-amd64 2>/dev/null ||
        { apt-get update -qq >/dev/null && apt-get download linux-image-amd64 2>/dev/null; }; } &&
      pkg=$(dpkg-deb -f linux-image-amd64_*.deb Depends | sed -E 's/^(linux-image-[^ ,]+).*/\1/') &&
      apt-get download "$pkg" 2>/dev/null &&
      dpkg -x "$pkg"_*.deb "$kdir"
  ) || { echo "vm-test: could not fetch the guest kernel (apt-get download linux-image-amd64)" >&2; exit 1; }
  rm -rf "$cache/debs"
fi
vmlinuz=$(ls "$kdir"/boot/vmlinuz-* | head -n1)
kver=${vmlinuz##*/vmlinuz-}
mods=$kdir/lib/modules/$kver/kernel

# --- host-built binaries ----------------------------------------------------
echo "vm-test: building claudefs and the driver's integration tests (release)" >&2
cargo build --release --bin claudefs || exit 1
test_bin=$(cargo test --release -p claudefs-nvme --test vfio --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "vfio":
        print(m["executable"])')
if [ -z "$test_bin" ] || [ ! -x "$test_bin" ]; then
  echo "vm-test: building the integration tests failed:" >&2
  cargo test --release -p claudefs-nvme --test vfio --no-run >&2
  exit 1
fi

# --- the initramfs ----------------------------------------------------------
work=$(mktemp -d "$cache/run.XXXXXX")
trap 'rm -rf "$work"' EXIT
out=$work/out
mkdir -p "$out" "$work/initrd/bin" "$work/initrd/mods"
cp /bin/busybox "$work/initrd/bin/busybox"
# Load order matters: each module after the ones it needs.
order="virtio/virtio_ring virtio/virtio virtio/virtio_pci_modern_dev virtio/virtio_pci_legacy_dev virtio/virtio_pci
  netfs/netfs fscache/fscache 9p/9pnet 9p/9pnet_virtio 9p/9p
  irqbypass vfio/vfio vfio/vfio_iommu_type1 vfio/vfio_virqfd vfio/vfio-pci-core vfio/vfio-pci
  crct10dif_common crct10dif_generic crc-t10dif crc64 crc64_rocksoft_generic crc64-rocksoft t10-pi
  nvme/nvme-core nvme/nvme minix"
n=0
for m in $order; do
  f=$(find "$mods" -name "${m##*/}.ko" | head -n1)
  [ -n "$f" ] || { echo "vm-test: module ${m##*/} missing from the guest kernel $kver" >&2; exit 1; }
  n=$((n + 1))
  cp "$f" "$work/initrd/mods/$(printf %02d "$n")-${m##*/}.ko"
done
cat >"$work/initrd/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /host /out
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in /mods/*.ko; do insmod "\$m" 2>/dev/null || insmod "\$m" || echo "guest: insmod \$m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro host /host || echo "guest: mounting the host root failed"
mount -t 9p -o trans=virtio,version=9p2000.L out /out || echo "guest: mounting the result share failed"
for d in dev proc sys; do mount --bind /\$d /host/\$d; done
# The guest's /tmp is its own (the host root is read-only); a checkout or
# target directory under the host's /tmp stays visible through bind mounts.
mkdir -p /hosttmp; mount --bind /host/tmp /hosttmp
mount -t tmpfs tmp /host/tmp
for p in $root $target; do
  case "\$p" in /tmp/*) mkdir -p "/host\$p"; mount --bind "/hosttmp/\${p#/tmp/}" "/host\$p" ;; esac
done
mount --bind /out /host/tmp/vm-out 2>/dev/null || { mkdir -p /host/tmp/vm-out && mount --bind /out /host/tmp/vm-out; }
if [ "$shell" = true ]; then
  setsid cttyhack sh
else
  chroot /host /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1 \
    CLAUDEFS_BIN=$target/release/claudefs CLAUDEFS_VFIO_TEST=$test_bin VM_OUT=/tmp/vm-out \
    /bin/bash $root/hack/vm-guest.sh
  echo "guest: exit status \$?"
fi
sync
poweroff -f
EOF
chmod +x "$work/initrd/init"
(cd "$work/initrd" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$work/initrd.gz"

# --- the emulated controllers -------------------------------------------------
truncate -s 64M "$work/ns0-1.img"
truncate -s 32M "$work/ns0-2.img"
truncate -s 32M "$work/ns1-1.img"
truncate -s 8M "$work/ns2-1.img"

echo "vm-test: booting the guest (software emulation; the whole run takes a few minutes)" >&2
qemu=(qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 2048
  -machine q35,kernel-irqchip=split -device intel-iommu,intremap=on,caching-mode=on,aw-bits=48
  -kernel "$vmlinuz" -initrd "$work/initrd.gz"
  -append "console=ttyS0 intel_iommu=on iommu=pt panic=-1 quiet"
  -nographic -no-reboot
  -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap
  -virtfs "local,path=$out,mount_tag=out,security_model=none"
  -drive "file=$work/ns0-1.img,if=none,id=d01,format=raw,discard=unmap"
  -drive "file=$work/ns0-2.img,if=none,id=d02,format=raw,discard=unmap"
  -drive "file=$work/ns1-1.img,if=none,id=d11,format=raw,discard=unmap"
  -drive "file=$work/ns2-1.img,if=none,id=d21,format=raw,discard=unmap"
  -device nvme,id=nvme0,serial=CFSNVME0
  -device nvme-ns,drive=d01,bus=nvme0,nsid=1,logical_block_size=512,physical_block_size=512
  -device nvme-ns,drive=d02,bus=nvme0,nsid=2,logical_block_size=4096,physical_block_size=4096
  -device nvme,id=nvme1,serial=CFSNVME1,mdts=2
  -device nvme-ns,drive=d11,bus=nvme1,nsid=1,logical_block_size=4096,physical_block_size=4096
  -device nvme,id=nvme2,serial=CFSNVME2,drive=d21)
if $shell; then
  exec "${qemu[@]}"
fi
log=$work/console.log
timeout "${VM_TIMEOUT:-1500}" "${qemu[@]}" </dev/null >"$log" 2>&1
qemu_status=$?

if [ -f "$out/result" ] && [ "$(cat "$out/result")" = PASS ]; then
  grep -E '^(PASS|FAIL|test |guest:|Nvme|Total)' "$out/guest.log" 2>/dev/null | tail -n 60
  if [ -n "${VM_KEEP:-}" ]; then trap - EXIT; echo "vm-test: kept $work"; fi
  echo "vm-test: PASS"
  exit 0
fi
echo "vm-test: FAIL (qemu exit status $qemu_status). Guest console:" >&2
tail -n 200 "$log" >&2
if [ -f "$out/guest.log" ]; then
  echo "---- guest test log ----" >&2
  tail -n 300 "$out/guest.log" >&2
fi
exit 1
