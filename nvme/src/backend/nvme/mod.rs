//! The NVMe bdev: a userspace, polled-mode driver for NVMe controllers owned
//! through VFIO ([`crate::vfio`]), SPDK's `bdev_nvme` in spirit.
//!
//! [`attach`] takes the controller at a PCI address, brings it up
//! (`admin`: disable, program the admin queue, enable, within CAP.TO),
//! identifies it and its namespaces, and registers every namespace as a bdev
//! named `<controller>n<nsid>` (`Nvme0n1`). Each reactor that does I/O gets
//! its own I/O queue pair ([`IoQpair`]), shared by all bdev channels of that
//! controller on the reactor and polled once per round; no lock is taken on
//! the I/O path. [`detach`] shuts the controller down normally (CC.SHN).
//!
//! See `docs/nvme.md` for the design: queues and doorbells, PRP/SGL, errors,
//! timeouts and resets.
//!
//! ```
//! use nvme::nvme::{NvmeAttachConfig, attach_twin};
//! use nvme::vfio::twin::{TwinKernel, TwinSpec};
//! let kernel = TwinKernel::new(vec![TwinSpec::nvme("0000:00:05.0", 5)]);
//! let registry = nvme::BdevRegistry::new();
//! let config = NvmeAttachConfig::pcie("Twin0", "0000:00:05.0");
//! assert_eq!(attach_twin(&registry, &config, &kernel).unwrap(), ["Twin0n1"]);
//! nvme::nvme::detach(&registry, "Twin0").unwrap();
//! ```

pub(crate) mod admin;
mod ctrlr;
pub(crate) mod emu;
mod prp;
mod qpair;
mod queue;
pub(crate) mod regs;
mod spec;

use std::sync::{Arc, Mutex};

pub use ctrlr::{Controller, Namespace};
use pmd::{IoChannel, PollStatus};
pub use qpair::IoQpair;
pub use spec::{ControllerData, ErrorLogEntry, HealthLog, NamespaceData, Status};

use crate::bdev::{Bdev, BdevRegistry, Completion, Io};
use crate::error::BdevError;
use crate::vfio::Kernel;
use crate::vfio::twin::TwinKernel;

/// Parameters of `bdev_nvme_attach_controller`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NvmeAttachConfig {
    /// Name of the controller; its namespaces become bdevs `<name>n<nsid>`.
    pub name: String,
    /// Transport: `pcie` (a local controller bound to vfio-pci).
    #[serde(default = "pcie")]
    pub trtype: String,
    /// PCI address of the controller, e.g. 0000:00:05.0 (see `hack/setup.sh status`).
    pub traddr: String,
    /// Entries per I/O queue (capped by the controller's CAP.MQES).
    #[serde(default = "default_depth")]
    pub io_queue_depth: u32,
    /// Milliseconds before an I/O command is aborted, and as long again
    /// before the controller is reset; 0 never.
    #[serde(default = "default_timeout")]
    pub io_timeout_ms: u64,
}

fn pcie() -> String {
    "pcie".into()
}

fn default_depth() -> u32 {
    256
}

fn default_timeout() -> u64 {
    30_000
}

impl NvmeAttachConfig {
    /// A local controller with default options.
    pub fn pcie(name: &str, traddr: &str) -> Self {
        Self {
            name: name.into(),
            trtype: pcie(),
            traddr: traddr.into(),
            io_queue_depth: default_depth(),
            io_timeout_ms: default_timeout(),
        }
    }
}

/// The attached controllers (a PCI device can be owned once per process).
static CONTROLLERS: Mutex<Vec<Arc<Controller>>> = Mutex::new(Vec::new());

fn attached() -> std::sync::MutexGuard<'static, Vec<Arc<Controller>>> {
    CONTROLLERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Attaches the controller at `config.traddr` (bound to vfio-pci) and
/// registers its namespaces as bdevs. Returns their names.
pub fn attach(registry: &Arc<BdevRegistry>, config: &NvmeAttachConfig) -> Result<Vec<String>, BdevError> {
    attach_with(registry, config, Arc::new(crate::vfio::sys::RealKernel))
}

/// [`attach`] through the test twin's kernel and its emulated controllers.
pub fn attach_twin(
    registry: &Arc<BdevRegistry>,
    config: &NvmeAttachConfig,
    kernel: &Arc<TwinKernel>,
) -> Result<Vec<String>, BdevError> {
    attach_with(registry, config, kernel.clone())
}

fn attach_with(
    registry: &Arc<BdevRegistry>,
    config: &NvmeAttachConfig,
    kernel: Arc<dyn Kernel>,
) -> Result<Vec<String>, BdevError> {
    if config.trtype != "pcie" {
        return Err(BdevError::invalid(
            &config.name,
            "trtype",
            format!("{:?} is not supported; use \"pcie\"", config.trtype),
        ));
    }
    if !(2..=65536).contains(&config.io_queue_depth) {
        return Err(BdevError::invalid(
            &config.name,
            "io_queue_depth",
            format!("{} is not from 2 to 65536", config.io_queue_depth),
        ));
    }
    crate::vfio::check_bdf(&config.traddr)?;
    if let Some(c) = attached().iter().find(|c| c.name() == config.name || c.traddr() == config.traddr) {
        return Err(BdevError::AlreadyAttached { traddr: c.traddr().to_string(), name: c.name().to_string() });
    }
    let ctrl = Controller::open(kernel, config)?;
    let mut names = Vec::new();
    let mut result = Ok(());
    for ns in ctrl.namespaces() {
        let name = format!("{}n{}", config.name, ns.nsid);
        if ns.data.metadata_size != 0 || !(512..=65536).contains(&ns.data.block_size) || ns.data.nsze == 0 {
            tracing::warn!(
                bdev = name,
                "namespace skipped: {}-byte blocks with {} bytes of metadata are not supported",
                ns.data.block_size,
                ns.data.metadata_size
            );
            continue;
        }
        let uuid = namespace_uuid(&ctrl.data().serial, ns.nsid);
        let backend = super::Backend::Nvme(NvmeNs {
            ctrl: ctrl.clone(),
            nsid: ns.nsid,
            shift: ns.data.block_size.trailing_zeros(),
        });
        match Bdev::new(&name, Some(uuid), ns.data.block_size, ns.data.nsze, backend).and_then(|b| registry.register(b))
        {
            Ok(_) => names.push(name),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if let Err(e) = result {
        for n in &names {
            let _ = registry.unregister(n, Some("nvme"));
        }
        let _ = ctrl.shutdown();
        return Err(e);
    }
    attached().push(ctrl);
    Ok(names)
}

/// A UUID that stays the same for a namespace across restarts: derived
/// from the controller's serial number and the namespace id.
fn namespace_uuid(serial: &str, nsid: u32) -> uuid::Uuid {
    use std::hash::{Hash, Hasher};
    let mut bytes = [0u8; 16];
    for (i, half) in bytes.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ("claudefs-nvme-namespace", serial, nsid, i).hash(&mut h);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// Detaches a controller: deletes its namespace bdevs (refused while any is
/// open or claimed) and shuts it down normally (CC.SHN), waiting for it.
pub fn detach(registry: &BdevRegistry, name: &str) -> Result<(), BdevError> {
    let ctrl = controller(name)?;
    let bdevs: Vec<Arc<Bdev>> = registry
        .list()
        .into_iter()
        .filter(|b| matches!(&b.backend, super::Backend::Nvme(ns) if Arc::ptr_eq(&ns.ctrl, &ctrl)))
        .collect();
    for b in &bdevs {
        if let Some(by) = b.claimed_by() {
            return Err(BdevError::Claimed { name: b.name().to_string(), by });
        }
        if b.open_count() > 0 {
            return Err(BdevError::Busy { name: b.name().to_string(), opens: b.open_count() });
        }
    }
    for b in &bdevs {
        registry.unregister(b.name(), Some("nvme"))?;
    }
    attached().retain(|c| !Arc::ptr_eq(c, &ctrl));
    ctrl.shutdown()
}

/// The attached controllers, in attach order.
pub fn controllers() -> Vec<Arc<Controller>> {
    attached().clone()
}

/// The attached controller named `name`.
pub fn controller(name: &str) -> Result<Arc<Controller>, BdevError> {
    attached().iter().find(|c| c.name() == name).cloned().ok_or_else(|| BdevError::NotFound(name.to_string()))
}

/// A namespace as a bdev backend.
pub(crate) struct NvmeNs {
    pub(crate) ctrl: Arc<Controller>,
    nsid: u32,
    shift: u32,
}

impl NvmeNs {
    pub(crate) fn supports(&self, op: crate::IoType) -> bool {
        match op {
            crate::IoType::Unmap => self.ctrl.data().supports_deallocate(),
            crate::IoType::WriteZeroes => self.ctrl.data().supports_write_zeroes(),
            _ => true,
        }
    }

    pub(crate) fn channel(&self, ctx: &mut pmd::Ctx<'_>) -> Result<NvmeChannel, BdevError> {
        let qpair = ctx.io_channel(&self.ctrl)?;
        if !qpair.borrow_mut().has_poller {
            qpair.borrow_mut().has_poller = true;
            let weak = qpair.downgrade();
            ctx.register_poller(format!("nvme_qpair_{}", self.ctrl.name()), 0, move |ctx| {
                let Some(qp) = weak.upgrade() else {
                    if let Some(id) = ctx.current_poller() {
                        ctx.unregister_poller(id);
                    }
                    return PollStatus::Idle;
                };
                let mut qp = qp.borrow_mut();
                if qp.poll(ctx.now()) > 0 {
                    PollStatus::Busy
                } else if qp.busy() {
                    PollStatus::Waiting
                } else {
                    PollStatus::Idle
                }
            });
        }
        let route = qpair.borrow_mut().attach_route();
        Ok(NvmeChannel { qpair, route, nsid: self.nsid, shift: self.shift })
    }
}

/// A bdev channel's share of its reactor's queue pair.
pub(crate) struct NvmeChannel {
    qpair: IoChannel<IoQpair>,
    route: u16,
    nsid: u32,
    shift: u32,
}

impl NvmeChannel {
    #[inline]
    pub(crate) fn submit(&mut self, now: u64, io: Io) -> Result<(), Io> {
        self.qpair.borrow_mut().submit(now, self.route, self.nsid, self.shift, io)
    }

    #[inline]
    pub(crate) fn poll(&mut self, out: &mut Vec<Completion>) {
        self.qpair.borrow_mut().take(self.route, out);
    }

    pub(crate) fn abort(&mut self, tag: u64) {
        self.qpair.borrow_mut().abort(self.route, tag);
    }
}

impl Drop for NvmeChannel {
    fn drop(&mut self) {
        self.qpair.borrow_mut().detach_route(self.route);
    }
}
