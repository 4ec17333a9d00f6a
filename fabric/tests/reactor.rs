//! Endpoints driven by reactors: stepped on one thread, and on real
//! reactor threads that sleep when idle and are woken by the transport.

mod common;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Kind, endpoint, kinds, listen_addr, now};
use fabric::frame::Payload;
use fabric::reactor::{attach, echo};
use fabric::rpc::{Event, RpcOptions};
use pmd::{CoreMask, IdlePolicy, Reactor, Runtime, RuntimeOptions};

#[test]
fn attached_endpoints_serve_a_closed_loop_of_calls() {
    for kind in kinds() {
        let mut reactors = Reactor::group(2);
        let server = endpoint(kind, Some(&listen_addr(kind)), RpcOptions::default());
        let addr = server.local_addr();
        reactors[0].with_ctx(|ctx| attach(ctx, server, echo)).unwrap();
        let mut client = endpoint(kind, None, RpcOptions::default());
        let conn = client.connect(now(), &addr).unwrap();
        let done = Rc::new(Cell::new(0u64));
        let d = done.clone();
        let target = 2000;
        // Keep 16 calls in flight: every completion issues the next call.
        let handler = move |rpc: &mut fabric::rpc::Rpc, now: u64, ev: Event| match ev {
            Event::Connected { conn, .. } => {
                for tag in 0..16u64 {
                    rpc.call(now, conn, 1, Payload::copy_from(&tag.to_le_bytes()), tag).unwrap();
                }
            }
            Event::Completion(c) => {
                assert_eq!(&c.result.unwrap()[..], &c.tag.to_le_bytes());
                d.set(d.get() + 1);
                if c.tag + 16 < target {
                    let tag = c.tag + 16;
                    rpc.call(now, conn, 1, Payload::copy_from(&tag.to_le_bytes()), tag).unwrap();
                }
            }
            other => panic!("unexpected {other:?}"),
        };
        let attached = reactors[1].with_ctx(|ctx| attach(ctx, client, handler)).unwrap();
        let start = Instant::now();
        while done.get() < target {
            assert!(start.elapsed() < Duration::from_secs(30), "{kind}: {} of {target} calls done", done.get());
            for r in &mut reactors {
                r.poll(now(), 64);
            }
        }
        assert_eq!(attached.rpc().borrow().outstanding(), 0);
        let names: Vec<String> = reactors[1].with_ctx(|ctx| ctx.pollers()).into_iter().map(|p| p.name).collect();
        assert!(names.iter().any(|n| n.starts_with("fabric:")), "{names:?}");
    }
}

#[test]
fn an_idle_reactor_sleeps_and_the_transport_wakes_it() {
    for kind in kinds() {
        // Deadlines checked only every 60 s: a quick answer to a sleeping
        // reactor can only come from the transport's wake fd (or, for a
        // transport without one, from its 1 ms poll).
        let opts = RpcOptions { timer_ms: 60_000, ..Default::default() };
        let rt = Runtime::start(RuntimeOptions {
            mask: CoreMask::first(1),
            idle: IdlePolicy::Adaptive,
            spin_us: 50,
            pin: false,
            ..Default::default()
        })
        .unwrap();
        let reactor = rt.reactors()[0].clone();
        let server = endpoint(kind, Some(&listen_addr(kind)), opts.clone());
        let addr = server.local_addr();
        let served = Arc::new(AtomicU64::new(0));
        let s = served.clone();
        reactor
            .call(move |ctx| {
                let handler = move |rpc: &mut fabric::rpc::Rpc, now: u64, ev: Event| {
                    if matches!(ev, Event::Request(_)) {
                        s.fetch_add(1, Ordering::Relaxed);
                    }
                    echo(rpc, now, ev);
                };
                attach(ctx, server, handler).map(|_| ())
            })
            .blocking_recv()
            .unwrap()
            .unwrap();
        let mut client = endpoint(kind, None, RpcOptions::default());
        let conn = client.connect(now(), &addr).unwrap();
        let events = RefCell::new(Vec::new());
        let wait = |client: &mut fabric::rpc::Rpc, what: &str, limit: Duration, cond: &dyn Fn(&[Event]) -> bool| {
            let start = Instant::now();
            let mut ev = events.borrow_mut();
            while !cond(&ev) {
                assert!(start.elapsed() < limit, "{kind}: {what} within {limit:?}");
                client.poll(now(), &mut ev);
            }
        };
        wait(&mut client, "connected", Duration::from_secs(10), &|e| {
            e.iter().any(|e| matches!(e, Event::Connected { .. }))
        });
        for round in 0..5u64 {
            // Let the server's reactor fall asleep.
            let start = Instant::now();
            while !reactor.is_sleeping() {
                assert!(start.elapsed() < Duration::from_secs(10), "{kind}: the idle reactor never slept");
                client.poll(now(), &mut events.borrow_mut());
            }
            let sleep_before = reactor.stats().sleep_ns;
            client.call(now(), conn, 1, Payload::copy_from(&round.to_le_bytes()), round).unwrap();
            wait(&mut client, "an answer from the sleeping reactor", Duration::from_secs(5), &|e| {
                e.iter().any(|e| matches!(e, Event::Completion(c) if c.tag == round))
            });
            assert!(reactor.stats().sleep_ns > sleep_before, "{kind}: the reactor had slept");
        }
        assert_eq!(served.load(Ordering::Relaxed), 5);
        let _ = Kind::Tcp;
        rt.shutdown();
    }
}
