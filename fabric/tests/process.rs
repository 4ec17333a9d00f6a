//! A peer in a process of its own (`fabric-echo`), killed with SIGKILL in
//! the middle of transfers, and restarted.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Kind, endpoint, kinds_surviving_a_killed_peer, now};
use fabric::FabricError;
use fabric::frame::Payload;
use fabric::rpc::{Event, Rpc, RpcOptions};
use fabric::stats::ConnState;

struct Echo {
    child: Child,
    addr: String,
}

impl Echo {
    fn start(kind: Kind, address: &str) -> Echo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fabric-echo"))
            .arg(kind.to_string())
            .arg(address)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "{kind}: fabric-echo printed no address (see its stderr)");
        Echo { child, addr: line.trim().to_string() }
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        // What a killed shm endpoint leaves behind (a no-op for other kinds).
        fabric::transport::ofi::remove_shm_regions(&self.addr);
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        fabric::transport::ofi::remove_shm_regions(&self.addr);
    }
}

fn fast_failure_detection() -> RpcOptions {
    RpcOptions {
        keepalive_interval_ms: 100,
        keepalive_timeout_ms: 1_500,
        handshake_timeout_ms: 2_000,
        ..Default::default()
    }
}

fn listen(kind: Kind) -> String {
    match kind {
        Kind::Ofi("shm") => common::listen_addr(kind),
        _ => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        }
    }
}

#[test]
fn a_peer_killed_mid_transfer_fails_every_pending_call_and_nothing_hangs() {
    common::init_logs();
    for kind in kinds_surviving_a_killed_peer() {
        let mut echo = Echo::start(kind, &listen(kind));
        let opts = RpcOptions { reconnect_attempts: 0, ..fast_failure_detection() };
        let mut client: Rpc = endpoint(kind, None, opts);
        let conn = client.connect(now(), &echo.addr).unwrap();
        let n = 200u64;
        for tag in 0..n {
            let len = if tag % 4 == 0 { 4 << 20 } else { 1000 + tag as usize };
            client.call(now(), conn, 1, Payload::from(vec![tag as u8; len]), tag).unwrap();
        }
        let (mut ok, mut failed, mut events) = (0, Vec::new(), Vec::new());
        let start = Instant::now();
        let mut killed = false;
        while ok + failed.len() < n as usize {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{kind}: calls still pending: {} of {n} done",
                ok + failed.len()
            );
            client.poll(now(), &mut events);
            for e in events.drain(..) {
                if let Event::Completion(c) = e {
                    match c.result {
                        Ok(p) => {
                            assert!(p.iter().all(|&b| b == c.tag as u8), "{kind}: echo #{} intact", c.tag);
                            ok += 1;
                        }
                        Err(e) => failed.push(e),
                    }
                }
            }
            if !killed && ok >= 10 {
                echo.kill();
                killed = true;
            }
        }
        assert!(killed, "{kind}: the peer was killed mid-transfer");
        assert!(!failed.is_empty(), "{kind}: {ok} calls succeeded, none failed: the kill came too late");
        for e in &failed {
            assert!(
                matches!(
                    **e,
                    FabricError::ConnectionLost { .. } | FabricError::KeepaliveTimeout { .. } | FabricError::Ofi { .. }
                ),
                "{kind}: a pending call failed with {e}"
            );
        }
        assert_eq!(client.state(conn), None, "{kind}: the connection is closed for good");
        assert_eq!(client.stats().connections()[0].state, ConnState::Closed);
        eprintln!("{kind}: {ok} calls answered before the kill, {} failed: {}", failed.len(), failed[0]);
    }
}

#[test]
fn a_client_reconnects_to_a_restarted_server_process() {
    common::init_logs();
    for kind in kinds_surviving_a_killed_peer() {
        let address = listen(kind);
        let mut echo = Echo::start(kind, &address);
        let opts = RpcOptions {
            reconnect_attempts: 100,
            reconnect_backoff_ms: 50,
            reconnect_backoff_max_ms: 200,
            ..fast_failure_detection()
        };
        let mut client: Rpc = endpoint(kind, None, opts);
        let conn = client.connect(now(), &echo.addr).unwrap();
        let mut events = Vec::new();
        let mut wait_for = |client: &mut Rpc, tag: u64| {
            let start = Instant::now();
            loop {
                assert!(start.elapsed() < Duration::from_secs(30), "{kind}: call {tag} not answered");
                client.poll(now(), &mut events);
                for e in events.drain(..) {
                    if let Event::Completion(c) = e
                        && c.tag == tag
                    {
                        return c.result;
                    }
                }
            }
        };
        client.call(now(), conn, 1, Payload::copy_from(b"before"), 1).unwrap();
        assert_eq!(&wait_for(&mut client, 1).unwrap()[..], b"before");
        let first = client.peer(conn).unwrap().incarnation;
        echo.kill();
        // Calls on the wire when the peer dies fail; one made after the client
        // noticed waits for the reconnection.
        let start = Instant::now();
        let mut lost = Vec::new();
        while client.state(conn) == Some(ConnState::Established) {
            assert!(start.elapsed() < Duration::from_secs(10), "{kind}: the death was not noticed");
            client.poll(now(), &mut lost);
        }
        assert!(lost.iter().any(|e| matches!(e, Event::Disconnected { reconnecting: true, .. })), "{kind}: {lost:?}");
        let restarted = Echo::start(kind, &address);
        assert_eq!(restarted.addr, echo.addr, "{kind}: the new server has the old address");
        client.call(now(), conn, 1, Payload::copy_from(b"after"), 2).unwrap();
        assert_eq!(&wait_for(&mut client, 2).unwrap()[..], b"after", "{kind}");
        assert_ne!(client.peer(conn).unwrap().incarnation, first, "{kind}: answered by the new process");
        assert!(client.stats().connections()[0].reconnects >= 1);
    }
}
