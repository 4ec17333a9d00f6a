//! The crash bdev: a base bdev behind a simulated volatile write cache, for
//! crash tests (SPDK's power-failure tests, redb's and TigerBeetle's crash
//! storage).
//!
//! # Model
//!
//! - A write completes as soon as its data is in the cache (the *overlay*),
//!   which keeps every version of every block written since it was last made
//!   durable. Reads see the newest version.
//! - A flush writes the newest version of every cached block to the base, one
//!   request at a time, then flushes the base, then completes. A FUA write is
//!   written through the same way before it completes. What the wrapper has
//!   written to the base is durable.
//! - A power cut ([`power_cut`]) fails every request not yet complete and
//!   decides, block by block, what of the cache survives: nothing (`drop`),
//!   the newest version (`keep`), or one of {nothing, each cached version}
//!   picked by a PRNG from `seed` (`random`). So a multi-block write may be
//!   torn at any block boundary, and blocks written after one another may
//!   persist in any combination; a block itself is the atomic unit. The
//!   survivors are written to the base, which then holds exactly the image a
//!   crash would leave. The bdev stays off (every request fails) until
//!   [`power_on`]. The same seed on the same workload gives the same image.
//!
//! A crash bdev serves one channel at a time (crash tests drive one reactor).
//! If none is open when the cut is requested, the next channel performs it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bdev::{Bdev, BdevChannel, BdevDesc, BdevRegistry, Claim, Completion, Io, IoError, IoType};
use crate::error::BdevError;

/// Parameters of `bdev_crash_create`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CrashConfig {
    /// Name of the new bdev.
    pub name: String,
    /// The bdev holding the durable image.
    pub base_name: String,
    /// UUID (generated if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<uuid::Uuid>,
}

/// What survives a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerCutMode {
    /// No unflushed write survives.
    Drop,
    /// Every unflushed write survives.
    Keep,
    /// Per block: nothing, or one of its unflushed versions, chosen by the seed.
    #[default]
    Random,
}

/// Parameters of `bdev_crash_power_cut`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PowerCutConfig {
    /// The crash bdev.
    pub name: String,
    /// drop, keep or random (default).
    #[serde(default)]
    pub mode: PowerCutMode,
    /// Seed of the random choices.
    #[serde(default)]
    pub seed: u64,
}

/// Power state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// Serving requests.
    On,
    /// A cut is in progress: survivors are being written to the base.
    Cutting,
    /// Cut; every request fails until [`power_on`].
    Off,
}

/// What `bdev_crash_get_status` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CrashStatus {
    /// Power state.
    pub state: PowerState,
    /// Blocks with unflushed versions.
    pub unflushed_blocks: u64,
    /// Power cuts so far.
    pub cuts: u64,
    /// Blocks that kept a version at the last cut.
    pub last_cut_survivors: u64,
    /// Blocks whose versions were all lost at the last cut.
    pub last_cut_dropped: u64,
}

#[derive(Clone)]
struct Version {
    seq: u64,
    /// The write's data and this block's offset in it; `None` reads as zeros.
    data: Option<(Arc<[u8]>, usize)>,
}

struct State {
    power: PowerState,
    cut: Option<(PowerCutMode, u64)>,
    overlay: BTreeMap<u64, Vec<Version>>,
    seq: u64,
    channel_open: bool,
    cuts: u64,
    last_cut: (u64, u64),
}

pub(crate) struct CrashDev {
    base: Arc<Bdev>,
    hold: Mutex<Option<(BdevDesc, Claim)>>,
    state: Mutex<State>,
    config: CrashConfig,
}

impl CrashDev {
    pub(crate) fn base(&self) -> &Arc<Bdev> {
        &self.base
    }

    pub(crate) fn config(&self, bdev: &Bdev) -> CrashConfig {
        CrashConfig { uuid: Some(bdev.uuid()), ..self.config.clone() }
    }

    pub(crate) fn release(&self) {
        self.hold.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn channel(&self, self_bdev: Arc<Bdev>, ctx: &mut pmd::Ctx<'_>) -> Result<CrashChannel, BdevError> {
        let desc = self.hold.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(d, _)| d.clone());
        let desc = desc.ok_or_else(|| BdevError::NotFound(self.base.name().to_string()))?;
        {
            let mut st = self.lock();
            if st.channel_open {
                return Err(BdevError::invalid(
                    self_bdev.name(),
                    "channel",
                    "a crash bdev serves one channel at a time".into(),
                ));
            }
            st.channel_open = true;
        }
        let inner = match desc.channel(ctx) {
            Ok(c) => c,
            Err(e) => {
                self.lock().channel_open = false;
                return Err(e);
            }
        };
        Ok(CrashChannel {
            block_size: self.base.block_size() as usize,
            dev: self_bdev,
            inner,
            done: Vec::new(),
            reads: HashMap::new(),
            writeback: VecDeque::new(),
            wb_busy: None,
            wb_failed: None,
            removals: Vec::new(),
            scratch: Vec::new(),
        })
    }
}

/// One step of writing back to the base, done strictly one at a time.
enum Wb {
    /// Write blocks `start..` with these versions; complete `then` afterwards.
    Write { start: u64, versions: Vec<Version>, fua: bool, then: Option<Io> },
    /// Flush the base; complete `then` afterwards.
    Flush { then: Option<Io> },
    /// The last step of a power cut: switch off.
    PowerOff,
}

/// Tag of the wrapper's own requests to the base (user tags are slot numbers).
const WB_TAG: u64 = 1 << 63;

pub(crate) struct CrashChannel {
    dev: Arc<Bdev>,
    inner: BdevChannel,
    block_size: usize,
    done: Vec<Completion>,
    /// Reads in the base: tag -> (first block, blocks).
    reads: HashMap<u64, (u64, u64)>,
    writeback: VecDeque<Wb>,
    /// The step in the base, if any.
    wb_busy: Option<Wb>,
    /// A write-back failure, reported by the next flush.
    wb_failed: Option<IoError>,
    /// Versions made durable, dropped from the overlay once no read is in the base.
    removals: Vec<(u64, u64)>,
    scratch: Vec<Completion>,
}

impl Drop for CrashChannel {
    fn drop(&mut self) {
        self.crash_dev().lock().channel_open = false;
    }
}

/// Splits (block, version) pairs into runs of consecutive blocks.
fn runs(blocks: impl IntoIterator<Item = (u64, Version)>) -> Vec<(u64, Vec<Version>)> {
    let mut out: Vec<(u64, Vec<Version>)> = Vec::new();
    for (block, v) in blocks {
        match out.last_mut() {
            Some((start, vs)) if *start + vs.len() as u64 == block => vs.push(v),
            _ => out.push((block, vec![v])),
        }
    }
    out
}

impl CrashChannel {
    fn crash_dev(&self) -> &CrashDev {
        match &self.dev.backend {
            super::Backend::Crash(d) => d,
            _ => unreachable!("a crash channel belongs to a crash bdev"),
        }
    }

    pub(crate) fn submit(&mut self, now: u64, io: Io) -> Result<(), Io> {
        let bs = self.block_size;
        let dev = match &self.dev.backend {
            super::Backend::Crash(d) => d,
            _ => unreachable!("a crash channel belongs to a crash bdev"),
        };
        let mut st = dev.lock();
        if st.power != PowerState::On {
            self.done.push(Completion::of(io, Err(IoError::Removed)));
            return Ok(());
        }
        match io.op {
            IoType::Read => {
                self.reads.insert(io.tag, (io.offset_blocks, io.num_blocks));
                drop(st);
                self.inner.submit(now, io);
            }
            IoType::Write | IoType::Unmap | IoType::WriteZeroes => {
                let data: Option<Arc<[u8]>> = (io.op == IoType::Write).then(|| {
                    let mut v = vec![0u8; io.bufs.len()];
                    io.bufs.copy_out(0, &mut v);
                    v.into()
                });
                let mut written = Vec::with_capacity(io.num_blocks as usize);
                for i in 0..io.num_blocks {
                    st.seq += 1;
                    let v = Version { seq: st.seq, data: data.clone().map(|d| (d, i as usize * bs)) };
                    st.overlay.entry(io.offset_blocks + i).or_default().push(v.clone());
                    written.push(v);
                }
                drop(st);
                if io.fua {
                    self.writeback.push_back(Wb::Write {
                        start: io.offset_blocks,
                        versions: written,
                        fua: true,
                        then: Some(io),
                    });
                } else {
                    self.done.push(Completion::of(io, Ok(())));
                }
            }
            IoType::Flush => {
                let newest = st.overlay.iter().map(|(&b, vs)| (b, vs.last().expect("no empty version lists").clone()));
                for (start, versions) in runs(newest) {
                    self.writeback.push_back(Wb::Write { start, versions, fua: false, then: None });
                }
                drop(st);
                self.writeback.push_back(Wb::Flush { then: Some(io) });
            }
        }
        self.pump(now);
        Ok(())
    }

    /// Starts the next write-back step if none is in the base.
    fn pump(&mut self, now: u64) {
        while self.wb_busy.is_none() {
            let Some(step) = self.writeback.pop_front() else { return };
            match &step {
                Wb::Write { start, versions, fua, .. } => {
                    let io = if versions.iter().all(|v| v.data.is_none()) {
                        Io::write_zeroes(*start, versions.len() as u64, WB_TAG)
                    } else {
                        let bs = self.block_size;
                        let mut buf = match pmd::DmaBuf::zeroed(versions.len() * bs) {
                            Ok(b) => b,
                            Err(e) => {
                                tracing::error!("crash bdev: no DMA memory for write-back: {e}");
                                self.finish_step(step, Err(IoError::Device));
                                continue;
                            }
                        };
                        for (i, v) in versions.iter().enumerate() {
                            if let Some((data, off)) = &v.data {
                                buf[i * bs..(i + 1) * bs].copy_from_slice(&data[*off..*off + bs]);
                            }
                        }
                        Io::write(*start, buf, WB_TAG).with_fua(*fua)
                    };
                    self.inner.submit(now, io);
                }
                Wb::Flush { .. } => self.inner.submit(now, Io::flush(WB_TAG)),
                Wb::PowerOff => {
                    self.crash_dev().lock().power = PowerState::Off;
                    continue;
                }
            }
            self.wb_busy = Some(step);
        }
    }

    /// Completes a write-back step with the base's status.
    fn finish_step(&mut self, step: Wb, status: Result<(), IoError>) {
        match step {
            Wb::Write { start, versions, then, .. } => {
                match status {
                    Ok(()) => self.removals.extend(versions.iter().enumerate().map(|(i, v)| (start + i as u64, v.seq))),
                    Err(e) => self.wb_failed = Some(e),
                }
                if let Some(io) = then {
                    self.done.push(Completion::of(io, status));
                }
            }
            Wb::Flush { then } => {
                let status = match self.wb_failed.take() {
                    Some(e) => Err(e),
                    None => status,
                };
                if let Some(io) = then {
                    self.done.push(Completion::of(io, status));
                }
            }
            Wb::PowerOff => {}
        }
    }

    pub(crate) fn poll(&mut self, now: u64, out: &mut Vec<Completion>) {
        self.inner.poll(now, &mut self.scratch);
        let mut scratch = std::mem::take(&mut self.scratch);
        for mut c in scratch.drain(..) {
            if c.tag == WB_TAG {
                let step = self.wb_busy.take().expect("a write-back completion has its step");
                self.finish_step(step, c.status);
                continue;
            }
            if let Some((first, count)) = self.reads.remove(&c.tag) {
                if c.status.is_ok() {
                    self.patch_read(first, count, &mut c);
                }
            }
            self.done.push(c);
        }
        self.scratch = scratch;
        if self.reads.is_empty() && !self.removals.is_empty() {
            let removals = std::mem::take(&mut self.removals);
            let mut st = self.crash_dev().lock();
            for (block, seq) in removals {
                if let Some(vs) = st.overlay.get_mut(&block) {
                    vs.retain(|v| v.seq > seq);
                    if vs.is_empty() {
                        st.overlay.remove(&block);
                    }
                }
            }
        }
        self.cut_if_requested();
        self.pump(now);
        out.append(&mut self.done);
    }

    /// Overwrites the blocks of a finished read that have newer cached versions.
    fn patch_read(&self, first: u64, count: u64, c: &mut Completion) {
        let bs = self.block_size;
        let st = self.crash_dev().lock();
        for (&block, vs) in st.overlay.range(first..first + count) {
            let at = (block - first) as usize * bs;
            match &vs.last().expect("no empty version lists").data {
                Some((data, off)) => c.bufs.copy_in(at, &data[*off..*off + bs]),
                None => c.bufs.fill(at, bs, 0),
            }
        }
    }

    /// Carries out a requested power cut once nothing is in the base.
    fn cut_if_requested(&mut self) {
        let mut st = match &self.dev.backend {
            super::Backend::Crash(d) => d.lock(),
            _ => unreachable!("a crash channel belongs to a crash bdev"),
        };
        let Some((mode, seed)) = st.cut else { return };
        // Requests waiting for write-back never complete successfully.
        for step in self.writeback.drain(..) {
            if let Wb::Write { then: Some(io), .. } | Wb::Flush { then: Some(io) } = step {
                self.done.push(Completion::of(io, Err(IoError::Removed)));
            }
        }
        if self.wb_busy.is_some() || !self.reads.is_empty() {
            return; // let what the device is doing finish first
        }
        st.cut = None;
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut survivors = Vec::new();
        let mut dropped = 0;
        for (block, versions) in std::mem::take(&mut st.overlay) {
            let pick = match mode {
                PowerCutMode::Drop => 0,
                PowerCutMode::Keep => versions.len(),
                PowerCutMode::Random => rng.usize(0..=versions.len()),
            };
            if pick == 0 {
                dropped += 1;
            } else {
                survivors.push((block, versions[pick - 1].clone()));
            }
        }
        st.cuts += 1;
        st.last_cut = (survivors.len() as u64, dropped);
        tracing::info!(bdev = self.dev.name(), ?mode, seed, survivors = survivors.len(), dropped, "power cut");
        drop(st);
        for (start, versions) in runs(survivors) {
            self.writeback.push_back(Wb::Write { start, versions, fua: false, then: None });
        }
        self.writeback.push_back(Wb::Flush { then: None });
        self.writeback.push_back(Wb::PowerOff);
    }

    pub(crate) fn abort(&mut self, _tag: u64) {}

    pub(crate) fn wakes_reactor(&self) -> bool {
        self.done.is_empty() && self.writeback.is_empty() && self.inner.wakes_reactor()
    }
}

/// Creates a crash bdev over `base_name`, claiming it.
pub fn create(registry: &BdevRegistry, config: &CrashConfig) -> Result<Arc<Bdev>, BdevError> {
    if registry.get(&config.name).is_ok() {
        return Err(BdevError::Exists(config.name.clone()));
    }
    let base = registry.get(&config.base_name)?;
    let desc = registry.open(&config.base_name, true)?;
    let claim = base.claim(&config.name)?;
    let state = State {
        power: PowerState::On,
        cut: None,
        overlay: BTreeMap::new(),
        seq: 0,
        channel_open: false,
        cuts: 0,
        last_cut: (0, 0),
    };
    let dev = CrashDev {
        base: base.clone(),
        hold: Mutex::new(Some((desc, claim))),
        state: Mutex::new(state),
        config: config.clone(),
    };
    let bdev = Bdev::new(&config.name, config.uuid, base.block_size(), base.num_blocks(), super::Backend::Crash(dev))?;
    registry.register(bdev)
}

fn crash_dev<'a>(bdev: &'a Bdev, name: &str) -> Result<&'a CrashDev, BdevError> {
    match &bdev.backend {
        super::Backend::Crash(d) => Ok(d),
        other => Err(BdevError::WrongKind { name: name.to_string(), kind: other.kind(), expected: "crash".into() }),
    }
}

/// Requests a power cut (see the module docs). The channel carries it out on
/// its next poll; [`status`] says `off` when the base holds the crash image.
pub fn power_cut(registry: &BdevRegistry, config: &PowerCutConfig) -> Result<(), BdevError> {
    let bdev = registry.get(&config.name)?;
    let mut st = crash_dev(&bdev, &config.name)?.lock();
    if st.power != PowerState::On {
        return Err(BdevError::invalid(&config.name, "state", format!("power is {:?}, not on", st.power)));
    }
    st.power = PowerState::Cutting;
    st.cut = Some((config.mode, config.seed));
    Ok(())
}

/// Turns a cut bdev back on.
pub fn power_on(registry: &BdevRegistry, name: &str) -> Result<(), BdevError> {
    let bdev = registry.get(name)?;
    let mut st = crash_dev(&bdev, name)?.lock();
    if st.power != PowerState::Off {
        return Err(BdevError::invalid(name, "state", format!("power is {:?}, not off", st.power)));
    }
    st.power = PowerState::On;
    Ok(())
}

/// The power state and cache occupancy.
pub fn status(registry: &BdevRegistry, name: &str) -> Result<CrashStatus, BdevError> {
    let bdev = registry.get(name)?;
    let st = crash_dev(&bdev, name)?.lock();
    Ok(CrashStatus {
        state: st.power,
        unflushed_blocks: st.overlay.len() as u64,
        cuts: st.cuts,
        last_cut_survivors: st.last_cut.0,
        last_cut_dropped: st.last_cut.1,
    })
}
