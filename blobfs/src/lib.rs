//! # blobfs — the blobstore of ClaudeFS
//!
//! A *blobstore* turns a bdev into *blobs*: named-by-number lists of clusters
//! (1 MiB by default) with extended attributes, read and written by 4 KiB
//! page. It is the layer everything else stores its data in: the Raft log and
//! snapshots, file data segments. SPDK's blobstore is the model; the
//! metadata is designed so that loading and crash recovery take time bounded
//! by the metadata, never by the device's size.
//!
//! - Blobs are thick (clusters allocated at resize) or thin (allocated on first
//!   write, zeroed or copied from a parent first); a *snapshot* takes over a
//!   blob's clusters read-only and the blob becomes its thin clone;
//!   *clones* of a snapshot copy a cluster on their first write to it;
//!   *inflate* and *decouple* cut the dependency.
//! - Metadata is a journal of checksummed records plus periodic checkpoints
//!   (docs/blobfs.md draws the format and argues the recovery). A blob's
//!   metadata changes become durable atomically at `sync`; allocations on
//!   first write are journaled before the write is acknowledged.
//! - Metadata lives on one *home* reactor; the data path runs on any reactor
//!   through a per-reactor [`BlobChannel`] without locks.
//!
//! ```no_run
//! # async fn demo(registry: &nvme::BdevRegistry, home: pmd::ReactorHandle) -> Result<(), blobfs::BlobError> {
//! use blobfs::{Blobstore, BlobOptions, FormatOptions};
//! let store = Blobstore::format(registry, "Malloc0", home, FormatOptions::default()).await?;
//! let id = store.create_blob(BlobOptions { num_clusters: 4, thin: true, ..Default::default() }).await?;
//! store.set_xattr(id, "name", b"log").await?;
//! store.sync_blob(id).await?;
//! store.unload().await?;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

mod channel;
mod engine;
mod error;
pub mod format;
pub mod fs;
pub mod reduce;
mod shared;
pub mod state;
mod store;

pub use channel::{BlobCompletion, BlobIo};
pub use engine::ops::{BlobInfo, BlobOptions};
pub use engine::{CheckReport, FormatOptions, LoadReport, OpStats};
pub use error::BlobError;
pub use shared::BlobShared;
pub use store::{Blob, BlobChannel, Blobstore, StoreStats};
