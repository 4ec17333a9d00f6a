//! Errors of blobstore operations. Errors of single blob I/Os are
//! [`nvme::IoError`]s, like those of bdevs.

/// Why a blobstore operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No blob has that id.
    #[error("no blob {0}")]
    NoSuchBlob(u64),
    /// The device failed a metadata I/O.
    #[error("{what} failed: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The device's error.
        #[source]
        source: nvme::IoError,
    },
    /// Metadata does not check: the store refuses to use it.
    #[error("corrupt metadata in {location}: {reason}")]
    Corrupt {
        /// Where: the page, record or checkpoint.
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// The bdev holds no blobstore (or one this code cannot read).
    #[error("bdev {bdev} holds no ClaudeFS blobstore: {reason}")]
    NotABlobstore {
        /// The bdev.
        bdev: String,
        /// Why not.
        reason: String,
    },
    /// Not enough free clusters.
    #[error("no space: {needed} clusters needed, {free} free")]
    NoSpace {
        /// Clusters the operation needs.
        needed: u64,
        /// Clusters free.
        free: u64,
    },
    /// The blob is open and the operation needs it closed.
    #[error("blob {id} is open ({count} handle(s)); close it first")]
    Open {
        /// The blob.
        id: u64,
        /// Open handles.
        count: u32,
    },
    /// Other blobs read through this one.
    #[error("blob {id} has clones {clones:?}; delete or inflate them first")]
    HasClones {
        /// The blob.
        id: u64,
        /// The clones.
        clones: Vec<u64>,
    },
    /// The blob refuses writes.
    #[error("blob {0} is read-only")]
    ReadOnly(u64),
    /// The operation needs a snapshot.
    #[error("blob {0} is not a snapshot")]
    NotSnapshot(u64),
    /// A parameter is out of range.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The parameter.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Blobs are still open.
    #[error("blobs still open: {0:?}; close them first")]
    Busy(Vec<u64>),
    /// The store was unloaded.
    #[error("the blobstore is unloaded")]
    Unloaded,
    /// The store's home reactor stopped.
    #[error("the blobstore's home reactor stopped")]
    HomeGone,
    /// The file system's metadata group failed to start or to serve.
    #[error("metadata group: {0}")]
    MetaGroup(String),
    /// The reactor asked to run a request stopped.
    #[error("the reactor asked to run a blob request stopped")]
    ReactorGone,
    /// The bdev could not be used.
    #[error(transparent)]
    Bdev(#[from] nvme::BdevError),
    /// No DMA memory for metadata I/O.
    #[error(transparent)]
    Dma(#[from] pmd::DmaError),
}

impl BlobError {
    pub(crate) fn io(what: impl Into<String>, source: nvme::IoError) -> Self {
        Self::Io { what: what.into(), source }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid { what, reason: reason.into() }
    }

    pub(crate) fn corrupt(location: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Corrupt { location: location.into(), reason: reason.to_string() }
    }

    /// The errno the JSON-RPC layer reports (negated).
    pub fn errno(&self) -> i32 {
        match self {
            Self::NoSuchBlob(_) => libc::ENOENT,
            Self::Io { source, .. } => source.errno(),
            Self::Corrupt { .. } => libc::EUCLEAN,
            Self::NotABlobstore { .. } | Self::NotSnapshot(_) | Self::Invalid { .. } => libc::EINVAL,
            Self::NoSpace { .. } => libc::ENOSPC,
            Self::Open { .. } | Self::HasClones { .. } | Self::Busy(_) => libc::EBUSY,
            Self::ReadOnly(_) => libc::EROFS,
            Self::Unloaded => libc::ENODEV,
            Self::HomeGone | Self::ReactorGone => libc::ESHUTDOWN,
            Self::MetaGroup(_) => libc::EIO,
            Self::Bdev(e) => e.errno(),
            Self::Dma(_) => libc::ENOMEM,
        }
    }
}
