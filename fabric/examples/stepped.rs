//! Per-message CPU cost of the RPC layer, without scheduling in the way:
//! 64 B echo round trips between two shm endpoints of this process, both
//! stepped on one thread, against the same ping-pong done with bare
//! libfabric calls (inject, completion read, re-post) on the same provider.
//!
//! `cargo run --release -p claudefs-fabric --example stepped [-- ROUND_TRIPS [SIZE [raw|rpc]]]`
//! (SIZE 0: the cost of one poll with nothing arriving instead)

use std::time::Instant;

use fabric::frame::Payload;
use fabric::ofi::{Endpoint, EndpointOptions, InfoList, Query};
use fabric::rpc::{Event, Rpc, RpcOptions};
use fabric::transport::TransportConfig;
use fabric::transport::ofi::unique_shm_name;

fn raw_endpoint(name: &str) -> Endpoint {
    let q = Query { provider: Some("shm"), node: Some(name), service: None, rma: false };
    let list = InfoList::get(&q).unwrap().expect("libfabric offers shm");
    Endpoint::open(list, EndpointOptions { cq_size: 128, slots: 8, wait_fd: false }).unwrap()
}

/// Bare libfabric: ns per round trip.
fn raw(n: usize, size: usize) -> f64 {
    let (na, nb) = (unique_shm_name(), unique_shm_name());
    let (mut a, mut b) = (raw_endpoint(&na), raw_endpoint(&nb));
    let ab = a.av_insert(b.name()).unwrap();
    let ba = b.av_insert(a.name()).unwrap();
    let mut bufs = [vec![0u8; 4096], vec![0u8; 4096]];
    let msg = vec![7u8; size];
    let mut done = Vec::new();
    // SAFETY: the buffers outlive the endpoints' use of them (re-posted only after each completion).
    unsafe {
        a.post_recv(0, bufs[0].as_mut_ptr(), 4096).unwrap();
        b.post_recv(0, bufs[1].as_mut_ptr(), 4096).unwrap();
    }
    let mut scratch = Vec::new();
    let mut wait = |ep: &mut Endpoint, buf: &mut Vec<u8>| loop {
        done.clear();
        ep.cq_read(&mut done).unwrap();
        if !done.is_empty() {
            // SAFETY: as above.
            unsafe { ep.post_recv(0, buf.as_mut_ptr(), 4096).unwrap() };
            return;
        }
    };
    // shm maps a peer's region on the first send to it: retry until it takes.
    while !a.inject(&msg, ab, 1).unwrap() {
        let _ = (a.cq_read(&mut scratch), b.cq_read(&mut scratch));
    }
    wait(&mut b, &mut bufs[1]);
    while !b.inject(&msg, ba, 1).unwrap() {
        let _ = (a.cq_read(&mut scratch), b.cq_read(&mut scratch));
    }
    wait(&mut a, &mut bufs[0]);
    let start = Instant::now();
    for _ in 0..n {
        assert!(a.inject(&msg, ab, 1).unwrap());
        wait(&mut b, &mut bufs[1]);
        assert!(b.inject(&msg, ba, 1).unwrap());
        wait(&mut a, &mut bufs[0]);
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// The RPC layer (echo service): ns per round trip.
fn rpc(n: usize, size: usize) -> f64 {
    let now = pmd::clock::now;
    let open = |addr: Option<String>| {
        let t = TransportConfig::new("shm", addr.as_deref()).open(16 << 20).unwrap();
        Rpc::new(t, RpcOptions::default()).unwrap()
    };
    let mut server = open(Some(unique_shm_name()));
    let mut client = open(None);
    let conn = client.connect(now(), &server.local_addr()).unwrap();
    let mut events = Vec::new();
    // One step: the server answers what came, the client reads its answers.
    // Returns the payload of a completed call (the next call's, as in `claudefs fabricperf`).
    let step = |server: &mut Rpc, client: &mut Rpc, events: &mut Vec<Event>| -> Option<Payload> {
        server.poll_with(now(), |server, _, ev| {
            if let Event::Request(r) = ev {
                server.respond(r.conn, r.id, r.method, Ok(r.payload)).unwrap();
            }
        });
        client.poll(now(), events);
        client.flush();
        events.drain(..).find_map(|e| match e {
            Event::Completion(c) => Some(c.result.expect("the echo succeeds")),
            _ => None,
        })
    };
    while client.peer(conn).is_none() {
        step(&mut server, &mut client, &mut events);
    }
    let mut payload = Payload::from(vec![7u8; size]);
    let start = Instant::now();
    for i in 0..n {
        client.call(now(), conn, 1, payload, i as u64).unwrap();
        payload = loop {
            if let Some(p) = step(&mut server, &mut client, &mut events) {
                break p;
            }
        };
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// ns per poll of an endpoint with nothing arriving: bare `fi_cq_read`
/// against [`Rpc::poll`] (what each side pays per turn of its loop while it
/// waits, and so, on average, half of what it adds to noticing a message).
fn idle(n: usize) -> (f64, f64) {
    let mut ep = raw_endpoint(&unique_shm_name());
    let mut done = Vec::new();
    let start = Instant::now();
    for _ in 0..n {
        ep.cq_read(&mut done).unwrap();
    }
    let raw = start.elapsed().as_nanos() as f64 / n as f64;
    let t = TransportConfig::new("shm", Some(&unique_shm_name())).open(16 << 20).unwrap();
    let mut rpc = Rpc::new(t, RpcOptions::default()).unwrap();
    let mut events = Vec::new();
    let start = Instant::now();
    for _ in 0..n {
        rpc.poll(pmd::clock::now(), &mut events);
    }
    (raw, start.elapsed().as_nanos() as f64 / n as f64)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(200_000, |s| s.parse().expect("ROUND_TRIPS"));
    let size: usize = args.next().map_or(64, |s| s.parse().expect("SIZE"));
    if size == 0 {
        for _ in 0..3 {
            let (r, c) = idle(n);
            println!("idle poll: fi_cq_read {r:.0} ns, Rpc::poll {c:.0} ns");
        }
        return;
    }
    if let Some(only) = args.next() {
        // For profiling one side: `raw` or `rpc`.
        let run = || if only == "raw" { raw(n, size) } else { rpc(n, size) };
        let ns: Vec<f64> = (0..5).map(|_| run()).collect();
        let min = ns.iter().copied().fold(f64::MAX, f64::min);
        return println!("{only}: min {min:.0} ns of {ns:.0?}");
    }
    for _ in 0..3 {
        let (r, c) = (raw(n, size), rpc(n, size));
        println!(
            "{size} B round trip, stepped on one thread: libfabric {r:.0} ns, rpc {c:.0} ns, ratio {:.2}, rpc overhead {:.0} ns",
            c / r,
            c - r
        );
    }
}
