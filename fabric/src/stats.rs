//! Counters of endpoints and connections, written by the reactor that owns
//! the endpoint and read by anyone (the control plane's
//! `fabric_get_connections`). Counters are single-writer relaxed atomics (a
//! load and a store, no locked instruction); the connection list and the
//! texts change only when a connection opens, closes or fails, under a
//! mutex nobody holds on the data path.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Connections closed long ago are forgotten beyond this many.
const CLOSED_KEPT: usize = 64;

#[inline]
fn bump(c: &AtomicU64, v: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

/// What a connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum ConnState {
    /// The transport connection is being set up.
    Connecting = 0,
    /// Our hello is out; waiting for the peer's.
    Handshaking = 1,
    /// Accepted; waiting for the peer's hello.
    AwaitingHello = 2,
    /// Requests flow.
    Established = 3,
    /// Failed; the next reconnect attempt waits for its backoff.
    Backoff = 4,
    /// Gone for good.
    Closed = 5,
}

impl ConnState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Connecting,
            1 => Self::Handshaking,
            2 => Self::AwaitingHello,
            3 => Self::Established,
            4 => Self::Backoff,
            _ => Self::Closed,
        }
    }
}

/// The counters of one connection.
#[derive(Debug)]
pub struct ConnStats {
    /// The connection's id on its endpoint.
    pub id: u64,
    /// Whether the peer connected to us.
    pub inbound: bool,
    state: AtomicU8,
    peer_addr: Mutex<String>,
    peer_name: Mutex<String>,
    last_error: Mutex<Option<String>>,
    pub(crate) bytes_tx: AtomicU64,
    pub(crate) bytes_rx: AtomicU64,
    pub(crate) frames_tx: AtomicU64,
    pub(crate) frames_rx: AtomicU64,
    pub(crate) requests_tx: AtomicU64,
    pub(crate) requests_rx: AtomicU64,
    pub(crate) bulk_tx: AtomicU64,
    pub(crate) bulk_rx: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) in_flight: AtomicU64,
}

impl ConnStats {
    pub(crate) fn new(id: u64, inbound: bool, peer_addr: String) -> Self {
        Self {
            id,
            inbound,
            state: AtomicU8::new(ConnState::Connecting as u8),
            peer_addr: Mutex::new(peer_addr),
            peer_name: Mutex::new(String::new()),
            last_error: Mutex::new(None),
            bytes_tx: AtomicU64::new(0),
            bytes_rx: AtomicU64::new(0),
            frames_tx: AtomicU64::new(0),
            frames_rx: AtomicU64::new(0),
            requests_tx: AtomicU64::new(0),
            requests_rx: AtomicU64::new(0),
            bulk_tx: AtomicU64::new(0),
            bulk_rx: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(crate) fn add(c: &AtomicU64, v: u64) {
        bump(c, v);
    }

    pub(crate) fn set_in_flight(&self, v: usize) {
        self.in_flight.store(v as u64, Ordering::Relaxed);
    }

    pub(crate) fn set_state(&self, s: ConnState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    pub(crate) fn set_peer(&self, name: &str, addr: &str) {
        *self.peer_name.lock().unwrap_or_else(|p| p.into_inner()) = name.to_string();
        if !addr.is_empty() {
            *self.peer_addr.lock().unwrap_or_else(|p| p.into_inner()) = addr.to_string();
        }
    }

    pub(crate) fn set_error(&self, e: &str) {
        bump(&self.errors, 1);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    /// The connection's state.
    pub fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// A copy of everything, for reports.
    pub fn snapshot(&self) -> ConnSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConnSnapshot {
            id: self.id,
            direction: if self.inbound { "inbound" } else { "outbound" },
            state: self.state(),
            peer_addr: self.peer_addr.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            peer_name: self.peer_name.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            bytes_sent: r(&self.bytes_tx),
            bytes_received: r(&self.bytes_rx),
            frames_sent: r(&self.frames_tx),
            frames_received: r(&self.frames_rx),
            requests_sent: r(&self.requests_tx),
            requests_received: r(&self.requests_rx),
            bulk_sent: r(&self.bulk_tx),
            bulk_received: r(&self.bulk_rx),
            requests_in_flight: r(&self.in_flight),
            errors: r(&self.errors),
            timeouts: r(&self.timeouts),
            reconnects: r(&self.reconnects),
            last_error: self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// One connection at one moment (what `fabric_get_connections` lists).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnSnapshot {
    /// Id on its endpoint.
    pub id: u64,
    /// "inbound" (the peer connected) or "outbound".
    pub direction: &'static str,
    /// State.
    pub state: ConnState,
    /// The peer's transport address.
    pub peer_addr: String,
    /// The peer's node name (from its hello).
    pub peer_name: String,
    /// Bytes sent (frames and bulk payloads).
    pub bytes_sent: u64,
    /// Bytes received (frames and bulk payloads).
    pub bytes_received: u64,
    /// Frames sent.
    pub frames_sent: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Requests sent.
    pub requests_sent: u64,
    /// Requests received.
    pub requests_received: u64,
    /// Bulk payloads exposed to the peer.
    pub bulk_sent: u64,
    /// Bulk payloads read from the peer.
    pub bulk_received: u64,
    /// Our requests waiting for an answer.
    pub requests_in_flight: u64,
    /// Failures of this connection (protocol errors, losses, timeouts).
    pub errors: u64,
    /// Calls that timed out.
    pub timeouts: u64,
    /// Times it was re-established.
    pub reconnects: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// An endpoint's identity and its connections.
#[derive(Debug)]
pub struct EndpointStats {
    /// Transport name ("tcp", "tcp;ofi_rxm", "shm").
    pub transport: String,
    /// Address peers connect to.
    pub local_addr: String,
    conns: Mutex<Vec<Arc<ConnStats>>>,
}

impl EndpointStats {
    pub(crate) fn new(transport: String, local_addr: String) -> Self {
        Self { transport, local_addr, conns: Mutex::new(Vec::new()) }
    }

    pub(crate) fn register(&self, c: Arc<ConnStats>) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let closed = conns.iter().filter(|c| c.state() == ConnState::Closed).count();
        if closed >= CLOSED_KEPT
            && let Some(i) = conns.iter().position(|c| c.state() == ConnState::Closed)
        {
            conns.remove(i);
        }
        conns.push(c);
    }

    /// Every connection, open or recently closed.
    pub fn connections(&self) -> Vec<ConnSnapshot> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|c| c.snapshot()).collect()
    }
}
