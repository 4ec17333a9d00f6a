//! The file system's metadata: a deterministic state machine of inodes,
//! directory entries, links, extended attributes, orphans and chunk maps,
//! changed only by [`Cmd`]s so that it can be replicated by Raft (a single
//! server is a one-member group, the same path a cluster takes).
//!
//! - [`types`]: inode numbers, kinds, attributes, POSIX error numbers.
//! - [`cmd`]: the commands (what a Raft log entry holds) and their replies.
//! - [`state`]: [`MetaState`], which answers queries and applies commands.
//!
//! File data is not here: a file's chunk map says where each chunk of its
//! data lives (a range of pages in a data blob). The data path writes the
//! chunk first, then proposes [`Cmd::Write`] to map it; chunks an operation
//! lets go of come back in its reply to be freed. That is the seam where the
//! data-reduction pipeline (chunking, dedupe, compression, encryption)
//! plugs in.

mod behind;
pub mod cmd;
pub mod data;
mod files;
pub mod raft;
mod reduce_io;
pub mod reduced;
pub mod state;
pub mod types;

pub use cmd::{Cmd, DropPrivs, RenameMode, Reply, SetAttr, XattrMode};
pub use files::{FileSystem, KeySource};
pub use reduce_io::{AuditReport, GcPass, ReduceStats};
pub use state::{MetaState, Usage};
pub use types::{Attr, ChunkRef, Creator, DirEntry, Errno, FileKind, Ino, ROOT, Time};

/// A blob the file system keeps open while it runs, closed once at shutdown
/// (so the store can then be unloaded cleanly).
pub(crate) struct HeldBlob(tokio::sync::Mutex<Option<crate::Blob>>);

impl HeldBlob {
    pub(crate) fn new(blob: crate::Blob) -> HeldBlob {
        HeldBlob(tokio::sync::Mutex::new(Some(blob)))
    }

    /// Puts `new` in the place of the blob held now; returns that one
    /// (`None` once closed: then `new` is closed at once).
    pub(crate) async fn replace(&self, new: crate::Blob) -> Result<Option<crate::Blob>, crate::BlobError> {
        let mut held = self.0.lock().await;
        if held.is_none() {
            new.close().await?;
            return Ok(None);
        }
        Ok(held.replace(new))
    }

    /// Closes the blob (`what` names it in the log); later calls do nothing.
    pub(crate) async fn close(&self, what: &str) -> Result<(), Errno> {
        match self.0.lock().await.take() {
            Some(blob) => blob.close().await.map_err(|e| {
                tracing::error!("closing the {what} blob: {e}");
                Errno(e.errno())
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
