//! The libfabric transport: one reliable-datagram (`FI_EP_RDM`) endpoint of a
//! chosen provider (`verbs;ofi_rxm`, `tcp;ofi_rxm`, `shm`, ...).
//!
//! An RDM endpoint has no connections: a peer is an address-vector entry, and
//! every posted receive buffer takes a message from anyone. A *link* here is
//! one peer: its `fi_addr_t`, and the 32-bit token it gave us in its hello.
//! Every message carries, as remote CQ data, the token the *receiver* gave the
//! link, which is how a receive completion names its link (`FI_SOURCE` is not
//! used: shm in libfabric 1.17 reports a wrong source for senders it does not
//! know). A message with no token (0) opens a link and must be a hello, whose
//! payload carries the sender's address; anything else from an unknown sender
//! is dropped with a warning.
//!
//! Frames fit one 64 KiB receive buffer (header + up to [`MAX_INLINE`]
//! bytes); larger payloads are exposed for RMA reads ([`Transport::expose`],
//! [`Transport::read_bulk`]) or fragmented by the RPC layer. Sends up to the
//! provider's inject size are copied out at once (`fi_injectdata`); larger
//! ones keep their header and payload in an operation slot until their
//! completion. A send the provider refuses for now (`-FI_EAGAIN`, e.g. while
//! rxm sets up its connection) waits in the link's queue, in order, and is
//! retried after a wait that doubles while the provider keeps refusing
//! (1 µs up to `MAX_RETRY_NS`): to a peer that is gone, every attempt of
//! rxm is a new TCP connect, which must not happen on every poll.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;

use pmd::DmaBuf;

use super::{ExposeId, LinkId, Transport, TransportConfig, TransportEvent};
use crate::error::FabricError;
use crate::frame::{BulkDesc, FrameError, HEADER_LEN, Header, Hello, MAX_INLINE, Opcode, Payload};
use crate::ofi::{self, Access, EndpointOptions, InfoList, Query};
use crate::slab::Slab;

/// Bytes of one receive buffer: the largest inline frame.
const RECV_LEN: usize = HEADER_LEN + MAX_INLINE;
/// Longest wait before a refused send is tried again.
const MAX_RETRY_NS: u64 = 1_000_000;
/// Received payloads up to this many bytes are copied into a buffer
/// allocated ahead, or kept from a payload sent by inject
/// ([`OfiTransport::spare`]).
const SPARE_LEN: usize = 256;
/// Buffers kept allocated ahead.
const SPARES: usize = 16;

/// The largest message (header included) `provider` sends by its cheapest
/// protocol, if it has a more costly one above it:
///
/// - shm copies a message up to its inject size through the shared region
///   at once; a larger one is fetched by the receiver with a cross-process
///   copy (a system call, and a message back to the sender), about 2 µs more.
/// - rxm over tcp sends a message up to its buffer size
///   (`FI_OFI_RXM_BUFFER_SIZE`, 16 KiB by default) eagerly; a larger one by
///   rendezvous, about 17 µs more. Some libfabric versions take rxm's own
///   packet header out of that buffer: [`RXM_HEADER_ROOM`] is left for it.
/// - rxm over verbs is left to its own protocols: its rendezvous is one
///   RDMA read, and no RDMA device here could show fragments to be cheaper.
///
/// `rxm_buffer` is the `FI_OFI_RXM_BUFFER_SIZE` setting, if any.
fn eager_message(provider: &str, inject_size: usize, rxm_buffer: Option<&str>) -> Option<usize> {
    if provider == "shm" {
        return Some(inject_size);
    }
    if provider == "tcp;ofi_rxm" {
        let configured = rxm_buffer.and_then(|v| v.trim().parse::<usize>().ok());
        return Some(configured.unwrap_or(RXM_BUFFER_SIZE).saturating_sub(RXM_HEADER_ROOM));
    }
    None
}

/// rxm's default buffer size: its eager limit.
const RXM_BUFFER_SIZE: usize = 16 * 1024;
/// Room left in rxm's buffer for its packet header (under 128 bytes in every version).
const RXM_HEADER_ROOM: usize = 128;

/// A received payload's bytes in a buffer of `spare` if it is small and one
/// is left, else in a new allocation.
fn small_payload(spare: &mut Vec<Vec<u8>>, body: &[u8]) -> Payload {
    if !body.is_empty()
        && body.len() <= SPARE_LEN
        && let Some(mut v) = spare.pop()
    {
        v.extend_from_slice(body);
        return Payload::Heap(v);
    }
    Payload::copy_from(body)
}

enum Op {
    Send { link: LinkId, payload: Payload },
    Read { link: LinkId, token: u64, buf: DmaBuf, desc: BulkDesc, posted: bool },
}

struct Link {
    fi_addr: u64,
    addr: Vec<u8>,
    text: String,
    /// The token the peer gave this link (0 until its hello arrives).
    peer_token: u32,
    /// Frames the provider could not take yet, in order.
    queue: VecDeque<(Header, Payload)>,
    /// When to try the queue again, and the wait before that (0: the provider took the last frame).
    retry_at: u64,
    retry_ns: u64,
    last_rx: u64,
}

impl Link {
    /// What a send to it needs: the link, the peer's address and its token.
    fn to(&self, link: LinkId) -> (LinkId, u64, u32) {
        (link, self.fi_addr, self.peer_token)
    }

    /// The provider refused a send at `now`: wait twice as long as last time before the next try.
    fn refused(&mut self, now: u64) {
        self.retry_ns = (self.retry_ns * 2).clamp(1_000, MAX_RETRY_NS);
        self.retry_at = now + self.retry_ns;
    }
}

/// The libfabric transport. See the module docs.
pub struct OfiTransport {
    // Dropped first: closing the endpoint ends every operation that uses the buffers below.
    ep: ofi::Endpoint,
    recv: Vec<DmaBuf>,
    ops: Vec<Option<Op>>,
    /// Header bytes of the send in each op slot (stable while the send is in flight).
    headers: Box<[[u8; HEADER_LEN]]>,
    free_ops: Vec<usize>,
    links: Slab<Link>,
    by_addr: HashMap<Vec<u8>, LinkId>,
    exposed: Slab<(Payload, usize)>,
    pending: Vec<TransportEvent>,
    /// Links with queued frames.
    backlog: Vec<LinkId>,
    /// Receive buffers read and not posted again yet: they are posted at the
    /// start of the next poll, so that an answer to what they held leaves first.
    repost: Vec<usize>,
    /// Buffers for small received payloads, so that no allocation stands
    /// between a message's arrival and its answer: those of payloads sent by
    /// inject (an echoed request, a call made with a response's payload
    /// need no new one), topped up with new ones at the start of a poll.
    spare: Vec<Vec<u8>>,
    /// Op slots of reads the provider refused for now.
    reads_waiting: VecDeque<usize>,
    completions: Vec<ofi::Completion>,
    /// Where an inject's frame is put together (inject_size bytes).
    scratch: Vec<u8>,
    provider: String,
    local: String,
    rma: bool,
    inject_size: usize,
    /// [`Transport::eager_payload`].
    eager: usize,
    in_flight: usize,
    rejected: u64,
    /// The time of the last poll.
    now: u64,
}

impl std::fmt::Debug for OfiTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfiTransport").field("provider", &self.provider).field("local", &self.local).finish()
    }
}

/// A shm endpoint name no other process on this host has used: process id,
/// start time and a counter.
pub fn unique_shm_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("cfs-{}-{nanos:x}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Removes the shared-memory regions a shm endpoint named `name` left in
/// `/dev/shm` (a process killed before it closed its endpoint leaves them).
/// Only for names whose process is known to be gone.
pub fn remove_shm_regions(name: &str) {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else { return };
    let prefix = format!("{name}:");
    for entry in dir.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Splits "IP:PORT", "IP" or a name into fi_getinfo's node and service.
fn node_service(bind: &str) -> (Option<&str>, Option<&str>) {
    if let Ok(sa) = bind.parse::<SocketAddr>() {
        let node = bind.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or(bind);
        let service = if sa.port() == 0 { None } else { bind.rsplit_once(':').map(|(_, p)| p) };
        return (Some(node), service);
    }
    (Some(bind), None)
}

/// A `struct sockaddr_in`/`sockaddr_in6` as libfabric's socket providers take it.
fn sockaddr_bytes(sa: SocketAddr) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    match sa.ip() {
        IpAddr::V4(ip) => {
            b.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            b.extend_from_slice(&sa.port().to_be_bytes());
            b.extend_from_slice(&ip.octets());
            b.extend_from_slice(&[0u8; 8]);
        }
        IpAddr::V6(ip) => {
            b.extend_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            b.extend_from_slice(&sa.port().to_be_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&ip.octets());
            b.extend_from_slice(&0u32.to_ne_bytes());
        }
    }
    b
}

/// The inverse of [`sockaddr_bytes`].
fn sockaddr_text(b: &[u8]) -> Option<String> {
    let family = u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    let ip: IpAddr = match i32::from(family) {
        libc::AF_INET => Ipv4Addr::from(<[u8; 4]>::try_from(b.get(4..8)?).ok()?).into(),
        libc::AF_INET6 => Ipv6Addr::from(<[u8; 16]>::try_from(b.get(8..24)?).ok()?).into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port).to_string())
}

impl OfiTransport {
    /// Opens an endpoint of `provider`, bound to `cfg.address` if given.
    pub fn open(provider: &str, cfg: &TransportConfig) -> Result<Self, FabricError> {
        let opts = cfg;
        // An unnamed shm endpoint gets a name of its own: libfabric's default
        // is the process id, and a region a killed process left under the
        // same (reused) id would be taken over, locks and all.
        let generated = (provider == "shm" && opts.address.is_none()).then(unique_shm_name);
        let address = opts.address.as_deref().or(generated.as_deref());
        let (node, service) = address.map_or((None, None), node_service);
        let query = |rma| Query { provider: Some(provider), node, service, rma };
        let no_match = |reason: String| FabricError::NoProvider { wanted: provider.to_string(), reason };
        let list = match opts.rma {
            true => match InfoList::get(&query(true))? {
                Some(l) => Some(l),
                None => InfoList::get(&query(false))?,
            },
            false => InfoList::get(&query(false))?,
        };
        let list = list.ok_or_else(|| {
            no_match(format!(
                "fi_getinfo offers no reliable-datagram endpoint with messages and remote CQ data{} (see `fi_info -l`)",
                opts.address.as_deref().map(|b| format!(" bound to {b:?}")).unwrap_or_default()
            ))
        })?;
        let recv_buffers = opts.recv_buffers.max(1);
        let slots = recv_buffers + opts.op_slots.max(1);
        let ep = ofi::Endpoint::open(list, EndpointOptions { cq_size: slots.max(128), slots, wait_fd: opts.wait_fd })?;
        let provider = ep.provider();
        let local = if ep.string_addresses() {
            String::from_utf8_lossy(ep.name()).trim_end_matches('\0').to_string()
        } else {
            sockaddr_text(ep.name()).unwrap_or_else(|| ep.addr_string(ep.name()))
        };
        let rxm_buffer = std::env::var("FI_OFI_RXM_BUFFER_SIZE").ok();
        let eager = eager_message(&provider, ep.inject_size(), rxm_buffer.as_deref())
            .map_or(MAX_INLINE, |m| m.saturating_sub(HEADER_LEN).clamp(crate::frame::FRAGMENT_PREFIX + 1, MAX_INLINE));
        let mut t = Self {
            rma: opts.rma && ep.rma(),
            inject_size: ep.inject_size(),
            eager,
            recv: Vec::with_capacity(recv_buffers),
            ops: (0..slots).map(|_| None).collect(),
            headers: vec![[0u8; HEADER_LEN]; slots].into_boxed_slice(),
            free_ops: (recv_buffers..slots).rev().collect(),
            links: Slab::default(),
            by_addr: HashMap::new(),
            exposed: Slab::default(),
            pending: Vec::new(),
            backlog: Vec::new(),
            repost: Vec::with_capacity(recv_buffers),
            spare: Vec::with_capacity(SPARES),
            reads_waiting: VecDeque::new(),
            completions: Vec::with_capacity(64),
            scratch: vec![0; ep.inject_size()],
            provider,
            local,
            in_flight: 0,
            rejected: 0,
            now: 0,
            ep,
        };
        for slot in 0..recv_buffers {
            let buf =
                DmaBuf::new(RECV_LEN).map_err(|e| FabricError::Memory { len: RECV_LEN, reason: e.to_string() })?;
            t.recv.push(buf);
            t.post_recv(slot)?;
        }
        tracing::debug!(provider = %t.provider, local = %t.local, rma = t.rma, inject = t.inject_size, "libfabric endpoint open");
        Ok(t)
    }

    /// Frames dropped because they came from no known peer and were no hello.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    fn post_recv(&mut self, slot: usize) -> Result<(), FabricError> {
        let buf = &mut self.recv[slot];
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        // SAFETY: the buffer lives in self.recv until the endpoint (dropped first) is closed,
        // and is not touched until this slot's completion is read.
        unsafe { self.ep.post_recv(slot, ptr, len) }
    }

    fn peer_text(&self, addr: &[u8]) -> String {
        if self.ep.string_addresses() {
            String::from_utf8_lossy(addr).trim_end_matches('\0').to_string()
        } else {
            sockaddr_text(addr).unwrap_or_else(|| self.ep.addr_string(addr))
        }
    }

    fn add_link(&mut self, addr: &[u8], now: u64) -> Result<LinkId, FabricError> {
        let fi_addr = self.ep.av_insert(addr)?;
        let text = self.peer_text(addr);
        let link = self.links.insert(Link {
            fi_addr,
            addr: addr.to_vec(),
            text,
            peer_token: 0,
            queue: VecDeque::new(),
            retry_at: 0,
            retry_ns: 0,
            last_rx: now,
        });
        if Slab::<Link>::short(link).is_none() {
            self.drop_link(link);
            return Err(FabricError::Config {
                option: "links",
                reason: "more than 65536 peers on one endpoint".into(),
            });
        }
        self.by_addr.insert(addr.to_vec(), link);
        Ok(link)
    }

    fn drop_link(&mut self, link: LinkId) -> Option<Link> {
        let l = self.links.remove(link)?;
        self.by_addr.remove(&l.addr);
        self.ep.av_remove(l.fi_addr);
        Some(l)
    }

    fn fail(&mut self, link: LinkId, error: FabricError, events: &mut Vec<TransportEvent>) {
        if self.drop_link(link).is_some() {
            events.push(TransportEvent::Closed { link, error: Box::new(error) });
        }
    }

    /// Tries to hand one frame to the provider: `Ok(Some(frame))` if it must wait.
    /// `dest` and `token` are the link's address and its peer's token.
    fn try_send(
        &mut self,
        (link, dest, token): (LinkId, u64, u32),
        header: Header,
        payload: Payload,
    ) -> Result<Option<(Header, Payload)>, FabricError> {
        let total = HEADER_LEN + payload.len();
        if total <= self.inject_size {
            let msg = &mut self.scratch[..total];
            header.encode_into(msg);
            msg[HEADER_LEN..].copy_from_slice(&payload);
            if !self.ep.inject(msg, dest, token)? {
                return Ok(Some((header, payload)));
            }
            // The provider copied it: the buffer can hold a received payload next.
            if let Payload::Heap(mut v) = payload
                && (SPARE_LEN..=4 * SPARE_LEN).contains(&v.capacity())
                && self.spare.len() < SPARES
            {
                v.clear();
                self.spare.push(v);
            }
            return Ok(None);
        }
        let Some(slot) = self.free_ops.pop() else { return Ok(Some((header, payload))) };
        header.encode_into(&mut self.headers[slot]);
        let op = self.ops[slot].insert(Op::Send { link, payload });
        let Op::Send { payload, .. } = op else { unreachable!("just inserted a send") };
        let parts: [&[u8]; 2] = [&self.headers[slot], payload];
        let n = if payload.is_empty() { 1 } else { 2 };
        // SAFETY: the header lives in self.headers[slot] and the payload in self.ops[slot]
        // until this slot's completion is read (or the endpoint, dropped first, is closed).
        match unsafe { self.ep.send(slot, &parts[..n], dest, token) } {
            Ok(true) => {
                self.in_flight += 1;
                Ok(None)
            }
            Ok(false) => {
                let Some(Op::Send { payload, .. }) = self.ops[slot].take() else { unreachable!("slot holds the send") };
                self.free_ops.push(slot);
                Ok(Some((header, payload)))
            }
            Err(e) => {
                self.ops[slot] = None;
                self.free_ops.push(slot);
                Err(e)
            }
        }
    }

    /// Sends what waits in the queues of links due for a try, in order, until the provider pushes back.
    fn drain_backlog(&mut self, now: u64, events: &mut Vec<TransportEvent>) {
        for link in std::mem::take(&mut self.backlog) {
            if self.links.get(link).is_some_and(|l| l.retry_at > now) {
                self.backlog.push(link);
                continue;
            }
            loop {
                let Some((to, frame)) = self.links.get_mut(link).and_then(|l| Some((l.to(link), l.queue.pop_front()?)))
                else {
                    break;
                };
                match self.try_send(to, frame.0, frame.1) {
                    Ok(None) => {
                        if let Some(l) = self.links.get_mut(link) {
                            l.retry_ns = 0;
                        }
                    }
                    Ok(Some(back)) => {
                        if let Some(l) = self.links.get_mut(link) {
                            l.queue.push_front(back);
                            l.refused(now);
                            self.backlog.push(link);
                        }
                        break;
                    }
                    Err(e) => {
                        self.fail(link, e, events);
                        break;
                    }
                }
            }
        }
    }

    fn post_read(&mut self, slot: usize) -> Result<bool, FabricError> {
        let Some(Op::Read { link, buf, desc, posted, .. }) = &mut self.ops[slot] else { return Ok(true) };
        let Some(l) = self.links.get(*link) else { return Ok(true) };
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        // SAFETY: the buffer lives in self.ops[slot] until this slot's completion is read
        // (or the endpoint, dropped first, is closed).
        let ok = unsafe { self.ep.read(slot, ptr, len, l.fi_addr, desc.addr, desc.key)? };
        if ok {
            *posted = true;
            self.in_flight += 1;
        }
        Ok(ok)
    }

    fn reject(&mut self, why: &str) {
        self.rejected += 1;
        tracing::warn!(provider = %self.provider, local = %self.local, "dropped a message from an unknown sender: {why}");
    }

    /// Handles one received message in receive buffer `slot`.
    fn on_recv(&mut self, slot: usize, len: usize, data: Option<u64>, now: u64, events: &mut Vec<TransportEvent>) {
        let known = data.and_then(|d| self.links.find_short(d as u32)).map(|(link, l)| {
            l.last_rx = now;
            link
        });
        let bytes = &self.recv[slot][..len.min(RECV_LEN)];
        let parsed = Header::decode(bytes, MAX_INLINE as u32).and_then(|h| {
            let body = &bytes[HEADER_LEN..];
            if body.len() > h.length as usize {
                return Err(FrameError::Trailing { what: "message", extra: body.len() - h.length as usize });
            }
            h.check_payload(body).map(|()| (h, small_payload(&mut self.spare, body)))
        });
        let (header, payload) = match (parsed, known) {
            (Ok(frame), _) => frame,
            (Err(source), Some(link)) => {
                let peer = self.links.get(link).map_or_else(String::new, |l| l.text.clone());
                self.fail(link, FabricError::Protocol { peer, source }, events);
                return;
            }
            (Err(e), None) => return self.reject(&e.to_string()),
        };
        let link = match known {
            Some(link) => link,
            None => {
                if header.opcode != Opcode::Hello {
                    return self.reject(&format!("a {:?} frame before any hello", header.opcode));
                }
                let hello = match Hello::decode(&payload) {
                    Ok(h) => h,
                    Err(e) => return self.reject(&format!("bad hello: {e}")),
                };
                match self.by_addr.get(&hello.addr) {
                    Some(&link) => {
                        if let Some(l) = self.links.get_mut(link) {
                            l.last_rx = now;
                        }
                        link
                    }
                    None => match self.add_link(&hello.addr, now) {
                        Ok(link) => {
                            events.push(TransportEvent::Accepted { link });
                            link
                        }
                        Err(e) => return self.reject(&format!("cannot add its address: {e}")),
                    },
                }
            }
        };
        if matches!(header.opcode, Opcode::Hello | Opcode::HelloAck)
            && let Ok(hello) = Hello::decode(&payload)
            && let Some(l) = self.links.get_mut(link)
        {
            l.peer_token = hello.token;
        }
        crate::push_in_place(events, || TransportEvent::Frame { link, header, payload });
    }
}

impl Transport for OfiTransport {
    fn name(&self) -> &str {
        &self.provider
    }

    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn address_bytes(&self) -> Vec<u8> {
        self.ep.name().to_vec()
    }

    fn max_frame_payload(&self) -> usize {
        MAX_INLINE
    }

    fn eager_payload(&self) -> usize {
        self.eager
    }

    fn rma(&self) -> bool {
        self.rma
    }

    fn host_local(&self) -> bool {
        self.provider == "shm"
    }

    fn connect(&mut self, now: u64, addr: &str) -> Result<LinkId, FabricError> {
        let raw = if self.ep.string_addresses() {
            let mut b = addr.as_bytes().to_vec();
            if b.last() != Some(&0) {
                b.push(0);
            }
            b
        } else {
            let sa: SocketAddr = addr.parse().map_err(|e| FabricError::BadAddress {
                addr: addr.to_string(),
                transport: self.provider.clone(),
                reason: format!("{e}; use IP:PORT"),
            })?;
            sockaddr_bytes(sa)
        };
        if self.by_addr.contains_key(&raw) {
            return Err(FabricError::BadAddress {
                addr: addr.to_string(),
                transport: self.provider.clone(),
                reason: "this endpoint already has a connection to that peer".into(),
            });
        }
        let link = self.add_link(&raw, now)?;
        self.pending.push(TransportEvent::Connected { link });
        Ok(link)
    }

    fn peer_addr(&self, link: LinkId) -> String {
        self.links.get(link).map_or_else(String::new, |l| l.text.clone())
    }

    fn send(&mut self, link: LinkId, header: Header, payload: Payload) -> Result<(), FabricError> {
        if payload.len() > MAX_INLINE {
            return Err(FabricError::TooLarge {
                peer: self.peer_addr(link),
                len: payload.len(),
                max: MAX_INLINE as u32,
            });
        }
        // A link the transport dropped itself (its Closed event is on the way) takes nothing more.
        let Some(l) = self.links.get_mut(link) else { return Ok(()) };
        if !l.queue.is_empty() {
            l.queue.push_back((header, payload));
            return Ok(());
        }
        let to = l.to(link);
        if let Some(back) = self.try_send(to, header, payload)? {
            let l = self.links.get_mut(link).expect("checked above");
            l.queue.push_back(back);
            l.refused(self.now);
            self.backlog.push(link);
        }
        Ok(())
    }

    fn token(&self, link: LinkId) -> u32 {
        Slab::<Link>::short(link).unwrap_or(0)
    }

    fn close(&mut self, link: LinkId) {
        self.drop_link(link);
    }

    fn flush(&mut self) {}

    fn poll(&mut self, now: u64, events: &mut Vec<TransportEvent>) -> bool {
        self.now = now;
        let before = events.len();
        events.append(&mut self.pending);
        while let Some(slot) = self.repost.pop() {
            if let Err(e) = self.post_recv(slot) {
                tracing::error!(provider = %self.provider, "re-posting a receive buffer failed: {e}");
            }
        }
        while self.spare.len() < SPARES {
            self.spare.push(Vec::with_capacity(SPARE_LEN));
        }
        let mut completions = std::mem::take(&mut self.completions);
        for _ in 0..16 {
            completions.clear();
            let result = self.ep.cq_read(&mut completions);
            let got = completions.len();
            for c in completions.drain(..) {
                if c.slot < self.recv.len() {
                    self.on_recv(c.slot, c.len, c.data, now, events);
                    self.repost.push(c.slot);
                    continue;
                }
                self.in_flight = self.in_flight.saturating_sub(1);
                match self.ops[c.slot].take() {
                    Some(Op::Read { link, token, buf, .. }) if self.links.get(link).is_some() => {
                        events.push(TransportEvent::BulkRead { link, token, result: Ok(Payload::from(buf)) });
                    }
                    _ => {}
                }
                self.free_ops.push(c.slot);
            }
            match result {
                // A short batch emptied the queue: another read would only cost a progress call.
                Ok(()) if got < ofi::CQ_BATCH => break,
                Ok(()) => {}
                Err(err) => {
                    let Some(slot) = err.slot else {
                        // No operation to blame: shm reports injects (which have no context)
                        // that fail later, e.g. to a peer that died. Keepalive notices the peer.
                        tracing::debug!(provider = %self.provider, "an error completion without an operation: {}", err.error);
                        continue;
                    };
                    if slot < self.recv.len() {
                        tracing::warn!(provider = %self.provider, "a receive failed: {}", err.error);
                        self.repost.push(slot);
                        continue;
                    }
                    self.in_flight = self.in_flight.saturating_sub(1);
                    match self.ops[slot].take() {
                        Some(Op::Send { link, .. }) => self.fail(link, err.error, events),
                        Some(Op::Read { link, token, .. }) => {
                            events.push(TransportEvent::BulkRead { link, token, result: Err(Box::new(err.error)) })
                        }
                        None => {}
                    }
                    self.free_ops.push(slot);
                }
            }
        }
        self.completions = completions;
        if !self.backlog.is_empty() {
            self.drain_backlog(now, events);
        }
        while let Some(&slot) = self.reads_waiting.front() {
            match self.post_read(slot) {
                Ok(true) => {
                    self.reads_waiting.pop_front();
                }
                Ok(false) => break,
                Err(e) => {
                    self.reads_waiting.pop_front();
                    if let Some(Op::Read { link, token, .. }) = self.ops[slot].take() {
                        events.push(TransportEvent::BulkRead { link, token, result: Err(Box::new(e)) });
                    }
                    self.free_ops.push(slot);
                }
            }
        }
        events.len() > before
    }

    fn last_rx(&self, link: LinkId) -> u64 {
        self.links.get(link).map_or(0, |l| l.last_rx)
    }

    fn expose(&mut self, payload: Payload) -> Result<(BulkDesc, ExposeId), FabricError> {
        // SAFETY: the payload moves into self.exposed and stays there (unmoved on the heap or
        // in DMA memory) until unexpose closes the registration, or the endpoint is dropped.
        let (mr, addr, key) = unsafe { self.ep.mr_reg(payload.as_ptr(), payload.len(), Access::RemoteRead)? };
        let len = payload.len() as u64;
        let id = self.exposed.insert((payload, mr));
        Ok((BulkDesc { addr, len, key, data_crc: None }, id))
    }

    fn unexpose(&mut self, id: ExposeId) -> Option<Payload> {
        let (payload, mr) = self.exposed.remove(id)?;
        self.ep.mr_close(mr);
        Some(payload)
    }

    fn read_bulk(&mut self, link: LinkId, desc: &BulkDesc, token: u64) -> Result<(), FabricError> {
        if self.links.get(link).is_none() {
            return Err(FabricError::UnknownConnection(link as u32));
        }
        let len = desc.len as usize;
        let buf = DmaBuf::new(len).map_err(|e| FabricError::Memory { len, reason: e.to_string() })?;
        let Some(slot) = self.free_ops.pop() else {
            return Err(FabricError::Backpressure {
                peer: self.peer_addr(link),
                queued: self.ops.len(),
                limit: self.ops.len(),
            });
        };
        self.ops[slot] = Some(Op::Read { link, token, buf, desc: *desc, posted: false });
        if !self.reads_waiting.is_empty() || !self.post_read(slot)? {
            self.reads_waiting.push_back(slot);
        }
        Ok(())
    }

    fn wake_fd(&self) -> Option<RawFd> {
        self.ep.wait_fd()
    }

    fn arm(&self) -> bool {
        self.pending.is_empty()
            && self.repost.is_empty()
            && self.backlog.is_empty()
            && self.reads_waiting.is_empty()
            && self.ep.trywait()
    }

    fn busy(&self) -> bool {
        self.in_flight > 0
            || !self.repost.is_empty()
            || !self.backlog.is_empty()
            || !self.reads_waiting.is_empty()
            || !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_round_trip_through_libfabric_bytes() {
        for a in ["127.0.0.1:7000", "[::1]:9"] {
            let sa: SocketAddr = a.parse().unwrap();
            assert_eq!(sockaddr_text(&sockaddr_bytes(sa)).unwrap(), sa.to_string());
        }
        assert_eq!(node_service("127.0.0.1:0"), (Some("127.0.0.1"), None));
        assert_eq!(node_service("10.0.0.1:7000"), (Some("10.0.0.1"), Some("7000")));
        assert_eq!(node_service("claudefs-a"), (Some("claudefs-a"), None));
    }

    #[test]
    fn the_buffers_of_injected_payloads_are_kept_for_received_ones() {
        let open = || OfiTransport::open("shm", &TransportConfig::new("shm", None)).unwrap();
        let (mut a, mut b) = (open(), open());
        let link = a.connect(pmd::clock::now(), &b.local_addr()).unwrap();
        let send = |a: &mut OfiTransport, capacity: usize| {
            let mut v = Vec::with_capacity(capacity);
            v.extend_from_slice(&[7; 64]);
            let ptr = v.as_ptr();
            a.send(link, Header::new(Opcode::Ping, 0).payload(&v), Payload::Heap(v)).unwrap();
            ptr
        };
        send(&mut a, 0);
        let mut events = Vec::new();
        // shm sets up its path to a peer on first use, with the peer's help.
        for _ in 0..1_000_000 {
            if a.links.get(link).unwrap().queue.is_empty() {
                break;
            }
            a.poll(pmd::clock::now(), &mut events);
            b.poll(pmd::clock::now(), &mut events);
        }
        assert!(a.links.get(link).unwrap().queue.is_empty(), "the first frame left");
        a.spare.clear();
        let small = send(&mut a, SPARE_LEN);
        assert_eq!(a.spare.iter().map(|v| (v.as_ptr(), v.len())).collect::<Vec<_>>(), [(small, 0)], "kept, emptied");
        send(&mut a, 64 << 10);
        assert_eq!(a.spare.len(), 1, "a large buffer is not kept for small payloads");
        while a.spare.len() < SPARES {
            a.spare.push(Vec::with_capacity(SPARE_LEN));
        }
        send(&mut a, SPARE_LEN);
        assert_eq!(a.spare.len(), SPARES, "no more than SPARES are kept");
    }

    #[test]
    fn eager_messages_follow_the_provider_and_rxm_buffer_setting() {
        assert_eq!(eager_message("shm", 4096, Some("65536")), Some(4096), "shm: its inject size");
        assert_eq!(eager_message("tcp;ofi_rxm", 64, None), Some(16384 - RXM_HEADER_ROOM));
        assert_eq!(eager_message("tcp;ofi_rxm", 64, Some(" 65536 ")), Some(65536 - RXM_HEADER_ROOM));
        assert_eq!(eager_message("verbs;ofi_rxm", 64, None), None, "verbs: rxm's rendezvous is an RDMA read");
        assert_eq!(
            eager_message("tcp;ofi_rxm", 64, Some("lots")),
            Some(16384 - RXM_HEADER_ROOM),
            "unparsable: default"
        );
        assert_eq!(eager_message("tcp", 64, None), None, "no eager step known");
    }
}
