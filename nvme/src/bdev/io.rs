//! One I/O request and its completion.

use std::sync::Arc;

use pmd::DmaBuf;

/// The kinds of I/O a bdev may support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IoType {
    /// Read blocks into the buffers.
    Read,
    /// Write the buffers to blocks.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Deallocate blocks (their content afterwards reads as zeros where the
    /// bdev says `unmap_zeroes`, and is undefined otherwise).
    Unmap,
    /// Set blocks to zero without a data buffer.
    WriteZeroes,
}

impl IoType {
    /// All kinds, in a fixed order (used as an index).
    pub const ALL: [IoType; 5] = [IoType::Read, IoType::Write, IoType::Flush, IoType::Unmap, IoType::WriteZeroes];

    /// Position in [`IoType::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Flush => "flush",
            IoType::Unmap => "unmap",
            IoType::WriteZeroes => "write_zeroes",
        }
    }

    /// Whether the op modifies the device.
    pub fn is_write(self) -> bool {
        !matches!(self, IoType::Read)
    }
}

/// A part of a buffer shared by several requests (a request split across
/// clusters of a blob, each part going to its own device request). Each part
/// owns `[offset, offset + len)` of the buffer while its request is in flight.
#[derive(Debug, Clone)]
pub struct BufPart {
    /// The whole buffer.
    pub buf: Arc<DmaBuf>,
    /// First byte of the part.
    pub offset: usize,
    /// Bytes in the part.
    pub len: usize,
}

/// One contiguous piece of memory a device transfers to or from.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// First byte.
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
    /// DMA pool region holding it (see [`DmaBuf::region`]).
    pub region: Option<u32>,
}

impl Segment {
    fn whole(b: &DmaBuf) -> Segment {
        Segment { ptr: b.dma_ptr(), len: b.len(), region: b.region() }
    }

    fn part(p: &BufPart) -> Segment {
        debug_assert!(p.offset + p.len <= p.buf.len());
        // SAFETY: the part lies within the buffer (checked when the part was made).
        let ptr = unsafe { p.buf.dma_ptr().add(p.offset) };
        Segment { ptr, len: p.len, region: p.buf.region() }
    }
}

/// The segments of a transfer, in order (see [`IoBufs::segments`]).
#[derive(Debug, Clone)]
pub struct Segments<'a> {
    bufs: &'a IoBufs,
    next: usize,
}

impl Iterator for Segments<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        let seg = match self.bufs {
            IoBufs::None => None,
            IoBufs::One(b) => (self.next == 0).then(|| Segment::whole(b)),
            IoBufs::Many(v) => v.get(self.next).map(Segment::whole),
            IoBufs::Parts(v) => v.get(self.next).map(Segment::part),
        };
        self.next += seg.is_some() as usize;
        seg
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.bufs.segment_count() - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Segments<'_> {}

/// The data buffers of an I/O: none, one, a scatter list, or parts of shared buffers.
#[derive(Debug, Default)]
pub enum IoBufs {
    /// No data (flush, unmap, write zeroes, or a timed-out I/O whose buffers
    /// stay with the device until it lets go of them).
    #[default]
    None,
    /// One contiguous buffer.
    One(DmaBuf),
    /// Several buffers, transferred in order.
    Many(Vec<DmaBuf>),
    /// Parts of shared buffers, transferred in order.
    Parts(Vec<BufPart>),
}

impl IoBufs {
    /// Total bytes.
    pub fn len(&self) -> usize {
        match self {
            IoBufs::None => 0,
            IoBufs::One(b) => b.len(),
            IoBufs::Many(v) => v.iter().map(|b| b.len()).sum(),
            IoBufs::Parts(v) => v.iter().map(|p| p.len).sum(),
        }
    }

    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The memory of the transfer, in order, for device drivers (no allocation).
    pub fn segments(&self) -> Segments<'_> {
        Segments { bufs: self, next: 0 }
    }

    /// How many segments the transfer has.
    pub fn segment_count(&self) -> usize {
        match self {
            IoBufs::None => 0,
            IoBufs::One(_) => 1,
            IoBufs::Many(v) => v.len(),
            IoBufs::Parts(v) => v.len(),
        }
    }

    /// The only segment, if the transfer is one contiguous piece.
    pub fn single_segment(&self) -> Option<Segment> {
        if self.segment_count() == 1 { self.segments().next() } else { None }
    }

    /// Takes the single buffer, if there is exactly one owned buffer.
    pub fn into_one(self) -> Option<DmaBuf> {
        match self {
            IoBufs::One(b) => Some(b),
            IoBufs::Many(mut v) if v.len() == 1 => v.pop(),
            _ => None,
        }
    }

    /// Copies `data` into the transfer's memory from byte `offset` of the transfer on.
    /// The caller owns the buffers (the request is complete).
    pub fn copy_in(&mut self, mut offset: usize, mut data: &[u8]) {
        for seg in self.segments() {
            if data.is_empty() {
                return;
            }
            if offset >= seg.len {
                offset -= seg.len;
                continue;
            }
            let n = (seg.len - offset).min(data.len());
            // SAFETY: [offset, offset + n) lies within the segment, whose memory this
            // request owns (no device holds it: the request is not in flight).
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), seg.ptr.add(offset), n) };
            data = &data[n..];
            offset = 0;
        }
    }

    /// Copies bytes from byte `offset` of the transfer on into `out`.
    pub fn copy_out(&self, mut offset: usize, mut out: &mut [u8]) {
        for seg in self.segments() {
            if out.is_empty() {
                return;
            }
            if offset >= seg.len {
                offset -= seg.len;
                continue;
            }
            let n = (seg.len - offset).min(out.len());
            // SAFETY: as in `copy_in`; reading the owned range.
            unsafe { std::ptr::copy_nonoverlapping(seg.ptr.add(offset), out.as_mut_ptr(), n) };
            out = &mut out[n..];
            offset = 0;
        }
    }

    /// Fills `len` bytes from byte `offset` of the transfer on with `byte`.
    pub fn fill(&mut self, mut offset: usize, mut len: usize, byte: u8) {
        for seg in self.segments() {
            if len == 0 {
                return;
            }
            if offset >= seg.len {
                offset -= seg.len;
                continue;
            }
            let n = (seg.len - offset).min(len);
            // SAFETY: as in `copy_in`.
            unsafe { std::ptr::write_bytes(seg.ptr.add(offset), byte, n) };
            len -= n;
            offset = 0;
        }
    }
}

impl From<DmaBuf> for IoBufs {
    fn from(b: DmaBuf) -> Self {
        IoBufs::One(b)
    }
}

impl From<Vec<DmaBuf>> for IoBufs {
    fn from(v: Vec<DmaBuf>) -> Self {
        IoBufs::Many(v)
    }
}

/// An I/O request. `tag` is the submitter's; it comes back in the completion.
#[derive(Debug)]
pub struct Io {
    /// What to do.
    pub op: IoType,
    /// First block.
    pub offset_blocks: u64,
    /// Number of blocks. For reads and writes it is set from the buffers' length.
    pub num_blocks: u64,
    /// Data buffers (reads and writes).
    pub bufs: IoBufs,
    /// Write through to stable media before completing (Force Unit Access).
    pub fua: bool,
    /// Returned in the completion.
    pub tag: u64,
}

impl Io {
    /// Reads `bufs.len()` bytes starting at block `offset_blocks`.
    pub fn read(offset_blocks: u64, bufs: impl Into<IoBufs>, tag: u64) -> Self {
        Self { op: IoType::Read, offset_blocks, num_blocks: 0, bufs: bufs.into(), fua: false, tag }
    }

    /// Writes the buffers starting at block `offset_blocks`.
    pub fn write(offset_blocks: u64, bufs: impl Into<IoBufs>, tag: u64) -> Self {
        Self { op: IoType::Write, offset_blocks, num_blocks: 0, bufs: bufs.into(), fua: false, tag }
    }

    /// Makes every write completed before it durable.
    pub fn flush(tag: u64) -> Self {
        Self { op: IoType::Flush, offset_blocks: 0, num_blocks: 0, bufs: IoBufs::None, fua: false, tag }
    }

    /// Deallocates `num_blocks` blocks.
    pub fn unmap(offset_blocks: u64, num_blocks: u64, tag: u64) -> Self {
        Self { op: IoType::Unmap, offset_blocks, num_blocks, bufs: IoBufs::None, fua: false, tag }
    }

    /// Zeroes `num_blocks` blocks.
    pub fn write_zeroes(offset_blocks: u64, num_blocks: u64, tag: u64) -> Self {
        Self { op: IoType::WriteZeroes, offset_blocks, num_blocks, bufs: IoBufs::None, fua: false, tag }
    }

    /// Sets Force Unit Access.
    pub fn with_fua(mut self, fua: bool) -> Self {
        self.fua = fua;
        self
    }
}

/// Why an I/O failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// The device reported an error.
    #[error("device I/O error")]
    Device,
    /// The OS reported an error (io_uring result).
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Os(i32),
    /// No completion within the descriptor's timeout.
    #[error("timed out")]
    TimedOut,
    /// Cancelled before it completed.
    #[error("aborted")]
    Aborted,
    /// Blocks beyond the end of the device.
    #[error("blocks beyond the end of the device")]
    OutOfRange,
    /// The buffers do not fit the request (length not a multiple of the block size).
    #[error("request is empty or its buffers are not a whole number of blocks")]
    Invalid,
    /// The bdev does not do this kind of I/O.
    #[error("operation not supported by this bdev")]
    Unsupported,
    /// A write through a read-only descriptor.
    #[error("descriptor is read-only")]
    ReadOnly,
    /// The device is gone (deleted, hot-removed or powered off).
    #[error("device removed")]
    Removed,
    /// No space to allocate (a thin-provisioned device or blob ran out).
    #[error("no space left")]
    NoSpace,
}

impl IoError {
    /// The closest errno, for callers that speak POSIX.
    pub fn errno(self) -> i32 {
        match self {
            IoError::Device => libc::EIO,
            IoError::Os(e) => e,
            IoError::TimedOut => libc::ETIMEDOUT,
            IoError::Aborted => libc::ECANCELED,
            IoError::OutOfRange => libc::ERANGE,
            IoError::Invalid => libc::EINVAL,
            IoError::Unsupported => libc::EOPNOTSUPP,
            IoError::ReadOnly => libc::EROFS,
            IoError::Removed => libc::ENODEV,
            IoError::NoSpace => libc::ENOSPC,
        }
    }
}

/// The end of an I/O: its tag, its outcome, and its buffers handed back.
#[derive(Debug)]
pub struct Completion {
    /// The request's tag.
    pub tag: u64,
    /// The request's kind.
    pub op: IoType,
    /// Success or why not.
    pub status: Result<(), IoError>,
    /// The buffers (empty after a timeout: they stay with the device until it lets go).
    pub bufs: IoBufs,
}

impl Completion {
    /// Completes `io` with `status`, handing its buffers back.
    pub fn of(io: Io, status: Result<(), IoError>) -> Self {
        Self { tag: io.tag, op: io.op, status, bufs: io.bufs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_in_and_out_cross_buffer_boundaries() {
        let mut bufs = IoBufs::Many(vec![DmaBuf::zeroed(3).unwrap(), DmaBuf::zeroed(4).unwrap()]);
        bufs.copy_in(2, b"abcd");
        let mut all = [0u8; 7];
        bufs.copy_out(0, &mut all);
        assert_eq!(&all, b"\0\0abcd\0");
        let mut out = [0u8; 5];
        bufs.copy_out(1, &mut out);
        assert_eq!(&out, b"\0abcd");
        assert_eq!(bufs.len(), 7);
        bufs.fill(1, 4, b'x');
        bufs.copy_out(0, &mut all);
        assert_eq!(&all, b"\0xxxxd\0");
    }

    #[test]
    fn parts_address_disjoint_ranges_of_one_buffer() {
        let shared = Arc::new(DmaBuf::zeroed(8192).unwrap());
        let mut a = IoBufs::Parts(vec![BufPart { buf: shared.clone(), offset: 0, len: 4096 }]);
        let mut b = IoBufs::Parts(vec![BufPart { buf: shared.clone(), offset: 4096, len: 4096 }]);
        a.copy_in(0, &[1; 4096]);
        b.copy_in(0, &[2; 4096]);
        assert_eq!(a.single_segment().unwrap().ptr as usize + 4096, b.single_segment().unwrap().ptr as usize);
        drop((a, b));
        let whole = Arc::try_unwrap(shared).unwrap();
        assert!(whole[..4096].iter().all(|&x| x == 1) && whole[4096..].iter().all(|&x| x == 2));
    }
}
