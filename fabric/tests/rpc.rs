//! Client and server over loopback, for every transport: plain TCP,
//! libfabric tcp;ofi_rxm and shm (and verbs;ofi_rxm where RDMA exists).

mod common;

use std::time::Duration;

use common::{Kind, Pair, Raw, hello, kinds, now};
use fabric::FabricError;
use fabric::frame::{
    BULK_THRESHOLD, FRAGMENT_PREFIX, HEADER_LEN, HELLO_LOCAL_DIGEST, Header, MAX_INLINE, Opcode, Payload, crc32c, flags,
};
use fabric::rpc::{Event, RpcOptions};
use fabric::stats::ConnState;
use fabric::transport::Transport;

const MIB: usize = 1 << 20;

fn random_payload(rng: &mut fastrand::Rng, len: usize) -> Payload {
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    Payload::from(v)
}

/// Echoes payloads of `sizes` bytes, several at once, checking every byte
/// and checksum. Returns the bytes sent.
fn echo_sizes(p: &mut Pair, sizes: &[usize], seed: u64) -> u64 {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut sent = Vec::new();
    for (tag, &len) in sizes.iter().enumerate() {
        let payload = random_payload(&mut rng, len);
        sent.push((len, crc32c(&payload), payload.to_vec()));
        p.call(payload, tag as u64);
    }
    p.run_until(Duration::from_secs(120), |p| p.done.len() == sizes.len());
    for c in p.done.drain(..) {
        let (len, crc, bytes) = &sent[c.tag as usize];
        let got = c.result.unwrap_or_else(|e| panic!("{}: a {len}-byte echo failed: {e}", p.kind));
        assert_eq!(got.len(), *len, "{}: length of echo #{}", p.kind, c.tag);
        assert_eq!(crc32c(&got), *crc, "{}: checksum of the {len}-byte echo #{}", p.kind, c.tag);
        assert!(got[..] == bytes[..], "{}: bytes of the {len}-byte echo #{}", p.kind, c.tag);
    }
    sizes.iter().sum::<usize>() as u64
}

#[test]
fn random_sizes_from_0_to_16_mib_round_trip_with_checksums() {
    let boundaries = [
        0,
        1,
        31,
        32,
        4096,
        MAX_INLINE - 1,
        MAX_INLINE,
        MAX_INLINE + 1,
        BULK_THRESHOLD - 1,
        BULK_THRESHOLD,
        2 * MIB + 1,
        16 * MIB,
    ];
    let seed = fastrand::u64(..);
    eprintln!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    for kind in kinds() {
        let mut p = Pair::new(kind, RpcOptions::default(), RpcOptions::default());
        let mut bytes = echo_sizes(&mut p, &boundaries, rng.u64(..));
        // Random sizes, log-uniform so that every scale is hit.
        let random: Vec<usize> = (0..40).map(|_| (2f64.powf(rng.f64() * 24.0) as usize).min(16 * MIB)).collect();
        bytes += echo_sizes(&mut p, &random, rng.u64(..));
        let s = &p.client.stats().connections()[0];
        assert_eq!(s.state, ConnState::Established);
        assert!(s.bytes_sent > bytes && s.bytes_received > bytes, "{kind}: {bytes} payload bytes, counted {s:?}");
        if kind != Kind::Tcp {
            assert!(s.bulk_sent > 0 && s.bulk_received > 0, "{kind}: large payloads went by RMA: {s:?}");
        }
    }
}

#[test]
fn bulk_payloads_travel_in_fragments_without_rma_and_with_digests_on_request() {
    for kind in kinds().into_iter().filter(|k| *k != Kind::Tcp) {
        let digest = RpcOptions { bulk_digest: true, ..Default::default() };
        let mut p = Pair::with_rma(kind, digest.clone(), RpcOptions::default(), false);
        echo_sizes(&mut p, &[BULK_THRESHOLD, 3 * MIB + 7, 0, 100], 7);
        let s = &p.client.stats().connections()[0];
        assert_eq!((s.bulk_sent, s.bulk_received), (0, 0), "{kind}: no RMA was used");
        let mut p = Pair::new(kind, digest, RpcOptions::default());
        echo_sizes(&mut p, &[BULK_THRESHOLD, 5 * MIB], 8);
    }
}

#[test]
fn payloads_a_little_over_the_eager_size_go_as_a_few_eager_fragments() {
    for kind in kinds() {
        // No keepalive pings (or pongs) in the frame counts.
        let quiet =
            RpcOptions { keepalive_interval_ms: 600_000, keepalive_timeout_ms: 1_200_000, ..Default::default() };
        let mut p = Pair::new(kind, quiet.clone(), quiet);
        let (eager, max) = (p.client.transport().eager_payload(), p.client.transport().max_frame_payload());
        if eager >= max {
            // The stream, and verbs (rxm's rendezvous is an RDMA read there).
            assert!(matches!(kind, Kind::Tcp | Kind::Ofi("verbs;ofi_rxm")), "{kind} has an eager step");
            continue;
        }
        // Up to four eager messages' worth (shm: 16 KiB) in fragments, above in one frame.
        let (piece, most) = (eager - FRAGMENT_PREFIX, 4 * (eager + HEADER_LEN));
        for (len, frames) in [(eager, 1), (eager + 1, 2), (most, most.div_ceil(piece)), (most + 1, 1)] {
            let before = p.client.stats().connections()[0].frames_sent;
            echo_sizes(&mut p, &[len], len as u64);
            let sent = p.client.stats().connections()[0].frames_sent - before;
            assert_eq!(sent, frames as u64, "{kind}: frames for a {len}-byte request (eager size {eager})");
        }
    }
}

#[test]
fn thousands_of_outstanding_calls_complete_within_the_credits() {
    for kind in kinds() {
        let server = RpcOptions { credits: 64, ..Default::default() };
        let mut p = Pair::new(kind, server, RpcOptions::default());
        p.hold = true;
        let mut rng = fastrand::Rng::with_seed(1);
        let n = 5000;
        let mut sent = Vec::new();
        for tag in 0..n {
            let len = rng.usize(0..2000);
            let payload = random_payload(&mut rng, len);
            sent.push(payload.to_vec());
            p.call(payload, tag);
        }
        assert_eq!(p.client.outstanding(), n as usize);
        // The server holds what it gets: only the granted 64 may arrive.
        p.run_until(Duration::from_secs(10), |p| p.held.len() == 64);
        for _ in 0..50 {
            p.step();
        }
        assert_eq!(p.held.len(), 64, "{kind}: the client respected the credits");
        // Now answer everything as it comes.
        p.run_until(Duration::from_secs(60), |p| {
            p.release();
            p.done.len() == n as usize
        });
        assert_eq!(p.max_held, 64);
        for c in p.done.drain(..) {
            assert_eq!(c.result.unwrap()[..], sent[c.tag as usize][..], "{kind}: call {} got its own answer", c.tag);
        }
        assert_eq!(p.client.outstanding(), 0);
    }
}

#[test]
fn calls_time_out_and_can_be_cancelled() {
    for kind in kinds() {
        let mut p = Pair::new(kind, RpcOptions::default(), RpcOptions::default());
        p.hold = true;
        let slow = p.client.call_timeout(now(), p.conn, 9, Payload::copy_from(b"slow"), 1, 50).unwrap();
        let cancelled = p.call(Payload::copy_from(b"cancel me"), 2);
        p.run_until(Duration::from_secs(5), |p| p.held.len() == 2);
        assert!(p.client.cancel(cancelled));
        assert!(!p.client.cancel(cancelled), "a call completes once");
        p.run_until(Duration::from_secs(5), |p| p.done.len() == 2);
        let mut done: Vec<_> = p.done.drain(..).collect();
        done.sort_by_key(|c| c.tag);
        assert!(
            matches!(done[0].result.as_ref().map_err(|e| &**e), Err(FabricError::TimedOut { method: 9, ms: 50, .. })),
            "{kind}: {:?}",
            done[0].result
        );
        assert_eq!(done[0].call, slow);
        assert!(
            matches!(done[1].result.as_ref().map_err(|e| &**e), Err(FabricError::Cancelled { .. })),
            "{kind}: {:?}",
            done[1].result
        );
        // The server is told about the cancellation and still answers (returning the credits);
        // the late answers are dropped, and the connection keeps working.
        p.run_until(Duration::from_secs(5), |p| p.server_events.iter().any(|e| matches!(e, Event::Cancelled { .. })));
        p.hold = false;
        p.release();
        let ok = p.call(Payload::copy_from(b"after"), 3);
        p.run_until(Duration::from_secs(5), |p| p.done.len() == 1);
        let c = p.done.pop().unwrap();
        assert_eq!((c.call, &c.result.unwrap()[..]), (ok, &b"after"[..]));
        let s = &p.client.stats().connections()[0];
        assert_eq!(s.timeouts, 1);
    }
}

#[test]
fn oversized_payloads_and_overfull_queues_are_refused() {
    for kind in kinds() {
        let server = RpcOptions { max_message: 100_000, credits: 1, ..Default::default() };
        let client = RpcOptions { max_queued: 3, ..Default::default() };
        let mut p = Pair::new(kind, server, client);
        let err = p.client.call(now(), p.conn, 1, Payload::from(vec![0u8; 100_001]), 0).unwrap_err();
        assert!(matches!(err, FabricError::TooLarge { len: 100_001, max: 100_000, .. }), "{kind}: {err}");
        p.hold = true;
        for tag in 0..4 {
            p.call(Payload::copy_from(b"x"), tag);
        }
        // One is on the wire (one credit), three wait; a fifth is refused.
        let err = p.client.call(now(), p.conn, 1, Payload::empty(), 9).unwrap_err();
        assert!(matches!(err, FabricError::Backpressure { queued: 3, limit: 3, .. }), "{kind}: {err}");
        p.hold = false;
        p.run_until(Duration::from_secs(5), |p| {
            p.release();
            p.done.len() == 4
        });
        // An answer the client cannot take is turned into an error by the server.
        let small = RpcOptions { max_message: 10, ..Default::default() };
        let mut p = Pair::new(kind, RpcOptions::default(), small);
        p.call(Payload::copy_from(b"0123456789"), 0);
        p.run_until(Duration::from_secs(5), |p| p.done.len() == 1);
        let c = p.done.pop().unwrap();
        assert!(c.result.is_ok());
        p.hold = true;
        p.call(Payload::copy_from(b"x"), 1);
        p.run_until(Duration::from_secs(5), |p| p.held.len() == 1);
        let r = p.held.pop().unwrap();
        p.server.respond(r.conn, r.id, r.method, Ok(Payload::from(vec![1u8; 11]))).unwrap();
        p.run_until(Duration::from_secs(5), |p| p.done.len() == 1);
        let err = p.done.pop().unwrap().result.unwrap_err();
        assert!(matches!(*err, FabricError::Remote { code, .. } if code == -libc::EMSGSIZE), "{kind}: {err}");
    }
}

#[test]
fn a_silent_peer_is_detected_by_keepalive_and_its_calls_fail() {
    for kind in kinds() {
        let quick = RpcOptions {
            keepalive_interval_ms: 100,
            keepalive_timeout_ms: 1_000,
            reconnect_attempts: 0,
            ..Default::default()
        };
        let mut p = Pair::new(kind, quick.clone(), quick);
        p.hold = true;
        p.call(Payload::copy_from(b"never answered"), 1);
        p.run_until(Duration::from_secs(5), |p| p.held.len() == 1);
        // Idle but alive: pings keep the connection up past the timeout.
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(1_500) {
            p.step();
        }
        assert!(p.done.is_empty(), "{kind}: an answering peer is not timed out: {:?}", p.done);
        // The server stops running (a hung process): only the client is polled.
        let start = std::time::Instant::now();
        let mut events = Vec::new();
        while p.client.state(p.conn).is_some() {
            assert!(start.elapsed() < Duration::from_secs(5), "{kind}: the silent peer was not detected");
            p.client.poll(now(), &mut events);
        }
        let failed = events.iter().find_map(|e| match e {
            Event::Completion(c) => Some(c),
            _ => None,
        });
        let err = failed.expect("the pending call completed").result.as_ref().unwrap_err();
        assert!(matches!(**err, FabricError::KeepaliveTimeout { .. }), "{kind}: {err}");
        assert!(events.iter().any(|e| matches!(e, Event::Disconnected { reconnecting: false, .. })));
        let s = &p.client.stats().connections()[0];
        assert_eq!(s.state, ConnState::Closed);
        assert!(s.last_error.as_deref().unwrap().contains("nothing received"), "{s:?}");
    }
}

#[test]
fn a_client_reconnects_when_its_server_comes_back() {
    // shm peers in one process share their regions: libfabric 1.17 crashes when
    // one sends to a closed one. tests/process.rs restarts a shm server in a
    // process of its own instead.
    for kind in kinds().into_iter().filter(|k| *k != Kind::Ofi("shm")) {
        let opts = RpcOptions {
            keepalive_interval_ms: 100,
            keepalive_timeout_ms: 1_000,
            reconnect_attempts: 50,
            reconnect_backoff_ms: 20,
            reconnect_backoff_max_ms: 100,
            ..Default::default()
        };
        let addr = match kind {
            Kind::Ofi("shm") => common::listen_addr(kind),
            _ => {
                // A fixed free port, so the new server is found at the old address.
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().to_string()
            }
        };
        let mut server = common::endpoint(kind, Some(&addr), RpcOptions::default());
        let mut client = common::endpoint(kind, None, opts);
        let conn = client.connect(now(), &server.local_addr()).unwrap();
        let mut done = Vec::new();
        let step = |server: &mut fabric::rpc::Rpc, client: &mut fabric::rpc::Rpc, done: &mut Vec<Event>| {
            let mut ev = Vec::new();
            server.poll(now(), &mut ev);
            for e in ev {
                if let Event::Request(r) = e {
                    server.respond(r.conn, r.id, r.method, Ok(r.payload)).unwrap();
                }
            }
            server.flush();
            client.poll(now(), done);
        };
        client.call(now(), conn, 1, Payload::copy_from(b"one"), 1).unwrap();
        let start = std::time::Instant::now();
        while !done.iter().any(|e| matches!(e, Event::Completion(_))) {
            assert!(start.elapsed() < Duration::from_secs(10));
            step(&mut server, &mut client, &mut done);
        }
        let incarnation = client.peer(conn).unwrap().incarnation;
        // The server goes away (its endpoint closes) and a new one takes its address.
        drop(server);
        let start = std::time::Instant::now();
        while client.state(conn) == Some(ConnState::Established) {
            assert!(start.elapsed() < Duration::from_secs(20), "{kind}: the loss was not noticed");
            client.poll(now(), &mut done);
        }
        let mut server = common::endpoint(kind, Some(&addr), RpcOptions::default());
        // A call made while disconnected waits for the new connection.
        done.clear();
        client.call(now(), conn, 1, Payload::copy_from(b"two"), 2).unwrap();
        let start = std::time::Instant::now();
        let answer = loop {
            assert!(start.elapsed() < Duration::from_secs(30), "{kind}: no reconnection: {done:?}");
            step(&mut server, &mut client, &mut done);
            if let Some(c) = done.iter_mut().find_map(|e| match e {
                Event::Completion(c) if c.tag == 2 => Some(c),
                _ => None,
            }) {
                break std::mem::replace(&mut c.result, Ok(Payload::empty()));
            }
        };
        assert_eq!(&answer.unwrap()[..], b"two", "{kind}");
        assert_ne!(client.peer(conn).unwrap().incarnation, incarnation, "{kind}: it is the new server");
        assert!(client.stats().connections()[0].reconnects >= 1);
    }
}

#[test]
fn payloads_on_shm_are_checksummed_only_when_either_side_asks() {
    for kind in kinds().into_iter().filter(|k| *k != Kind::Tcp) {
        let Kind::Ofi(provider) = kind else { unreachable!() };
        for (server_asks, client_asks) in [(false, false), (false, true), (true, false)] {
            let server = RpcOptions { local_digest: server_asks, ..Default::default() };
            let mut p = Pair::new(kind, server, RpcOptions::default());
            let mut served = 0;
            // A raw client, to see the flags of the server's answer.
            let mut raw = Raw::new(provider, &p.server.local_addr());
            let addr = raw.ep.name().to_vec();
            raw.send(&mut p, &hello(addr, 5, if client_asks { HELLO_LOCAL_DIGEST } else { 0 }), 0, &mut served);
            let token = raw.hello_ack_token(&mut p, &mut served);
            let body = [3u8; 64];
            let mut request = Header::new(Opcode::Request, 1).method(1).payload(&body).encode().to_vec();
            request.extend_from_slice(&body);
            raw.send(&mut p, &request, token, &mut served);
            let (h, payload) = raw.next_frame(&mut p, &mut served);
            assert_eq!((h.opcode, &payload[..]), (Opcode::Response, &body[..]), "{kind}: the echo");
            let digest = provider != "shm" || server_asks || client_asks;
            let what = format!("{kind}: the server asks {server_asks}, the client {client_asks}");
            assert_eq!(h.has(flags::DIGEST), digest, "{what}");
            assert_eq!(h.payload_crc, if digest { crc32c(&body) } else { 0 }, "{what}");
        }
    }
}
