//! Driving an [`Rpc`] endpoint from a reactor.
//!
//! [`attach`] moves an endpoint onto the calling reactor and registers:
//!
//! - a busy poller that polls the endpoint ([`Rpc::poll_with`]), which hands
//!   each [`Event`] to the given handler (which may respond, call, or close)
//!   as it happens, and flushes what the handler queued, so an answer leaves
//!   in the same round its request came;
//! - a timed poller that does nothing but bound how long the reactor may
//!   sleep, so call deadlines, keepalives and reconnects fire on time
//!   ([`crate::rpc::RpcOptions::timer_ms`], 10 ms by default; at most 1 ms
//!   for a transport without a wake fd, which also bounds how late a
//!   sleeping reactor notices a message there);
//! - a [`WakeSource`] on the transport's fd (the TCP transport's epoll set,
//!   the libfabric completion queue's wait fd), armed with `fi_trywait` or the
//!   endpoint's own pending work, so an idle reactor sleeps until traffic comes.
//!
//! The endpoint stays reachable through [`Attached::rpc`] for code on the
//! same reactor (a poller issuing calls).

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::rc::{Rc, Weak};

use pmd::{Armed, Ctx, PollStatus, PollerId, WakeSource};

use crate::error::FabricError;
use crate::rpc::{Event, Rpc};
use crate::transport::Transport;

/// An endpoint attached to a reactor.
pub struct Attached<T: Transport> {
    rpc: Rc<RefCell<Rpc<T>>>,
    pollers: [PollerId; 2],
}

impl<T: Transport> Attached<T> {
    /// The endpoint (borrow it only outside its handler).
    pub fn rpc(&self) -> &Rc<RefCell<Rpc<T>>> {
        &self.rpc
    }

    /// The endpoint's pollers (unregistering both detaches it, as
    /// [`Attached::detach`] does, from code that cannot hold this handle).
    pub fn pollers(&self) -> [PollerId; 2] {
        self.pollers
    }

    /// Unregisters the pollers; the endpoint closes when the last reference
    /// to it goes (its wake source then removes itself).
    pub fn detach(self, ctx: &mut Ctx<'_>) {
        for p in self.pollers {
            ctx.unregister_poller(p);
        }
    }
}

struct Wake<T: Transport> {
    fd: RawFd,
    rpc: Weak<RefCell<Rpc<T>>>,
}

impl<T: Transport> WakeSource for Wake<T> {
    fn fd(&self) -> RawFd {
        self.fd
    }

    fn arm(&self) -> Armed {
        let Some(rpc) = self.rpc.upgrade() else { return Armed::Gone };
        match rpc.try_borrow() {
            Ok(r) if r.may_sleep() => Armed::Sleep,
            _ => Armed::Pending,
        }
    }

    fn disarm(&self) {}
}

/// Runs `rpc` on the calling reactor, handing every event to `handler`
/// (with the reactor's `now`). See the module docs.
pub fn attach<T: Transport + 'static>(
    ctx: &mut Ctx<'_>,
    rpc: Rpc<T>,
    mut handler: impl FnMut(&mut Rpc<T>, u64, Event) + 'static,
) -> Result<Attached<T>, FabricError> {
    let name = format!("fabric:{}:{}", rpc.transport().name(), rpc.local_addr());
    let wake_fd = rpc.wake_fd();
    let rpc = Rc::new(RefCell::new(rpc));
    if let Some(fd) = wake_fd {
        let src = Rc::new(Wake { fd, rpc: Rc::downgrade(&rpc) });
        ctx.register_wake_source(src).map_err(|e| FabricError::socket("adding the wake fd of", &name, e))?;
    }
    let r = rpc.clone();
    let poller = ctx.register_poller(name.clone(), 0, move |ctx| r.borrow_mut().poll_with(ctx.now(), &mut handler));
    let timer_ns = rpc.borrow().options().timer_ms.saturating_mul(1_000_000);
    let tick_ns = if wake_fd.is_some() { timer_ns } else { timer_ns.min(1_000_000) };
    let tick = ctx.register_poller(format!("{name}:timers"), tick_ns, |_| PollStatus::Idle);
    Ok(Attached { rpc, pollers: [poller, tick] })
}

/// The built-in echo service: answers every request with its own payload.
pub fn echo<T: Transport>(rpc: &mut Rpc<T>, _now: u64, ev: Event) {
    match ev {
        Event::Request(req) => {
            if let Err(e) = rpc.respond(req.conn, req.id, req.method, Ok(req.payload)) {
                tracing::debug!("echo: {e}");
            }
        }
        Event::Connected { conn, peer } => {
            tracing::debug!(conn, peer = %peer.name, addr = %peer.addr, "echo: peer connected")
        }
        Event::Disconnected { conn, error, .. } => tracing::debug!(conn, "echo: peer gone: {error}"),
        Event::Cancelled { .. } | Event::Completion(_) => {}
    }
}
