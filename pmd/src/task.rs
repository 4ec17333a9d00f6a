//! Futures on a reactor: a small single-threaded executor driven by
//! [`crate::Reactor::poll`].
//!
//! Multi-step operations (a metadata update that writes a journal record,
//! then a super block, then answers) are far easier to write with
//! `async`/`await` than as hand-rolled state machines. A task is a `!Send`
//! future that lives on the reactor that spawned it; it is polled when its
//! waker fires, in the reactor's next round. Wakers may be fired from any
//! thread: they queue the task on a lock-free queue and wake the reactor if
//! it sleeps. The hot I/O paths stay plain polled state machines; tasks are
//! for the control and metadata paths.
//!
//! ```
//! let mut reactor = pmd::Reactor::group(1).pop().unwrap();
//! let handle = reactor.with_ctx(|ctx| ctx.spawn(async { 6 * 7 }));
//! reactor.poll(0, 8);
//! assert_eq!(handle.try_take(), Some(42));
//! ```

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use crossbeam_queue::SegQueue;

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;
/// Tasks spawned from inside a running task, waiting to be adopted.
type Spawned = Rc<RefCell<Vec<LocalFuture>>>;

/// Where wakers put tasks that should run again. Shared with other threads.
pub(crate) struct ReadyQueue {
    queue: SegQueue<(u32, u32)>,
    wake: Box<dyn Fn() + Send + Sync>,
}

struct TaskWaker {
    id: u32,
    generation: u32,
    ready: Arc<ReadyQueue>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.queue.push((self.id, self.generation));
        (self.ready.wake)();
    }
}

struct Slot {
    generation: u32,
    future: Option<LocalFuture>,
    waker: Waker,
}

/// The tasks of one reactor.
pub(crate) struct Executor {
    slots: Vec<Slot>,
    free: Vec<u32>,
    ready: Arc<ReadyQueue>,
    /// Tasks spawned while another task runs, adopted after it returns.
    spawned: Spawned,
    live: usize,
}

thread_local! {
    /// The executor whose task is being polled, and its reactor's `now`.
    static CURRENT: RefCell<Option<(Spawned, u64)>> = const { RefCell::new(None) };
}

impl Executor {
    pub(crate) fn new(wake: Box<dyn Fn() + Send + Sync>) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            ready: Arc::new(ReadyQueue { queue: SegQueue::new(), wake }),
            spawned: Rc::default(),
            live: 0,
        }
    }

    /// Tasks not finished yet.
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    pub(crate) fn spawn_boxed(&mut self, future: LocalFuture) {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let id = self.slots.len() as u32;
                let waker = Waker::noop().clone();
                self.slots.push(Slot { generation: 0, future: None, waker });
                id
            }
        };
        let slot = &mut self.slots[id as usize];
        slot.generation = slot.generation.wrapping_add(1);
        slot.future = Some(future);
        slot.waker = Waker::from(Arc::new(TaskWaker { id, generation: slot.generation, ready: self.ready.clone() }));
        self.live += 1;
        self.ready.queue.push((id, slot.generation));
    }

    /// Polls up to `budget` ready tasks; returns how many ran.
    pub(crate) fn run(&mut self, now: u64, budget: usize) -> usize {
        let mut ran = 0;
        // `is_empty` first: an empty `pop` costs a full fence, every round.
        while ran < budget && !self.ready.queue.is_empty() {
            let Some((id, generation)) = self.ready.queue.pop() else { break };
            let Some(slot) = self.slots.get_mut(id as usize) else { continue };
            if slot.generation != generation {
                continue; // a stale wake-up of a finished task
            }
            let Some(mut future) = slot.future.take() else { continue };
            let waker = slot.waker.clone();
            let previous = CURRENT.with(|c| c.replace(Some((self.spawned.clone(), now))));
            let done = future.as_mut().poll(&mut Context::from_waker(&waker)).is_ready();
            CURRENT.with(|c| *c.borrow_mut() = previous);
            ran += 1;
            let slot = &mut self.slots[id as usize];
            if done {
                self.free.push(id);
                self.live -= 1;
            } else {
                slot.future = Some(future);
            }
            let spawned = std::mem::take(&mut *self.spawned.borrow_mut());
            for f in spawned {
                self.spawn_boxed(f);
            }
        }
        ran
    }

    /// Whether a task is queued to run.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.queue.is_empty()
    }
}

/// The result of a spawned task, for other tasks or code on the same reactor.
pub struct JoinHandle<T> {
    state: Rc<JoinState<T>>,
}

struct JoinState<T> {
    result: RefCell<Option<T>>,
    done: Cell<bool>,
    waiter: RefCell<Option<Waker>>,
}

impl<T> JoinHandle<T> {
    /// The result, if the task has finished (once).
    pub fn try_take(&self) -> Option<T> {
        self.state.result.borrow_mut().take()
    }

    /// Whether the task has finished.
    pub fn is_finished(&self) -> bool {
        self.state.done.get()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.state.result.borrow_mut().take() {
            Some(v) => Poll::Ready(v),
            None => {
                assert!(!self.state.done.get(), "JoinHandle polled after its result was taken");
                *self.state.waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Wraps `future` so that its output lands in a [`JoinHandle`].
pub(crate) fn joinable<F: Future + 'static>(future: F) -> (LocalFuture, JoinHandle<F::Output>) {
    let state = Rc::new(JoinState { result: RefCell::new(None), done: Cell::new(false), waiter: RefCell::new(None) });
    let s = state.clone();
    let task = Box::pin(async move {
        let v = future.await;
        *s.result.borrow_mut() = Some(v);
        s.done.set(true);
        if let Some(w) = s.waiter.borrow_mut().take() {
            w.wake();
        }
    });
    (task, JoinHandle { state })
}

/// Spawns a task on the reactor whose task is running now. Panics outside a task
/// (use [`crate::Ctx::spawn`] from pollers and messages).
pub fn spawn_local<F: Future + 'static>(future: F) -> JoinHandle<F::Output> {
    let (task, handle) = joinable(future);
    CURRENT.with(|c| {
        let cur = c.borrow();
        let (spawned, _) = cur.as_ref().expect("pmd::task::spawn_local called outside a reactor task");
        spawned.borrow_mut().push(task);
    });
    handle
}

/// The `now` of the reactor polling the current task (the real clock outside tasks).
pub fn now() -> u64 {
    CURRENT.with(|c| c.borrow().as_ref().map(|(_, now)| *now)).unwrap_or_else(crate::clock::now)
}

/// Yields once, letting other tasks and pollers run.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use crate::Reactor;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn tasks_run_join_and_spawn_children() {
        let mut r = Reactor::group(1).pop().unwrap();
        let log = Rc::new(std::cell::RefCell::new(Vec::new()));
        let l = log.clone();
        let h = r.with_ctx(|ctx| {
            ctx.spawn(async move {
                l.borrow_mut().push("parent start");
                let l2 = l.clone();
                let child = super::spawn_local(async move {
                    l2.borrow_mut().push("child");
                    7
                });
                super::yield_now().await;
                let v = child.await;
                l.borrow_mut().push("parent end");
                v * 6
            })
        });
        for t in 0..10 {
            r.poll(t, 16);
        }
        assert_eq!(h.try_take(), Some(42));
        assert_eq!(*log.borrow(), ["parent start", "child", "parent end"]);
    }

    #[test]
    fn a_waker_fired_from_another_thread_wakes_a_sleeping_reactor() {
        let mut r = Reactor::group(1).pop().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<std::task::Waker>();
        let done = Rc::new(Cell::new(false));
        let d = done.clone();
        r.with_ctx(|ctx| {
            ctx.spawn(async move {
                let mut sent = false;
                std::future::poll_fn(|cx| {
                    if sent {
                        std::task::Poll::Ready(())
                    } else {
                        sent = true;
                        tx.send(cx.waker().clone()).unwrap();
                        std::task::Poll::Pending
                    }
                })
                .await;
                d.set(true);
            })
        });
        r.poll(0, 8);
        let waker = rx.recv().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            waker.wake();
        });
        let start = std::time::Instant::now();
        r.sleep(Some(10_000_000_000)).unwrap();
        assert!(start.elapsed() < std::time::Duration::from_secs(5), "woken by the waker, not the timeout");
        r.poll(1, 8);
        assert!(done.get());
        t.join().unwrap();
    }
}
