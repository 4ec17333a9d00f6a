//! Transports: what moves frames between two endpoints.
//!
//! A [`Transport`] is one local endpoint with any number of *links* (one per
//! peer): the plain TCP transport ([`tcp`]: a socket per link) and the
//! libfabric transport ([`ofi`]: one reliable-datagram endpoint, a link per
//! address-vector entry). Both take whole frames (header + payload) and hand
//! back whole, checked frames; both are driven by [`Transport::poll`] and
//! never block. The RPC layer ([`crate::rpc`]) sits on top and does not care
//! which one it has: it asks [`Transport::max_frame_payload`] whether large
//! payloads can go in one frame (a stream can), and [`Transport::rma`]
//! whether they can be read by RMA instead.

use std::os::fd::RawFd;

use crate::error::FabricError;
use crate::frame::{BulkDesc, Header, Payload};

pub mod tcp;

#[cfg(feature = "libfabric")]
pub mod ofi;

/// A link (a connection to one peer) of a transport. Ids are not reused
/// while anything may still refer to them.
pub type LinkId = u64;

/// What a transport reports from [`Transport::poll`].
#[derive(Debug)]
pub enum TransportEvent {
    /// A peer connected to us.
    Accepted {
        /// The new link.
        link: LinkId,
    },
    /// A [`Transport::connect`] finished.
    Connected {
        /// The link.
        link: LinkId,
    },
    /// A whole, checked frame arrived.
    Frame {
        /// From whom.
        link: LinkId,
        /// Its header.
        header: Header,
        /// Its payload.
        payload: Payload,
    },
    /// A [`Transport::read_bulk`] finished.
    BulkRead {
        /// The link it read from.
        link: LinkId,
        /// The token given to `read_bulk`.
        token: u64,
        /// The payload, or why it could not be read (boxed, as in
        /// `Closed`: events are moved on every message, errors are rare).
        result: Result<Payload, Box<FabricError>>,
    },
    /// The link is gone; nothing more will arrive on it.
    Closed {
        /// The link.
        link: LinkId,
        /// Why.
        error: Box<FabricError>,
    },
}

/// A handle to a payload exposed for RMA reads ([`Transport::expose`]).
pub type ExposeId = u64;

/// One local endpoint of some transport. See the module docs.
pub trait Transport {
    /// The transport's name: "tcp", or the libfabric provider ("tcp;ofi_rxm", "shm").
    fn name(&self) -> &str;
    /// The address peers connect to, in the form [`Transport::connect`] takes.
    fn local_addr(&self) -> String;
    /// The raw address a peer's transport needs to answer us (sent in hellos).
    fn address_bytes(&self) -> Vec<u8>;
    /// The largest payload one frame may carry (`usize::MAX` on a stream).
    fn max_frame_payload(&self) -> usize;
    /// The largest payload one frame moves by the provider's cheapest
    /// protocol (at most [`Transport::max_frame_payload`], which it is where
    /// there is no such step). The RPC layer cuts larger payloads that go
    /// inline into fragments of this size: a few cheap messages cost less
    /// than one through the provider's protocol for large messages.
    fn eager_payload(&self) -> usize {
        self.max_frame_payload()
    }
    /// Whether payloads can be exposed for, and fetched by, RMA reads.
    fn rma(&self) -> bool;
    /// Whether frames only ever cross this host's memory (shm): no wire or
    /// NIC that could corrupt them, so payload checksums are optional.
    fn host_local(&self) -> bool {
        false
    }

    /// Starts connecting to `addr`; [`TransportEvent::Connected`] or
    /// [`TransportEvent::Closed`] follows.
    fn connect(&mut self, now: u64, addr: &str) -> Result<LinkId, FabricError>;
    /// The peer's address as text.
    fn peer_addr(&self, link: LinkId) -> String;
    /// Queues a frame. Its payload must fit [`Transport::max_frame_payload`].
    /// Frames for a link that failed are dropped (its `Closed` event tells).
    fn send(&mut self, link: LinkId, header: Header, payload: Payload) -> Result<(), FabricError>;
    /// The 32-bit token naming this link in our hellos. (A connectionless
    /// transport learns the peer's token from the peer's hello, and tags
    /// every message to the peer with it.)
    fn token(&self, link: LinkId) -> u32;
    /// Drops a link; queued frames are discarded. No event follows.
    fn close(&mut self, link: LinkId);
    /// Pushes queued frames out (one batched write per link where possible).
    fn flush(&mut self);
    /// Moves things along; returns whether anything happened.
    fn poll(&mut self, now: u64, events: &mut Vec<TransportEvent>) -> bool;
    /// Monotonic ns time of the last bytes received on `link`.
    fn last_rx(&self, link: LinkId) -> u64;

    /// Registers `payload` so that peers can read it; returns its descriptor
    /// (without a checksum) and a handle to take it back.
    fn expose(&mut self, payload: Payload) -> Result<(BulkDesc, ExposeId), FabricError>;
    /// Takes an exposed payload back (peers can no longer read it).
    fn unexpose(&mut self, id: ExposeId) -> Option<Payload>;
    /// Reads a peer's exposed payload; [`TransportEvent::BulkRead`] follows.
    fn read_bulk(&mut self, link: LinkId, desc: &BulkDesc, token: u64) -> Result<(), FabricError>;

    /// An fd that becomes readable when the transport has work, so that a
    /// reactor can sleep; `None` if only polling notices work.
    fn wake_fd(&self) -> Option<RawFd>;
    /// Called before the reactor sleeps on [`Transport::wake_fd`]: false if
    /// work is already pending (do not sleep).
    fn arm(&self) -> bool;
    /// Whether operations are outstanding that only polling will notice.
    fn busy(&self) -> bool;
}

/// libfabric providers `"auto"` tries, best first (all reach other hosts).
pub const AUTO_PREFERENCE: [&str; 2] = ["verbs;ofi_rxm", "tcp;ofi_rxm"];

/// Which transport to open and how: the parameters of `fabric_listen` and
/// of `claudefs fabricperf`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    /// "tcp" (plain sockets, no libfabric), a libfabric provider
    /// ("tcp;ofi_rxm", "shm", "verbs;ofi_rxm", ...), or "auto" (the first of
    /// verbs;ofi_rxm and tcp;ofi_rxm that libfabric offers, else plain tcp).
    pub transport: String,
    /// Where to listen or bind: "IP:PORT" ("IP:0" or "IP": any port) for
    /// socket transports, a name for shm. Absent: no listener (tcp) or the
    /// provider's default.
    #[serde(default)]
    pub address: Option<String>,
    /// Move bulk payloads by RMA when the provider can (else in fragments).
    #[serde(default = "yes")]
    pub rma: bool,
    /// Ask libfabric for a completion-queue wait fd so an idle reactor can sleep.
    #[serde(default = "yes")]
    pub wait_fd: bool,
    /// libfabric: 64 KiB receive buffers kept posted.
    #[serde(default = "default_recv_buffers")]
    pub recv_buffers: usize,
    /// libfabric: operation slots for sends and RMA reads in flight.
    #[serde(default = "default_op_slots")]
    pub op_slots: usize,
}

fn yes() -> bool {
    true
}
fn default_recv_buffers() -> usize {
    64
}
fn default_op_slots() -> usize {
    1024
}

impl TransportConfig {
    /// `transport` at `address` with every default.
    pub fn new(transport: &str, address: Option<&str>) -> Self {
        Self {
            transport: transport.to_string(),
            address: address.map(str::to_string),
            rma: true,
            wait_fd: true,
            recv_buffers: default_recv_buffers(),
            op_slots: default_op_slots(),
        }
    }

    /// The transport `"auto"` stands for here (others stand for themselves).
    pub fn resolve(&self) -> String {
        if self.transport != "auto" {
            return self.transport.clone();
        }
        #[cfg(feature = "libfabric")]
        if let Ok(found) = crate::ofi::providers() {
            for want in AUTO_PREFERENCE {
                if found.iter().any(|(name, _)| name == want) {
                    return want.to_string();
                }
            }
        }
        "tcp".to_string()
    }

    /// Opens the transport; `max_message` bounds what a stream accepts.
    pub fn open(&self, max_message: u32) -> Result<AnyTransport, FabricError> {
        match self.resolve().as_str() {
            "tcp" => Ok(AnyTransport::Tcp(tcp::TcpTransport::new(self.address.as_deref(), max_message)?)),
            #[cfg(feature = "libfabric")]
            provider => Ok(AnyTransport::Ofi(ofi::OfiTransport::open(provider, self)?)),
            #[cfg(not(feature = "libfabric"))]
            provider => Err(FabricError::NoLibfabric(provider.to_string())),
        }
    }
}

/// A transport this host offers (what `fabric_get_transports` lists).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TransportInfo {
    /// The name [`TransportConfig::transport`] takes.
    pub name: String,
    /// "sockets" (plain TCP) or "libfabric".
    pub kind: &'static str,
    /// libfabric's fabric and domain of its first entry (the preferred one).
    pub fabric: Option<String>,
    /// The domain (for tcp: the interface).
    pub domain: Option<String>,
    /// Capabilities.
    pub caps: Vec<&'static str>,
    /// Bulk payloads move by RMA.
    pub rma: bool,
    /// Largest message of the provider.
    pub max_msg_size: u64,
    /// Largest send that completes at once.
    pub inject_size: usize,
    /// How peers are named: "ip:port" or "name" (shm).
    pub addresses: &'static str,
}

/// Every transport this host can open: plain TCP, then each libfabric
/// provider offering reliable-datagram endpoints, in libfabric's order.
#[cfg_attr(not(feature = "libfabric"), allow(unused_mut))]
pub fn available() -> Result<Vec<TransportInfo>, FabricError> {
    let mut out = vec![TransportInfo {
        name: "tcp".into(),
        kind: "sockets",
        fabric: None,
        domain: None,
        caps: vec!["msg"],
        rma: false,
        max_msg_size: u64::from(u32::MAX),
        inject_size: 0,
        addresses: "ip:port",
    }];
    #[cfg(feature = "libfabric")]
    for (name, i) in crate::ofi::providers()? {
        out.push(TransportInfo {
            name,
            kind: "libfabric",
            fabric: Some(i.fabric),
            domain: Some(i.domain),
            caps: i.caps,
            rma: i.rma,
            max_msg_size: i.max_msg_size,
            inject_size: i.inject_size,
            addresses: if i.string_addresses { "name" } else { "ip:port" },
        });
    }
    Ok(out)
}

/// The libfabric library's version, if this build has libfabric.
pub fn libfabric_version() -> Option<String> {
    #[cfg(feature = "libfabric")]
    return Some(crate::ofi::library_version());
    #[cfg(not(feature = "libfabric"))]
    None
}

/// Either transport, dispatched without virtual calls.
// One per endpoint, made once and never moved on a hot path: the size of
// the larger variant costs nothing, and a box would cost an indirection on
// every call.
#[allow(clippy::large_enum_variant)]
pub enum AnyTransport {
    /// Plain TCP.
    Tcp(tcp::TcpTransport),
    /// libfabric.
    #[cfg(feature = "libfabric")]
    Ofi(ofi::OfiTransport),
}

impl std::fmt::Debug for AnyTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} transport at {}", self.name(), self.local_addr())
    }
}

macro_rules! dispatch {
    ($self:ident, $t:ident => $e:expr) => {
        match $self {
            AnyTransport::Tcp($t) => $e,
            #[cfg(feature = "libfabric")]
            AnyTransport::Ofi($t) => $e,
        }
    };
}

impl Transport for AnyTransport {
    fn name(&self) -> &str {
        dispatch!(self, t => t.name())
    }
    fn local_addr(&self) -> String {
        dispatch!(self, t => t.local_addr())
    }
    fn address_bytes(&self) -> Vec<u8> {
        dispatch!(self, t => t.address_bytes())
    }
    fn max_frame_payload(&self) -> usize {
        dispatch!(self, t => t.max_frame_payload())
    }
    fn eager_payload(&self) -> usize {
        dispatch!(self, t => t.eager_payload())
    }
    fn rma(&self) -> bool {
        dispatch!(self, t => t.rma())
    }
    fn host_local(&self) -> bool {
        dispatch!(self, t => t.host_local())
    }
    fn connect(&mut self, now: u64, addr: &str) -> Result<LinkId, FabricError> {
        dispatch!(self, t => t.connect(now, addr))
    }
    fn peer_addr(&self, link: LinkId) -> String {
        dispatch!(self, t => t.peer_addr(link))
    }
    fn send(&mut self, link: LinkId, header: Header, payload: Payload) -> Result<(), FabricError> {
        dispatch!(self, t => t.send(link, header, payload))
    }
    fn token(&self, link: LinkId) -> u32 {
        dispatch!(self, t => t.token(link))
    }
    fn close(&mut self, link: LinkId) {
        dispatch!(self, t => t.close(link))
    }
    fn flush(&mut self) {
        dispatch!(self, t => t.flush())
    }
    fn poll(&mut self, now: u64, events: &mut Vec<TransportEvent>) -> bool {
        dispatch!(self, t => t.poll(now, events))
    }
    fn last_rx(&self, link: LinkId) -> u64 {
        dispatch!(self, t => t.last_rx(link))
    }
    fn expose(&mut self, payload: Payload) -> Result<(BulkDesc, ExposeId), FabricError> {
        dispatch!(self, t => t.expose(payload))
    }
    fn unexpose(&mut self, id: ExposeId) -> Option<Payload> {
        dispatch!(self, t => t.unexpose(id))
    }
    fn read_bulk(&mut self, link: LinkId, desc: &BulkDesc, token: u64) -> Result<(), FabricError> {
        dispatch!(self, t => t.read_bulk(link, desc, token))
    }
    fn wake_fd(&self) -> Option<RawFd> {
        dispatch!(self, t => t.wake_fd())
    }
    fn arm(&self) -> bool {
        dispatch!(self, t => t.arm())
    }
    fn busy(&self) -> bool {
        dispatch!(self, t => t.busy())
    }
}
