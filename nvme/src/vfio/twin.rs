//! The test twin of `super::sys`: an in-memory kernel with PCI devices,
//! IOMMU groups, VFIO containers and emulated NVMe controllers
//! ([`Emu`]). The same container/group/device logic and the whole driver run
//! against it in unit tests, and the driver's cost benchmark measures the
//! driver alone with it (the emulator runs outside the measured functions).
//!
//! ```
//! use nvme::vfio::twin::{TwinKernel, TwinSpec};
//! let kernel = TwinKernel::new(vec![TwinSpec::nvme("0000:00:05.0", 5)]);
//! assert!(kernel.emu("0000:00:05.0").is_some());
//! ```

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{BarMap, Fd, Kernel, Kick, PciInfo};
pub use crate::backend::nvme::emu::{Emu, EmuConfig, EmuNamespace};
use crate::error::BdevError;

/// One PCI device of the twin.
#[derive(Debug, Clone)]
pub struct TwinSpec {
    /// PCI address.
    pub bdf: String,
    /// PCI class code.
    pub class: u32,
    /// Bound driver.
    pub driver: Option<String>,
    /// IOMMU group.
    pub group: u32,
    /// The emulated controller behind it, for NVMe devices.
    pub nvme: Option<EmuConfig>,
}

impl TwinSpec {
    /// An NVMe controller bound to vfio-pci, alone in IOMMU group `group`,
    /// with one 64 MiB namespace of 4 KiB blocks.
    pub fn nvme(bdf: &str, group: u32) -> Self {
        Self {
            bdf: bdf.into(),
            class: super::NVME_CLASS,
            driver: Some("vfio-pci".into()),
            group,
            nvme: Some(EmuConfig::new(&format!("TWIN{group}"), 4096, 16384)),
        }
    }
}

struct Device {
    spec: TwinSpec,
    emu: Option<Arc<Mutex<Emu>>>,
}

enum Handle {
    Container { maps: Arc<Mutex<Vec<(usize, usize)>>> },
    Group(u32),
    Device(String),
}

#[derive(Default)]
struct State {
    devices: Vec<Device>,
    handles: HashMap<Fd, Handle>,
    next_fd: Fd,
    fail_maps: usize,
}

/// The twin kernel. See the module docs.
pub struct TwinKernel {
    state: Mutex<State>,
    manual: Arc<std::sync::atomic::AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn no_handle() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

impl TwinKernel {
    /// A kernel with these devices. Emulated controllers run on every
    /// register write (see [`TwinKernel::set_manual`]).
    pub fn new(specs: Vec<TwinSpec>) -> Arc<Self> {
        let k = Arc::new(Self { state: Mutex::default(), manual: Default::default() });
        for s in specs {
            k.add_device(s);
        }
        lock(&k.state).next_fd = 100;
        k
    }

    /// Adds a device.
    pub fn add_device(&self, spec: TwinSpec) {
        let emu = spec.nvme.clone().map(|c| Arc::new(Mutex::new(Emu::new(c))));
        lock(&self.state).devices.push(Device { spec, emu });
    }

    /// Rebinds a device to another driver (`None`: unbound).
    pub fn set_driver(&self, bdf: &str, driver: Option<&str>) {
        if let Some(d) = lock(&self.state).devices.iter_mut().find(|d| d.spec.bdf == bdf) {
            d.spec.driver = driver.map(str::to_string);
        }
    }

    /// The emulated controller at `bdf`.
    pub fn emu(&self, bdf: &str) -> Option<Arc<Mutex<Emu>>> {
        lock(&self.state).devices.iter().find(|d| d.spec.bdf == bdf).and_then(|d| d.emu.clone())
    }

    /// With `true`, emulated controllers run only when a test calls
    /// [`Emu::step`], not on register writes.
    pub fn set_manual(&self, manual: bool) {
        self.manual.store(manual, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes the next `n` DMA mappings fail.
    pub fn fail_next_maps(&self, n: usize) {
        lock(&self.state).fail_maps = n;
    }

    /// Whether `[addr, addr + len)` is mapped in some container.
    pub fn is_mapped(&self, addr: u64, len: usize) -> bool {
        let st = lock(&self.state);
        st.handles.values().any(|h| match h {
            Handle::Container { maps } => {
                lock(maps).iter().any(|&(a, l)| addr as usize >= a && addr as usize + len <= a + l)
            }
            _ => false,
        })
    }

    /// Handles not yet closed.
    pub fn open_handles(&self) -> usize {
        lock(&self.state).handles.len()
    }

    fn new_handle(st: &mut State, h: Handle) -> Fd {
        let fd = st.next_fd;
        st.next_fd += 1;
        st.handles.insert(fd, h);
        fd
    }

    fn device_emu(&self, device: Fd) -> io::Result<Arc<Mutex<Emu>>> {
        let st = lock(&self.state);
        let Some(Handle::Device(bdf)) = st.handles.get(&device) else { return Err(no_handle()) };
        st.devices.iter().find(|d| &d.spec.bdf == bdf).and_then(|d| d.emu.clone()).ok_or_else(no_handle)
    }
}

impl Kernel for TwinKernel {
    fn pci_info(&self, bdf: &str) -> io::Result<PciInfo> {
        let st = lock(&self.state);
        let d = st.devices.iter().find(|d| d.spec.bdf == bdf).ok_or(io::ErrorKind::NotFound)?;
        Ok(PciInfo {
            class: d.spec.class,
            vendor: 0x1b36,
            device: 0x0010,
            driver: d.spec.driver.clone(),
            iommu_group: Some(d.spec.group),
        })
    }

    fn group_devices(&self, group: u32) -> io::Result<Vec<(String, Option<String>)>> {
        let st = lock(&self.state);
        Ok(st
            .devices
            .iter()
            .filter(|d| d.spec.group == group)
            .map(|d| (d.spec.bdf.clone(), d.spec.driver.clone()))
            .collect())
    }

    fn open_container(&self) -> io::Result<Fd> {
        Ok(Self::new_handle(&mut lock(&self.state), Handle::Container { maps: Arc::default() }))
    }

    fn open_group(&self, group: u32) -> io::Result<Fd> {
        let mut st = lock(&self.state);
        if st.handles.values().any(|h| matches!(h, Handle::Group(g) if *g == group)) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        Ok(Self::new_handle(&mut st, Handle::Group(group)))
    }

    fn group_viable(&self, group: Fd) -> io::Result<bool> {
        let st = lock(&self.state);
        let Some(Handle::Group(g)) = st.handles.get(&group) else { return Err(no_handle()) };
        Ok(st
            .devices
            .iter()
            .filter(|d| d.spec.group == *g)
            .all(|d| d.spec.driver.is_none() || d.spec.driver.as_deref() == Some("vfio-pci")))
    }

    fn set_container(&self, group: Fd, container: Fd) -> io::Result<()> {
        let st = lock(&self.state);
        let (Some(Handle::Group(g)), Some(Handle::Container { maps })) =
            (st.handles.get(&group), st.handles.get(&container))
        else {
            return Err(no_handle());
        };
        for d in st.devices.iter().filter(|d| d.spec.group == *g) {
            if let Some(emu) = &d.emu {
                lock(emu).iommu = maps.clone();
            }
        }
        Ok(())
    }

    fn device_fd(&self, group: Fd, bdf: &str) -> io::Result<Fd> {
        let mut st = lock(&self.state);
        let Some(Handle::Group(g)) = st.handles.get(&group) else { return Err(no_handle()) };
        let g = *g;
        if !st.devices.iter().any(|d| d.spec.bdf == bdf && d.spec.group == g) {
            return Err(io::Error::from_raw_os_error(libc::ENODEV));
        }
        Ok(Self::new_handle(&mut st, Handle::Device(bdf.to_string())))
    }

    fn map_bar0(&self, device: Fd) -> io::Result<BarMap> {
        let emu = self.device_emu(device)?;
        let regs = lock(&emu).regs.clone();
        Ok(BarMap { base: regs.base(), len: regs.len() })
    }

    fn unmap_bar0(&self, _bar: BarMap) {}

    fn config_read(&self, device: Fd, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.device_emu(device)?;
        buf.fill(0);
        Ok(())
    }

    fn config_write(&self, device: Fd, _offset: u64, _buf: &[u8]) -> io::Result<()> {
        self.device_emu(device).map(|_| ())
    }

    fn dma_map(&self, container: Fd, addr: usize, len: usize) -> io::Result<()> {
        let mut st = lock(&self.state);
        if st.fail_maps > 0 {
            st.fail_maps -= 1;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let Some(Handle::Container { maps }) = st.handles.get(&container) else { return Err(no_handle()) };
        lock(maps).push((addr, len));
        Ok(())
    }

    fn dma_unmap(&self, container: Fd, addr: usize, _len: usize) -> io::Result<()> {
        let st = lock(&self.state);
        let Some(Handle::Container { maps }) = st.handles.get(&container) else { return Err(no_handle()) };
        lock(maps).retain(|&(a, _)| a != addr);
        Ok(())
    }

    fn close(&self, fd: Fd) {
        if let Some(Handle::Container { maps }) = lock(&self.state).handles.remove(&fd) {
            lock(&maps).clear();
        }
    }

    fn kick(&self, device: Fd) -> Option<Kick> {
        let emu = self.device_emu(device).ok()?;
        let manual = self.manual.clone();
        Some(Arc::new(move || {
            if !manual.load(std::sync::atomic::Ordering::Relaxed) {
                lock(&emu).step();
            }
        }))
    }

    fn check_dma_memory(&self) -> Result<(), BdevError> {
        Ok(())
    }
}
