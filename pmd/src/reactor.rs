//! Reactors: single-threaded event loops advanced by [`Reactor::poll`].
//!
//! A reactor owns its pollers, its io channels and its inbox of messages. It
//! owns neither the OS thread nor the clock: whoever drives it calls
//! `poll(now, budget)`, which
//!
//! 1. runs up to `budget` messages from the inbox,
//! 2. runs every busy poller once and every timed poller that is due,
//! 3. accounts the time since the previous call as busy or idle,
//!
//! and returns a [`PollOutcome`] saying whether anything happened and when the
//! next timed poller is due. [`crate::Runtime`] drives one reactor per core on a
//! pinned thread; tests drive several reactors deterministically on one thread.
//!
//! ```
//! use pmd::{PollStatus, Reactor};
//!
//! let mut reactors = Reactor::group(2);
//! let counter = std::rc::Rc::new(std::cell::Cell::new(0));
//! let c = counter.clone();
//! reactors[0].register_poller("count", 0, move |_ctx| { c.set(c.get() + 1); PollStatus::Busy });
//! // Reactor 1 sends a message to reactor 0, which runs it on its next poll.
//! reactors[1].handle().peer(0).unwrap().send(|ctx| assert_eq!(ctx.reactor_id(), 0));
//! for now in 0..3 {
//!     for r in &mut reactors { r.poll(now, 64); }
//! }
//! assert_eq!(counter.get(), 3);
//! ```

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::os::fd::RawFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_queue::SegQueue;

use crate::channel::{IoChannel, IoDevice};
use crate::sys::{Epoll, EventFd};
use crate::task::{Executor, JoinHandle, joinable};

/// Index of a reactor within its group (0-based, in core-mask order).
pub type ReactorId = u32;

/// What a poller reports after one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollStatus {
    /// It did work.
    Busy,
    /// It found nothing to do, and anything it waits for will wake the reactor
    /// (a message or a registered wake fd), so the reactor may sleep.
    Idle,
    /// It found nothing to do this time, but it has work outstanding that is
    /// only noticed by polling (e.g. a device completion queue without
    /// interrupts), so the reactor must not sleep.
    Waiting,
}

/// What one call to [`Reactor::poll`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollOutcome {
    /// A message ran or a poller reported [`PollStatus::Busy`].
    pub busy: bool,
    /// Some poller reported [`PollStatus::Waiting`]: do not sleep.
    pub waiting: bool,
    /// When the earliest timed poller is due next, if any.
    pub next_deadline: Option<u64>,
}

/// Something that can wake a sleeping reactor through an eventfd: an
/// io_uring's completion eventfd, a device's interrupt eventfd.
///
/// Notifications cost CPU time even while the reactor polls, so a source keeps
/// them off until the reactor is about to sleep: [`WakeSource::arm`] turns them
/// on (and says whether work is already pending), [`WakeSource::disarm`] turns
/// them off again after the wake-up and drains the eventfd.
pub trait WakeSource {
    /// The eventfd that becomes readable when work arrives. It must stay open
    /// as long as the source lives.
    fn fd(&self) -> RawFd;
    /// Called just before the reactor sleeps.
    fn arm(&self) -> Armed;
    /// Called after the reactor wakes up.
    fn disarm(&self);
}

/// What [`WakeSource::arm`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Armed {
    /// Notifications are on and nothing is pending: the reactor may sleep.
    Sleep,
    /// Work is already pending: the reactor must not sleep.
    Pending,
    /// The thing behind the source is gone: remove the source.
    Gone,
}

/// A message: a closure run once on the target reactor.
pub type Message = Box<dyn FnOnce(&mut Ctx<'_>) + Send>;
type PollerFn = Box<dyn FnMut(&mut Ctx<'_>) -> PollStatus>;

/// Identifies a poller on its reactor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PollerId(u64);

/// A snapshot of one poller, for `thread_get_pollers`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PollerInfo {
    /// Name given at registration.
    pub name: String,
    /// `"active"` (runs every round), `"timed"` or `"paused"`.
    pub state: &'static str,
    /// Period in microseconds, 0 for busy pollers.
    pub period_us: u64,
    /// Times it ran.
    pub run_count: u64,
    /// Times it reported work.
    pub busy_count: u64,
}

struct PollerSlot {
    id: PollerId,
    name: String,
    period_ns: u64,
    next_run: u64,
    paused: bool,
    removed: bool,
    run_count: u64,
    busy_count: u64,
    /// Taken out while the poller runs, so that it can use the whole [`Ctx`].
    f: Option<PollerFn>,
}

/// Busy/idle accounting of one reactor, written only by the reactor and read by
/// anyone (single-writer relaxed atomics: no lock, no read-modify-write).
#[derive(Debug, Default)]
pub struct ReactorStats {
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
    sleep_ns: AtomicU64,
    rounds: AtomicU64,
    messages: AtomicU64,
    pollers: AtomicU64,
}

impl ReactorStats {
    fn add(counter: &AtomicU64, v: u64) {
        counter.store(counter.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> ReactorStatsSnapshot {
        ReactorStatsSnapshot {
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            idle_ns: self.idle_ns.load(Ordering::Relaxed),
            sleep_ns: self.sleep_ns.load(Ordering::Relaxed),
            rounds: self.rounds.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
            pollers: self.pollers.load(Ordering::Relaxed),
        }
    }
}

/// Counters of one reactor at one moment.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ReactorStatsSnapshot {
    /// Time spent in rounds that did work.
    pub busy_ns: u64,
    /// Time spent in rounds that did nothing, including sleep.
    pub idle_ns: u64,
    /// Part of `idle_ns` spent asleep on the wake-up eventfd.
    pub sleep_ns: u64,
    /// Number of polls.
    pub rounds: u64,
    /// Messages run.
    pub messages: u64,
    /// Registered pollers.
    pub pollers: u64,
}

/// State shared between a reactor and every handle to it.
struct Shared {
    id: ReactorId,
    core: Option<usize>,
    inbox: SegQueue<Message>,
    wake: EventFd,
    sleeping: AtomicBool,
    stats: ReactorStats,
}

/// The reactors of a group, weakly (a handle holding the group must not keep
/// itself alive through it).
type Peers = Arc<std::sync::OnceLock<Vec<std::sync::Weak<Shared>>>>;

/// A cheap, thread-safe handle to a reactor: send it messages, read its stats.
#[derive(Clone)]
pub struct ReactorHandle {
    shared: Arc<Shared>,
    peers: Peers,
}

impl fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReactorHandle").field("id", &self.shared.id).field("core", &self.shared.core).finish()
    }
}

impl ReactorHandle {
    /// The reactor's index in its group.
    pub fn id(&self) -> ReactorId {
        self.shared.id
    }

    /// The CPU core it is pinned to, if any.
    pub fn core(&self) -> Option<usize> {
        self.shared.core
    }

    /// Queues `f` to run on the reactor's next poll, waking it if asleep.
    pub fn send(&self, f: impl FnOnce(&mut Ctx<'_>) + Send + 'static) {
        self.send_boxed(Box::new(f));
    }

    /// Like [`ReactorHandle::send`] for an already boxed message.
    pub fn send_boxed(&self, msg: Message) {
        self.shared.inbox.push(msg);
        // Pairs with the SeqCst store of `sleeping` before the reactor's final
        // inbox check in `Reactor::sleep`: either the reactor sees the message,
        // or we see `sleeping` and wake it.
        if self.shared.sleeping.load(Ordering::SeqCst) {
            self.shared.wake.notify();
        }
    }

    /// Runs `f` on the reactor and returns its result through a oneshot
    /// channel. The receiver reports an error if the reactor stopped first.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Ctx<'_>) -> R + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(move |ctx| {
            let _ = tx.send(f(ctx));
        });
        rx
    }

    /// Runs the future that `f` makes as a task on the reactor and returns its
    /// output through a oneshot channel (an error if the reactor stops first).
    /// `f` is sent to the reactor and called there with its context; the
    /// future itself need not be `Send`.
    pub fn spawn<T, Fut>(
        &self,
        f: impl FnOnce(&mut Ctx<'_>) -> Fut + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<T>
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = T> + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(move |ctx| {
            let fut = f(ctx);
            ctx.spawn(async move {
                let _ = tx.send(fut.await);
            });
        });
        rx
    }

    /// Asks the reactor to stop after its current round.
    pub fn stop(&self) {
        self.send(|ctx| ctx.stop());
    }

    /// The reactor's busy/idle counters.
    pub fn stats(&self) -> ReactorStatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Whether the reactor is asleep on its eventfd right now.
    pub fn is_sleeping(&self) -> bool {
        self.shared.sleeping.load(Ordering::Relaxed)
    }

    /// Another reactor of the same group, by id (`None` if there is no such
    /// reactor, or it is gone).
    pub fn peer(&self, id: ReactorId) -> Option<ReactorHandle> {
        let shared = self.peers.get()?.get(id as usize)?.upgrade()?;
        Some(ReactorHandle { shared, peers: self.peers.clone() })
    }
}

/// Everything a reactor is made of, ready to be turned into a [`Reactor`] on
/// the thread that will drive it ([`Reactor`] itself is not `Send`).
pub struct ReactorSeed {
    handle: ReactorHandle,
}

impl ReactorSeed {
    /// Creates one seed per entry of `cores` (`None`: not pinned), all knowing each other.
    pub fn group(cores: &[Option<usize>]) -> std::io::Result<Vec<ReactorSeed>> {
        let peers = Arc::new(std::sync::OnceLock::new());
        let mut handles = Vec::with_capacity(cores.len());
        for (i, core) in cores.iter().enumerate() {
            let shared = Arc::new(Shared {
                id: i as ReactorId,
                core: *core,
                inbox: SegQueue::new(),
                wake: EventFd::new()?,
                sleeping: AtomicBool::new(false),
                stats: ReactorStats::default(),
            });
            handles.push(ReactorHandle { shared, peers: peers.clone() });
        }
        let _ = peers.set(handles.iter().map(|h| Arc::downgrade(&h.shared)).collect());
        Ok(handles.into_iter().map(|handle| ReactorSeed { handle }).collect())
    }

    /// The handle of the reactor this seed becomes.
    pub fn handle(&self) -> &ReactorHandle {
        &self.handle
    }

    /// Builds the reactor (call this on the thread that will drive it).
    pub fn build(self) -> Reactor {
        let shared = self.handle.shared.clone();
        let executor = Executor::new(Box::new(move || {
            if shared.sleeping.load(Ordering::SeqCst) {
                shared.wake.notify();
            }
        }));
        Reactor {
            shared: self.handle.shared.clone(),
            core: Core {
                executor,
                locals: HashMap::new(),
                handle: self.handle,
                now: 0,
                pollers: Vec::new(),
                next_poller_id: 0,
                channels: HashMap::new(),
                wake_sources: Vec::new(),
                epoll: None,
                stopped: false,
                running_poller: None,
            },
            last_now: None,
            last_busy: false,
        }
    }
}

/// The part of a reactor that pollers and messages may use, through [`Ctx`].
struct Core {
    executor: Executor,
    locals: HashMap<(TypeId, u64), Rc<dyn Any>>,
    handle: ReactorHandle,
    now: u64,
    pollers: Vec<PollerSlot>,
    next_poller_id: u64,
    channels: HashMap<(usize, TypeId), Weak<dyn Any>>,
    wake_sources: Vec<Rc<dyn WakeSource>>,
    epoll: Option<Epoll>,
    stopped: bool,
    running_poller: Option<PollerId>,
}

/// A single-threaded event loop. See the module docs.
pub struct Reactor {
    /// The handle's shared half, held here too so that a round of
    /// [`Reactor::poll`] borrows it beside `core` instead of cloning the
    /// `Arc` (two atomic read-modify-writes a round).
    shared: Arc<Shared>,
    core: Core,
    last_now: Option<u64>,
    last_busy: bool,
}

impl fmt::Debug for Reactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reactor")
            .field("id", &self.core.handle.id())
            .field("pollers", &self.core.pollers.len())
            .finish()
    }
}

/// Token the reactor's own eventfd has in its epoll set.
const WAKE_TOKEN: u64 = u64::MAX;

impl Reactor {
    /// `n` unpinned reactors that know each other, for tests and tools that
    /// step them on one thread.
    pub fn group(n: usize) -> Vec<Reactor> {
        ReactorSeed::group(&vec![None; n.max(1)])
            .expect("creating an eventfd failed: the process is out of file descriptors")
            .into_iter()
            .map(ReactorSeed::build)
            .collect()
    }

    /// A handle to this reactor.
    pub fn handle(&self) -> ReactorHandle {
        self.core.handle.clone()
    }

    /// This reactor's id.
    pub fn id(&self) -> ReactorId {
        self.core.handle.id()
    }

    /// Whether a message asked the reactor to stop.
    pub fn is_stopped(&self) -> bool {
        self.core.stopped
    }

    /// Registers a poller from outside a poll (see [`Ctx::register_poller`]).
    pub fn register_poller(
        &mut self,
        name: impl Into<String>,
        period_ns: u64,
        f: impl FnMut(&mut Ctx<'_>) -> PollStatus + 'static,
    ) -> PollerId {
        self.core.register_poller(name.into(), period_ns, Box::new(f))
    }

    /// Runs `f` with a context, as a message would, without going through the inbox.
    pub fn with_ctx<R>(&mut self, f: impl FnOnce(&mut Ctx<'_>) -> R) -> R {
        f(&mut Ctx { core: &mut self.core })
    }

    /// Advances the reactor by one round at time `now`. See the module docs.
    pub fn poll(&mut self, now: u64, budget: usize) -> PollOutcome {
        let shared = &*self.shared;
        let stats = &shared.stats;
        let core = &mut self.core;
        if let Some(last) = self.last_now {
            let elapsed = now.saturating_sub(last);
            ReactorStats::add(if self.last_busy { &stats.busy_ns } else { &stats.idle_ns }, elapsed);
        }
        core.now = now;

        let mut messages = 0;
        // `is_empty` first: an empty `pop` costs a full fence, every round.
        while messages < budget && !core.stopped && !shared.inbox.is_empty() {
            let Some(msg) = shared.inbox.pop() else { break };
            msg(&mut Ctx { core: &mut *core });
            messages += 1;
        }

        let tasks = core.executor.run(now, budget);
        let mut busy = messages > 0 || tasks > 0 || core.executor.has_ready();
        let mut waiting = false;
        let mut next_deadline: Option<u64> = None;
        // Pollers registered during this round first run in the next one.
        let count = core.pollers.len();
        for i in 0..count {
            let slot = &mut core.pollers[i];
            if slot.paused || slot.removed {
                continue;
            }
            if slot.period_ns > 0 && now < slot.next_run {
                next_deadline = Some(next_deadline.map_or(slot.next_run, |d| d.min(slot.next_run)));
                continue;
            }
            let (Some(mut f), id) = (slot.f.take(), slot.id) else { continue };
            core.running_poller = Some(id);
            let status = f(&mut Ctx { core: &mut *core });
            core.running_poller = None;
            let slot = &mut core.pollers[i];
            slot.f = Some(f);
            slot.run_count += 1;
            match status {
                PollStatus::Busy => {
                    slot.busy_count += 1;
                    busy = true;
                }
                PollStatus::Waiting => waiting = true,
                PollStatus::Idle => {}
            }
            if slot.period_ns > 0 {
                slot.next_run = now + slot.period_ns;
                next_deadline = Some(next_deadline.map_or(slot.next_run, |d| d.min(slot.next_run)));
            }
        }
        if core.pollers.iter().any(|p| p.removed) {
            core.pollers.retain(|p| !p.removed);
        }

        ReactorStats::add(&stats.rounds, 1);
        ReactorStats::add(&stats.messages, messages as u64);
        stats.pollers.store(core.pollers.len() as u64, Ordering::Relaxed);
        self.last_now = Some(now);
        self.last_busy = busy;
        PollOutcome { busy, waiting, next_deadline }
    }

    /// Sleeps until a message arrives, a wake source fires, or `timeout_ns`
    /// passes (`None`: no timeout). Returns at once if a message is queued or
    /// a wake source has work pending. The time asleep counts as idle and sleep time.
    pub fn sleep(&mut self, timeout_ns: Option<u64>) -> std::io::Result<()> {
        let shared = self.core.handle.shared.clone();
        let mut pending = false;
        let mut gone = Vec::new();
        for (i, src) in self.core.wake_sources.iter().enumerate() {
            match src.arm() {
                Armed::Sleep => {}
                Armed::Pending => pending = true,
                Armed::Gone => gone.push(i),
            }
        }
        for i in gone.into_iter().rev() {
            let src = self.core.wake_sources.remove(i);
            if let Some(ep) = &self.core.epoll {
                let _ = ep.remove(src.fd());
            }
        }
        self.core.epoll()?;
        shared.sleeping.store(true, Ordering::SeqCst);
        let epoll = self.core.epoll.as_ref().expect("created above");
        if shared.inbox.is_empty() && !self.core.executor.has_ready() && !pending {
            let timeout_ms = timeout_ns.map_or(-1, |ns| ns.div_ceil(1_000_000).min(i32::MAX as u64) as i32);
            let start = crate::clock::now();
            let result = epoll.wait(timeout_ms);
            ReactorStats::add(&shared.stats.sleep_ns, crate::clock::now().saturating_sub(start));
            if let Err(e) = result {
                shared.sleeping.store(false, Ordering::SeqCst);
                return Err(e);
            }
        }
        shared.sleeping.store(false, Ordering::SeqCst);
        shared.wake.drain();
        for src in &self.core.wake_sources {
            src.disarm();
        }
        Ok(())
    }
}

impl Core {
    fn register_poller(&mut self, name: String, period_ns: u64, f: PollerFn) -> PollerId {
        let id = PollerId(self.next_poller_id);
        self.next_poller_id += 1;
        self.pollers.push(PollerSlot {
            id,
            name,
            period_ns,
            next_run: self.now + period_ns,
            paused: false,
            removed: false,
            run_count: 0,
            busy_count: 0,
            f: Some(f),
        });
        id
    }

    fn epoll(&mut self) -> std::io::Result<&Epoll> {
        if self.epoll.is_none() {
            let ep = Epoll::new()?;
            ep.add(std::os::fd::AsRawFd::as_raw_fd(&self.handle.shared.wake), WAKE_TOKEN)?;
            for (i, src) in self.wake_sources.iter().enumerate() {
                ep.add(src.fd(), i as u64)?;
            }
            self.epoll = Some(ep);
        }
        Ok(self.epoll.as_ref().expect("set above"))
    }
}

/// What pollers and messages see of their reactor.
pub struct Ctx<'a> {
    core: &'a mut Core,
}

impl Ctx<'_> {
    /// The `now` passed to the current [`Reactor::poll`].
    pub fn now(&self) -> u64 {
        self.core.now
    }

    /// This reactor's id.
    pub fn reactor_id(&self) -> ReactorId {
        self.core.handle.id()
    }

    /// A handle to this reactor.
    pub fn handle(&self) -> &ReactorHandle {
        &self.core.handle
    }

    /// Sends a message to reactor `target` of this group (possibly this one).
    /// Returns false if there is no such reactor.
    pub fn send(&self, target: ReactorId, f: impl FnOnce(&mut Ctx<'_>) + Send + 'static) -> bool {
        match self.core.handle.peer(target) {
            Some(peer) => {
                peer.send(f);
                true
            }
            None => false,
        }
    }

    /// Registers a poller. `period_ns == 0` makes a busy poller that runs
    /// every round; otherwise it runs at most once per period.
    pub fn register_poller(
        &mut self,
        name: impl Into<String>,
        period_ns: u64,
        f: impl FnMut(&mut Ctx<'_>) -> PollStatus + 'static,
    ) -> PollerId {
        self.core.register_poller(name.into(), period_ns, Box::new(f))
    }

    /// Removes a poller (it may be the one running). Unknown ids are ignored.
    pub fn unregister_poller(&mut self, id: PollerId) {
        if let Some(p) = self.core.pollers.iter_mut().find(|p| p.id == id) {
            p.removed = true;
        }
    }

    /// Pauses or resumes a poller.
    pub fn set_poller_paused(&mut self, id: PollerId, paused: bool) {
        if let Some(p) = self.core.pollers.iter_mut().find(|p| p.id == id) {
            p.paused = paused;
        }
    }

    /// The poller currently running, if called from a poller.
    pub fn current_poller(&self) -> Option<PollerId> {
        self.core.running_poller
    }

    /// Snapshots of the registered pollers.
    pub fn pollers(&self) -> Vec<PollerInfo> {
        self.core
            .pollers
            .iter()
            .filter(|p| !p.removed)
            .map(|p| PollerInfo {
                name: p.name.clone(),
                state: if p.paused {
                    "paused"
                } else if p.period_ns > 0 {
                    "timed"
                } else {
                    "active"
                },
                period_us: p.period_ns / 1000,
                run_count: p.run_count,
                busy_count: p.busy_count,
            })
            .collect()
    }

    /// Adds a source that wakes this reactor when it sleeps. It stays
    /// registered until its [`WakeSource::arm`] answers [`Armed::Gone`].
    pub fn register_wake_source(&mut self, src: Rc<dyn WakeSource>) -> std::io::Result<()> {
        if let Some(ep) = &self.core.epoll {
            ep.add(src.fd(), self.core.wake_sources.len() as u64)?;
        }
        self.core.wake_sources.push(src);
        Ok(())
    }

    /// Spawns a task on this reactor (see [`crate::task`]); it first runs in the
    /// next round.
    pub fn spawn<F: std::future::Future + 'static>(&mut self, future: F) -> JoinHandle<F::Output> {
        let (task, handle) = joinable(future);
        self.core.executor.spawn_boxed(task);
        handle
    }

    /// Keeps `value` on this reactor under (its type, `key`), e.g. the state of
    /// a service whose home this reactor is. Replaces any previous value.
    pub fn insert_local<T: 'static>(&mut self, key: u64, value: Rc<T>) {
        self.core.locals.insert((TypeId::of::<T>(), key), value);
    }

    /// The value kept under (`T`, `key`), if any.
    pub fn local<T: 'static>(&self, key: u64) -> Option<Rc<T>> {
        self.core.locals.get(&(TypeId::of::<T>(), key)).cloned().and_then(|v| v.downcast::<T>().ok())
    }

    /// Removes and returns the value kept under (`T`, `key`).
    pub fn remove_local<T: 'static>(&mut self, key: u64) -> Option<Rc<T>> {
        self.core.locals.remove(&(TypeId::of::<T>(), key)).and_then(|v| v.downcast::<T>().ok())
    }

    /// This reactor's channel to `dev` if one exists (never creates one).
    pub fn existing_io_channel<D: IoDevice>(&self, dev: &Arc<D>) -> Option<IoChannel<D::Channel>> {
        let key = (Arc::as_ptr(dev) as *const () as usize, TypeId::of::<D>());
        self.core.channels.get(&key).and_then(Weak::upgrade).map(IoChannel::from_any)
    }

    /// Tasks spawned on this reactor and not finished.
    pub fn live_tasks(&self) -> usize {
        self.core.executor.live()
    }

    /// Asks the reactor to stop after this round.
    pub fn stop(&mut self) {
        self.core.stopped = true;
    }

    /// This reactor's channel to `dev`, created on first use and shared by
    /// every user on this reactor until the last [`IoChannel`] is dropped.
    pub fn io_channel<D: IoDevice>(&mut self, dev: &Arc<D>) -> Result<IoChannel<D::Channel>, D::Error> {
        let key = (Arc::as_ptr(dev) as *const () as usize, TypeId::of::<D>());
        if let Some(existing) = self.core.channels.get(&key).and_then(Weak::upgrade) {
            return Ok(IoChannel::from_any(existing));
        }
        let channel = dev.create_channel(self)?;
        let channel = IoChannel::new(dev.clone(), channel);
        self.core.channels.retain(|_, w| w.strong_count() > 0);
        self.core.channels.insert(key, Rc::downgrade(&channel.as_any()));
        Ok(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn busy_pollers_run_every_round_and_timed_ones_on_their_period() {
        let mut r = Reactor::group(1).pop().unwrap();
        let busy = Rc::new(Cell::new(0));
        let timed = Rc::new(Cell::new(Vec::new()));
        let b = busy.clone();
        r.register_poller("busy", 0, move |_| {
            b.set(b.get() + 1);
            PollStatus::Idle
        });
        let t = timed.clone();
        r.register_poller("timed", 100, move |ctx| {
            let mut v = t.take();
            v.push(ctx.now());
            t.set(v);
            PollStatus::Busy
        });
        let mut outcomes = Vec::new();
        for now in (0..=350).step_by(50) {
            outcomes.push(r.poll(now, 8));
        }
        assert_eq!(busy.get(), 8);
        assert_eq!(timed.take(), vec![100, 200, 300]);
        assert_eq!(outcomes[0], PollOutcome { busy: false, waiting: false, next_deadline: Some(100) });
        assert!(outcomes[2].busy);
        assert_eq!(outcomes[2].next_deadline, Some(200));
    }

    #[test]
    fn messages_cross_reactors_and_respect_the_budget() {
        let mut rs = Reactor::group(2);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        for i in 0..5 {
            let seen = seen.clone();
            rs[0].handle().peer(1).unwrap().send(move |ctx| seen.lock().unwrap().push((ctx.reactor_id(), i)));
        }
        assert!(rs[1].poll(0, 2).busy);
        assert_eq!(seen.lock().unwrap().len(), 2);
        rs[1].poll(1, 10);
        assert_eq!(*seen.lock().unwrap(), (0..5).map(|i| (1, i)).collect::<Vec<_>>());
        assert!(!rs[1].poll(2, 10).busy);
    }

    #[test]
    fn pollers_can_unregister_themselves_and_register_others() {
        let mut r = Reactor::group(1).pop().unwrap();
        let runs = Rc::new(Cell::new(0));
        let r2 = runs.clone();
        r.register_poller("once", 0, move |ctx| {
            let id = ctx.current_poller().unwrap();
            ctx.unregister_poller(id);
            let r3 = r2.clone();
            ctx.register_poller("child", 0, move |_| {
                r3.set(r3.get() + 1);
                PollStatus::Idle
            });
            PollStatus::Busy
        });
        r.poll(0, 1);
        r.with_ctx(|ctx| assert_eq!(ctx.pollers().iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["child"]));
        r.poll(1, 1);
        r.poll(2, 1);
        assert_eq!(runs.get(), 2);
    }

    #[test]
    fn time_is_accounted_as_busy_or_idle() {
        let mut r = Reactor::group(1).pop().unwrap();
        let work = Rc::new(Cell::new(true));
        let w = work.clone();
        r.register_poller("p", 0, move |_| if w.get() { PollStatus::Busy } else { PollStatus::Idle });
        r.poll(0, 1); // busy round
        work.set(false);
        r.poll(100, 1); // the 100 ns before this call were busy; this round is idle
        r.poll(250, 1); // the 150 ns before were idle
        let s = r.handle().stats();
        assert_eq!((s.busy_ns, s.idle_ns, s.rounds), (100, 150, 3));
    }

    #[test]
    fn locals_are_typed_and_keyed() {
        let mut r = Reactor::group(1).pop().unwrap();
        r.with_ctx(|ctx| {
            ctx.insert_local(1, Rc::new(5u32));
            ctx.insert_local(2, Rc::new(String::from("x")));
            assert_eq!(ctx.local::<u32>(1).as_deref(), Some(&5));
            assert!(ctx.local::<u32>(2).is_none(), "another type under key 2");
            assert_eq!(ctx.remove_local::<String>(2).as_deref().map(String::as_str), Some("x"));
            assert!(ctx.local::<String>(2).is_none());
        });
        let mut rx = r.handle().spawn(|ctx| {
            let v = ctx.local::<u32>(1).map_or(0, |v| *v);
            async move { v + 1 }
        });
        r.poll(0, 8);
        r.poll(1, 8);
        assert_eq!(rx.try_recv().unwrap(), 6);
    }

    #[test]
    fn call_returns_the_result_and_stop_stops() {
        let mut r = Reactor::group(1).pop().unwrap();
        let mut rx = r.handle().call(|ctx| ctx.reactor_id() + 41);
        r.poll(0, 4);
        assert_eq!(rx.try_recv().unwrap(), 41);
        r.handle().stop();
        r.poll(1, 4);
        assert!(r.is_stopped());
    }

    #[test]
    fn sleep_wakes_on_message_and_times_out() {
        let mut r = Reactor::group(1).pop().unwrap();
        let start = std::time::Instant::now();
        r.sleep(Some(20_000_000)).unwrap();
        assert!(start.elapsed() >= std::time::Duration::from_millis(19));
        let h = r.handle();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            h.send(|_| {});
        });
        let start = std::time::Instant::now();
        r.sleep(Some(10_000_000_000)).unwrap();
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        t.join().unwrap();
        assert!(r.poll(0, 1).busy);
        assert!(r.handle().stats().sleep_ns > 0);
    }

    #[test]
    fn sleep_wakes_on_a_wake_source_and_respects_its_arming() {
        struct Src {
            efd: EventFd,
            state: Cell<Armed>,
            armed: Cell<u32>,
            disarmed: Cell<u32>,
        }
        impl WakeSource for Src {
            fn fd(&self) -> RawFd {
                std::os::fd::AsRawFd::as_raw_fd(&self.efd)
            }
            fn arm(&self) -> Armed {
                self.armed.set(self.armed.get() + 1);
                self.state.get()
            }
            fn disarm(&self) {
                self.disarmed.set(self.disarmed.get() + 1);
                self.efd.drain();
            }
        }
        let mut r = Reactor::group(1).pop().unwrap();
        let src = Rc::new(Src {
            efd: EventFd::new().unwrap(),
            state: Cell::new(Armed::Sleep),
            armed: Cell::new(0),
            disarmed: Cell::new(0),
        });
        r.with_ctx(|ctx| ctx.register_wake_source(src.clone())).unwrap();
        // Woken by the source's eventfd.
        src.efd.notify();
        let start = std::time::Instant::now();
        r.sleep(Some(10_000_000_000)).unwrap();
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!((src.armed.get(), src.disarmed.get()), (1, 1));
        // Drained by disarm: the next sleep runs to its timeout.
        let start = std::time::Instant::now();
        r.sleep(Some(20_000_000)).unwrap();
        assert!(start.elapsed() >= std::time::Duration::from_millis(19));
        // Pending work: no sleep at all.
        src.state.set(Armed::Pending);
        let start = std::time::Instant::now();
        r.sleep(Some(10_000_000_000)).unwrap();
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        // Gone: removed, and no longer asked.
        src.state.set(Armed::Gone);
        r.sleep(Some(1_000_000)).unwrap();
        let armed = src.armed.get();
        r.sleep(Some(1_000_000)).unwrap();
        assert_eq!(src.armed.get(), armed);
    }
}
