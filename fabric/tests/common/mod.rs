//! Shared harness: endpoints of every transport on loopback, stepped on one
//! thread with the real clock (the transports are real: sockets, libfabric).

#![allow(dead_code)]

use std::time::{Duration, Instant};

use fabric::frame::{HEADER_LEN, Header, Hello, Opcode, Payload};
use fabric::rpc::{CallId, Completion, ConnId, Event, Rpc, RpcOptions};
use fabric::transport::TransportConfig;

/// A transport to test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Ofi(&'static str),
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Tcp => write!(f, "tcp"),
            Kind::Ofi(p) => write!(f, "{p}"),
        }
    }
}

/// Every transport this machine can run: plain TCP, tcp;ofi_rxm and shm
/// always (libfabric-dev is a build dependency), verbs;ofi_rxm where an
/// RDMA device exists (skipped with a message otherwise).
pub fn kinds() -> Vec<Kind> {
    let mut v = vec![Kind::Tcp, Kind::Ofi("tcp;ofi_rxm"), Kind::Ofi("shm")];
    let verbs = fabric::ofi::providers().unwrap_or_default().iter().any(|(n, _)| n == "verbs;ofi_rxm");
    if verbs {
        v.push(Kind::Ofi("verbs;ofi_rxm"));
    } else {
        eprintln!("skipping verbs;ofi_rxm: libfabric offers no verbs provider here (no RDMA device)");
    }
    // FABRIC_TEST_KINDS=shm,tcp narrows a run down while debugging.
    if let Ok(only) = std::env::var("FABRIC_TEST_KINDS") {
        v.retain(|k| only.split(',').any(|o| o == k.to_string()));
    }
    v
}

/// The kinds whose survivors a killed peer cannot stall: all but shm.
/// libfabric 1.17's shm guards each endpoint's receive queue with a
/// process-shared spinlock that senders take; a sender killed while holding
/// it leaves the receiver spinning inside `fi_cq_read` for good (observed
/// here about one kill in five; docs/fabric.md). Nothing outside libfabric
/// can release that lock, so shm is for processes that end cleanly, and the
/// killed-peer tests run on the others.
pub fn kinds_surviving_a_killed_peer() -> Vec<Kind> {
    let mut v = kinds();
    v.retain(|k| *k != Kind::Ofi("shm"));
    v
}

/// Sends the crate's logs to the test output (RUST_LOG picks the level).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_test_writer().with_ansi(false).with_env_filter(filter).try_init();
}

pub fn now() -> u64 {
    pmd::clock::now()
}

/// Where a server of `kind` listens: any port on loopback, or a fresh shm name.
pub fn listen_addr(kind: Kind) -> String {
    match kind {
        Kind::Ofi("shm") => fabric::transport::ofi::unique_shm_name(),
        _ => "127.0.0.1:0".into(),
    }
}

/// An endpoint of `kind`; listening on `listen` if given (clients bind to loopback).
pub fn endpoint_with(kind: Kind, listen: Option<&str>, opts: RpcOptions, rma: bool) -> Rpc {
    let (name, address) = match (kind, listen) {
        (Kind::Tcp, l) => ("tcp".to_string(), l.map(str::to_string)),
        (Kind::Ofi(p), Some(a)) => (p.to_string(), Some(a.to_string())),
        (Kind::Ofi("shm"), None) => ("shm".to_string(), None),
        (Kind::Ofi(p), None) => (p.to_string(), Some("127.0.0.1".to_string())),
    };
    let mut cfg = TransportConfig::new(&name, address.as_deref());
    cfg.rma = rma;
    let t = cfg.open(opts.max_message).unwrap();
    Rpc::new(t, opts).unwrap()
}

pub fn endpoint(kind: Kind, listen: Option<&str>, opts: RpcOptions) -> Rpc {
    endpoint_with(kind, listen, opts, true)
}

/// A server answering with `serve` and a client connected to it.
pub struct Pair {
    pub kind: Kind,
    pub server: Rpc,
    pub client: Rpc,
    pub conn: ConnId,
    pub done: Vec<Completion>,
    pub client_events: Vec<Event>,
    pub server_events: Vec<Event>,
    /// Requests the server holds instead of answering (when `hold` is set).
    pub held: Vec<fabric::rpc::Request>,
    pub hold: bool,
    pub max_held: usize,
}

impl Pair {
    pub fn new(kind: Kind, server_opts: RpcOptions, client_opts: RpcOptions) -> Pair {
        Self::with_rma(kind, server_opts, client_opts, true)
    }

    pub fn with_rma(kind: Kind, server_opts: RpcOptions, client_opts: RpcOptions, rma: bool) -> Pair {
        init_logs();
        let server = endpoint_with(kind, Some(&listen_addr(kind)), server_opts, rma);
        let mut client = endpoint_with(kind, None, client_opts, rma);
        let conn = client.connect(now(), &server.local_addr()).unwrap();
        let mut p = Pair {
            kind,
            server,
            client,
            conn,
            done: Vec::new(),
            client_events: Vec::new(),
            server_events: Vec::new(),
            held: Vec::new(),
            hold: false,
            max_held: 0,
        };
        p.run_until(Duration::from_secs(10), |p| p.client.peer(p.conn).is_some());
        p
    }

    /// One round: server (echo, or hold), then client.
    pub fn step(&mut self) {
        let mut events = Vec::new();
        self.server.poll(now(), &mut events);
        for ev in events {
            match ev {
                Event::Request(r) if self.hold => {
                    self.held.push(r);
                    self.max_held = self.max_held.max(self.held.len());
                }
                Event::Request(r) => {
                    // Fails only if the connection died meanwhile; the test sees that elsewhere.
                    let _ = self.server.respond(r.conn, r.id, r.method, Ok(r.payload));
                }
                other => self.server_events.push(other),
            }
        }
        self.server.flush();
        let mut events = Vec::new();
        self.client.poll(now(), &mut events);
        for ev in events {
            match ev {
                Event::Completion(c) => self.done.push(c),
                other => self.client_events.push(other),
            }
        }
    }

    /// Steps until `cond` holds; panics after `limit`.
    pub fn run_until(&mut self, limit: Duration, mut cond: impl FnMut(&mut Pair) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            assert!(start.elapsed() < limit, "{}: condition not met within {limit:?}", self.kind);
            self.step();
        }
    }

    pub fn call(&mut self, payload: Payload, tag: u64) -> CallId {
        self.client.call(now(), self.conn, 1, payload, tag).unwrap()
    }

    /// Answers the held requests with their own payloads.
    pub fn release(&mut self) {
        for r in std::mem::take(&mut self.held) {
            let _ = self.server.respond(r.conn, r.id, r.method, Ok(r.payload));
        }
    }
}

/// Log lines written while `f` runs on this thread.
pub fn capture_logs<R>(f: impl FnOnce() -> R) -> (R, String) {
    use std::sync::{Arc, Mutex};
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink(Arc::new(Mutex::new(Vec::new())));
    let s = sink.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || s.clone()).with_ansi(false).finish();
    let r = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
    (r, text)
}

/// A valid hello, as a client would open with (hello `flags`: `frame::HELLO_*`).
pub fn hello(addr: Vec<u8>, token: u32, flags: u32) -> Vec<u8> {
    let h = Hello { max_message: 1 << 20, flags, incarnation: 9, token, name: "raw".into(), addr };
    let payload = h.encode().unwrap();
    let mut frame = Header::new(Opcode::Hello, 0).credits(4).payload(&payload).encode().to_vec();
    frame.extend_from_slice(&payload);
    frame
}

/// Keeps the pair's client busy: a new echo whenever the last one finished.
pub fn keep_serving(p: &mut Pair, served: &mut usize) {
    p.step();
    for c in p.done.drain(..) {
        assert_eq!(&c.result.unwrap()[..], &c.tag.to_le_bytes(), "{}: the good client is served", p.kind);
        *served += 1;
    }
    if p.client.outstanding() == 0 {
        let tag = *served as u64;
        p.call(Payload::copy_from(&tag.to_le_bytes()), tag);
    }
}

/// A raw libfabric endpoint, to send what a well-behaved transport never
/// would and to see frames as they arrive.
pub struct Raw {
    pub ep: fabric::ofi::Endpoint,
    dest: u64,
    buf: Box<[u8]>,
}

impl Raw {
    pub fn new(provider: &str, server: &str) -> Raw {
        use fabric::ofi::{EndpointOptions, InfoList, Query};
        let node = (provider != "shm").then_some("127.0.0.1");
        let q = Query { provider: Some(provider), node, service: None, rma: false };
        let list = InfoList::get(&q).unwrap().unwrap();
        let mut ep =
            fabric::ofi::Endpoint::open(list, EndpointOptions { cq_size: 64, slots: 8, wait_fd: false }).unwrap();
        let raw = match server.parse::<std::net::SocketAddr>() {
            Ok(sa) => {
                let std::net::IpAddr::V4(ip) = sa.ip() else { panic!("IPv4 loopback expected") };
                let mut b = (libc::AF_INET as u16).to_ne_bytes().to_vec();
                b.extend_from_slice(&sa.port().to_be_bytes());
                b.extend_from_slice(&ip.octets());
                b.extend_from_slice(&[0u8; 8]);
                b
            }
            Err(_) => format!("{server}\0").into_bytes(),
        };
        let dest = ep.av_insert(&raw).unwrap();
        let mut buf = vec![0u8; 65536].into_boxed_slice();
        // SAFETY: the buffer lives in the returned Raw, which drops the endpoint first.
        unsafe { ep.post_recv(0, buf.as_mut_ptr(), buf.len()) }.unwrap();
        Raw { ep, dest, buf }
    }

    /// Sends `bytes` with remote CQ data `token`, stepping `p` until the provider takes it.
    pub fn send(&mut self, p: &mut Pair, bytes: &[u8], token: u32, served: &mut usize) {
        let start = Instant::now();
        while !self.ep.inject(bytes, self.dest, token).unwrap_or(false) {
            let mut v = Vec::new();
            let _ = self.ep.cq_read(&mut v);
            keep_serving(p, served);
            assert!(start.elapsed() < Duration::from_secs(10), "the provider never took the message");
        }
    }

    /// The next frame that arrives (header and payload), stepping `p` meanwhile.
    pub fn next_frame(&mut self, p: &mut Pair, served: &mut usize) -> (Header, Vec<u8>) {
        let start = Instant::now();
        loop {
            let mut v = Vec::new();
            let _ = self.ep.cq_read(&mut v);
            if let Some(c) = v.first() {
                let frame = self.buf[..c.len].to_vec();
                // SAFETY: as in `new`.
                unsafe { self.ep.post_recv(0, self.buf.as_mut_ptr(), self.buf.len()) }.unwrap();
                let h = Header::decode(&frame, 1 << 20).unwrap();
                return (h, frame[HEADER_LEN..].to_vec());
            }
            keep_serving(p, served);
            assert!(start.elapsed() < Duration::from_secs(10), "no frame arrived");
        }
    }

    /// Waits for the server's hello-ack and returns the token it gave us.
    pub fn hello_ack_token(&mut self, p: &mut Pair, served: &mut usize) -> u32 {
        let (h, payload) = self.next_frame(p, served);
        assert_eq!(h.opcode, Opcode::HelloAck);
        Hello::decode(&payload).unwrap().token
    }
}
