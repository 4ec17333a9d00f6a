//! VFIO: owning a PCI device from user space.
//!
//! Linux's VFIO driver hands a PCI device to a process through three objects:
//!
//! - a **container** (`/dev/vfio/vfio`): one IOMMU address space. Memory the
//!   device may reach is mapped into it with `VFIO_IOMMU_MAP_DMA`; ClaudeFS
//!   maps every DMA pool region with IOVA = virtual address, so a buffer's
//!   address is what the device is given.
//! - a **group** (`/dev/vfio/N`): the devices the IOMMU cannot tell apart.
//!   A group is *viable* only when every device in it is bound to vfio-pci
//!   (or to no driver); only then can it join a container.
//! - the **device** fd: its regions (BAR0 holds the NVMe registers, mapped
//!   with mmap) and its PCI configuration space.
//!
//! Every system call lives behind the small `Kernel` trait: `sys` is the
//! real one (ioctls, mmap, sysfs), [`twin`] an in-memory one with emulated
//! NVMe controllers, so that the logic here and the whole driver above it run
//! in unit tests without hardware. The trait is only used on the control path
//! (attach, DMA mapping); the I/O path touches nothing but memory.

pub(crate) mod sys;
pub mod twin;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pmd::dma::{DmaListener, ListenerId, RegionInfo};

use crate::error::BdevError;

/// A kernel handle (a file descriptor for the real kernel).
pub(crate) type Fd = i32;

/// What sysfs says about a PCI device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciInfo {
    /// PCI class code (0x010802 for an NVMe controller).
    pub class: u32,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// The bound driver, if any.
    pub driver: Option<String>,
    /// The IOMMU group, if the device is behind an IOMMU.
    pub iommu_group: Option<u32>,
}

/// NVMe controllers are PCI class 01 (storage), subclass 08 (NVM), interface 02 (NVMe).
pub const NVME_CLASS: u32 = 0x010802;

/// A mapped BAR: base address and length.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BarMap {
    pub(crate) base: *mut u8,
    pub(crate) len: usize,
}

/// Called after each doorbell write and while waiting for the device; the
/// twin's emulated controller runs in it, the real kernel has none.
pub(crate) type Kick = Arc<dyn Fn() + Send + Sync>;

/// Every operating-system call the VFIO layer makes. See the module docs.
pub(crate) trait Kernel: Send + Sync {
    /// The sysfs view of `bdf`; `NotFound` if there is no such device.
    fn pci_info(&self, bdf: &str) -> io::Result<PciInfo>;
    /// The devices of an IOMMU group with their drivers.
    fn group_devices(&self, group: u32) -> io::Result<Vec<(String, Option<String>)>>;
    /// Opens `/dev/vfio/vfio` and checks the API version and type1v2 IOMMU support.
    fn open_container(&self) -> io::Result<Fd>;
    /// Opens `/dev/vfio/<group>`.
    fn open_group(&self, group: u32) -> io::Result<Fd>;
    /// VFIO_GROUP_GET_STATUS: whether the group is viable.
    fn group_viable(&self, group: Fd) -> io::Result<bool>;
    /// VFIO_GROUP_SET_CONTAINER, then (first group of a container) VFIO_SET_IOMMU type1v2.
    fn set_container(&self, group: Fd, container: Fd) -> io::Result<()>;
    /// VFIO_GROUP_GET_DEVICE_FD.
    fn device_fd(&self, group: Fd, bdf: &str) -> io::Result<Fd>;
    /// Maps BAR0 of the device (VFIO_DEVICE_GET_REGION_INFO, mmap).
    fn map_bar0(&self, device: Fd) -> io::Result<BarMap>;
    /// Unmaps what [`Kernel::map_bar0`] mapped.
    fn unmap_bar0(&self, bar: BarMap);
    /// Reads PCI configuration space.
    fn config_read(&self, device: Fd, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes PCI configuration space.
    fn config_write(&self, device: Fd, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// VFIO_IOMMU_MAP_DMA with IOVA = `addr`, read and write.
    fn dma_map(&self, container: Fd, addr: usize, len: usize) -> io::Result<()>;
    /// VFIO_IOMMU_UNMAP_DMA.
    fn dma_unmap(&self, container: Fd, addr: usize, len: usize) -> io::Result<()>;
    /// Closes a handle.
    fn close(&self, fd: Fd);
    /// The twin's hook run after doorbell writes; `None` for real hardware.
    fn kick(&self, device: Fd) -> Option<Kick>;
    /// Checks that DMA memory is fit for this kernel's devices (hugepages).
    fn check_dma_memory(&self) -> Result<(), BdevError>;
}

/// The DMA mappings of one container: every pool region, kept current by a
/// [`DmaListener`]. Mappings that failed are remembered, so that a request
/// with a buffer in them is refused instead of faulting the device.
pub(crate) struct Container {
    kernel: Arc<dyn Kernel>,
    fd: Fd,
    any_failed: AtomicBool,
    /// Regions the kernel refused, with its errno.
    failed: Mutex<Vec<(RegionInfo, i32)>>,
    warned_small_pages: AtomicBool,
}

impl Container {
    /// Fails, naming the kernel's error, if any part of `[addr, addr + len)`
    /// could not be mapped (for the driver's own queues at attach).
    pub(crate) fn check(&self, bdf: &str, addr: u64, len: usize) -> Result<(), BdevError> {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        let end = addr as usize + len;
        match failed.iter().find(|(r, _)| (addr as usize) < r.addr + r.len && r.addr < end) {
            None => Ok(()),
            Some((r, errno)) => Err(BdevError::Vfio {
                bdf: bdf.to_string(),
                action: "VFIO_IOMMU_MAP_DMA of the DMA pool (IOVA = virtual address: the IOMMU must cover 48-bit addresses)",
                source: io::Error::other(format!(
                    "{} for [{:#x}, {:#x})",
                    io::Error::from_raw_os_error(*errno),
                    r.addr,
                    r.addr + r.len
                )),
            }),
        }
    }

    /// Whether `[addr, addr + len)` is mapped for the device. One relaxed
    /// load unless some mapping has failed.
    #[inline]
    pub(crate) fn is_mapped(&self, addr: u64, len: usize) -> bool {
        if !self.any_failed.load(Ordering::Acquire) {
            return true;
        }
        let end = addr as usize + len;
        !self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(r, _)| (addr as usize) < r.addr + r.len && r.addr < end)
    }
}

impl DmaListener for Container {
    fn mapped(&self, region: RegionInfo) {
        if !region.huge && !self.warned_small_pages.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                addr = region.addr,
                "a DMA region is not on hugepages (they ran out): it is mapped for the device all the same, but \
                 reserve more (HUGEMEM=<MiB> hack/setup.sh) to keep IOMMU mappings few"
            );
        }
        if let Err(e) = self.kernel.dma_map(self.fd, region.addr, region.len) {
            tracing::error!(
                addr = region.addr,
                len = region.len,
                "VFIO_IOMMU_MAP_DMA failed ({e}); requests with buffers in this region will be refused"
            );
            self.failed.lock().unwrap_or_else(|p| p.into_inner()).push((region, e.raw_os_error().unwrap_or(libc::EIO)));
            self.any_failed.store(true, Ordering::Release);
        }
    }

    fn unmapped(&self, region: RegionInfo) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = failed.iter().position(|(r, _)| r.addr == region.addr) {
            failed.remove(i);
        } else if let Err(e) = self.kernel.dma_unmap(self.fd, region.addr, region.len) {
            tracing::warn!(addr = region.addr, "VFIO_IOMMU_UNMAP_DMA failed: {e}");
        }
    }
}

/// An NVMe controller owned through VFIO: container, group, device, BAR0.
/// Dropping it unmaps BAR0, withdraws the DMA listener and closes the handles
/// (which also removes the IOMMU mappings).
pub(crate) struct VfioDevice {
    kernel: Arc<dyn Kernel>,
    bdf: String,
    pub(crate) container: Arc<Container>,
    listener: ListenerId,
    group: Fd,
    device: Fd,
    pub(crate) bar: BarMap,
}

// SAFETY: the BAR pointer refers to device registers that stay mapped while
// this value lives; accesses to them are volatile and synchronised by the driver.
unsafe impl Send for VfioDevice {}
// SAFETY: as above.
unsafe impl Sync for VfioDevice {}

fn vfio_err<'a>(bdf: &'a str, action: &'static str) -> impl FnOnce(io::Error) -> BdevError + 'a {
    move |source| BdevError::Vfio { bdf: bdf.to_string(), action, source }
}

/// Checks that `bdf` looks like `dddd:bb:dd.f`.
pub(crate) fn check_bdf(bdf: &str) -> Result<(), BdevError> {
    let b = bdf.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    let ok = b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && hex(0..4)
        && hex(5..7)
        && hex(8..10)
        && (b'0'..=b'7').contains(&b[11]);
    if ok {
        Ok(())
    } else {
        Err(BdevError::invalid(bdf, "traddr", "a PCI address is domain:bus:device.function, e.g. 0000:00:05.0".into()))
    }
}

impl VfioDevice {
    /// Takes the NVMe controller at `bdf`: checks it (exists, is NVMe, is
    /// bound to vfio-pci, its group is viable), sets up a container, maps
    /// every DMA region into it and BAR0 into the process, and enables bus
    /// mastering.
    pub(crate) fn open(kernel: Arc<dyn Kernel>, bdf: &str) -> Result<Self, BdevError> {
        check_bdf(bdf)?;
        let info = match kernel.pci_info(bdf) {
            Ok(i) => i,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BdevError::NoPciDevice(bdf.to_string())),
            Err(e) => return Err(vfio_err(bdf, "reading sysfs")(e)),
        };
        if info.class != NVME_CLASS {
            return Err(BdevError::NotNvme { bdf: bdf.to_string(), class: info.class });
        }
        if info.driver.as_deref() != Some("vfio-pci") {
            return Err(BdevError::NotVfio { bdf: bdf.to_string(), driver: info.driver });
        }
        let group_id = info.iommu_group.ok_or_else(|| BdevError::NoIommu(bdf.to_string()))?;
        kernel.check_dma_memory()?;
        let group = kernel.open_group(group_id).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                BdevError::invalid(
                    bdf,
                    "traddr",
                    format!("IOMMU group {group_id} is already open (attached by this or another process)"),
                )
            } else {
                vfio_err(bdf, "opening its IOMMU group")(e)
            }
        })?;
        let close_on_err = |e: BdevError, fds: &[Fd]| {
            for &fd in fds {
                kernel.close(fd);
            }
            e
        };
        match kernel.group_viable(group) {
            Ok(true) => {}
            Ok(false) => {
                let others = kernel
                    .group_devices(group_id)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(d, drv)| d != bdf && drv.as_deref() != Some("vfio-pci"))
                    .map(|(d, drv)| format!("{d} ({})", drv.unwrap_or_else(|| "no driver".into())))
                    .collect::<Vec<_>>();
                return Err(close_on_err(
                    BdevError::NotViable { bdf: bdf.to_string(), group: group_id, others: others.join(", ") },
                    &[group],
                ));
            }
            Err(e) => return Err(close_on_err(vfio_err(bdf, "VFIO_GROUP_GET_STATUS")(e), &[group])),
        }
        let container_fd =
            kernel.open_container().map_err(|e| close_on_err(vfio_err(bdf, "opening /dev/vfio/vfio")(e), &[group]))?;
        if let Err(e) = kernel.set_container(group, container_fd) {
            return Err(close_on_err(
                vfio_err(bdf, "VFIO_GROUP_SET_CONTAINER / VFIO_SET_IOMMU")(e),
                &[group, container_fd],
            ));
        }
        let container = Arc::new(Container {
            kernel: kernel.clone(),
            fd: container_fd,
            any_failed: AtomicBool::new(false),
            failed: Mutex::new(Vec::new()),
            warned_small_pages: AtomicBool::new(false),
        });
        let listener = pmd::dma::add_listener(container.clone());
        let undo = |e: BdevError, fds: &[Fd]| {
            pmd::dma::remove_listener(listener);
            close_on_err(e, fds)
        };
        let device = kernel
            .device_fd(group, bdf)
            .map_err(|e| undo(vfio_err(bdf, "VFIO_GROUP_GET_DEVICE_FD")(e), &[container_fd, group]))?;
        // PCI command register: memory space (bit 1) and bus master (bit 2) on, INTx off (bit 10).
        let mut cmd = [0u8; 2];
        let enable = kernel.config_read(device, 4, &mut cmd).and_then(|()| {
            let v = (u16::from_le_bytes(cmd) | 0x2 | 0x4 | 0x400).to_le_bytes();
            kernel.config_write(device, 4, &v)
        });
        if let Err(e) = enable {
            return Err(undo(vfio_err(bdf, "enabling bus mastering")(e), &[device, container_fd, group]));
        }
        let bar = kernel
            .map_bar0(device)
            .map_err(|e| undo(vfio_err(bdf, "mapping BAR0")(e), &[device, container_fd, group]))?;
        if bar.len < 0x2000 {
            kernel.unmap_bar0(bar);
            return Err(undo(
                vfio_err(bdf, "mapping BAR0")(io::Error::other(format!(
                    "BAR0 is {} bytes, too small for NVMe registers",
                    bar.len
                ))),
                &[device, container_fd, group],
            ));
        }
        Ok(Self { kernel, bdf: bdf.to_string(), container, listener, group, device, bar })
    }

    /// Fails if DMA memory at `buf` is not mapped for the device.
    pub(crate) fn check_mapped(&self, buf: &pmd::DmaBuf) -> Result<(), BdevError> {
        self.container.check(&self.bdf, buf.iova(), buf.len())
    }

    /// The twin's kick hook (see [`Kernel::kick`]).
    pub(crate) fn kick(&self) -> Option<Kick> {
        self.kernel.kick(self.device)
    }
}

impl Drop for VfioDevice {
    fn drop(&mut self) {
        pmd::dma::remove_listener(self.listener);
        self.kernel.unmap_bar0(self.bar);
        self.kernel.close(self.device);
        self.kernel.close(self.container.fd);
        self.kernel.close(self.group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twin::{TwinKernel, TwinSpec};

    fn kernel() -> Arc<TwinKernel> {
        TwinKernel::new(vec![TwinSpec::nvme("0000:00:05.0", 5), TwinSpec::nvme("0000:00:06.0", 6)])
    }

    #[test]
    fn bad_addresses_and_devices_are_named() {
        let k = kernel();
        let err = |bdf: &str, k: &Arc<TwinKernel>| VfioDevice::open(k.clone(), bdf).err().unwrap().to_string();
        assert!(err("00:05.0", &k).contains("domain:bus:device.function"));
        assert!(err("0000:00:09.0", &k).contains("no PCI device 0000:00:09.0"));
        k.set_driver("0000:00:05.0", Some("nvme"));
        let e = err("0000:00:05.0", &k);
        assert!(e.contains("bound to nvme") && e.contains("hack/setup.sh"), "{e}");
        k.set_driver("0000:00:05.0", Some("vfio-pci"));
        k.add_device(TwinSpec { class: 0x020000, ..TwinSpec::nvme("0000:00:02.0", 2) });
        assert!(err("0000:00:02.0", &k).contains("not an NVMe controller"));
    }

    #[test]
    fn a_group_with_foreign_drivers_is_not_viable_and_they_are_named() {
        let k = kernel();
        k.add_device(TwinSpec { driver: Some("ahci".into()), class: 0x010601, ..TwinSpec::nvme("0000:00:1f.2", 5) });
        let e = VfioDevice::open(k.clone(), "0000:00:05.0").err().unwrap().to_string();
        assert!(e.contains("IOMMU group 5 is not viable") && e.contains("0000:00:1f.2 (ahci)"), "{e}");
        assert_eq!(k.open_handles(), 0, "nothing stays open after a failed attach");
    }

    #[test]
    fn regions_are_mapped_and_failures_remembered() {
        let k = kernel();
        let before = pmd::DmaBuf::new(4096).unwrap();
        let dev = VfioDevice::open(k.clone(), "0000:00:05.0").unwrap();
        assert!(k.is_mapped(before.iova(), 4096), "existing regions are mapped at open");
        k.fail_next_maps(1);
        let big = pmd::DmaBuf::new(3 << 20).unwrap();
        assert!(!dev.container.is_mapped(big.iova(), 4096), "a failed mapping is remembered");
        assert!(dev.container.is_mapped(before.iova(), 4096));
        let e = VfioDevice::open(k.clone(), "0000:00:05.0").err().unwrap().to_string();
        assert!(e.contains("already open"), "{e}");
        drop(big);
        drop(dev);
        assert_eq!(k.open_handles(), 0);
        assert!(!k.is_mapped(before.iova(), 4096), "closing the container drops its mappings");
    }
}
