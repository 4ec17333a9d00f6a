//! Per-reactor io channels (SPDK's `spdk_get_io_channel`).
//!
//! An [`IoDevice`] is anything with per-reactor state: the io_uring of a
//! reactor, an NVMe controller's queue pair. [`crate::Ctx::io_channel`] returns
//! the calling reactor's channel to a device, creating it on first use; every
//! user on that reactor shares it, and it is destroyed (dropped) when the last
//! user drops its [`IoChannel`]. A channel never leaves its reactor, so using
//! it takes no lock.

use std::any::Any;
use std::cell::{RefCell, RefMut};
use std::rc::Rc;
use std::sync::Arc;

use crate::reactor::Ctx;

/// A device with per-reactor channels.
pub trait IoDevice: Send + Sync + 'static {
    /// The per-reactor state.
    type Channel: 'static;
    /// Why a channel could not be created.
    type Error;

    /// Creates this reactor's channel (called once per reactor while a channel is alive).
    fn create_channel(self: &Arc<Self>, ctx: &mut Ctx<'_>) -> Result<Self::Channel, Self::Error>;
}

struct Inner<C> {
    /// Keeps the device alive (and its address unique) while the channel lives.
    _device: Arc<dyn Any + Send + Sync>,
    channel: RefCell<C>,
}

/// A reference to this reactor's channel to one device. Cloning is cheap.
pub struct IoChannel<C: 'static>(Rc<Inner<C>>);

impl<C: 'static> Clone for IoChannel<C> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<C: 'static> IoChannel<C> {
    pub(crate) fn new<D: Send + Sync + 'static>(device: Arc<D>, channel: C) -> Self {
        Self(Rc::new(Inner { _device: device, channel: RefCell::new(channel) }))
    }

    pub(crate) fn as_any(&self) -> Rc<dyn Any> {
        self.0.clone()
    }

    pub(crate) fn from_any(any: Rc<dyn Any>) -> Self {
        Self(any.downcast::<Inner<C>>().unwrap_or_else(|_| unreachable!("channel cache is keyed by device type")))
    }

    /// Borrows the channel. Panics if it is already borrowed, which would mean a
    /// channel method re-entered itself.
    pub fn borrow_mut(&self) -> RefMut<'_, C> {
        self.0.channel.borrow_mut()
    }

    /// A handle that does not keep the channel alive.
    pub fn downgrade(&self) -> WeakIoChannel<C> {
        WeakIoChannel(Rc::downgrade(&self.0))
    }

    /// Whether two handles refer to the same channel.
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.0, &other.0)
    }
}

/// A non-owning reference to a channel (see [`IoChannel::downgrade`]).
pub struct WeakIoChannel<C: 'static>(std::rc::Weak<Inner<C>>);

impl<C: 'static> WeakIoChannel<C> {
    /// The channel, if it still exists.
    pub fn upgrade(&self) -> Option<IoChannel<C>> {
        self.0.upgrade().map(IoChannel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Reactor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Dev {
        created: AtomicUsize,
    }

    struct Chan {
        reactor: u32,
        uses: u32,
    }

    impl IoDevice for Dev {
        type Channel = Chan;
        type Error = std::convert::Infallible;
        fn create_channel(self: &Arc<Self>, ctx: &mut Ctx<'_>) -> Result<Chan, Self::Error> {
            self.created.fetch_add(1, Ordering::Relaxed);
            Ok(Chan { reactor: ctx.reactor_id(), uses: 0 })
        }
    }

    #[test]
    fn one_channel_per_reactor_shared_until_dropped() {
        let mut rs = Reactor::group(2);
        let dev = Arc::new(Dev { created: AtomicUsize::new(0) });
        let a = rs[0].with_ctx(|ctx| ctx.io_channel(&dev)).unwrap();
        let b = rs[0].with_ctx(|ctx| ctx.io_channel(&dev)).unwrap();
        let c = rs[1].with_ctx(|ctx| ctx.io_channel(&dev)).unwrap();
        assert!(a.ptr_eq(&b));
        assert!(!a.ptr_eq(&c));
        a.borrow_mut().uses += 1;
        assert_eq!(b.borrow_mut().uses, 1);
        assert_eq!((b.borrow_mut().reactor, c.borrow_mut().reactor), (0, 1));
        assert_eq!(dev.created.load(Ordering::Relaxed), 2);
        drop((a, b));
        let d = rs[0].with_ctx(|ctx| ctx.io_channel(&dev)).unwrap();
        assert_eq!(d.borrow_mut().uses, 0, "a new channel after the last one was dropped");
        assert_eq!(dev.created.load(Ordering::Relaxed), 3);
    }
}
