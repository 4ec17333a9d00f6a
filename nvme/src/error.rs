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
        "the file system holding {0} does not support O_DIRECT (tmpfs does not, for one): put the image on \
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
            Self::Dma(_) => libc::ENOMEM,
        }
    }
}
