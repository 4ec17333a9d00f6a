//! One bdevperf job: a poller on one reactor that keeps `depth` requests in
//! flight against one bdev until its time is up.

use std::sync::mpsc::Sender;

use std::sync::Arc;

use blobfs::{BlobChannel, BlobIo, BlobShared, Blobstore};
use nvme::stats::{Histogram, HistogramSnapshot};
use nvme::{BdevChannel, BdevDesc, Completion, Io, IoType};
use pmd::{Ctx, DmaBuf, PollStatus};

use super::Workload;

/// What a job drives: a bdev, or a blob (offsets in 4 KiB pages).
#[derive(Clone)]
pub enum TargetSpec {
    Bdev(BdevDesc),
    Blob { store: Blobstore, blob: Arc<BlobShared>, name: String },
}

impl TargetSpec {
    pub fn name(&self) -> String {
        match self {
            TargetSpec::Bdev(d) => d.bdev().name().to_string(),
            TargetSpec::Blob { name, .. } => name.clone(),
        }
    }

    /// Bytes per unit of offset.
    pub fn block_size(&self) -> u64 {
        match self {
            TargetSpec::Bdev(d) => d.bdev().block_size() as u64,
            TargetSpec::Blob { .. } => blobfs::format::PAGE_SIZE as u64,
        }
    }
}

/// A job's channel. A job holds exactly one, so the size gap between the
/// variants costs nothing worth a box (which would cost a load per I/O).
#[allow(clippy::large_enum_variant)]
enum Target {
    Bdev(BdevChannel),
    Blob { ch: BlobChannel, blob: Arc<BlobShared> },
}

impl Target {
    fn submit(&mut self, now: u64, io: Io) {
        match self {
            Target::Bdev(ch) => ch.submit(now, io),
            Target::Blob { ch, blob, .. } => {
                let bio = BlobIo {
                    blob: blob.clone(),
                    op: io.op,
                    page: io.offset_blocks,
                    pages: io.num_blocks,
                    bufs: io.bufs,
                    tag: io.tag,
                };
                ch.submit(now, bio)
            }
        }
    }

    fn poll(&mut self, now: u64, out: &mut Vec<Completion>) -> usize {
        match self {
            Target::Bdev(ch) => ch.poll(now, out),
            Target::Blob { ch, .. } => ch.poll(now, out),
        }
    }

    fn idle_status(&self) -> PollStatus {
        match self {
            Target::Bdev(ch) => ch.idle_status(),
            // The blobstore's own poller keeps the reactor awake while it has work.
            Target::Blob { .. } => PollStatus::Idle,
        }
    }
}

/// What a job is asked to do.
#[derive(Clone)]
pub struct JobSpec {
    pub target: TargetSpec,
    pub workload: Workload,
    pub depth: usize,
    pub io_blocks: u64,
    /// First block and number of blocks the job may touch.
    pub range: (u64, u64),
    pub duration_ns: u64,
    pub rwmix_read: u32,
    pub seed: u64,
    pub timeout: Option<std::time::Duration>,
}

/// What a job reports.
#[derive(Debug, Clone)]
pub struct JobResult {
    pub bdev: String,
    pub reactor: u32,
    pub core: Option<usize>,
    pub elapsed_ns: u64,
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub latency: HistogramSnapshot,
    /// Sum of all latencies, for the average.
    pub latency_sum_ns: u64,
    /// Verify: the first mismatch, described.
    pub mismatch: Option<String>,
    /// The first failed request, described.
    pub first_error: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Busy,
    /// Verify: the write of this slot's block range is done; read it back.
    VerifyRead,
}

struct Slot {
    buf: Option<DmaBuf>,
    start: u64,
    offset: u64,
    generation: u64,
    phase: Phase,
}

pub struct Job {
    spec: JobSpec,
    ch: Target,
    block_size: u64,
    slots: Vec<Slot>,
    rng: fastrand::Rng,
    cursor: u64,
    ios_in_range: u64,
    begin: u64,
    end: u64,
    inflight: usize,
    done: Vec<Completion>,
    latency: Histogram,
    latency_sum_ns: u64,
    ios: u64,
    bytes: u64,
    errors: u64,
    timeouts: u64,
    mismatch: Option<String>,
    first_error: Option<String>,
    expected: Vec<u8>,
    tx: Option<Sender<JobResult>>,
}

/// Fills `out` with the verify pattern of (block, generation): every 8-byte
/// word differs, so a misplaced, stale or torn block never compares equal.
pub fn fill_pattern(out: &mut [u8], block: u64, generation: u64, block_size: u64) {
    for (i, word) in out.chunks_exact_mut(8).enumerate() {
        let pos = block * block_size / 8 + i as u64;
        let mut x = pos ^ generation.rotate_left(40) ^ 0x9E37_79B9_7F4A_7C15;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        word.copy_from_slice(&(x ^ (x >> 31)).to_le_bytes());
    }
}

impl Job {
    pub fn start(spec: JobSpec, ctx: &mut Ctx<'_>, tx: Sender<JobResult>) -> anyhow::Result<()> {
        let ch = match &spec.target {
            TargetSpec::Bdev(desc) => {
                let mut ch = desc.channel(ctx)?;
                ch.set_timeout(spec.timeout);
                Target::Bdev(ch)
            }
            TargetSpec::Blob { store, blob, .. } => Target::Blob { ch: store.channel(ctx)?, blob: blob.clone() },
        };
        let block_size = spec.target.block_size();
        let io_bytes = (spec.io_blocks * block_size) as usize;
        let needs_buf = matches!(
            spec.workload,
            Workload::Read
                | Workload::Write
                | Workload::Randread
                | Workload::Randwrite
                | Workload::Rw
                | Workload::Randrw
                | Workload::Verify
        );
        let mut slots = Vec::with_capacity(spec.depth);
        for _ in 0..spec.depth {
            let buf = if needs_buf {
                let mut b = DmaBuf::new(io_bytes)?;
                b.fill(0xA5);
                Some(b)
            } else {
                None
            };
            slots.push(Slot { buf, start: 0, offset: 0, generation: 0, phase: Phase::Idle });
        }
        let now = pmd::clock::now();
        let mut job = Job {
            ios_in_range: (spec.range.1 / spec.io_blocks).max(1),
            rng: fastrand::Rng::with_seed(spec.seed ^ ctx.reactor_id() as u64),
            cursor: 0,
            begin: now,
            end: now + spec.duration_ns,
            inflight: 0,
            done: Vec::with_capacity(spec.depth),
            latency: Histogram::default(),
            latency_sum_ns: 0,
            ios: 0,
            bytes: 0,
            errors: 0,
            timeouts: 0,
            mismatch: None,
            first_error: None,
            expected: if spec.workload == Workload::Verify { vec![0; io_bytes] } else { Vec::new() },
            tx: Some(tx),
            slots,
            block_size,
            ch,
            spec,
        };
        for i in 0..job.slots.len() {
            job.submit(i, now);
        }
        let name = format!("bdevperf_{}", job.spec.target.name());
        ctx.register_poller(name, 0, move |ctx| job.poll(ctx));
        Ok(())
    }

    fn next_offset(&mut self, sequential: bool) -> u64 {
        let index = if sequential {
            let i = self.cursor % self.ios_in_range;
            self.cursor += 1;
            i
        } else {
            self.rng.u64(0..self.ios_in_range)
        };
        self.spec.range.0 + index * self.spec.io_blocks
    }

    fn submit(&mut self, i: usize, now: u64) {
        use Workload::*;
        let blocks = self.spec.io_blocks;
        let io = match self.spec.workload {
            Verify if self.slots[i].phase == Phase::VerifyRead => {
                let s = &mut self.slots[i];
                Io::read(s.offset, s.buf.take().expect("verify keeps its buffer"), i as u64)
            }
            Verify => {
                let generation = self.cursor / self.ios_in_range + 1;
                let offset = self.next_offset(true);
                let bs = self.block_size;
                let s = &mut self.slots[i];
                s.offset = offset;
                s.generation = generation;
                let mut buf = s.buf.take().expect("verify keeps its buffer");
                fill_pattern(&mut buf, offset, generation, bs);
                Io::write(offset, buf, i as u64)
            }
            Read | Write | Randread | Randwrite | Rw | Randrw => {
                let sequential = matches!(self.spec.workload, Read | Write | Rw);
                let read = match self.spec.workload {
                    Read | Randread => true,
                    Write | Randwrite => false,
                    _ => self.rng.u32(0..100) < self.spec.rwmix_read,
                };
                let offset = self.next_offset(sequential);
                let buf = match self.slots[i].buf.take() {
                    Some(b) => b,
                    // A timed-out request's buffer stays with the device.
                    None => match DmaBuf::new((blocks * self.block_size) as usize) {
                        Ok(b) => b,
                        Err(e) => {
                            self.fail(format!("no DMA memory for a new buffer: {e}"));
                            return;
                        }
                    },
                };
                if read { Io::read(offset, buf, i as u64) } else { Io::write(offset, buf, i as u64) }
            }
            Unmap => Io::unmap(self.next_offset(false), blocks, i as u64),
            WriteZeroes => Io::write_zeroes(self.next_offset(false), blocks, i as u64),
            Flush => Io::flush(i as u64),
        };
        let s = &mut self.slots[i];
        s.start = now;
        s.phase = if s.phase == Phase::VerifyRead { Phase::VerifyRead } else { Phase::Busy };
        self.inflight += 1;
        self.ch.submit(now, io);
    }

    fn fail(&mut self, what: String) {
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }

    /// Handles one completion; returns whether the slot should go on.
    fn complete(&mut self, c: Completion, now: u64) -> bool {
        let i = c.tag as usize;
        self.inflight -= 1;
        let slot = &mut self.slots[i];
        let latency = now.saturating_sub(slot.start);
        let counted = now <= self.end;
        if counted {
            self.latency.record(latency);
            self.latency_sum_ns += latency;
            self.ios += 1;
            self.bytes += if c.op == IoType::Flush { 0 } else { self.spec.io_blocks * self.block_size };
        }
        if let Err(e) = c.status {
            if counted {
                self.errors += 1;
                if e == nvme::IoError::TimedOut {
                    self.timeouts += 1;
                }
            }
            let (offset, op) = (slot.offset, c.op.as_str());
            slot.phase = Phase::Idle;
            self.slots[i].buf = c.bufs.into_one();
            self.fail(format!("{op} at block {offset} failed: {e}"));
            return self.spec.workload != Workload::Verify;
        }
        let buf = c.bufs.into_one();
        if self.spec.workload != Workload::Verify {
            self.slots[i].buf = buf;
            return true;
        }
        let slot = &mut self.slots[i];
        let buf = buf.expect("a successful verify request returns its buffer");
        if slot.phase == Phase::Busy {
            slot.phase = Phase::VerifyRead;
            slot.buf = Some(buf);
            return true;
        }
        // A read back: compare every byte with what was written.
        let (offset, generation) = (slot.offset, slot.generation);
        fill_pattern(&mut self.expected, offset, generation, self.block_size);
        if buf[..] != self.expected[..] {
            let at = buf.iter().zip(&self.expected).position(|(a, b)| a != b).unwrap_or(0);
            let bs = self.block_size as usize;
            self.mismatch = Some(format!(
                "bdev {}: data mismatch at block {} (byte {} of the {}-byte request at block {offset}): expected {:#04x}, read {:#04x}",
                self.spec.target.name(),
                offset + (at / bs) as u64,
                at % bs,
                buf.len(),
                self.expected[at],
                buf[at],
            ));
        }
        let slot = &mut self.slots[i];
        slot.phase = Phase::Idle;
        slot.buf = Some(buf);
        self.mismatch.is_none()
    }

    fn poll(&mut self, ctx: &mut Ctx<'_>) -> PollStatus {
        let now = pmd::clock::now();
        let mut done = std::mem::take(&mut self.done);
        self.ch.poll(now, &mut done);
        let busy = !done.is_empty();
        let stopping = now >= self.end || self.mismatch.is_some();
        for c in done.drain(..) {
            let i = c.tag as usize;
            let go_on = self.complete(c, now);
            let verify_read = self.slots[i].phase == Phase::VerifyRead;
            if go_on && (!stopping || verify_read) && self.mismatch.is_none() {
                self.submit(i, now);
            }
        }
        self.done = done;
        if (stopping || self.mismatch.is_some()) && self.inflight == 0 {
            if let Some(tx) = self.tx.take() {
                let _ = tx.send(JobResult {
                    bdev: self.spec.target.name(),
                    reactor: ctx.reactor_id(),
                    core: ctx.handle().core(),
                    elapsed_ns: now.min(self.end).saturating_sub(self.begin).max(1),
                    ios: self.ios,
                    bytes: self.bytes,
                    errors: self.errors,
                    timeouts: self.timeouts,
                    latency: self.latency.snapshot(),
                    latency_sum_ns: self.latency_sum_ns,
                    mismatch: self.mismatch.clone(),
                    first_error: self.first_error.clone(),
                });
                if let Some(id) = ctx.current_poller() {
                    ctx.unregister_poller(id);
                }
            }
            return PollStatus::Idle;
        }
        if busy { PollStatus::Busy } else { self.ch.idle_status() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_by_block_and_generation() {
        let mut a = vec![0; 4096];
        let mut b = vec![0; 4096];
        fill_pattern(&mut a, 1, 1, 512);
        fill_pattern(&mut b, 1, 2, 512);
        assert_ne!(a, b);
        fill_pattern(&mut b, 2, 1, 512);
        assert_ne!(a[..512], b[..512]);
        assert_eq!(a[512..1024], b[..512], "the pattern is a function of the absolute position");
        let words: std::collections::HashSet<&[u8]> = a.chunks(8).collect();
        assert_eq!(words.len(), 512);
    }
}
