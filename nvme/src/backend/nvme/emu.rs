//! An emulated NVMe controller: the device half of the driver's test twin.
//!
//! It has a register page standing in for BAR0, reads submission queues and
//! writes completion queues in the process's own DMA memory (IOVA = virtual
//! address, as the driver programs it), and checks every access against the
//! twin IOMMU's mappings, failing a command with Data Transfer Error where a
//! real IOMMU would fault. It runs when [`Emu::step`] is called: after each
//! register write (the twin's kick, as QEMU's device model runs on an MMIO
//! write) or by hand, for tests that want to see the driver between steps.
//!
//! It implements what the driver uses: enable/disable/shutdown, the admin
//! commands (Identify, Set Features, Get Log Page, Create/Delete I/O
//! queues, Abort) and the NVM commands (Read, Write, Flush, Write Zeroes,
//! Dataset Management), with MDTS, PRPs and SGLs; plus fault injection: hold
//! commands (until aborted or the controller is reset), fail them with a
//! chosen status, or refuse to become ready.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::prp::{Seg, walk};
use super::regs::RegisterPage;
use super::spec::{Cqe, LOG_SMART, Sqe, Status, op, reg, sc, sct};

/// A namespace of an emulated controller.
#[derive(Debug, Clone, Copy)]
pub struct EmuNamespace {
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Number of blocks.
    pub blocks: u64,
}

/// How an emulated controller looks.
#[derive(Debug, Clone)]
pub struct EmuConfig {
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Namespaces, nsid 1 first.
    pub namespaces: Vec<EmuNamespace>,
    /// MDTS (0: no limit).
    pub mdts: u8,
    /// SGL support.
    pub sgl: bool,
    /// Entries per queue at most (CAP.MQES + 1).
    pub max_entries: u32,
    /// I/O queue pairs granted at most.
    pub max_queues: u16,
}

impl EmuConfig {
    /// A controller with one namespace.
    pub fn new(serial: &str, block_size: u32, blocks: u64) -> Self {
        Self {
            serial: serial.into(),
            model: "ClaudeFS emulated NVMe".into(),
            namespaces: vec![EmuNamespace { block_size, blocks }],
            mdts: 5,
            sgl: true,
            max_entries: 1024,
            max_queues: 8,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sq {
    base: u64,
    entries: u32,
    head: u32,
    cqid: u16,
}

#[derive(Debug, Clone, Copy)]
struct Cq {
    base: u64,
    entries: u32,
    tail: u32,
    phase: bool,
}

/// The emulated controller. See the module docs.
pub struct Emu {
    cfg: EmuConfig,
    pub(crate) regs: Arc<RegisterPage>,
    /// The twin IOMMU's mappings: (address, length).
    pub(crate) iommu: Arc<Mutex<Vec<(usize, usize)>>>,
    enabled: bool,
    sqs: BTreeMap<u16, Sq>,
    cqs: BTreeMap<u16, Cq>,
    data: Vec<Vec<u8>>,
    granted_queues: u16,
    held: Vec<(u16, Sqe)>,
    hold_next: u32,
    fail_next: Option<(Status, u32)>,
    never_ready: bool,
    ignore_aborts: bool,
    reads: u64,
    writes: u64,
    /// NVM commands executed (held ones included).
    pub io_commands: u64,
    /// Largest transfer of one command, in bytes.
    pub largest_transfer: usize,
    /// Commands that used SGLs.
    pub sgl_commands: u64,
    /// Times the controller was enabled.
    pub enables: u32,
    /// Whether a normal shutdown was requested.
    pub shut_down: bool,
}

const CAP_TO_UNITS: u64 = 2; // 1 s

impl Emu {
    pub(crate) fn new(cfg: EmuConfig) -> Self {
        let regs = Arc::new(RegisterPage::new(0x4000));
        let cap = (cfg.max_entries as u64 - 1) | 1 << 16 | CAP_TO_UNITS << 24 | 1 << 37 | 4 << 52;
        regs.write(reg::CAP, cap as u32);
        regs.write(reg::CAP + 4, (cap >> 32) as u32);
        regs.write(reg::VS, 0x0001_0400);
        let data = cfg.namespaces.iter().map(|n| vec![0u8; (n.blocks * n.block_size as u64) as usize]).collect();
        Self {
            cfg,
            regs,
            iommu: Arc::default(),
            enabled: false,
            sqs: BTreeMap::new(),
            cqs: BTreeMap::new(),
            data,
            granted_queues: 0,
            held: Vec::new(),
            hold_next: 0,
            fail_next: None,
            never_ready: false,
            ignore_aborts: false,
            reads: 0,
            writes: 0,
            io_commands: 0,
            largest_transfer: 0,
            sgl_commands: 0,
            enables: 0,
            shut_down: false,
        }
    }

    /// Holds the next `n` NVM commands: they never complete until aborted,
    /// their queue is deleted or the controller is reset.
    pub fn hold_io(&mut self, n: u32) {
        self.hold_next = n;
    }

    /// Fails the next `n` NVM commands with status (`sct`, `sc`).
    pub fn fail_io(&mut self, sct: u8, sc: u8, n: u32) {
        self.fail_next = Some((Status::new(sct, sc), n));
    }

    /// Makes the controller ignore enable requests (it never becomes ready).
    pub fn set_never_ready(&mut self, v: bool) {
        self.never_ready = v;
    }

    /// Makes Abort commands find nothing to abort.
    pub fn ignore_aborts(&mut self, v: bool) {
        self.ignore_aborts = v;
    }

    /// Commands held right now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The bytes of namespace `nsid` (1-based).
    pub fn namespace_data(&self, nsid: u32) -> &[u8] {
        &self.data[nsid as usize - 1]
    }

    fn mapped(&self, addr: u64, len: usize) -> bool {
        let (a, end) = (addr as usize, addr as usize + len);
        self.iommu.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|&(m, l)| a >= m && end <= m + l)
    }

    fn read_mem<T: Copy>(&self, addr: u64) -> Option<T> {
        // SAFETY: the address lies in memory the IOMMU maps (pool regions, which stay
        // mapped); a device reads it as bytes at any time, as this does.
        self.mapped(addr, std::mem::size_of::<T>()).then(|| unsafe { (addr as *const T).read_volatile() })
    }

    fn write_mem<T: Copy>(&self, addr: u64, v: T) -> bool {
        let ok = self.mapped(addr, std::mem::size_of::<T>());
        if ok {
            // SAFETY: as in read_mem; the driver gave this memory to the device.
            unsafe { (addr as *mut T).write_volatile(v) };
        }
        ok
    }

    /// Runs the controller: reacts to CC changes and executes every command
    /// the SQ doorbells announce.
    pub fn step(&mut self) {
        let cc = self.regs.read(reg::CC);
        let mut csts = self.regs.read(reg::CSTS);
        if cc & reg::CC_EN == 0 && self.enabled {
            self.disable();
            csts &= !reg::CSTS_RDY;
        } else if cc & reg::CC_EN != 0 && !self.enabled && !self.never_ready {
            self.enable();
            csts |= reg::CSTS_RDY;
        }
        if cc & reg::CC_SHN_MASK != 0 && csts & reg::CSTS_SHST_MASK != reg::CSTS_SHST_DONE {
            self.shut_down = true;
            csts = (csts & !reg::CSTS_SHST_MASK) | reg::CSTS_SHST_DONE;
        }
        self.regs.write(reg::CSTS, csts);
        if self.enabled {
            let qids: Vec<u16> = self.sqs.keys().copied().collect();
            for qid in qids {
                self.run_sq(qid);
            }
        }
    }

    fn disable(&mut self) {
        self.enabled = false;
        self.sqs.clear();
        self.cqs.clear();
        self.held.clear();
        self.granted_queues = 0;
        for i in 0..(self.regs.len() - reg::DOORBELLS) / 4 {
            self.regs.write(reg::DOORBELLS + 4 * i, 0);
        }
    }

    fn enable(&mut self) {
        let aqa = self.regs.read(reg::AQA);
        let asq = self.regs.read(reg::ASQ) as u64 | (self.regs.read(reg::ASQ + 4) as u64) << 32;
        let acq = self.regs.read(reg::ACQ) as u64 | (self.regs.read(reg::ACQ + 4) as u64) << 32;
        self.sqs.insert(0, Sq { base: asq, entries: (aqa & 0xfff) + 1, head: 0, cqid: 0 });
        self.cqs.insert(0, Cq { base: acq, entries: ((aqa >> 16) & 0xfff) + 1, tail: 0, phase: true });
        self.enabled = true;
        self.shut_down = false;
        self.enables += 1;
        let csts = self.regs.read(reg::CSTS) & !reg::CSTS_SHST_MASK;
        self.regs.write(reg::CSTS, csts);
    }

    fn run_sq(&mut self, qid: u16) {
        loop {
            let Some(sq) = self.sqs.get(&qid).copied() else { return };
            let tail = self.regs.read(reg::DOORBELLS + 8 * qid as usize);
            if sq.head == tail || tail >= sq.entries {
                return;
            }
            let Some(cq) = self.cqs.get(&sq.cqid).copied() else { return };
            let cq_head = self.regs.read(reg::DOORBELLS + 8 * sq.cqid as usize + 4);
            if (cq.tail + 1) % cq.entries == cq_head {
                return; // CQ full: wait for the host
            }
            let Some(sqe) = self.read_mem::<Sqe>(sq.base + sq.head as u64 * 64) else {
                // An unmapped SQ is fatal: Controller Fatal Status.
                let csts = self.regs.read(reg::CSTS) | reg::CSTS_CFS;
                self.regs.write(reg::CSTS, csts);
                return;
            };
            let head = (sq.head + 1) % sq.entries;
            self.sqs.get_mut(&qid).expect("present").head = head;
            let result = if qid == 0 { Some(self.admin(&sqe)) } else { self.io(qid, &sqe) };
            if let Some((dw0, status)) = result {
                self.post(sq.cqid, qid, sqe.cid(), head, dw0, status);
            }
        }
    }

    fn post(&mut self, cqid: u16, sqid: u16, cid: u16, sqhd: u32, dw0: u32, status: Status) {
        let Some(cq) = self.cqs.get_mut(&cqid) else { return };
        let cqe = Cqe { dw0, dw1: 0, sqhd: sqhd as u16, sqid, cid, status: status.0 << 1 | cq.phase as u16 };
        let at = cq.base + cq.tail as u64 * 16;
        cq.tail += 1;
        if cq.tail == cq.entries {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        self.write_mem(at, cqe);
    }

    fn copy(&mut self, segs: &[Seg], ns: usize, mut at: usize, to_device: bool) -> bool {
        if !segs.iter().all(|s| self.mapped(s.addr, s.len as usize)) {
            return false;
        }
        for s in segs {
            let media = &mut self.data[ns][at..at + s.len as usize];
            // SAFETY: the buffer lies in IOMMU-mapped memory the driver handed to the device.
            let host = unsafe { std::slice::from_raw_parts_mut(s.addr as *mut u8, s.len as usize) };
            if to_device {
                media.copy_from_slice(host)
            } else {
                host.copy_from_slice(media)
            }
            at += s.len as usize;
        }
        true
    }

    fn io(&mut self, qid: u16, sqe: &Sqe) -> Option<(u32, Status)> {
        let generic = |code| Status::new(sct::GENERIC, code);
        self.io_commands += 1;
        if self.hold_next > 0 {
            self.hold_next -= 1;
            self.held.push((qid, *sqe));
            return None;
        }
        if let Some((status, n)) = self.fail_next {
            self.fail_next = if n > 1 { Some((status, n - 1)) } else { None };
            return Some((0, status));
        }
        let ns = sqe.nsid as usize;
        if ns == 0 || ns > self.data.len() {
            return Some((0, generic(sc::INVALID_NAMESPACE)));
        }
        let ns = ns - 1;
        let geo = self.cfg.namespaces[ns];
        let lba = sqe.cdw10 as u64 | (sqe.cdw11 as u64) << 32;
        let blocks = (sqe.cdw12 & 0xffff) as u64 + 1;
        let in_range = lba.checked_add(blocks).is_some_and(|end| end <= geo.blocks);
        let status = match sqe.opcode() {
            op::READ | op::WRITE => {
                if !in_range {
                    return Some((0, generic(sc::LBA_OUT_OF_RANGE)));
                }
                let bytes = (blocks * geo.block_size as u64) as usize;
                if self.cfg.mdts > 0 && bytes > 4096 << self.cfg.mdts {
                    return Some((0, generic(sc::INVALID_FIELD)));
                }
                if sqe.cdw0 & super::spec::PSDT_SGL != 0 {
                    if !self.cfg.sgl {
                        return Some((0, generic(sc::INVALID_FIELD)));
                    }
                    self.sgl_commands += 1;
                }
                let segs = walk(sqe, bytes, |addr, i| self.read_mem::<u64>(addr + 8 * i as u64).unwrap_or(u64::MAX));
                self.largest_transfer = self.largest_transfer.max(bytes);
                let write = sqe.opcode() == op::WRITE;
                match segs {
                    Ok(segs) if self.copy(&segs, ns, (lba * geo.block_size as u64) as usize, write) => {
                        if write {
                            self.writes += 1
                        } else {
                            self.reads += 1
                        }
                        Status::SUCCESS
                    }
                    _ => generic(sc::DATA_TRANSFER_ERROR),
                }
            }
            op::FLUSH => Status::SUCCESS,
            op::WRITE_ZEROES => {
                if !in_range {
                    return Some((0, generic(sc::LBA_OUT_OF_RANGE)));
                }
                let bs = geo.block_size as usize;
                self.data[ns][lba as usize * bs..(lba + blocks) as usize * bs].fill(0);
                Status::SUCCESS
            }
            op::DSM => {
                let ranges = (sqe.cdw10 & 0xff) + 1;
                let mut status = Status::SUCCESS;
                for r in 0..ranges as u64 {
                    let (Some(len), Some(slba)) = (
                        self.read_mem::<u32>(sqe.dptr[0] + 16 * r + 4),
                        self.read_mem::<u64>(sqe.dptr[0] + 16 * r + 8),
                    ) else {
                        status = generic(sc::DATA_TRANSFER_ERROR);
                        break;
                    };
                    if slba.checked_add(len as u64).is_none_or(|e| e > geo.blocks) {
                        status = generic(sc::LBA_OUT_OF_RANGE);
                        break;
                    }
                    if sqe.cdw11 & 4 != 0 {
                        let bs = geo.block_size as usize;
                        self.data[ns][slba as usize * bs..(slba as usize + len as usize) * bs].fill(0);
                    }
                }
                status
            }
            _ => generic(sc::INVALID_OPCODE),
        };
        Some((0, status))
    }

    fn admin(&mut self, sqe: &Sqe) -> (u32, Status) {
        let generic = |code| Status::new(sct::GENERIC, code);
        let specific = |code| Status::new(sct::COMMAND, code);
        match sqe.opcode() {
            op::IDENTIFY => {
                let mut page = [0u8; 4096];
                match sqe.cdw10 & 0xff {
                    1 => self.identify_controller(&mut page),
                    0 => {
                        let Some(ns) = self.cfg.namespaces.get((sqe.nsid as usize).wrapping_sub(1)) else {
                            return (0, generic(sc::INVALID_NAMESPACE));
                        };
                        page[0..8].copy_from_slice(&ns.blocks.to_le_bytes());
                        page[8..16].copy_from_slice(&ns.blocks.to_le_bytes());
                        page[33] = 1; // deallocated blocks read as zeros
                        page[128..132].copy_from_slice(&((ns.block_size.trailing_zeros()) << 16).to_le_bytes());
                    }
                    2 => {
                        let ids = (1..=self.cfg.namespaces.len() as u32).filter(|&i| i > sqe.nsid);
                        for (k, id) in ids.enumerate() {
                            page[4 * k..4 * k + 4].copy_from_slice(&id.to_le_bytes());
                        }
                    }
                    _ => return (0, generic(sc::INVALID_FIELD)),
                }
                self.copy_to_host(sqe, &page)
            }
            op::SET_FEATURES if sqe.cdw10 & 0xff == super::spec::FEAT_NUM_QUEUES => {
                let want = ((sqe.cdw11 & 0xffff) + 1).min((sqe.cdw11 >> 16) + 1) as u16;
                self.granted_queues = want.min(self.cfg.max_queues);
                let n = self.granted_queues as u32 - 1;
                (n << 16 | n, Status::SUCCESS)
            }
            op::GET_LOG_PAGE => {
                let mut page = [0u8; 4096];
                if sqe.cdw10 as u8 == LOG_SMART {
                    page[1..3].copy_from_slice(&300u16.to_le_bytes());
                    page[3] = 100;
                    page[4] = 10;
                    page[64..80].copy_from_slice(&(self.reads as u128).to_le_bytes());
                    page[80..96].copy_from_slice(&(self.writes as u128).to_le_bytes());
                    page[112..128].copy_from_slice(&(self.enables as u128).to_le_bytes());
                }
                let bytes = (((sqe.cdw10 >> 16) | (sqe.cdw11 & 0xffff) << 16) as usize + 1) * 4;
                self.copy_to_host(sqe, &page[..bytes.min(4096)])
            }
            op::CREATE_CQ | op::CREATE_SQ => {
                let qid = sqe.cdw10 as u16;
                let entries = (sqe.cdw10 >> 16) + 1;
                let is_cq = sqe.opcode() == op::CREATE_CQ;
                let exists = if is_cq { self.cqs.contains_key(&qid) } else { self.sqs.contains_key(&qid) };
                if qid == 0 || qid > self.granted_queues || exists {
                    return (0, specific(sc::INVALID_QUEUE_ID));
                }
                if entries < 2 || entries > self.cfg.max_entries {
                    return (0, specific(sc::INVALID_QUEUE_SIZE));
                }
                if !self.mapped(sqe.dptr[0], entries as usize * if is_cq { 16 } else { 64 }) {
                    return (0, generic(sc::DATA_TRANSFER_ERROR));
                }
                if is_cq {
                    self.cqs.insert(qid, Cq { base: sqe.dptr[0], entries, tail: 0, phase: true });
                } else {
                    let cqid = (sqe.cdw11 >> 16) as u16;
                    if !self.cqs.contains_key(&cqid) || cqid == 0 {
                        return (0, specific(0x00));
                    }
                    self.sqs.insert(qid, Sq { base: sqe.dptr[0], entries, head: 0, cqid });
                }
                (0, Status::SUCCESS)
            }
            op::DELETE_SQ => {
                let qid = sqe.cdw10 as u16;
                let Some(sq) = (qid != 0).then(|| self.sqs.remove(&qid)).flatten() else {
                    return (0, specific(sc::INVALID_QUEUE_ID));
                };
                let (gone, kept): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut self.held).into_iter().partition(|(q, _)| *q == qid);
                self.held = kept;
                for (_, h) in gone {
                    self.post(sq.cqid, qid, h.cid(), sq.head, 0, generic(sc::ABORTED_SQ_DELETION));
                }
                self.regs.write(reg::DOORBELLS + 8 * qid as usize, 0);
                (0, Status::SUCCESS)
            }
            op::DELETE_CQ => {
                let qid = sqe.cdw10 as u16;
                if qid == 0 || self.cqs.remove(&qid).is_none() {
                    return (0, specific(sc::INVALID_QUEUE_ID));
                }
                self.regs.write(reg::DOORBELLS + 8 * qid as usize + 4, 0);
                (0, Status::SUCCESS)
            }
            op::ABORT => {
                let (sqid, cid) = (sqe.cdw10 as u16, (sqe.cdw10 >> 16) as u16);
                let found = self.held.iter().position(|(q, h)| *q == sqid && h.cid() == cid);
                match found.filter(|_| !self.ignore_aborts) {
                    Some(i) => {
                        let (_, h) = self.held.remove(i);
                        let sq = self.sqs[&sqid];
                        self.post(sq.cqid, sqid, h.cid(), sq.head, 0, generic(sc::ABORT_REQUESTED));
                        (0, Status::SUCCESS)
                    }
                    None => (1, Status::SUCCESS), // not aborted
                }
            }
            _ => (0, generic(sc::INVALID_OPCODE)),
        }
    }

    fn identify_controller(&self, page: &mut [u8; 4096]) {
        let put = |page: &mut [u8; 4096], at: usize, len: usize, s: &str| {
            let mut field = vec![b' '; len];
            field[..s.len().min(len)].copy_from_slice(&s.as_bytes()[..s.len().min(len)]);
            page[at..at + len].copy_from_slice(&field);
        };
        page[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        put(page, 4, 20, &self.cfg.serial);
        put(page, 24, 40, &self.cfg.model);
        put(page, 64, 8, "1.0");
        page[77] = self.cfg.mdts;
        page[78..80].copy_from_slice(&1u16.to_le_bytes());
        page[258] = 3;
        page[512] = 0x66;
        page[513] = 0x44;
        page[516..520].copy_from_slice(&(self.cfg.namespaces.len() as u32).to_le_bytes());
        page[520..522].copy_from_slice(&0b1100u16.to_le_bytes());
        page[525] = 1;
        page[536] = self.cfg.sgl as u8;
    }

    fn copy_to_host(&mut self, sqe: &Sqe, data: &[u8]) -> (u32, Status) {
        match walk(sqe, data.len(), |addr, i| self.read_mem::<u64>(addr + 8 * i as u64).unwrap_or(u64::MAX)) {
            Ok(segs) if segs.iter().all(|s| self.mapped(s.addr, s.len as usize)) => {
                let mut at = 0;
                for s in segs {
                    // SAFETY: mapped memory the driver handed to the device for this command.
                    unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), s.addr as *mut u8, s.len as usize) };
                    at += s.len as usize;
                }
                (0, Status::SUCCESS)
            }
            _ => (0, Status::new(sct::GENERIC, sc::DATA_TRANSFER_ERROR)),
        }
    }
}
