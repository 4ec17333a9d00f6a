//! # pmd — the polled-mode runtime of ClaudeFS
//!
//! ClaudeFS runs its data plane the way SPDK does: one *reactor* per CPU core,
//! each a single-threaded loop that polls its devices instead of waiting for
//! interrupts. Work never crosses threads through locks; it moves as
//! *messages* over lock-free queues. This crate provides:
//!
//! - [`Reactor`]: the loop itself, advanced by `poll(now, budget)` so that tests
//!   can step several reactors on one thread, with busy and timed pollers
//!   ([`Ctx::register_poller`]) and messages ([`ReactorHandle::send`]).
//! - [`Runtime`]: one reactor per core of a [`CoreMask`], pinned, with an
//!   [`IdlePolicy`] (`always` poll, or `adaptive`: sleep on an eventfd when idle).
//! - [`IoDevice`] / [`IoChannel`]: per-reactor channels to a device, shared by
//!   every user on that reactor.
//! - [`DmaBuf`]: DMA-able memory from a hugepage-backed pool (ordinary memory
//!   when no hugepages are reserved), owned so that memory a device may write
//!   is never readable as `&[u8]`.
//! - [`task`]: futures on a reactor (`Ctx::spawn`), for multi-step control and
//!   metadata operations.
//! - [`rpc`]: the JSON-RPC 2.0 control server on a Unix socket.
//! - [`clock`]: the cheap monotonic nanosecond clock reactors are driven by.
//!
//! Every system call is in the private `sys` module.

#![deny(missing_docs)]

mod channel;
pub mod clock;
mod cpuset;
pub mod dma;
mod reactor;
pub mod rpc;
mod runtime;
mod sys;
pub mod task;

pub use channel::{IoChannel, IoDevice, WeakIoChannel};
pub use cpuset::{CoreMask, CoreMaskError};
pub use dma::{DmaBuf, DmaError, DmaListener};
pub use reactor::{
    Armed, Ctx, Message, PollOutcome, PollStatus, PollerId, PollerInfo, Reactor, ReactorHandle, ReactorId, ReactorSeed,
    ReactorStatsSnapshot, WakeSource,
};
pub use runtime::{IdlePolicy, Runtime, RuntimeError, RuntimeOptions};
pub use sys::EventFd;

/// The crate version, reported by `framework_get_version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
