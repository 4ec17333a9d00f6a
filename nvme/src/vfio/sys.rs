//! The real [`Kernel`]: every VFIO ioctl, mmap and sysfs read of the crate.
//!
//! The ioctls are issued directly with the kernel's structures (a handful of
//! `#[repr(C)]` types from `<linux/vfio.h>`) rather than through rust-vmm's
//! `vfio-ioctls`, which is built for virtual machine monitors and brings
//! `vm-memory` and KVM types with it; the driver needs nine calls.

use std::ffi::CString;
use std::io;
use std::path::Path;

use super::{BarMap, Fd, Kernel, Kick, PciInfo};
use crate::error::BdevError;

// <linux/vfio.h>: _IO(';', 100 + n).
const VFIO_GET_API_VERSION: libc::c_ulong = 0x3B64;
const VFIO_CHECK_EXTENSION: libc::c_ulong = 0x3B65;
const VFIO_SET_IOMMU: libc::c_ulong = 0x3B66;
const VFIO_GROUP_GET_STATUS: libc::c_ulong = 0x3B67;
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = 0x3B68;
const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = 0x3B6A;
const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = 0x3B6C;
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = 0x3B71;
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = 0x3B72;
const VFIO_API_VERSION: i32 = 0;
const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
const VFIO_REGION_INFO_FLAG_MMAP: u32 = 4;
const VFIO_DMA_MAP_FLAG_READ_WRITE: u32 = 3;
const BAR0_INDEX: u32 = 0;
const CONFIG_INDEX: u32 = 7;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn open(path: &str) -> io::Result<Fd> {
    let c = CString::new(path).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path; the returned fd is ours.
    cvt(unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })
}

/// ioctl with an integer argument.
fn ioctl_val(fd: Fd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: these requests take an integer argument and no pointer.
    cvt(unsafe { libc::ioctl(fd, req, arg) })
}

/// ioctl with a pointer to `T`.
///
/// # Safety
///
/// `req` must be a request whose argument is a `T` (as `<linux/vfio.h>` defines it).
unsafe fn ioctl_ptr<T>(fd: Fd, req: libc::c_ulong, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: `arg` is a live, writable T of the type the request expects (caller's contract).
    cvt(unsafe { libc::ioctl(fd, req, arg as *mut T) })
}

fn region_info(device: Fd, index: u32) -> io::Result<RegionInfo> {
    let mut info = RegionInfo { argsz: std::mem::size_of::<RegionInfo>() as u32, index, ..Default::default() };
    // SAFETY: VFIO_DEVICE_GET_REGION_INFO takes a struct vfio_region_info.
    unsafe { ioctl_ptr(device, VFIO_DEVICE_GET_REGION_INFO, &mut info) }?;
    Ok(info)
}

fn sysfs(bdf: &str) -> std::path::PathBuf {
    Path::new("/sys/bus/pci/devices").join(bdf)
}

fn read_hex(path: &Path) -> io::Result<u32> {
    let s = std::fs::read_to_string(path)?;
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).map_err(io::Error::other)
}

fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// The host's VFIO.
pub(crate) struct RealKernel;

impl Kernel for RealKernel {
    fn pci_info(&self, bdf: &str) -> io::Result<PciInfo> {
        let dir = sysfs(bdf);
        if !dir.exists() {
            return Err(io::ErrorKind::NotFound.into());
        }
        Ok(PciInfo {
            class: read_hex(&dir.join("class"))?,
            vendor: read_hex(&dir.join("vendor"))? as u16,
            device: read_hex(&dir.join("device"))? as u16,
            driver: link_name(&dir.join("driver")),
            iommu_group: link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok()),
        })
    }

    fn group_devices(&self, group: u32) -> io::Result<Vec<(String, Option<String>)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(format!("/sys/kernel/iommu_groups/{group}/devices"))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let driver = link_name(&sysfs(&name).join("driver"));
            out.push((name, driver));
        }
        out.sort();
        Ok(out)
    }

    fn open_container(&self) -> io::Result<Fd> {
        let fd = open("/dev/vfio/vfio")?;
        let check = || -> io::Result<()> {
            if ioctl_val(fd, VFIO_GET_API_VERSION, 0)? != VFIO_API_VERSION {
                return Err(io::Error::other("unknown VFIO API version"));
            }
            if ioctl_val(fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU)? != 1 {
                return Err(io::Error::other("the kernel's VFIO has no type1v2 IOMMU"));
            }
            Ok(())
        };
        check().inspect_err(|_| self.close(fd))?;
        Ok(fd)
    }

    fn open_group(&self, group: u32) -> io::Result<Fd> {
        open(&format!("/dev/vfio/{group}"))
    }

    fn group_viable(&self, group: Fd) -> io::Result<bool> {
        let mut status = GroupStatus { argsz: std::mem::size_of::<GroupStatus>() as u32, flags: 0 };
        // SAFETY: VFIO_GROUP_GET_STATUS takes a struct vfio_group_status.
        unsafe { ioctl_ptr(group, VFIO_GROUP_GET_STATUS, &mut status) }?;
        Ok(status.flags & VFIO_GROUP_FLAGS_VIABLE != 0)
    }

    fn set_container(&self, group: Fd, container: Fd) -> io::Result<()> {
        let mut fd = container;
        // SAFETY: VFIO_GROUP_SET_CONTAINER takes a pointer to the container fd (an int).
        unsafe { ioctl_ptr(group, VFIO_GROUP_SET_CONTAINER, &mut fd) }?;
        ioctl_val(container, VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU)?;
        Ok(())
    }

    fn device_fd(&self, group: Fd, bdf: &str) -> io::Result<Fd> {
        let name = CString::new(bdf).map_err(io::Error::other)?;
        // SAFETY: VFIO_GROUP_GET_DEVICE_FD takes a NUL-terminated device name; the result is a new fd.
        cvt(unsafe { libc::ioctl(group, VFIO_GROUP_GET_DEVICE_FD, name.as_ptr()) })
    }

    fn map_bar0(&self, device: Fd) -> io::Result<BarMap> {
        let info = region_info(device, BAR0_INDEX)?;
        if info.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(io::Error::other("BAR0 cannot be mmapped"));
        }
        let len = info.size as usize;
        // SAFETY: maps the device region VFIO describes at its offset in the device fd;
        // the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device,
                info.offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(BarMap { base: ptr.cast(), len })
    }

    fn unmap_bar0(&self, bar: BarMap) {
        // SAFETY: `bar` was returned by map_bar0 and is unmapped once, after its last use.
        unsafe { libc::munmap(bar.base.cast(), bar.len) };
    }

    fn config_read(&self, device: Fd, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let base = region_info(device, CONFIG_INDEX)?.offset;
        // SAFETY: reads into a live, writable buffer of the length we pass.
        let n = unsafe { libc::pread(device, buf.as_mut_ptr().cast(), buf.len(), (base + offset) as libc::off_t) };
        if n as usize != buf.len() {
            return Err(if n < 0 { io::Error::last_os_error() } else { io::Error::other("short config read") });
        }
        Ok(())
    }

    fn config_write(&self, device: Fd, offset: u64, buf: &[u8]) -> io::Result<()> {
        let base = region_info(device, CONFIG_INDEX)?.offset;
        // SAFETY: writes from a live buffer of the length we pass.
        let n = unsafe { libc::pwrite(device, buf.as_ptr().cast(), buf.len(), (base + offset) as libc::off_t) };
        if n as usize != buf.len() {
            return Err(if n < 0 { io::Error::last_os_error() } else { io::Error::other("short config write") });
        }
        Ok(())
    }

    fn dma_map(&self, container: Fd, addr: usize, len: usize) -> io::Result<()> {
        let mut map = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ_WRITE,
            vaddr: addr as u64,
            iova: addr as u64,
            size: len as u64,
        };
        // SAFETY: VFIO_IOMMU_MAP_DMA takes a struct vfio_iommu_type1_dma_map; the memory
        // stays mapped until the matching unmap (pool regions: for the process's life).
        unsafe { ioctl_ptr(container, VFIO_IOMMU_MAP_DMA, &mut map) }?;
        Ok(())
    }

    fn dma_unmap(&self, container: Fd, addr: usize, len: usize) -> io::Result<()> {
        let mut unmap =
            DmaUnmap { argsz: std::mem::size_of::<DmaUnmap>() as u32, flags: 0, iova: addr as u64, size: len as u64 };
        // SAFETY: VFIO_IOMMU_UNMAP_DMA takes a struct vfio_iommu_type1_dma_unmap.
        unsafe { ioctl_ptr(container, VFIO_IOMMU_UNMAP_DMA, &mut unmap) }?;
        Ok(())
    }

    fn close(&self, fd: Fd) {
        // SAFETY: `fd` is a handle this kernel returned and the caller closes once.
        unsafe { libc::close(fd) };
    }

    fn kick(&self, _device: Fd) -> Option<Kick> {
        None
    }

    fn check_dma_memory(&self) -> Result<(), BdevError> {
        let stats = pmd::dma::mem_stats();
        check_hugepages(stats.hugepage_mode, stats.hugepage_bytes, stats.system_hugepages_free)
    }
}

/// Hugepages the driver asks an operator to reserve at least (its queues
/// need a few MiB; the rest is for data buffers).
pub(crate) const SUGGESTED_HUGEPAGES: u64 = 512;

/// VFIO devices get DMA memory from hugepages: refuses a pool that will not
/// use them or a system with none reserved.
pub(crate) fn check_hugepages(
    mode: pmd::dma::HugepageMode,
    pool_huge_bytes: u64,
    system_free: u64,
) -> Result<(), BdevError> {
    let reason = match mode {
        pmd::dma::HugepageMode::Never => "the DMA pool was started with --hugepages never",
        _ if pool_huge_bytes == 0 && system_free == 0 => "no free 2 MiB hugepages are reserved",
        _ => return Ok(()),
    };
    Err(BdevError::NoHugepages { reason, pages: SUGGESTED_HUGEPAGES })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmd::dma::HugepageMode;

    #[test]
    fn hugepages_are_required_and_the_fix_is_named() {
        let e = check_hugepages(HugepageMode::Auto, 0, 0).unwrap_err().to_string();
        assert!(e.contains("/proc/sys/vm/nr_hugepages") && e.contains("512") && e.contains("HUGEMEM"), "{e}");
        assert!(check_hugepages(HugepageMode::Never, 4 << 20, 10).unwrap_err().to_string().contains("never"));
        assert!(check_hugepages(HugepageMode::Auto, 2 << 20, 0).is_ok());
        assert!(check_hugepages(HugepageMode::Require, 0, 1).is_ok());
    }
}
