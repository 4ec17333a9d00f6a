//! One NVMe controller: bring-up, identification, its I/O queue ids, reset
//! and shutdown. It is the [`pmd::IoDevice`] whose per-reactor channel is an
//! [`IoQpair`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pmd::DmaBuf;

use super::NvmeAttachConfig;
use super::admin::{ADMIN_ENTRIES, Admin, run_init, wait_for};
use super::qpair::IoQpair;
use super::queue::Queue;
use super::regs::Regs;
use super::spec::{Cap, ControllerData, ErrorLogEntry, HealthLog, LOG_ERROR, LOG_SMART, NamespaceData, Sqe, reg};
use crate::error::BdevError;
use crate::vfio::{Kernel, VfioDevice};

const RESETTING: u64 = 1;
const FAILED: u64 = 2;
pub(crate) const GEN_SHIFT: u32 = 2;

/// The controller state queue pairs watch (one atomic load per poll).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CtrlState {
    /// Bumped every time the controller has been disabled by a reset.
    pub(crate) generation: u64,
    pub(crate) resetting: bool,
    pub(crate) failed: bool,
}

/// An active namespace.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Namespace {
    /// Namespace id.
    pub nsid: u32,
    /// What Identify Namespace said.
    #[serde(flatten)]
    pub data: NamespaceData,
}

/// An attached NVMe controller. See the module docs.
pub struct Controller {
    pub(crate) config: NvmeAttachConfig,
    pub(crate) regs: Arc<Regs>,
    cap: Cap,
    /// The VS register: NVMe version the controller implements.
    version: u32,
    data: ControllerData,
    namespaces: Vec<Namespace>,
    admin: Mutex<Admin>,
    state: AtomicU64,
    /// Queue ids not in use.
    qids: Mutex<Vec<u16>>,
    io_queues: u16,
    queue_entries: u32,
    max_transfer: usize,
    reset_lock: Mutex<()>,
    /// Last so that the registers and memory are released after everything else.
    vfio: VfioDevice,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("name", &self.config.name).field("traddr", &self.config.traddr).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Controller {
    /// Takes the controller at `config.traddr` through `kernel`, brings it up
    /// and identifies it and its namespaces.
    pub(crate) fn open(kernel: Arc<dyn Kernel>, config: &NvmeAttachConfig) -> Result<Arc<Self>, BdevError> {
        let name = config.name.as_str();
        let vfio = VfioDevice::open(kernel, &config.traddr)?;
        // SAFETY: BAR0 stays mapped as long as `vfio`, which the controller owns
        // and drops last.
        let regs = Arc::new(unsafe { Regs::new(vfio.bar.base, vfio.bar.len, vfio.kick(), None) });
        let cap = Cap::decode(regs.read64(reg::CAP));
        if !cap.nvm || cap.page_min > 4096 {
            return Err(BdevError::invalid(
                name,
                "traddr",
                format!("the controller lacks the NVM command set or 4 KiB pages ({cap:?})"),
            ));
        }
        let version = regs.read32(reg::VS);
        regs.set_doorbell_stride(cap.doorbell_stride);
        let mut aq = Queue::new(regs.clone(), 0, ADMIN_ENTRIES.min(cap.max_entries))?;
        let mut admin_page = DmaBuf::zeroed(4096)?;
        for buf in [aq.sq_buf(), aq.cq_buf(), &admin_page] {
            vfio.check_mapped(buf)?;
        }
        run_init(&regs, cap, &mut aq, name)?;
        admin_page.fill(0);
        let mut admin = Admin::new(aq, admin_page);
        let data = ControllerData::parse(&admin.read(&regs, name, "Identify Controller", |a| Sqe::identify(1, 0, a))?);
        let list = admin.read(&regs, name, "Identify Active Namespace List", |a| Sqe::identify(2, 0, a))?;
        let mut namespaces = Vec::new();
        for id in
            list.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).take_while(|&i| i != 0)
        {
            let ns = NamespaceData::parse(&admin.read(&regs, name, "Identify Namespace", |a| Sqe::identify(0, id, a))?);
            namespaces.push(Namespace { nsid: id, data: ns });
        }
        let want = regs.max_qid().clamp(1, 64);
        let granted = admin.execute(&regs, name, "Set Features (Number of Queues)", Sqe::set_num_queues(want))?.dw0;
        let io_queues = (((granted & 0xffff).min(granted >> 16)) as u16 + 1).min(want);
        let mdts = if data.mdts == 0 { usize::MAX } else { 4096usize << data.mdts };
        let ctrl = Arc::new(Self {
            config: config.clone(),
            queue_entries: config.io_queue_depth.clamp(2, cap.max_entries),
            max_transfer: mdts.min(2 << 20),
            cap,
            version,
            data,
            namespaces,
            admin: Mutex::new(admin),
            state: AtomicU64::new(0),
            qids: Mutex::new((1..=io_queues).rev().collect()),
            io_queues,
            reset_lock: Mutex::new(()),
            regs,
            vfio,
        });
        tracing::info!(
            ctrl = name,
            traddr = ctrl.config.traddr,
            model = ctrl.data.model,
            serial = ctrl.data.serial,
            namespaces = ctrl.namespaces.len(),
            io_queues,
            max_transfer = ctrl.max_transfer,
            sgl = ctrl.data.sgl,
            "NVMe controller attached"
        );
        Ok(ctrl)
    }

    /// Its name (`Nvme0`).
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The PCI address.
    pub fn traddr(&self) -> &str {
        &self.config.traddr
    }

    /// What Identify Controller said.
    pub fn data(&self) -> &ControllerData {
        &self.data
    }

    /// The NVMe version the controller implements (VS), e.g. `1.4.0`.
    pub fn version(&self) -> String {
        format!("{}.{}.{}", self.version >> 16, (self.version >> 8) & 0xff, self.version & 0xff)
    }

    /// The active namespaces.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    /// I/O queue pairs the controller granted.
    pub fn io_queues(&self) -> u16 {
        self.io_queues
    }

    /// I/O queue pairs in use (one per reactor doing I/O).
    pub fn io_queues_in_use(&self) -> u16 {
        self.io_queues - lock(&self.qids).len() as u16
    }

    /// Entries per I/O queue.
    pub fn queue_entries(&self) -> u32 {
        self.queue_entries
    }

    /// Largest transfer of one command, in bytes (MDTS, at most 2 MiB).
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }

    /// Whether commands may use SGLs.
    pub fn sgl(&self) -> bool {
        self.data.sgl
    }

    /// Times the controller has been reset.
    pub fn resets(&self) -> u64 {
        self.state().generation
    }

    pub(crate) fn io_timeout_ns(&self) -> u64 {
        self.config.io_timeout_ms * 1_000_000
    }

    pub(crate) fn state(&self) -> CtrlState {
        let s = self.state.load(Ordering::Acquire);
        CtrlState { generation: s >> GEN_SHIFT, resetting: s & RESETTING != 0, failed: s & FAILED != 0 }
    }

    /// The raw state: `generation << GEN_SHIFT` while neither resetting nor failed.
    #[inline]
    pub(crate) fn state_word(&self) -> u64 {
        self.state.load(Ordering::Acquire)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.state().generation
    }

    pub(crate) fn is_dma_mapped(&self, iova: u64, len: usize) -> bool {
        self.vfio.container.is_mapped(iova, len)
    }

    /// A queue id for a new queue pair.
    pub(crate) fn alloc_qid(&self) -> Result<u16, BdevError> {
        lock(&self.qids).pop().ok_or_else(|| {
            BdevError::invalid(
                self.name(),
                "io queues",
                format!(
                    "the controller granted {} I/O queue pairs and all are in use (one per reactor)",
                    self.io_queues
                ),
            )
        })
    }

    pub(crate) fn free_qid(&self, qid: u16) {
        lock(&self.qids).push(qid);
    }

    /// Creates the I/O CQ and SQ of `q` if the controller is still in generation `generation`.
    pub(crate) fn create_io_queues(&self, q: &Queue, generation: u64) -> Result<(), BdevError> {
        let mut admin = lock(&self.admin);
        if self.generation() != generation {
            return Err(BdevError::invalid(self.name(), "queue", "the controller was reset meanwhile".into()));
        }
        let name = self.name();
        admin.execute(
            &self.regs,
            name,
            "Create I/O Completion Queue",
            Sqe::create_cq(q.qid, q.entries(), q.cq_iova()),
        )?;
        if let Err(e) = admin.execute(
            &self.regs,
            name,
            "Create I/O Submission Queue",
            Sqe::create_sq(q.qid, q.entries(), q.sq_iova(), q.qid),
        ) {
            let _ = admin.execute(&self.regs, name, "Delete I/O Completion Queue", Sqe::delete_cq(q.qid));
            return Err(e);
        }
        Ok(())
    }

    /// Deletes queue pair `qid` (its commands end aborted). Succeeds at once
    /// if a reset since `generation` already removed it.
    pub(crate) fn delete_io_queues(&self, qid: u16, generation: u64) -> Result<(), BdevError> {
        let mut admin = lock(&self.admin);
        let state = self.state();
        if state.generation != generation {
            return Ok(());
        }
        if state.failed {
            return Err(BdevError::invalid(self.name(), "queue", "the controller failed".into()));
        }
        admin.execute(&self.regs, self.name(), "Delete I/O Submission Queue", Sqe::delete_sq(qid))?;
        admin.execute(&self.regs, self.name(), "Delete I/O Completion Queue", Sqe::delete_cq(qid))?;
        Ok(())
    }

    /// Posts an Abort for command `cid` of queue `sqid` without waiting.
    /// False if the admin queue is busy (the caller tries again later).
    pub(crate) fn post_abort(&self, sqid: u16, cid: u16) -> bool {
        match self.admin.try_lock() {
            Ok(mut admin) => admin.post(Sqe::abort(sqid, cid)),
            Err(_) => false,
        }
    }

    /// Resets the controller on another thread, unless a reset is under way.
    pub(crate) fn request_reset(self: &Arc<Self>) {
        if self.state.fetch_or(RESETTING, Ordering::AcqRel) & RESETTING != 0 {
            return;
        }
        let ctrl = self.clone();
        let spawned = std::thread::Builder::new().name(format!("{}_reset", self.name())).spawn(move || {
            if let Err(e) = ctrl.reset_locked() {
                tracing::error!(ctrl = ctrl.name(), "controller reset failed: {e}");
            }
        });
        if let Err(e) = spawned {
            tracing::error!(ctrl = self.name(), "cannot start a reset thread: {e}");
            self.state.fetch_and(!RESETTING, Ordering::AcqRel);
        }
    }

    /// Resets the controller: disable (the controller drops every command and
    /// stops all DMA), bring up the admin queue again and re-enable. Queue
    /// pairs notice the new generation on their next poll, fail what they had
    /// in flight with `Aborted` and re-create their queues.
    pub fn reset(&self) -> Result<(), BdevError> {
        self.state.fetch_or(RESETTING, Ordering::AcqRel);
        self.reset_locked()
    }

    /// [`Controller::reset`] with RESETTING already set.
    fn reset_locked(&self) -> Result<(), BdevError> {
        let _one_at_a_time = lock(&self.reset_lock);
        let name = self.name();
        tracing::warn!(ctrl = name, "resetting the controller");
        self.state.fetch_or(RESETTING, Ordering::AcqRel);
        let mut admin = lock(&self.admin);
        let cc = self.regs.read32(reg::CC);
        self.regs.write32(reg::CC, cc & !reg::CC_EN);
        let disabled = wait_for(&self.regs, self.cap.timeout_ms * 1_000_000, |_| {
            (self.regs.read32(reg::CSTS) & reg::CSTS_RDY == 0).then_some(())
        });
        if disabled.is_none() {
            self.state.fetch_or(FAILED, Ordering::AcqRel);
            return Err(BdevError::ControllerTimeout {
                ctrl: name.to_string(),
                what: "CSTS.RDY to clear after CC.EN = 0",
                ms: self.cap.timeout_ms,
            });
        }
        // Disabled: no command will complete and no DMA happens any more.
        self.state.fetch_add(1 << GEN_SHIFT, Ordering::AcqRel);
        admin.reset();
        let result = run_init(&self.regs, self.cap, &mut admin.q, name).and_then(|()| {
            admin
                .execute(&self.regs, name, "Set Features (Number of Queues)", Sqe::set_num_queues(self.io_queues))
                .map(|_| ())
        });
        match result {
            Ok(()) => {
                self.state.fetch_and(!RESETTING, Ordering::AcqRel);
                tracing::info!(ctrl = name, generation = self.generation(), "controller reset done");
                Ok(())
            }
            Err(e) => {
                self.state.fetch_or(FAILED, Ordering::AcqRel);
                Err(e)
            }
        }
    }

    /// Reads the SMART / Health Information log page.
    pub fn health(&self) -> Result<HealthLog, BdevError> {
        let page = lock(&self.admin).read(&self.regs, self.name(), "Get Log Page (SMART / Health)", |a| {
            Sqe::get_log_page(LOG_SMART, 0xffff_ffff, 512, a)
        })?;
        Ok(HealthLog::parse(&page))
    }

    /// Reads the Error Information log page (the entries that fit 4 KiB).
    pub fn error_log(&self) -> Result<Vec<ErrorLogEntry>, BdevError> {
        let entries = (self.data.elpe as u32 + 1).min(64);
        let page = lock(&self.admin).read(&self.regs, self.name(), "Get Log Page (Error Information)", |a| {
            Sqe::get_log_page(LOG_ERROR, 0xffff_ffff, entries * 64, a)
        })?;
        Ok(ErrorLogEntry::parse_page(&page[..entries as usize * 64]))
    }

    /// Normal shutdown: CC.SHN = 01, then wait for CSTS.SHST = complete.
    pub(crate) fn shutdown(&self) -> Result<(), BdevError> {
        let _admin = lock(&self.admin);
        let cc = self.regs.read32(reg::CC);
        self.regs.write32(reg::CC, (cc & !reg::CC_SHN_MASK) | reg::CC_SHN_NORMAL);
        let ms = self.cap.timeout_ms.max(10_000);
        wait_for(&self.regs, ms * 1_000_000, |_| {
            (self.regs.read32(reg::CSTS) & reg::CSTS_SHST_MASK == reg::CSTS_SHST_DONE).then_some(())
        })
        .ok_or_else(|| BdevError::ControllerTimeout {
            ctrl: self.name().to_string(),
            what: "CSTS.SHST = shutdown complete",
            ms,
        })?;
        self.state.fetch_or(FAILED, Ordering::AcqRel);
        tracing::info!(ctrl = self.name(), "controller shut down");
        Ok(())
    }
}

impl pmd::IoDevice for Controller {
    type Channel = IoQpair;
    type Error = BdevError;

    fn create_channel(self: &Arc<Self>, _ctx: &mut pmd::Ctx<'_>) -> Result<IoQpair, BdevError> {
        let qid = self.alloc_qid()?;
        let mut qp = match IoQpair::new(self.clone(), qid, self.queue_entries) {
            Ok(q) => q,
            Err(e) => {
                self.free_qid(qid);
                return Err(e);
            }
        };
        qp.create()?;
        Ok(qp)
    }
}
