//! Message RPC over any [`Transport`]: connections with a handshake,
//! requests matched to responses, credits, timeouts, cancellation, bulk
//! payloads, keepalive and reconnection.
//!
//! An [`Rpc`] is one local endpoint. It is a state machine that owns no
//! thread and no clock: [`Rpc::poll`] advances it at time `now` and returns
//! [`Event`]s — requests to serve, completions of calls made, connections
//! coming and going. Calls are submitted with [`Rpc::call`], which returns at
//! once; each call completes exactly once, through a [`Completion`] from a
//! later `poll`. A server answers each [`Request`] with [`Rpc::respond`],
//! now or later. [`crate::reactor::attach`] drives an `Rpc` from a reactor.
//!
//! # Flow control
//!
//! Each side grants the other a number of *credits* in its hello: requests
//! it accepts at once. A request uses one; the response gives it back (its
//! header's `credits` field). Calls without a credit wait, in order, in the
//! connection's queue (up to [`RpcOptions::max_queued`]; beyond that
//! [`Rpc::call`] fails with [`FabricError::Backpressure`]). A peer that sends
//! more requests than it was granted breaks the protocol and is disconnected.
//!
//! # Large payloads
//!
//! Payloads of [`BULK_THRESHOLD`] bytes or more are *bulk*: on a transport
//! with RMA the sender registers the buffer and sends a descriptor, the
//! receiver reads it with one RMA read and acknowledges with `BulkDone`, so
//! the bytes cross once, without copies through receive buffers. On a stream
//! (TCP) they go inline in one frame; on a message transport without RMA they
//! are cut into 64 KiB fragments. Bulk payloads are checksummed only when
//! either side asks ([`RpcOptions::bulk_digest`]: file data is protected end
//! to end above this layer). Other payloads are, except on a host-local
//! transport ([`Transport::host_local`]: shm, where they cross no wire),
//! unless either side asks ([`RpcOptions::local_digest`]). Headers always are.
//!
//! Smaller payloads go in one frame, except those just over the transport's
//! eager size ([`Transport::eager_payload`]: shm's inject size, rxm's eager
//! limit over tcp), which go as a few fragments of that size: cheaper than
//! one message through the provider's protocol for large ones.

mod conn;
mod inbound;

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::error::FabricError;
use crate::frame::{self, BULK_THRESHOLD, Header, Opcode, Payload, RemoteError, flags};
use crate::slab::Slab;
use crate::stats::{ConnState, ConnStats, EndpointStats};
use crate::transport::{AnyTransport, ExposeId, LinkId, Transport, TransportEvent};

pub use pmd::PollStatus;

/// A connection of an [`Rpc`] endpoint. It keeps its id across reconnects.
pub type ConnId = u64;
/// A call made with [`Rpc::call`].
pub type CallId = u64;

/// Options of an RPC endpoint (parameters of `fabric_listen` too).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RpcOptions {
    /// This node's name, sent to peers in the hello.
    pub name: String,
    /// Requests a peer may have outstanding with us at once (1 to
    /// [`MAX_CREDITS`]).
    pub credits: u16,
    /// Largest payload accepted (bytes).
    pub max_message: u32,
    /// Default deadline of a call (ms).
    pub request_timeout_ms: u64,
    /// Silence after which a connection is probed with a ping (ms).
    pub keepalive_interval_ms: u64,
    /// Silence after which a connection is declared dead (ms).
    pub keepalive_timeout_ms: u64,
    /// Time allowed for connecting and the hello exchange (ms).
    pub handshake_timeout_ms: u64,
    /// Reconnect attempts after an outbound connection fails (0: none).
    pub reconnect_attempts: u32,
    /// First wait before reconnecting (ms); doubles per attempt.
    pub reconnect_backoff_ms: u64,
    /// Longest wait between reconnect attempts (ms).
    pub reconnect_backoff_max_ms: u64,
    /// Checksum bulk payloads too (both sides must agree to skip it).
    pub bulk_digest: bool,
    /// Checksum payloads on a host-local transport (shm) too, where they
    /// cross only this host's memory (both sides must agree to skip it).
    pub local_digest: bool,
    /// Calls that may wait for credits per connection.
    pub max_queued: usize,
    /// How often a sleeping reactor wakes to check deadlines (ms): the
    /// resolution of timeouts while idle. (A transport without a wake fd is
    /// also polled this often, at least every millisecond.)
    pub timer_ms: u64,
}

impl Default for RpcOptions {
    fn default() -> Self {
        Self {
            name: "claudefs".into(),
            credits: 128,
            max_message: 16 << 20,
            request_timeout_ms: 30_000,
            keepalive_interval_ms: 1_000,
            keepalive_timeout_ms: 10_000,
            handshake_timeout_ms: 5_000,
            reconnect_attempts: 5,
            reconnect_backoff_ms: 100,
            reconnect_backoff_max_ms: 5_000,
            bulk_digest: false,
            local_digest: false,
            max_queued: 65_536,
            timer_ms: 10,
        }
    }
}

impl RpcOptions {
    fn check(&self) -> Result<(), FabricError> {
        let bad = |option, reason: &str| Err(FabricError::Config { option, reason: reason.to_string() });
        if self.credits == 0 || self.credits > MAX_CREDITS {
            return bad("credits", &format!("must be from 1 to {MAX_CREDITS}"));
        }
        if self.name.len() > frame::MAX_NAME {
            return bad("name", "must be at most 255 bytes");
        }
        if self.keepalive_timeout_ms <= self.keepalive_interval_ms {
            return bad("keepalive_timeout_ms", "must be longer than keepalive_interval_ms");
        }
        if self.keepalive_interval_ms == 0
            || self.handshake_timeout_ms == 0
            || self.request_timeout_ms == 0
            || self.timer_ms == 0
        {
            return bad("timeouts", "must be above 0 ms");
        }
        Ok(())
    }
}

/// Who is on the other end of an established connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its node name.
    pub name: String,
    /// Its transport address.
    pub addr: String,
    /// Random per process: changes when the peer restarts.
    pub incarnation: u64,
    /// Largest payload it accepts.
    pub max_message: u32,
    /// It serves RMA reads of its bulk payloads.
    pub rma: bool,
    /// It wants bulk payloads checksummed.
    pub bulk_digest: bool,
    /// It wants payloads checksummed on a host-local transport.
    pub local_digest: bool,
}

/// A request to serve. Answer it with [`Rpc::respond`] (exactly once).
#[derive(Debug)]
pub struct Request {
    /// The connection it came on.
    pub conn: ConnId,
    /// Its id (unique among the connection's outstanding requests).
    pub id: u64,
    /// The service method.
    pub method: u16,
    /// Its payload.
    pub payload: Payload,
}

/// How a call ended.
#[derive(Debug)]
pub struct Completion {
    /// The call.
    pub call: CallId,
    /// The tag given to [`Rpc::call`].
    pub tag: u64,
    /// The response payload, or why there is none.
    pub result: Result<Payload, Box<FabricError>>,
}

/// What [`Rpc::poll`] reports.
#[derive(Debug)]
pub enum Event {
    /// A connection is established (again).
    Connected {
        /// The connection.
        conn: ConnId,
        /// The peer.
        peer: PeerInfo,
    },
    /// A connection failed or closed. Its outstanding calls completed with
    /// errors; queued calls wait if it is `reconnecting`.
    Disconnected {
        /// The connection.
        conn: ConnId,
        /// Why.
        error: FabricError,
        /// An attempt to reconnect is scheduled.
        reconnecting: bool,
    },
    /// A request to serve.
    Request(Request),
    /// The peer gave up on a request it sent us (it still expects a response
    /// to return the credit, but will ignore its content).
    Cancelled {
        /// The connection.
        conn: ConnId,
        /// The request id.
        id: u64,
    },
    /// A call finished.
    Completion(Completion),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    /// Waiting for a credit or for the connection.
    Queued,
    /// On the wire; the response completes it.
    Sent,
    /// Completed to the caller (timeout, cancel), but the peer still owes a
    /// response (which returns the credit).
    Abandoned,
}

struct Call {
    conn: ConnId,
    tag: u64,
    method: u16,
    timeout_ms: u64,
    payload: Option<Payload>,
    state: CallState,
}

/// A bulk payload being read from a peer.
struct BulkIn {
    conn: ConnId,
    header: Header,
    data_crc: Option<u32>,
}

/// A payload arriving in fragments.
struct Partial {
    header: Header,
    /// The bytes up to the furthest fragment yet (gaps zeroed).
    bytes: Vec<u8>,
    total: u64,
    /// The byte ranges received, sorted, adjacent ones merged: one range
    /// while fragments come in order.
    ranges: Vec<(u64, u64)>,
}

impl Partial {
    /// Records the piece `start..end`; false if it overlaps one received before.
    fn add_range(&mut self, start: u64, end: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.1 <= start);
        if self.ranges.get(i).is_some_and(|r| r.0 < end) {
            return false;
        }
        let joins_prev = i > 0 && self.ranges[i - 1].1 == start;
        let joins_next = self.ranges.get(i).is_some_and(|r| r.0 == end);
        match (joins_prev, joins_next) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 = end,
            (false, true) => self.ranges[i].0 = start,
            (false, false) => self.ranges.insert(i, (start, end)),
        }
        true
    }

    fn complete(&self) -> bool {
        self.ranges == [(0, self.total)]
    }
}

struct Outbound {
    addr: String,
    attempts: u32,
    retry_at: u64,
}

struct Conn {
    link: Option<LinkId>,
    outbound: Option<Outbound>,
    state: ConnState,
    /// When the current state began.
    since: u64,
    peer: Option<PeerInfo>,
    send_credits: u32,
    queue: VecDeque<CallId>,
    /// Our calls on the wire (sent, not answered) on this connection.
    in_flight: usize,
    /// Requests from the peer not answered yet (at most our credits).
    served: Outstanding,
    /// Our bulk payloads the peer may read: (request id, is response) -> handle.
    exposed: HashMap<(u64, bool), ExposeId, BuildHasherDefault<IdHasher>>,
    /// Fragmented payloads being reassembled: (request id, is response).
    partial: HashMap<(u64, bool), Partial, BuildHasherDefault<IdHasher>>,
    ping_sent: Option<u64>,
    stats: Arc<ConnStats>,
}

impl Conn {
    fn peer_text(&self) -> String {
        match (&self.peer, &self.outbound) {
            (Some(p), _) if !p.name.is_empty() => format!("{} ({})", p.name, p.addr),
            (Some(p), _) => p.addr.clone(),
            (None, Some(o)) => o.addr.clone(),
            (None, None) => self.stats.snapshot().peer_addr,
        }
    }

    fn set_state(&mut self, s: ConnState, now: u64) {
        self.state = s;
        self.since = now;
        self.stats.set_state(s);
    }
}

/// An RPC endpoint over transport `T`. See the module docs.
pub struct Rpc<T: Transport = AnyTransport> {
    t: T,
    opts: RpcOptions,
    /// Whether we checksum payloads below the bulk size whatever the peer
    /// asks: off a host-local transport, or when the options ask.
    inline_digest: bool,
    incarnation: u64,
    conns: Slab<Conn>,
    by_link: LinkMap,
    calls: Slab<Call>,
    /// Call deadlines, one FIFO per distinct timeout: calls with the same
    /// timeout expire in the order they were made, so each FIFO is sorted,
    /// and entries of answered calls leave from its front as it is checked.
    deadlines: Vec<(u64, VecDeque<(u64, CallId)>)>,
    bulk_in: Slab<BulkIn>,
    events: Vec<Event>,
    /// The batch of `events` being handed over (kept for its capacity).
    handing: Vec<Event>,
    tevents: Vec<TransportEvent>,
    next_check: u64,
    next_expire: u64,
    /// The latest `now` seen (for work started without one, like a response).
    now: u64,
    stats: Arc<EndpointStats>,
}

impl<T: Transport> std::fmt::Debug for Rpc<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rpc")
            .field("transport", &self.t.name())
            .field("local", &self.t.local_addr())
            .field("conns", &self.conns.len())
            .field("calls", &self.calls.len())
            .finish()
    }
}

/// Payloads above the transport's eager size ([`Transport::eager_payload`])
/// and up to this many eager messages' worth of bytes (header included: shm
/// up to 16 KiB, tcp;ofi_rxm up to 63.5 KiB) go as eager fragments; larger
/// ones in one frame. Measured on shm: 4 KiB moves in 1.1 µs as two
/// fragments against 2.8 µs as one frame, 16 KiB in 2.8 against 4.2 µs;
/// with more fragments the gain shrinks, and it reverses where cache lines
/// move slowly between the cores (16 KiB: 7.1 against 6.4 µs), since each
/// fragment's bytes cross through the shared region twice and a
/// cross-process copy's once. On tcp;ofi_rxm, fragments beat the rendezvous
/// at every inline size.
const EAGER_FRAGMENTS: usize = 4;

/// Most credits an endpoint grants: the requests a connection is serving
/// are searched one by one.
pub const MAX_CREDITS: u16 = 4096;

/// The ids of requests being served on one connection: at most the credits
/// granted, and usually a handful, so a vector searched from the end (the
/// newest first) beats a hash set's insert and remove on every request.
#[derive(Default)]
struct Outstanding(Vec<u64>);

impl Outstanding {
    /// Adds `id`; false if it is already there.
    fn insert(&mut self, id: u64) -> bool {
        if self.contains(id) {
            return false;
        }
        self.0.push(id);
        true
    }

    fn contains(&self, id: u64) -> bool {
        self.0.iter().rev().any(|&x| x == id)
    }

    /// Removes `id`; false if it was not there.
    fn remove(&mut self, id: u64) -> bool {
        match self.0.iter().rposition(|&x| x == id) {
            Some(i) => {
                self.0.swap_remove(i);
                true
            }
            None => false,
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Hashes ids (slab keys, already spread) with one multiplication. Request
/// ids come from the peer, but the set of them is bounded by the credits it
/// was granted.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

/// Queues one frame on `c`'s link (none while it has no link) and counts it.
fn put_frame(t: &mut impl Transport, c: &Conn, header: Header, payload: Payload) -> Result<(), FabricError> {
    let Some(link) = c.link else { return Ok(()) };
    ConnStats::add(&c.stats.frames_tx, 1);
    ConnStats::add(&c.stats.bytes_tx, (frame::HEADER_LEN + payload.len()) as u64);
    t.send(link, header, payload)
}

/// The connection of each transport link, with the last one looked up kept
/// aside: frames mostly come in runs from one peer, and a hash lookup on
/// every frame is a few nanoseconds of each round trip.
#[derive(Default)]
struct LinkMap {
    map: HashMap<LinkId, ConnId, BuildHasherDefault<IdHasher>>,
    last: Cell<Option<(LinkId, ConnId)>>,
}

impl LinkMap {
    fn get(&self, link: LinkId) -> Option<ConnId> {
        if let Some((l, conn)) = self.last.get()
            && l == link
        {
            return Some(conn);
        }
        let conn = *self.map.get(&link)?;
        self.last.set(Some((link, conn)));
        Some(conn)
    }

    fn insert(&mut self, link: LinkId, conn: ConnId) {
        self.map.insert(link, conn);
        self.last.set(Some((link, conn)));
    }

    fn remove(&mut self, link: LinkId) {
        self.map.remove(&link);
        if self.last.get().is_some_and(|(l, _)| l == link) {
            self.last.set(None);
        }
    }
}

/// How often connections are checked for keepalive, handshake and reconnect deadlines (ns).
const CHECK_PERIOD_NS: u64 = 1_000_000;
/// How often call deadlines are checked (ns): timeouts are in milliseconds,
/// and a busy endpoint should not look at its deadlines on every poll.
const EXPIRE_PERIOD_NS: u64 = 100_000;

fn ms(v: u64) -> u64 {
    v.saturating_mul(1_000_000)
}

impl<T: Transport> Rpc<T> {
    /// An endpoint on transport `t`.
    pub fn new(t: T, opts: RpcOptions) -> Result<Self, FabricError> {
        opts.check()?;
        let stats = Arc::new(EndpointStats::new(t.name().to_string(), t.local_addr()));
        Ok(Self {
            inline_digest: !t.host_local() || opts.local_digest,
            t,
            opts,
            incarnation: fastrand::u64(1..),
            conns: Slab::default(),
            by_link: LinkMap::default(),
            calls: Slab::default(),
            deadlines: Vec::new(),
            bulk_in: Slab::default(),
            events: Vec::new(),
            handing: Vec::new(),
            tevents: Vec::new(),
            next_check: 0,
            next_expire: 0,
            now: 0,
            stats,
        })
    }

    /// The transport's name ("tcp", "tcp;ofi_rxm", ...).
    pub fn transport_name(&self) -> &str {
        self.t.name()
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.t
    }

    /// The options in force.
    pub fn options(&self) -> &RpcOptions {
        &self.opts
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> String {
        self.t.local_addr()
    }

    /// Counters of this endpoint and its connections, readable from any thread.
    pub fn stats(&self) -> &Arc<EndpointStats> {
        &self.stats
    }

    /// The peer of an established connection.
    pub fn peer(&self, conn: ConnId) -> Option<&PeerInfo> {
        self.conns.get(conn).and_then(|c| c.peer.as_ref())
    }

    /// A connection's state (`None`: no such connection, or closed for good).
    pub fn state(&self, conn: ConnId) -> Option<ConnState> {
        self.conns.get(conn).map(|c| c.state)
    }

    /// Calls made and not completed yet.
    pub fn outstanding(&self) -> usize {
        self.calls.iter().filter(|(_, c)| c.state != CallState::Abandoned).count()
    }

    /// Requests received and not answered yet, on all connections.
    pub fn serving(&self) -> usize {
        self.conns.iter().map(|(_, c)| c.served.len()).sum()
    }

    /// Opens a connection to `addr`; [`Event::Connected`] follows (or
    /// [`Event::Disconnected`]). Calls may be made at once: they wait for it.
    pub fn connect(&mut self, now: u64, addr: &str) -> Result<ConnId, FabricError> {
        self.now = now;
        let link = self.t.connect(now, addr)?;
        let conn = self.add_conn(Some(link), false, self.t.peer_addr(link), now);
        let c = self.conns.get_mut(conn).expect("just added");
        c.outbound = Some(Outbound { addr: addr.to_string(), attempts: 0, retry_at: 0 });
        Ok(conn)
    }

    fn add_conn(&mut self, link: Option<LinkId>, inbound: bool, peer_addr: String, now: u64) -> ConnId {
        let stats_ref = &self.stats;
        let conn = self.conns.insert_with(|id| {
            let stats = Arc::new(ConnStats::new(id, inbound, peer_addr));
            stats_ref.register(stats.clone());
            let state = if inbound { ConnState::AwaitingHello } else { ConnState::Connecting };
            stats.set_state(state);
            Conn {
                link,
                outbound: None,
                state,
                since: now,
                peer: None,
                send_credits: 0,
                queue: VecDeque::new(),
                in_flight: 0,
                served: Outstanding::default(),
                exposed: HashMap::default(),
                partial: HashMap::default(),
                ping_sent: None,
                stats,
            }
        });
        if let Some(l) = link {
            self.by_link.insert(l, conn);
        }
        conn
    }

    /// Calls `method` on `conn` with `payload`, with the default timeout.
    /// Returns at once; a [`Completion`] carrying `tag` follows.
    pub fn call(
        &mut self,
        now: u64,
        conn: ConnId,
        method: u16,
        payload: Payload,
        tag: u64,
    ) -> Result<CallId, FabricError> {
        self.call_timeout(now, conn, method, payload, tag, self.opts.request_timeout_ms)
    }

    /// [`Rpc::call`] with a deadline of `timeout_ms` from `now`.
    pub fn call_timeout(
        &mut self,
        now: u64,
        conn: ConnId,
        method: u16,
        payload: Payload,
        tag: u64,
        timeout_ms: u64,
    ) -> Result<CallId, FabricError> {
        self.now = now;
        let max_queued = self.opts.max_queued;
        let c = self.conns.get(conn).ok_or(FabricError::UnknownConnection(conn as u32))?;
        if let Some(p) = &c.peer
            && payload.len() > p.max_message as usize
        {
            return Err(FabricError::TooLarge { peer: c.peer_text(), len: payload.len(), max: p.max_message });
        }
        if c.queue.len() >= max_queued {
            return Err(FabricError::Backpressure { peer: c.peer_text(), queued: c.queue.len(), limit: max_queued });
        }
        // Nothing waits ahead of it and a credit is there: straight out, not through the queue.
        let direct = c.queue.is_empty() && c.state == ConnState::Established && c.send_credits > 0;
        let deadline = now.saturating_add(ms(timeout_ms));
        let (payload, queued) = if direct { (Some(payload), None) } else { (None, Some(payload)) };
        let id = self.calls.insert(Call { conn, tag, method, timeout_ms, payload: queued, state: CallState::Queued });
        match self.deadlines.iter_mut().find(|(t, _)| *t == timeout_ms) {
            Some((_, q)) => q.push_back((deadline, id)),
            None => self.deadlines.push((timeout_ms, VecDeque::from([(deadline, id)]))),
        }
        match payload {
            Some(payload) => self.send_call(conn, id, payload),
            None => {
                self.conns.get_mut(conn).expect("checked above").queue.push_back(id);
                self.pump(conn);
            }
        }
        Ok(id)
    }

    /// Cancels a call: it completes with [`FabricError::Cancelled`] (at the
    /// next poll) and the peer is told. Returns false if it already completed.
    pub fn cancel(&mut self, call: CallId) -> bool {
        let Some(c) = self.calls.get(call) else { return false };
        let peer = self.conns.get(c.conn).map_or_else(String::new, |x| x.peer_text());
        self.abandon(call, FabricError::Cancelled { peer, request_id: call })
    }

    /// Completes a call with `error` now; the peer is told if it has the request.
    fn abandon(&mut self, call: CallId, error: FabricError) -> bool {
        let Some(c) = self.calls.get_mut(call) else { return false };
        let (conn, tag) = (c.conn, c.tag);
        match c.state {
            CallState::Abandoned => return false,
            CallState::Queued => {
                self.calls.remove(call);
                if let Some(x) = self.conns.get_mut(conn) {
                    x.queue.retain(|&q| q != call);
                }
            }
            CallState::Sent => {
                c.state = CallState::Abandoned;
                self.send_frame(conn, Header::new(Opcode::Cancel, call), Payload::empty());
            }
        }
        self.events.push(Event::Completion(Completion { call, tag, result: Err(Box::new(error)) }));
        true
    }

    /// Answers a request (exactly once). `Err` from the service becomes an
    /// error response. Fails if the request is unknown (answered already, or
    /// its connection is gone).
    pub fn respond(
        &mut self,
        conn: ConnId,
        id: u64,
        method: u16,
        result: Result<Payload, RemoteError>,
    ) -> Result<(), FabricError> {
        let c = self.conns.get_mut(conn).ok_or(FabricError::UnknownConnection(conn as u32))?;
        if !c.served.remove(id) {
            return Err(FabricError::Violation {
                peer: c.peer_text(),
                reason: format!("respond() to request {id}, which is not outstanding"),
            });
        }
        let max = c.peer.as_ref().map_or(u32::MAX, |p| p.max_message) as usize;
        let (payload, extra) = match result {
            Ok(p) if p.len() > max => {
                let e = RemoteError {
                    code: -libc::EMSGSIZE,
                    message: format!("response of {} bytes exceeds the peer's maximum {max}", p.len()),
                };
                (Payload::from(e.encode()), flags::ERROR)
            }
            Ok(p) => (p, 0),
            Err(e) => (Payload::from(e.encode()), flags::ERROR),
        };
        let header = Header::new(Opcode::Response, id).method(method).credits(1).flag(extra);
        self.send_message(conn, header, payload);
        Ok(())
    }

    /// Closes a connection: the peer is told, calls on it fail, no reconnect.
    pub fn close(&mut self, now: u64, conn: ConnId) {
        if self.conns.get(conn).is_some_and(|c| c.state == ConnState::Established) {
            self.send_frame(conn, Header::new(Opcode::Goodbye, 0), Payload::empty());
            self.t.flush();
        }
        if let Some(c) = self.conns.get_mut(conn) {
            c.outbound = None;
            let error = FabricError::ConnectionLost { peer: c.peer_text(), reason: "closed locally".into() };
            self.lose(now, conn, error);
        }
    }

    /// Pushes queued frames out now (for callers of [`Rpc::poll`] that answer
    /// its events afterwards; [`Rpc::poll_with`] does it after its handler).
    pub fn flush(&mut self) {
        self.t.flush();
    }

    /// Whether events wait for the next poll.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Advances the endpoint to `now`: expires calls, checks connections,
    /// reads the transport, writes. Appends what happened to `out`.
    pub fn poll(&mut self, now: u64, out: &mut Vec<Event>) -> PollStatus {
        self.poll_with(now, |_, _, ev| out.push(ev))
    }

    /// [`Rpc::poll`], handing each event to `handler` as soon as it happens
    /// (with this endpoint, so that it can answer, call or close, and `now`).
    /// A request's answer then leaves before the frames read with it are
    /// looked at, and deadlines and connection checks are done before the
    /// transport is read rather than between a request and its answer.
    pub fn poll_with(&mut self, now: u64, mut handler: impl FnMut(&mut Self, u64, Event)) -> PollStatus {
        self.now = now;
        if now >= self.next_expire {
            self.next_expire = now + EXPIRE_PERIOD_NS;
            self.expire_calls(now);
        }
        if now >= self.next_check {
            self.next_check = now + CHECK_PERIOD_NS;
            self.check_conns(now);
        }
        let mut busy = self.hand_over(now, &mut handler);
        let mut tevents = std::mem::take(&mut self.tevents);
        busy |= self.t.poll(now, &mut tevents);
        for ev in tevents.drain(..) {
            self.on_transport(now, ev);
            self.hand_over(now, &mut handler);
        }
        self.tevents = tevents;
        self.t.flush();
        if busy {
            PollStatus::Busy
        } else if self.t.busy() || (self.t.wake_fd().is_none() && !self.is_quiet()) {
            // Nothing can wake a sleeping reactor for this transport: keep
            // polling while a peer owes us anything or we owe it.
            PollStatus::Waiting
        } else {
            PollStatus::Idle
        }
    }

    /// Hands the events queued so far to `handler` (and those it queues in
    /// turn); false if there were none.
    #[inline(always)]
    fn hand_over(&mut self, now: u64, handler: &mut impl FnMut(&mut Self, u64, Event)) -> bool {
        let any = !self.events.is_empty();
        while !self.events.is_empty() {
            if self.events.len() == 1 {
                let ev = self.events.pop().expect("one event");
                handler(self, now, ev);
                continue;
            }
            let mut batch = std::mem::replace(&mut self.events, std::mem::take(&mut self.handing));
            for ev in batch.drain(..) {
                handler(self, now, ev);
            }
            self.handing = batch;
        }
        any
    }

    /// Whether the reactor may sleep (see [`pmd::WakeSource::arm`]).
    pub(crate) fn may_sleep(&self) -> bool {
        self.events.is_empty() && self.t.arm()
    }

    /// The transport's wake fd.
    pub(crate) fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        self.t.wake_fd()
    }

    fn expire_calls(&mut self, now: u64) {
        let mut expired = Vec::new();
        for (_, q) in &mut self.deadlines {
            while let Some(&(deadline, call)) = q.front() {
                match self.calls.get(call) {
                    // Answered already: just drop the entry.
                    None => {}
                    Some(c) if c.state == CallState::Abandoned => {}
                    Some(_) if deadline > now => break,
                    Some(_) => expired.push(call),
                }
                q.pop_front();
            }
        }
        for call in expired {
            let Some(c) = self.calls.get(call) else { continue };
            let (conn, method, timeout_ms) = (c.conn, c.method, c.timeout_ms);
            let peer = match self.conns.get(conn) {
                Some(x) => {
                    ConnStats::add(&x.stats.timeouts, 1);
                    x.peer_text()
                }
                None => String::new(),
            };
            self.abandon(call, FabricError::TimedOut { peer, request_id: call, method, ms: timeout_ms });
        }
    }

    /// Sends queued calls while the connection is up and credits last.
    fn pump(&mut self, conn: ConnId) {
        loop {
            let Some(c) = self.conns.get_mut(conn) else { return };
            if c.state != ConnState::Established || c.send_credits == 0 {
                return;
            }
            let Some(call) = c.queue.pop_front() else { return };
            let max = c.peer.as_ref().map_or(u32::MAX, |p| p.max_message);
            let Some(k) = self.calls.get_mut(call) else { continue };
            let payload = k.payload.take().unwrap_or_default();
            if payload.len() > max as usize {
                let (tag, peer) = (k.tag, c.peer_text());
                self.calls.remove(call);
                let error = FabricError::TooLarge { peer, len: payload.len(), max };
                self.events.push(Event::Completion(Completion { call, tag, result: Err(Box::new(error)) }));
                continue;
            }
            self.send_call(conn, call, payload);
        }
    }

    /// Puts a call on the wire, taking one of the connection's credits.
    fn send_call(&mut self, conn: ConnId, call: CallId, payload: Payload) {
        let (Some(c), Some(k)) = (self.conns.get_mut(conn), self.calls.get_mut(call)) else { return };
        k.state = CallState::Sent;
        c.send_credits -= 1;
        c.in_flight += 1;
        ConnStats::add(&c.stats.requests_tx, 1);
        c.stats.set_in_flight(c.in_flight);
        let header = Header::new(Opcode::Request, call).method(k.method);
        self.send_message(conn, header, payload);
    }

    /// Sends one request or response, choosing how its payload travels:
    /// inline, by RMA, or in fragments.
    fn send_message(&mut self, conn: ConnId, header: Header, payload: Payload) {
        let Some(c) = self.conns.get(conn) else { return };
        let len = payload.len();
        let bulk = len >= BULK_THRESHOLD;
        let digest = match bulk {
            true => self.opts.bulk_digest || c.peer.as_ref().is_some_and(|p| p.bulk_digest),
            false => self.inline_digest || c.peer.as_ref().is_some_and(|p| p.local_digest),
        };
        let (eager, max) = (self.t.eager_payload(), self.t.max_frame_payload());
        let eager_fragments =
            len > eager && len <= max && len <= EAGER_FRAGMENTS.saturating_mul(eager.saturating_add(frame::HEADER_LEN));
        if len <= max && !eager_fragments {
            // One frame: sent from here rather than through send_frame, which would look the connection up again.
            let header = header.payload_with(&payload, digest);
            if let Err(e) = put_frame(&mut self.t, c, header, payload) {
                self.lose(self.now, conn, e);
            }
            return;
        }
        let is_response = header.opcode == Opcode::Response;
        if len > max && self.t.rma() && c.peer.as_ref().is_some_and(|p| p.rma) {
            let crc = digest.then(|| frame::crc32c(&payload));
            match self.t.expose(payload) {
                Ok((mut desc, handle)) => {
                    desc.data_crc = crc;
                    let c = self.conns.get_mut(conn).expect("checked above");
                    if let Some(old) = c.exposed.insert((header.request_id, is_response), handle) {
                        self.t.unexpose(old);
                    }
                    ConnStats::add(&c.stats.bulk_tx, 1);
                    ConnStats::add(&c.stats.bytes_tx, len as u64);
                    let d = desc.encode();
                    return self.send_frame(conn, header.flag(flags::BULK).payload(&d), Payload::copy_from(&d));
                }
                Err(e) => return self.lose(self.now, conn, e),
            }
        }
        let bytes = match payload {
            Payload::Heap(v) => v,
            Payload::Dma(b) => b.to_vec(),
        };
        // Eager fragments, or (without RMA) fragments of whole frames.
        let frame_payload = if eager_fragments { eager } else { max };
        self.send_fragments_of(conn, header, bytes, digest, frame_payload);
    }

    /// Sends `bytes` as fragments with payloads of `frame_payload` bytes at
    /// most, every one saying where it goes; only the first carries the
    /// header's credits.
    fn send_fragments_of(&mut self, conn: ConnId, header: Header, bytes: Vec<u8>, digest: bool, frame_payload: usize) {
        let chunk = frame_payload - frame::FRAGMENT_PREFIX;
        let total = bytes.len() as u64;
        for (i, piece) in bytes.chunks(chunk).enumerate() {
            let prefix = frame::Fragment { offset: (i * chunk) as u64, total }.encode();
            let mut p = Vec::with_capacity(prefix.len() + piece.len());
            p.extend_from_slice(&prefix);
            p.extend_from_slice(piece);
            let mut h = header.flag(flags::FRAGMENT);
            if i > 0 {
                h = h.credits(0);
            }
            self.send_frame(conn, h.payload_with(&p, digest), Payload::from(p));
        }
    }

    /// Queues one frame on the connection's link; a transport error fails the connection.
    fn send_frame(&mut self, conn: ConnId, header: Header, payload: Payload) {
        let Some(c) = self.conns.get(conn) else { return };
        if let Err(e) = put_frame(&mut self.t, c, header, payload) {
            self.lose(self.now, conn, e);
        }
    }

    fn on_transport(&mut self, now: u64, ev: TransportEvent) {
        match ev {
            TransportEvent::Accepted { link } => {
                let addr = self.t.peer_addr(link);
                let conn = self.add_conn(Some(link), true, addr, now);
                tracing::debug!(conn, transport = self.t.name(), "accepted a connection");
            }
            TransportEvent::Connected { link } => {
                if let Some(conn) = self.by_link.get(link) {
                    self.send_hello(now, conn, Opcode::Hello);
                }
            }
            TransportEvent::Frame { link, header, payload } => {
                if let Some(conn) = self.by_link.get(link) {
                    self.on_frame(now, conn, header, payload);
                }
            }
            TransportEvent::BulkRead { link, token, result } => {
                if self.by_link.get(link).is_some() {
                    self.on_bulk_read(now, token, result.map_err(|e| *e));
                }
            }
            TransportEvent::Closed { link, error } => {
                if let Some(conn) = self.by_link.get(link) {
                    self.lose(now, conn, *error);
                }
            }
        }
    }
}

impl<T: Transport> Rpc<T> {
    /// The connections and their states, for reports.
    pub fn connections(&self) -> Vec<(ConnId, ConnState)> {
        self.conns.iter().map(|(k, c)| (k, c.state)).collect()
    }

    /// Whether nothing is outstanding: no calls, no requests being served,
    /// no bulk payloads being read or waiting to be read.
    pub fn is_quiet(&self) -> bool {
        self.calls.len() == 0
            && self.bulk_in.len() == 0
            && self.conns.iter().all(|(_, c)| c.served.is_empty() && c.exposed.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_ranges_merge_and_refuse_overlaps() {
        let mut p =
            Partial { header: Header::new(Opcode::Request, 1), bytes: Vec::new(), total: 40, ranges: Vec::new() };
        assert!(p.add_range(0, 10) && p.add_range(10, 20), "in order");
        assert_eq!(p.ranges, [(0, 20)], "one range while in order");
        assert!(p.add_range(30, 40) && p.add_range(25, 30), "out of order, joining the next");
        assert_eq!(p.ranges, [(0, 20), (25, 40)]);
        assert!(!p.add_range(15, 25), "overlaps the first");
        assert!(!p.add_range(20, 26), "overlaps the second");
        assert!(!p.add_range(0, 5), "a duplicate");
        assert!(!p.complete());
        assert!(p.add_range(20, 25), "fills the gap, joining both");
        assert_eq!(p.ranges, [(0, 40)]);
        assert!(p.complete());
    }

    #[test]
    fn options_out_of_range_are_refused_by_name() {
        let with = |credits| RpcOptions { credits, ..Default::default() }.check();
        for credits in [0, MAX_CREDITS + 1] {
            match with(credits) {
                Err(FabricError::Config { option, reason }) => {
                    assert_eq!(option, "credits");
                    assert!(reason.contains("4096"), "{reason}");
                }
                other => panic!("credits {credits}: {other:?}"),
            }
        }
        assert!(with(1).is_ok() && with(MAX_CREDITS).is_ok());
        let long = RpcOptions { name: "n".repeat(256), ..Default::default() };
        assert!(matches!(long.check(), Err(FabricError::Config { option: "name", .. })));
    }

    #[test]
    fn a_removed_link_is_not_found_through_the_one_kept_aside() {
        let mut m = LinkMap::default();
        m.insert(10, 1);
        m.insert(20, 2);
        assert_eq!((m.get(10), m.get(20), m.get(10)), (Some(1), Some(2), Some(1)));
        m.remove(10);
        assert_eq!(m.get(10), None, "the last link looked up was removed");
        assert_eq!(m.get(20), Some(2));
        m.remove(30);
        assert_eq!(m.get(20), Some(2));
    }

    #[test]
    fn outstanding_ids_are_a_set() {
        let mut o = Outstanding::default();
        assert!(o.insert(3) && o.insert(9) && o.insert(4));
        assert!(!o.insert(9), "a duplicate is refused");
        assert!(o.remove(9) && !o.remove(9));
        assert!(o.contains(3) && o.contains(4) && !o.contains(9));
        assert_eq!(o.len(), 2);
        o.clear();
        assert!(o.is_empty());
    }
}
