//! Metadata I/O of the home reactor's tasks: async page reads and writes,
//! cluster zeroing and copying, flushes, through the home reactor's channel.

use std::sync::Arc;

use nvme::{Completion, Io, IoBufs};
use pmd::{DmaBuf, IoChannel};

use crate::channel::BsChannel;
use crate::error::BlobError;
use crate::format::PAGE_SIZE;
use crate::shared::StoreShared;

/// Largest single metadata transfer.
const MAX_TRANSFER: u64 = 8 << 20;

pub(crate) struct MdIo {
    pub ch: IoChannel<BsChannel>,
    pub store: Arc<StoreShared>,
}

impl MdIo {
    async fn run(&self, io: Io) -> Completion {
        let w = self.ch.borrow_mut().md_submit(pmd::task::now(), io);
        std::future::poll_fn(|cx| match self.ch.borrow_mut().waited_poll(w, cx.waker()) {
            Some(c) => std::task::Poll::Ready(c),
            None => std::task::Poll::Pending,
        })
        .await
    }

    fn lba(&self, page: u64) -> u64 {
        page * self.store.blocks_per_page
    }

    /// Reads `count` pages from device page `page` into one buffer.
    pub async fn read_pages(&self, page: u64, count: u64, what: &str) -> Result<DmaBuf, BlobError> {
        let mut out = DmaBuf::new((count * PAGE_SIZE as u64) as usize)?;
        let mut done = 0;
        while done < count {
            let n = (count - done).min(MAX_TRANSFER / PAGE_SIZE as u64);
            let c = self.run(Io::read(self.lba(page + done), DmaBuf::new((n * PAGE_SIZE as u64) as usize)?, 0)).await;
            c.status.map_err(|e| BlobError::io(format!("reading {what} (page {})", page + done), e))?;
            let start = (done * PAGE_SIZE as u64) as usize;
            c.bufs.copy_out(0, &mut out[start..start + (n * PAGE_SIZE as u64) as usize]);
            done += n;
        }
        Ok(out)
    }

    /// Writes `data` (whole pages) at device page `page`; FUA makes it durable
    /// when it completes.
    pub async fn write_pages(&self, page: u64, data: &[u8], fua: bool, what: &str) -> Result<(), BlobError> {
        debug_assert_eq!(data.len() % PAGE_SIZE, 0);
        let count = (data.len() / PAGE_SIZE) as u64;
        let mut done = 0;
        while done < count {
            let n = (count - done).min(MAX_TRANSFER / PAGE_SIZE as u64);
            let start = (done * PAGE_SIZE as u64) as usize;
            let buf = DmaBuf::copy_from(&data[start..start + (n * PAGE_SIZE as u64) as usize])?;
            let c = self.run(Io::write(self.lba(page + done), buf, 0).with_fua(fua)).await;
            c.status.map_err(|e| BlobError::io(format!("writing {what} (page {})", page + done), e))?;
            done += n;
        }
        Ok(())
    }

    /// Zeroes `n` clusters from cluster `first`.
    pub async fn zero_clusters(&self, first: u64, n: u64) -> Result<(), BlobError> {
        let bpc = self.store.blocks_per_cluster;
        let c = self.run(Io::write_zeroes(first * bpc, n * bpc, 0)).await;
        c.status.map_err(|e| BlobError::io(format!("zeroing clusters {first}..{}", first + n), e))
    }

    /// Copies cluster `from` to cluster `to`.
    pub async fn copy_cluster(&self, from: u64, to: u64) -> Result<(), BlobError> {
        let bpc = self.store.blocks_per_cluster;
        let size = self.store.geometry.cluster_size as usize;
        let c = self.run(Io::read(from * bpc, DmaBuf::new(size)?, 0)).await;
        c.status.map_err(|e| BlobError::io(format!("reading cluster {from} to copy it"), e))?;
        let c = self.run(Io { bufs: c.bufs, ..Io::write(to * bpc, IoBufs::None, 0) }).await;
        c.status.map_err(|e| BlobError::io(format!("writing the copy of cluster {from} to cluster {to}"), e))
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> Result<(), BlobError> {
        let c = self.run(Io::flush(0)).await;
        c.status.map_err(|e| BlobError::io("flushing the device", e))
    }
}
