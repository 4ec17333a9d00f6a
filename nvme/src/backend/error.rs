//! The error bdev: a pass-through to a base bdev that fails chosen requests.
//! Named `EE_<base>` as in SPDK. Injections (`bdev_error_inject`) pick an op
//! type, a kind and a count:
//!
//! - `failure`: complete with a device error;
//! - `timeout`: hold the request, never completing it until it is aborted
//!   (the submitter's timeout fires and aborts it);
//! - `torn`: transfer only the first `torn_blocks` blocks (default half),
//!   then report success, like a device that lies: a write leaves the rest of
//!   the range untouched, a read leaves garbage (0xEE) in the rest of the
//!   buffer, a flush does nothing;
//! - `busy`: refuse the request as if the device queue were full (the generic
//!   layer queues it and retries).
//!
//! Rules are consulted in the order they were added; each matching request
//! uses up one count of the first rule that matches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::bdev::{Bdev, BdevChannel, BdevDesc, BdevRegistry, Claim, Completion, Io, IoError, IoType};

use crate::error::BdevError;

/// Parameters of `bdev_error_create`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorConfig {
    /// The bdev to wrap; the new bdev is named `EE_<base_name>`.
    pub base_name: String,
    /// UUID (generated if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<uuid::Uuid>,
}

/// Which requests an injection applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InjectIoType {
    /// Every kind.
    All,
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Flushes.
    Flush,
    /// Unmaps.
    Unmap,
    /// Write-zeroes.
    WriteZeroes,
}

impl InjectIoType {
    fn matches(self, op: IoType) -> bool {
        match self {
            InjectIoType::All => true,
            InjectIoType::Read => op == IoType::Read,
            InjectIoType::Write => op == IoType::Write,
            InjectIoType::Flush => op == IoType::Flush,
            InjectIoType::Unmap => op == IoType::Unmap,
            InjectIoType::WriteZeroes => op == IoType::WriteZeroes,
        }
    }
}

/// What an injection does (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InjectKind {
    /// Complete with a device error.
    Failure,
    /// Never complete until aborted.
    Timeout,
    /// Transfer only part of the request and report success.
    Torn,
    /// Refuse as if the queue were full.
    Busy,
    /// Remove the rules for this io_type.
    Clear,
}

/// Parameters of `bdev_error_inject`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InjectConfig {
    /// The error bdev (`EE_<base>`).
    pub name: String,
    /// Which requests: all, read, write, flush, unmap, write_zeroes.
    pub io_type: InjectIoType,
    /// failure, timeout, torn, busy, or clear (remove rules for io_type).
    pub error_type: InjectKind,
    /// How many requests to affect.
    #[serde(default = "one")]
    pub num: u32,
    /// Let this many matching requests through untouched first.
    #[serde(default)]
    pub skip: u32,
    /// For `torn`: blocks that do get transferred (default: half the request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torn_blocks: Option<u64>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone)]
struct Rule {
    io_type: InjectIoType,
    kind: InjectKind,
    remaining: u32,
    skip: u32,
    torn_blocks: Option<u64>,
}

pub(crate) struct ErrorDev {
    base: Arc<Bdev>,
    hold: Mutex<Option<(BdevDesc, Claim)>>,
    rules: Mutex<Vec<Rule>>,
    config: ErrorConfig,
}

impl ErrorDev {
    pub(crate) fn base(&self) -> &Arc<Bdev> {
        &self.base
    }

    pub(crate) fn config(&self, bdev: &Bdev) -> ErrorConfig {
        ErrorConfig { uuid: Some(bdev.uuid()), ..self.config.clone() }
    }

    pub(crate) fn release(&self) {
        self.hold.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Consumes one count of the first rule matching `op`.
    fn take(&self, op: IoType) -> Option<(InjectKind, Option<u64>)> {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let i = rules.iter().position(|r| r.io_type.matches(op))?;
        let rule = &mut rules[i];
        if rule.skip > 0 {
            rule.skip -= 1;
            return None;
        }
        rule.remaining -= 1;
        let hit = (rule.kind, rule.torn_blocks);
        if rule.remaining == 0 {
            rules.remove(i);
        }
        Some(hit)
    }

    pub(crate) fn channel(&self, self_bdev: Arc<Bdev>, ctx: &mut pmd::Ctx<'_>) -> Result<ErrorChannel, BdevError> {
        let desc = self.hold.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(d, _)| d.clone());
        let desc = desc.ok_or_else(|| BdevError::NotFound(self.base.name().to_string()))?;
        Ok(ErrorChannel {
            inner: desc.channel(ctx)?,
            dev: self_bdev,
            block_size: self.base.block_size() as usize,
            held: Vec::new(),
            torn: HashMap::new(),
            done: Vec::new(),
            scratch: Vec::new(),
        })
    }
}

/// A torn request waiting for the base: what to hand back at completion.
enum Torn {
    /// A read: garble the buffer from this byte on.
    Read { keep_bytes: usize },
    /// A write sent as a shorter copy: the original request to complete.
    Write(Io),
}

pub(crate) struct ErrorChannel {
    inner: BdevChannel,
    dev: Arc<Bdev>,
    block_size: usize,
    held: Vec<Io>,
    torn: HashMap<u64, Torn>,
    done: Vec<Completion>,
    scratch: Vec<Completion>,
}

impl ErrorChannel {
    fn dev(&self) -> &ErrorDev {
        match &self.dev.backend {
            super::Backend::Error(d) => d,
            _ => unreachable!("an error channel belongs to an error bdev"),
        }
    }

    pub(crate) fn submit(&mut self, now: u64, mut io: Io) -> Result<(), Io> {
        let Some((kind, torn_blocks)) = self.dev().take(io.op) else {
            self.inner.submit(now, io);
            return Ok(());
        };
        match kind {
            InjectKind::Failure => self.done.push(Completion::of(io, Err(IoError::Device))),
            InjectKind::Timeout => self.held.push(io),
            InjectKind::Busy => return Err(io),
            InjectKind::Clear => self.inner.submit(now, io),
            InjectKind::Torn => {
                let keep = torn_blocks.unwrap_or(io.num_blocks / 2).min(io.num_blocks);
                match io.op {
                    IoType::Flush => self.done.push(Completion::of(io, Ok(()))),
                    _ if keep == 0 => self.done.push(Completion::of(io, Ok(()))),
                    IoType::Unmap | IoType::WriteZeroes => {
                        io.num_blocks = keep;
                        self.inner.submit(now, io);
                    }
                    IoType::Read => {
                        self.torn.insert(io.tag, Torn::Read { keep_bytes: keep as usize * self.block_size });
                        self.inner.submit(now, io);
                    }
                    IoType::Write => {
                        let keep_bytes = keep as usize * self.block_size;
                        let mut prefix = match pmd::DmaBuf::new(keep_bytes) {
                            Ok(b) => b,
                            Err(e) => {
                                tracing::error!("error bdev: no DMA memory for a torn write: {e}");
                                self.done.push(Completion::of(io, Err(IoError::Device)));
                                return Ok(());
                            }
                        };
                        io.bufs.copy_out(0, &mut prefix);
                        let short = Io::write(io.offset_blocks, prefix, io.tag).with_fua(io.fua);
                        self.torn.insert(io.tag, Torn::Write(io));
                        self.inner.submit(now, short);
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn poll(&mut self, now: u64, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
        self.inner.poll(now, &mut self.scratch);
        for mut c in self.scratch.drain(..) {
            match self.torn.remove(&c.tag) {
                None => out.push(c),
                Some(Torn::Read { keep_bytes }) => {
                    let rest = c.bufs.len().saturating_sub(keep_bytes);
                    c.bufs.fill(keep_bytes, rest, 0xEE);
                    out.push(c);
                }
                Some(Torn::Write(original)) => out.push(Completion::of(original, c.status)),
            }
        }
    }

    pub(crate) fn abort(&mut self, tag: u64) {
        if let Some(i) = self.held.iter().position(|io| io.tag == tag) {
            let io = self.held.swap_remove(i);
            self.done.push(Completion::of(io, Err(IoError::Aborted)));
        }
    }

    /// Held requests are only released by an abort, which only a poll notices.
    pub(crate) fn wakes_reactor(&self) -> bool {
        self.held.is_empty() && self.done.is_empty() && self.inner.wakes_reactor()
    }
}

/// Creates `EE_<base_name>`, claiming the base.
pub fn create(registry: &BdevRegistry, config: &ErrorConfig) -> Result<Arc<Bdev>, BdevError> {
    let name = format!("EE_{}", config.base_name);
    if registry.get(&name).is_ok() {
        return Err(BdevError::Exists(name));
    }
    let base = registry.get(&config.base_name)?;
    let desc = registry.open(&config.base_name, true)?;
    let claim = base.claim(&name)?;
    let dev = ErrorDev {
        base: base.clone(),
        hold: Mutex::new(Some((desc, claim))),
        rules: Mutex::new(Vec::new()),
        config: config.clone(),
    };
    let bdev = Bdev::new(&name, config.uuid, base.block_size(), base.num_blocks(), super::Backend::Error(dev))?;
    registry.register(bdev)
}

/// Adds (or with `clear`, removes) an injection rule.
pub fn inject(registry: &BdevRegistry, config: &InjectConfig) -> Result<(), BdevError> {
    let bdev = registry.get(&config.name)?;
    let super::Backend::Error(dev) = &bdev.backend else {
        return Err(BdevError::WrongKind {
            name: config.name.clone(),
            kind: bdev.backend.kind(),
            expected: "error".into(),
        });
    };
    let mut rules = dev.rules.lock().unwrap_or_else(|p| p.into_inner());
    if config.error_type == InjectKind::Clear {
        rules.retain(|r| config.io_type != InjectIoType::All && r.io_type != config.io_type);
        return Ok(());
    }
    if config.num == 0 {
        return Err(BdevError::invalid(
            &config.name,
            "num",
            "must be at least 1 (use error_type \"clear\" to remove rules)".into(),
        ));
    }
    rules.push(Rule {
        io_type: config.io_type,
        kind: config.error_type,
        remaining: config.num,
        skip: config.skip,
        torn_blocks: config.torn_blocks,
    });
    Ok(())
}
