//! The parts of the NVMe 1.4 base specification the driver speaks: controller
//! registers, submission and completion queue entries, typed commands,
//! status codes and the Identify data it reads. Shared by the driver and the
//! emulated controller of the test twin.

use crate::bdev::IoError;

/// Controller registers (offsets in BAR0).
pub(crate) mod reg {
    pub(crate) const CAP: usize = 0x00;
    pub(crate) const VS: usize = 0x08;
    pub(crate) const CC: usize = 0x14;
    pub(crate) const CSTS: usize = 0x1c;
    pub(crate) const AQA: usize = 0x24;
    pub(crate) const ASQ: usize = 0x28;
    pub(crate) const ACQ: usize = 0x30;
    pub(crate) const DOORBELLS: usize = 0x1000;

    pub(crate) const CC_EN: u32 = 1;
    /// IOSQES = 6 (64-byte entries), IOCQES = 4 (16-byte entries), MPS = 0 (4 KiB pages), CSS = NVM.
    pub(crate) const CC_IO_ENTRY_SIZES: u32 = 6 << 16 | 4 << 20;
    pub(crate) const CC_SHN_NORMAL: u32 = 1 << 14;
    pub(crate) const CC_SHN_MASK: u32 = 3 << 14;
    pub(crate) const CSTS_RDY: u32 = 1;
    pub(crate) const CSTS_CFS: u32 = 2;
    pub(crate) const CSTS_SHST_MASK: u32 = 3 << 2;
    pub(crate) const CSTS_SHST_DONE: u32 = 2 << 2;
}

/// The memory page size the driver programs (CC.MPS = 0): 4 KiB.
pub(crate) const PAGE: usize = 4096;

/// The Controller Capabilities register, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cap {
    /// Maximum entries per queue (MQES + 1).
    pub(crate) max_entries: u32,
    /// CAP.TO: worst-case time for CSTS.RDY to change, in milliseconds.
    pub(crate) timeout_ms: u64,
    /// Doorbell stride in bytes (4 << DSTRD).
    pub(crate) doorbell_stride: usize,
    /// The NVM command set is supported.
    pub(crate) nvm: bool,
    /// Smallest memory page size, in bytes.
    pub(crate) page_min: usize,
}

impl Cap {
    pub(crate) fn decode(v: u64) -> Self {
        Self {
            max_entries: (v & 0xffff) as u32 + 1,
            timeout_ms: ((v >> 24) & 0xff).max(1) * 500,
            doorbell_stride: 4 << ((v >> 32) & 0xf),
            nvm: (v >> 37) & 1 == 1,
            page_min: 1 << (12 + ((v >> 48) & 0xf)),
        }
    }
}

/// Opcodes.
pub(crate) mod op {
    pub(crate) const DELETE_SQ: u8 = 0x00;
    pub(crate) const CREATE_SQ: u8 = 0x01;
    pub(crate) const GET_LOG_PAGE: u8 = 0x02;
    pub(crate) const DELETE_CQ: u8 = 0x04;
    pub(crate) const CREATE_CQ: u8 = 0x05;
    pub(crate) const IDENTIFY: u8 = 0x06;
    pub(crate) const ABORT: u8 = 0x08;
    pub(crate) const SET_FEATURES: u8 = 0x09;

    pub(crate) const FLUSH: u8 = 0x00;
    pub(crate) const WRITE: u8 = 0x01;
    pub(crate) const READ: u8 = 0x02;
    pub(crate) const WRITE_ZEROES: u8 = 0x08;
    pub(crate) const DSM: u8 = 0x09;
}

/// Feature id of Number of Queues.
pub(crate) const FEAT_NUM_QUEUES: u32 = 0x07;
/// Log page ids.
pub(crate) const LOG_ERROR: u8 = 0x01;
pub(crate) const LOG_SMART: u8 = 0x02;

/// A submission queue entry (64 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sqe {
    /// Opcode (7:0), PSDT (15:14), command id (31:16).
    pub(crate) cdw0: u32,
    pub(crate) nsid: u32,
    pub(crate) cdw2: u32,
    pub(crate) cdw3: u32,
    pub(crate) mptr: u64,
    pub(crate) dptr: [u64; 2],
    pub(crate) cdw10: u32,
    pub(crate) cdw11: u32,
    pub(crate) cdw12: u32,
    pub(crate) cdw13: u32,
    pub(crate) cdw14: u32,
    pub(crate) cdw15: u32,
}

const _: () = assert!(std::mem::size_of::<Sqe>() == 64);

/// PSDT value for SGL data pointers.
pub(crate) const PSDT_SGL: u32 = 1 << 14;

impl Sqe {
    fn new(opcode: u8, nsid: u32) -> Self {
        Self { cdw0: opcode as u32, nsid, ..Default::default() }
    }

    pub(crate) fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }

    pub(crate) fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }

    pub(crate) fn set_cid(&mut self, cid: u16) {
        self.cdw0 = (self.cdw0 & 0xffff) | (cid as u32) << 16;
    }

    /// Read or write of `blocks` (1..=65536) blocks at `lba`.
    pub(crate) fn rw(write: bool, nsid: u32, lba: u64, blocks: u32, fua: bool) -> Self {
        let mut s = Self::new(if write { op::WRITE } else { op::READ }, nsid);
        s.cdw10 = lba as u32;
        s.cdw11 = (lba >> 32) as u32;
        s.cdw12 = (blocks - 1) | if fua { 1 << 30 } else { 0 };
        s
    }

    pub(crate) fn flush(nsid: u32) -> Self {
        Self::new(op::FLUSH, nsid)
    }

    pub(crate) fn write_zeroes(nsid: u32, lba: u64, blocks: u32) -> Self {
        let mut s = Self::rw(false, nsid, lba, blocks, false);
        s.cdw0 = op::WRITE_ZEROES as u32;
        s
    }

    /// Dataset Management with the Deallocate attribute over `ranges` ranges
    /// (the range list is at the data pointer).
    pub(crate) fn deallocate(nsid: u32, ranges: u32) -> Self {
        let mut s = Self::new(op::DSM, nsid);
        s.cdw10 = ranges - 1;
        s.cdw11 = 1 << 2;
        s
    }

    pub(crate) fn identify(cns: u8, nsid: u32, buf: u64) -> Self {
        let mut s = Self::new(op::IDENTIFY, nsid);
        s.dptr[0] = buf;
        s.cdw10 = cns as u32;
        s
    }

    pub(crate) fn set_num_queues(n: u16) -> Self {
        let mut s = Self::new(op::SET_FEATURES, 0);
        s.cdw10 = FEAT_NUM_QUEUES;
        s.cdw11 = (n as u32 - 1) << 16 | (n as u32 - 1);
        s
    }

    pub(crate) fn get_log_page(lid: u8, nsid: u32, bytes: u32, buf: u64) -> Self {
        let mut s = Self::new(op::GET_LOG_PAGE, nsid);
        s.dptr[0] = buf;
        let dwords = bytes / 4 - 1;
        s.cdw10 = (dwords & 0xffff) << 16 | lid as u32;
        s.cdw11 = dwords >> 16;
        s
    }

    pub(crate) fn create_cq(qid: u16, entries: u32, addr: u64) -> Self {
        let mut s = Self::new(op::CREATE_CQ, 0);
        s.dptr[0] = addr;
        s.cdw10 = (entries - 1) << 16 | qid as u32;
        s.cdw11 = 1; // physically contiguous, interrupts off
        s
    }

    pub(crate) fn create_sq(qid: u16, entries: u32, addr: u64, cqid: u16) -> Self {
        let mut s = Self::new(op::CREATE_SQ, 0);
        s.dptr[0] = addr;
        s.cdw10 = (entries - 1) << 16 | qid as u32;
        s.cdw11 = (cqid as u32) << 16 | 1;
        s
    }

    pub(crate) fn delete_sq(qid: u16) -> Self {
        let mut s = Self::new(op::DELETE_SQ, 0);
        s.cdw10 = qid as u32;
        s
    }

    pub(crate) fn delete_cq(qid: u16) -> Self {
        let mut s = Self::new(op::DELETE_CQ, 0);
        s.cdw10 = qid as u32;
        s
    }

    pub(crate) fn abort(sqid: u16, cid: u16) -> Self {
        let mut s = Self::new(op::ABORT, 0);
        s.cdw10 = (cid as u32) << 16 | sqid as u32;
        s
    }
}

/// A completion queue entry (16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Cqe {
    pub(crate) dw0: u32,
    pub(crate) dw1: u32,
    pub(crate) sqhd: u16,
    pub(crate) sqid: u16,
    pub(crate) cid: u16,
    /// Phase tag (bit 0) and status field (15:1).
    pub(crate) status: u16,
}

const _: () = assert!(std::mem::size_of::<Cqe>() == 16);

impl Cqe {
    #[cfg(test)]
    pub(crate) fn phase(&self) -> bool {
        self.status & 1 == 1
    }

    pub(crate) fn status(&self) -> Status {
        Status((self.status >> 1) & 0x7fff)
    }
}

/// A completion status field (without the phase tag).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Status(pub(crate) u16);

/// Status code types.
pub(crate) mod sct {
    pub(crate) const GENERIC: u8 = 0;
    pub(crate) const COMMAND: u8 = 1;
    pub(crate) const MEDIA: u8 = 2;
    pub(crate) const PATH: u8 = 3;
}

/// Generic status codes the driver and the emulated controller use.
pub(crate) mod sc {
    pub(crate) const SUCCESS: u8 = 0x00;
    pub(crate) const INVALID_OPCODE: u8 = 0x01;
    pub(crate) const INVALID_FIELD: u8 = 0x02;
    pub(crate) const DATA_TRANSFER_ERROR: u8 = 0x04;
    pub(crate) const INTERNAL: u8 = 0x06;
    pub(crate) const ABORT_REQUESTED: u8 = 0x07;
    pub(crate) const ABORTED_SQ_DELETION: u8 = 0x08;
    pub(crate) const INVALID_NAMESPACE: u8 = 0x0b;
    pub(crate) const LBA_OUT_OF_RANGE: u8 = 0x80;
    pub(crate) const CAPACITY_EXCEEDED: u8 = 0x81;
    pub(crate) const NAMESPACE_NOT_READY: u8 = 0x82;
    /// Command specific (SCT 1).
    pub(crate) const INVALID_QUEUE_ID: u8 = 0x01;
    pub(crate) const INVALID_QUEUE_SIZE: u8 = 0x02;
    /// Media errors (SCT 2).
    pub(crate) const WRITE_FAULT: u8 = 0x80;
    pub(crate) const UNRECOVERED_READ: u8 = 0x81;
}

impl Status {
    pub(crate) const SUCCESS: Status = Status(0);

    /// A status from its type and code.
    pub(crate) fn new(sct: u8, sc: u8) -> Self {
        Status((sct as u16) << 8 | sc as u16)
    }

    /// Status Code Type.
    pub fn sct(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    /// Status Code.
    pub fn sc(self) -> u8 {
        self.0 as u8
    }

    /// Do Not Retry.
    pub fn dnr(self) -> bool {
        self.0 & 0x4000 != 0
    }

    pub(crate) fn is_ok(self) -> bool {
        self.sct() == 0 && self.sc() == 0
    }

    /// The specification's name of the status.
    pub fn name(self) -> &'static str {
        match (self.sct(), self.sc()) {
            (sct::GENERIC, sc::SUCCESS) => "Successful Completion",
            (sct::GENERIC, sc::INVALID_OPCODE) => "Invalid Command Opcode",
            (sct::GENERIC, sc::INVALID_FIELD) => "Invalid Field in Command",
            (sct::GENERIC, 0x03) => "Command ID Conflict",
            (sct::GENERIC, sc::DATA_TRANSFER_ERROR) => "Data Transfer Error",
            (sct::GENERIC, 0x05) => "Commands Aborted due to Power Loss Notification",
            (sct::GENERIC, sc::INTERNAL) => "Internal Error",
            (sct::GENERIC, sc::ABORT_REQUESTED) => "Command Abort Requested",
            (sct::GENERIC, sc::ABORTED_SQ_DELETION) => "Command Aborted due to SQ Deletion",
            (sct::GENERIC, 0x0a) => "Invalid Format",
            (sct::GENERIC, sc::INVALID_NAMESPACE) => "Invalid Namespace or Format",
            (sct::GENERIC, 0x0d) => "Invalid SGL Segment Descriptor",
            (sct::GENERIC, 0x0f) => "Data SGL Length Invalid",
            (sct::GENERIC, 0x13) => "PRP Offset Invalid",
            (sct::GENERIC, sc::LBA_OUT_OF_RANGE) => "LBA Out of Range",
            (sct::GENERIC, sc::CAPACITY_EXCEEDED) => "Capacity Exceeded",
            (sct::GENERIC, sc::NAMESPACE_NOT_READY) => "Namespace Not Ready",
            (sct::COMMAND, 0x00) => "Completion Queue Invalid",
            (sct::COMMAND, sc::INVALID_QUEUE_ID) => "Invalid Queue Identifier",
            (sct::COMMAND, sc::INVALID_QUEUE_SIZE) => "Invalid Queue Size",
            (sct::COMMAND, 0x03) => "Abort Command Limit Exceeded",
            (sct::COMMAND, 0x80) => "Conflicting Attributes",
            (sct::MEDIA, sc::WRITE_FAULT) => "Write Fault",
            (sct::MEDIA, sc::UNRECOVERED_READ) => "Unrecovered Read Error",
            (sct::MEDIA, 0x85) => "Compare Failure",
            (sct::MEDIA, 0x86) => "Access Denied",
            (sct::MEDIA, 0x87) => "Deallocated or Unwritten Logical Block",
            (sct::PATH, _) => "Path Related Status",
            (sct::GENERIC, _) => "Generic Command Status",
            (sct::COMMAND, _) => "Command Specific Status",
            (sct::MEDIA, _) => "Media and Data Integrity Error",
            _ => "Vendor Specific or Reserved Status",
        }
    }

    /// The bdev error a failed I/O command reports.
    pub(crate) fn io_error(self) -> IoError {
        match (self.sct(), self.sc()) {
            (sct::GENERIC, sc::LBA_OUT_OF_RANGE | sc::CAPACITY_EXCEEDED) => IoError::OutOfRange,
            (sct::GENERIC, sc::ABORT_REQUESTED | sc::ABORTED_SQ_DELETION | 0x05) => IoError::Aborted,
            (sct::GENERIC, sc::INVALID_OPCODE) => IoError::Unsupported,
            (sct::GENERIC, sc::INVALID_FIELD | sc::INVALID_NAMESPACE | 0x0d | 0x0f | 0x13) => IoError::Invalid,
            (sct::GENERIC, sc::NAMESPACE_NOT_READY) => IoError::Removed,
            _ => IoError::Device,
        }
    }
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (SCT {:#x}, SC {:#04x}{})",
            self.name(),
            self.sct(),
            self.sc(),
            if self.dnr() { ", DNR" } else { "" }
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end_matches([' ', '\0']).trim_start().to_string()
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// What Identify Controller says (the fields the driver uses).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ControllerData {
    /// PCI vendor id.
    pub vid: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Maximum data transfer size as a power of two of the minimum page size (0: no limit).
    pub mdts: u8,
    /// Controller id.
    pub cntlid: u16,
    /// Abort command limit (0-based).
    pub acl: u8,
    /// Error log page entries (0-based).
    pub elpe: u8,
    /// Number of namespaces.
    pub nn: u32,
    /// Optional NVM commands: bit 2 Dataset Management, bit 3 Write Zeroes.
    pub oncs: u16,
    /// A volatile write cache is present.
    pub vwc: bool,
    /// SGLs are supported for NVM commands.
    pub sgl: bool,
}

impl ControllerData {
    pub(crate) fn parse(b: &[u8]) -> Self {
        Self {
            vid: le16(b, 0),
            serial: text(&b[4..24]),
            model: text(&b[24..64]),
            firmware: text(&b[64..72]),
            mdts: b[77],
            cntlid: le16(b, 78),
            acl: b[258],
            elpe: b[262],
            nn: le32(b, 516),
            oncs: le16(b, 520),
            vwc: b[525] & 1 == 1,
            sgl: le32(b, 536) & 3 != 0,
        }
    }

    pub(crate) fn supports_deallocate(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }

    pub(crate) fn supports_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }
}

/// What Identify Namespace says (the fields the driver uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NamespaceData {
    /// Size in logical blocks.
    pub nsze: u64,
    /// Logical block size in bytes (of the format in use).
    pub block_size: u32,
    /// Metadata bytes per block (of the format in use).
    pub metadata_size: u16,
    /// Index of the LBA format in use.
    pub format: u8,
    /// Deallocated blocks read as zeros (DLFEAT).
    pub deallocate_zeroes: bool,
}

impl NamespaceData {
    pub(crate) fn parse(b: &[u8]) -> Self {
        let format = b[26] & 0xf;
        let lbaf = le32(b, 128 + 4 * format as usize);
        Self {
            nsze: le64(b, 0),
            block_size: 1u32.checked_shl((lbaf >> 16) & 0xff).unwrap_or(0),
            metadata_size: lbaf as u16,
            format,
            deallocate_zeroes: b[33] & 0x7 == 1,
        }
    }
}

/// The SMART / Health Information log page (the fields reported).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HealthLog {
    /// Critical warning bits.
    pub critical_warning: u8,
    /// Composite temperature in kelvin.
    pub temperature_kelvin: u16,
    /// Available spare, percent.
    pub available_spare: u8,
    /// Available spare threshold, percent.
    pub available_spare_threshold: u8,
    /// Percentage of rated life used.
    pub percentage_used: u8,
    /// Data units (1000 blocks of 512 bytes) read.
    pub data_units_read: u128,
    /// Data units written.
    pub data_units_written: u128,
    /// Read commands completed.
    pub host_read_commands: u128,
    /// Write commands completed.
    pub host_write_commands: u128,
    /// Minutes the controller was busy with I/O.
    pub controller_busy_time: u128,
    /// Power cycles.
    pub power_cycles: u128,
    /// Power-on hours.
    pub power_on_hours: u128,
    /// Unsafe shutdowns.
    pub unsafe_shutdowns: u128,
    /// Unrecovered data integrity errors.
    pub media_errors: u128,
    /// Error log entries over the controller's life.
    pub num_err_log_entries: u128,
}

impl HealthLog {
    pub(crate) fn parse(b: &[u8]) -> Self {
        let u128_at = |at: usize| u128::from_le_bytes(b[at..at + 16].try_into().expect("16 bytes"));
        Self {
            critical_warning: b[0],
            temperature_kelvin: le16(b, 1),
            available_spare: b[3],
            available_spare_threshold: b[4],
            percentage_used: b[5],
            data_units_read: u128_at(32),
            data_units_written: u128_at(48),
            host_read_commands: u128_at(64),
            host_write_commands: u128_at(80),
            controller_busy_time: u128_at(96),
            power_cycles: u128_at(112),
            power_on_hours: u128_at(128),
            unsafe_shutdowns: u128_at(144),
            media_errors: u128_at(160),
            num_err_log_entries: u128_at(176),
        }
    }
}

/// One entry of the Error Information log page.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ErrorLogEntry {
    /// Unique, increasing error count (0: the entry is empty).
    pub error_count: u64,
    /// Submission queue of the failed command.
    pub sqid: u16,
    /// Its command id.
    pub cid: u16,
    /// Its status, named.
    pub status: String,
    /// The first LBA with the error.
    pub lba: u64,
    /// Its namespace.
    pub nsid: u32,
}

impl ErrorLogEntry {
    /// Parses the non-empty 64-byte entries of an Error Information page.
    pub(crate) fn parse_page(b: &[u8]) -> Vec<Self> {
        b.chunks_exact(64)
            .map(|e| Self {
                error_count: le64(e, 0),
                sqid: le16(e, 8),
                cid: le16(e, 10),
                status: Status(le16(e, 12) >> 1).to_string(),
                lba: le64(e, 16),
                nsid: le32(e, 24),
            })
            .filter(|e| e.error_count != 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_bdev_errors_and_are_named() {
        let s = Status::new(sct::GENERIC, sc::LBA_OUT_OF_RANGE);
        assert_eq!(s.io_error(), IoError::OutOfRange);
        assert_eq!(s.to_string(), "LBA Out of Range (SCT 0x0, SC 0x80)");
        assert_eq!(Status::new(sct::GENERIC, sc::ABORT_REQUESTED).io_error(), IoError::Aborted);
        assert_eq!(Status::new(sct::GENERIC, sc::INVALID_OPCODE).io_error(), IoError::Unsupported);
        assert_eq!(Status::new(sct::MEDIA, sc::UNRECOVERED_READ).io_error(), IoError::Device);
        assert_eq!(Status::new(sct::MEDIA, sc::UNRECOVERED_READ).name(), "Unrecovered Read Error");
        let dnr = Status(0x4000 | Status::new(sct::GENERIC, sc::INTERNAL).0);
        assert!(dnr.dnr() && dnr.to_string().ends_with(", DNR)"));
        // The status field sits above the phase tag in the CQE.
        let cqe = Cqe { status: (Status::new(sct::COMMAND, sc::INVALID_QUEUE_ID).0 << 1) | 1, ..Default::default() };
        assert!(cqe.phase());
        assert_eq!(cqe.status().name(), "Invalid Queue Identifier");
    }

    #[test]
    fn commands_encode_their_fields() {
        let mut r = Sqe::rw(true, 2, 0x1_0000_0005, 8, true);
        r.set_cid(77);
        assert_eq!((r.opcode(), r.cid(), r.nsid), (op::WRITE, 77, 2));
        assert_eq!((r.cdw10, r.cdw11, r.cdw12), (5, 1, 7 | 1 << 30));
        let l = Sqe::get_log_page(LOG_SMART, 0xffff_ffff, 512, 0x1000);
        assert_eq!(l.cdw10, 127 << 16 | 2);
        assert_eq!(Sqe::create_sq(3, 256, 0, 3).cdw10, 255 << 16 | 3);
        assert_eq!(Sqe::set_num_queues(4).cdw11, 3 << 16 | 3);
        let cap = Cap::decode(0x0000_0020_1000_07ff | 1 << 37);
        assert_eq!(
            (cap.max_entries, cap.timeout_ms, cap.doorbell_stride, cap.nvm, cap.page_min),
            (2048, 8000, 4, true, 4096)
        );
    }
}
