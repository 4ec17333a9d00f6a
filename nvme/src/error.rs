//! Errors of bdev management (creation, deletion, opening). Errors of single
//! I/Os are [`crate::IoError`].

use std::path::PathBuf;

/// Why a bdev operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    /// The name is taken.
    #[error("bdev {0:?} already exists")]
    Exists(String),
    /// No bdev has that name or UUID.
    #[error("no bdev named {0:?}")]
    NotFound(String),
    /// Someone holds the claim.
    #[error("bdev {name:?} is claimed by {by}; delete {by} first")]
    Claimed {
        /// The bdev.
        name: String,
        /// The claim holder.
        by: String,
    },
    /// Open descriptors prevent deletion.
    #[error("bdev {name:?} is open by {opens} user(s); close them first")]
    Busy {
        /// The bdev.
        name: String,
        /// Open descriptors.
        opens: usize,
    },
    /// A delete method for another kind of bdev.
    #[error("bdev {name:?} is a {kind} bdev, not a {expected} bdev")]
    WrongKind {
        /// The bdev.
        name: String,
        /// What it is.
        kind: &'static str,
        /// What the caller expected.
        expected: String,
    },
    /// A parameter is out of range.
    #[error("bdev {name:?}: invalid {param}: {reason}")]
    Invalid {
        /// The bdev.
        name: String,
        /// The parameter.
        param: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A backing file could not be used.
    #[error("{action} {path} failed: {source}")]
    File {
        /// What was being done ("opening", "creating", ...).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The backing file does not exist and no size was given to create it.
    #[error("{0} does not exist; pass `size` (bytes) to create it")]
    FileMissing(PathBuf),
    /// The file system refuses O_DIRECT.
    #[error(
        "the file system holding {0} does not support O_DIRECT (ramfs does not, nor tmpfs before Linux 6.6): put the image on \
         ext4/xfs/btrfs, or on a loop device (`losetup --direct-io=on`), or pass `\"direct\": false` to use the page cache"
    )]
    NoDirectIo(PathBuf),
    /// The file is not a whole number of blocks.
    #[error("{path} is {size} bytes, not a multiple of the {block_size}-byte block size")]
    SizeNotMultiple {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The block size.
        block_size: u32,
    },
    /// The block size is below what the file (O_DIRECT) requires.
    #[error("block size {block_size} of {path} is not a multiple of its O_DIRECT alignment {align}")]
    BlockSizeAlignment {
        /// The file.
        path: PathBuf,
        /// The requested block size.
        block_size: u32,
        /// The file system's alignment.
        align: u32,
    },
    /// io_uring setup failed.
    #[error("io_uring: {action} failed: {source}")]
    Uring {
        /// What was being done.
        action: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Options may no longer change.
    #[error("{0}")]
    TooLate(String),
    /// A VFIO or sysfs operation on a PCI device failed.
    #[error("{bdf}: {action} failed: {source}")]
    Vfio {
        /// PCI address.
        bdf: String,
        /// What was being done.
        action: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No PCI device at that address.
    #[error("there is no PCI device {0} (see `hack/setup.sh status` for the NVMe controllers)")]
    NoPciDevice(String),
    /// The device is not an NVMe controller.
    #[error("{bdf} is not an NVMe controller (PCI class {class:#08x}, NVMe is 0x010802)")]
    NotNvme {
        /// PCI address.
        bdf: String,
        /// Its class code.
        class: u32,
    },
    /// The device is not bound to vfio-pci.
    #[error(
        "{bdf} is {}, not to vfio-pci: run `PCI_ALLOWED={bdf} hack/setup.sh` to hand it to vfio-pci",
        match driver { Some(d) => format!("bound to {d}"), None => "bound to no driver".to_string() }
    )]
    NotVfio {
        /// PCI address.
        bdf: String,
        /// Its driver.
        driver: Option<String>,
    },
    /// The device has no IOMMU group.
    #[error("{0} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line)")]
    NoIommu(String),
    /// The IOMMU group has devices not bound to vfio-pci.
    #[error(
        "IOMMU group {group} is not viable for {bdf}: every device in it must be bound to vfio-pci or to no driver;          these are not: {others}"
    )]
    NotViable {
        /// PCI address.
        bdf: String,
        /// The group.
        group: u32,
        /// The other devices and their drivers.
        others: String,
    },
    /// The pool cannot give hugepage memory.
    #[error(
        "VFIO needs hugepage DMA memory and {reason}: reserve at least {pages} 2 MiB hugepages          (`echo {pages} > /proc/sys/vm/nr_hugepages`, or HUGEMEM={} hack/setup.sh) and start with --hugepages auto or require",
        pages * 2
    )]
    NoHugepages {
        /// What is missing.
        reason: &'static str,
        /// Hugepages to reserve.
        pages: u64,
    },
    /// The controller or address is attached already.
    #[error("the controller at {traddr} is already attached as {name}")]
    AlreadyAttached {
        /// PCI address.
        traddr: String,
        /// Its controller name.
        name: String,
    },
    /// The controller did not do something in time.
    #[error("NVMe controller {ctrl}: no {what} within {ms} ms")]
    ControllerTimeout {
        /// Controller name.
        ctrl: String,
        /// What was awaited.
        what: &'static str,
        /// The limit.
        ms: u64,
    },
    /// The controller reported a fatal status (CSTS.CFS).
    #[error("NVMe controller {ctrl}: fatal status (CSTS.CFS) when {when}")]
    ControllerFatal {
        /// Controller name.
        ctrl: String,
        /// What was being done.
        when: &'static str,
    },
    /// An admin command failed.
    #[error("NVMe controller {ctrl}: {action} failed: {status}")]
    Nvme {
        /// Controller name.
        ctrl: String,
        /// The command.
        action: &'static str,
        /// Its status.
        status: crate::nvme::Status,
    },
    /// DMA memory for a bdev's own buffers could not be had.
    #[error(transparent)]
    Dma(#[from] pmd::DmaError),
}

impl BdevError {
    pub(crate) fn invalid(name: &str, param: &'static str, reason: String) -> Self {
        Self::Invalid { name: name.to_string(), param, reason }
    }

    /// The errno the JSON-RPC layer reports (negated), as SPDK does.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Exists(_) => libc::EEXIST,
            Self::NotFound(_) => libc::ENODEV,
            Self::Claimed { .. } | Self::Busy { .. } => libc::EBUSY,
            Self::WrongKind { .. }
            | Self::Invalid { .. }
            | Self::NoDirectIo(_)
            | Self::SizeNotMultiple { .. }
            | Self::BlockSizeAlignment { .. } => libc::EINVAL,
            Self::FileMissing(_) => libc::ENOENT,
            Self::File { source, .. } | Self::Uring { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Self::TooLate(_) => libc::EPERM,
            Self::Vfio { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Self::NoPciDevice(_) => libc::ENODEV,
            Self::NotNvme { .. } | Self::NotVfio { .. } | Self::NoIommu(_) | Self::NotViable { .. } => libc::EINVAL,
            Self::NoHugepages { .. } => libc::ENOMEM,
            Self::AlreadyAttached { .. } => libc::EEXIST,
            Self::ControllerTimeout { .. } => libc::ETIMEDOUT,
            Self::ControllerFatal { .. } | Self::Nvme { .. } => libc::EIO,
            Self::Dma(_) => libc::ENOMEM,
        }
    }
}
