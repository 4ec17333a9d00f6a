//! One reactor per core, each on its own pinned thread.

use std::sync::Arc;
use std::thread::JoinHandle;

use crate::clock;
use crate::cpuset::CoreMask;
use crate::reactor::{ReactorHandle, ReactorSeed};

/// What a reactor does when it has nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IdlePolicy {
    /// Poll without pause: lowest latency, one whole core per reactor
    /// (dedicated storage servers).
    Always,
    /// Poll while busy; after `spin_us` without work, sleep on an eventfd until
    /// a message, a device completion or the next timer wakes the reactor.
    Adaptive,
}

impl std::str::FromStr for IdlePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(Self::Always),
            "adaptive" => Ok(Self::Adaptive),
            other => Err(format!("unknown idle policy {other:?}: use \"always\" or \"adaptive\"")),
        }
    }
}

impl IdlePolicy {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::Adaptive => "adaptive",
        }
    }
}

/// How to start reactors.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Cores to run reactors on, one reactor each.
    pub mask: CoreMask,
    /// Idle behaviour of every reactor.
    pub idle: IdlePolicy,
    /// Under [`IdlePolicy::Adaptive`], how long a reactor keeps polling without work before it sleeps.
    pub spin_us: u64,
    /// Messages a reactor runs per round at most.
    pub msg_budget: usize,
    /// Pin each reactor thread to its core.
    pub pin: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self { mask: CoreMask::first(1), idle: IdlePolicy::Adaptive, spin_us: 200, msg_budget: 64, pin: true }
    }
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Creating a reactor's eventfd failed.
    #[error("creating reactor wake-up eventfds failed: {0}")]
    EventFd(#[source] std::io::Error),
    /// The OS refused a thread.
    #[error("spawning the thread of reactor {reactor} failed: {source}")]
    Spawn {
        /// Reactor id.
        reactor: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Running reactors. Dropping it stops them and joins their threads.
pub struct Runtime {
    reactors: Arc<[ReactorHandle]>,
    threads: Vec<JoinHandle<()>>,
    options: RuntimeOptions,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("mask", &self.options.mask.to_string()).finish()
    }
}

impl Runtime {
    /// Starts one reactor per core of `options.mask`.
    pub fn start(options: RuntimeOptions) -> Result<Self, RuntimeError> {
        let cores: Vec<Option<usize>> = options.mask.cores().iter().map(|&c| Some(c)).collect();
        let seeds = ReactorSeed::group(&cores).map_err(RuntimeError::EventFd)?;
        let reactors: Arc<[ReactorHandle]> = seeds.iter().map(|s| s.handle().clone()).collect();
        let mut threads = Vec::new();
        for seed in seeds {
            let id = seed.handle().id();
            let core = seed.handle().core();
            let opts = options.clone();
            let thread = std::thread::Builder::new()
                .name(format!("reactor_{id}"))
                .spawn(move || run(seed, core, &opts))
                .map_err(|source| RuntimeError::Spawn { reactor: id, source })?;
            threads.push(thread);
        }
        tracing::info!(mask = %options.mask, idle = options.idle.as_str(), reactors = reactors.len(), clock = clock::source(), "reactors started");
        Ok(Self { reactors, threads, options })
    }

    /// Handles to the reactors, in id order.
    pub fn reactors(&self) -> &Arc<[ReactorHandle]> {
        &self.reactors
    }

    /// The options the runtime was started with.
    pub fn options(&self) -> &RuntimeOptions {
        &self.options
    }

    /// Stops every reactor and waits for its thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        for r in self.reactors.iter() {
            r.stop();
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a reactor thread panicked");
            }
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn run(seed: ReactorSeed, core: Option<usize>, opts: &RuntimeOptions) {
    let mut reactor = seed.build();
    if let (true, Some(core)) = (opts.pin, core) {
        if let Err(e) = crate::sys::pin_current_thread(core) {
            tracing::warn!(reactor = reactor.id(), core, "pinning the reactor thread failed: {e}; it runs unpinned");
        }
    }
    let spin_ns = opts.spin_us * 1000;
    let mut last_active = clock::now();
    loop {
        let now = clock::now();
        let out = reactor.poll(now, opts.msg_budget);
        if reactor.is_stopped() {
            break;
        }
        if out.busy || out.waiting {
            last_active = now;
            continue;
        }
        if opts.idle == IdlePolicy::Adaptive && now.saturating_sub(last_active) >= spin_ns {
            let timeout = out.next_deadline.map(|d| d.saturating_sub(clock::now()));
            if let Err(e) = reactor.sleep(timeout) {
                tracing::error!(reactor = reactor.id(), "sleeping failed: {e}; polling instead");
                last_active = clock::now();
            }
        }
    }
    tracing::debug!(reactor = reactor.id(), "reactor stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PollStatus;
    use std::time::Duration;

    #[test]
    fn adaptive_reactors_sleep_when_idle_and_serve_messages() {
        let rt =
            Runtime::start(RuntimeOptions { mask: CoreMask::first(1), spin_us: 100, ..Default::default() }).unwrap();
        let r = rt.reactors()[0].clone();
        std::thread::sleep(Duration::from_millis(100));
        assert!(r.is_sleeping(), "an idle adaptive reactor sleeps");
        let rx = r.call(|ctx| ctx.reactor_id());
        assert_eq!(rx.blocking_recv().unwrap(), 0, "and wakes for a message");
        let s = r.stats();
        // Relative, not absolute: on a loaded machine the reactor thread may
        // start late and have been idle for less than the 100 ms slept here.
        assert!(s.sleep_ns > 0 && s.sleep_ns > s.idle_ns / 2, "most of the idle time was asleep: {s:?}");
        rt.shutdown();
    }

    #[test]
    fn always_poll_reactors_never_sleep_and_run_timed_pollers() {
        let rt = Runtime::start(RuntimeOptions { idle: IdlePolicy::Always, pin: false, ..Default::default() }).unwrap();
        let r = rt.reactors()[0].clone();
        let (tx, rx) = std::sync::mpsc::channel();
        r.send(move |ctx| {
            let mut n = 0;
            ctx.register_poller("tick", 5_000_000, move |_| {
                n += 1;
                if n == 3 {
                    let _ = tx.send(());
                }
                PollStatus::Busy
            });
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("timed poller ran three times");
        assert_eq!(r.stats().sleep_ns, 0);
        rt.shutdown();
    }

    #[test]
    fn sleeping_reactor_wakes_for_its_timed_poller() {
        let rt = Runtime::start(RuntimeOptions { spin_us: 10, pin: false, ..Default::default() }).unwrap();
        let r = rt.reactors()[0].clone();
        let (tx, rx) = std::sync::mpsc::channel();
        r.send(move |ctx| {
            ctx.register_poller("tick", 20_000_000, move |_| {
                let _ = tx.send(crate::clock::now());
                PollStatus::Idle
            });
        });
        let a = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let b = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(b - a >= 19_000_000, "period respected: {} ns", b - a);
        assert!(r.stats().sleep_ns > 0);
    }
}
