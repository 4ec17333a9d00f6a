//! The on-disk format, as pure functions from values to bytes and back
//! (docs/blobfs.md draws it byte by byte).
//!
//! Device layout, in 4 KiB pages:
//!
//! ```text
//! page 0, 1           super block copies A and B
//! pages 2 .. 2+J      the journal: a ring of J pages of records
//! up to md_clusters   (padding to a cluster boundary)
//! clusters md_clusters .. num_clusters
//!                     data: blob clusters, and the clusters of the
//!                     current and previous checkpoint
//! ```

pub(crate) mod codec;
pub mod meta;
pub mod page;

pub use codec::DecodeError;
pub use meta::{
    BlobMd, Checkpoint, CheckpointHeader, CheckpointRef, FLAG_NO_ZERO, FLAG_READ_ONLY, FLAG_SNAPSHOT, FLAG_THIN,
    Geometry, JournalPos, MAX_CHECKPOINT_EXTENTS, MAX_OVERCOMMIT, MAX_XATTR_NAME, MAX_XATTR_VALUE, MAX_XATTRS_TOTAL,
    Op, SuperBlock, check_xattr_name, decode_checkpoint, decode_ops, encode_checkpoint, encode_ops,
};
pub use page::{
    FORMAT_VERSION, PAGE_SIZE, PAYLOAD_LEN, PageError, PageHeader, PageKind, Seed, decode_page, encode_page,
    encode_pages,
};
