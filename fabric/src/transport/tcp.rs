//! The plain TCP transport: frames on non-blocking sockets, for hosts
//! without libfabric (and as the reference the libfabric transports are
//! measured against).
//!
//! One epoll set holds the listener and every link's socket. [`Transport::poll`]
//! asks it which sockets are ready (one `epoll_wait` with no timeout), accepts,
//! reads whatever arrived into each link's [`FrameReader`] and hands back the
//! complete frames. Sends are queued and go out in [`Transport::flush`] as one
//! `writev` per link covering every queued frame (header and payload slices,
//! no copy); when a socket is full the rest waits for `EPOLLOUT`. The epoll
//! fd is also the reactor's wake-up source: it is readable exactly when a
//! socket has something for us.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use super::{ExposeId, LinkId, Transport, TransportEvent};
use crate::error::FabricError;
use crate::frame::{BulkDesc, FrameError, FrameReader, HEADER_LEN, Header, MAX_INLINE, Payload};
use crate::slab::Slab;
use crate::sys::{Connecting, Poller, Ready, TcpSocket};

/// Epoll token of the listener (no link key has this value).
const LISTENER: u64 = u64::MAX;
/// Frames per `writev` at most.
const IOV_FRAMES: usize = 64;
/// Bytes read from one link per poll at most, so one busy peer cannot starve the others.
const READ_BUDGET: usize = 4 << 20;

struct Out {
    header: [u8; HEADER_LEN],
    payload: Payload,
}

struct Link {
    sock: TcpSocket,
    peer: SocketAddr,
    connecting: bool,
    reader: FrameReader,
    out: VecDeque<Out>,
    /// Bytes of `out.front()` already written.
    out_off: usize,
    /// EPOLLOUT is registered (the socket was full).
    want_write: bool,
    dirty: bool,
    last_rx: u64,
}

/// The plain TCP transport. See the module docs.
pub struct TcpTransport {
    poller: Poller,
    listener: Option<TcpSocket>,
    local: String,
    links: Slab<Link>,
    dirty: Vec<LinkId>,
    ready: Vec<Ready>,
    /// Events found outside `poll` (an immediate connect, a failed write).
    pending: Vec<TransportEvent>,
    max_payload: u32,
    keepalive_secs: u64,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport").field("local", &self.local).field("links", &self.links.len()).finish()
    }
}

fn parse_addr(addr: &str) -> Result<SocketAddr, FabricError> {
    addr.parse().map_err(|e| FabricError::BadAddress {
        addr: addr.to_string(),
        transport: "tcp".into(),
        reason: format!("{e}; use IP:PORT (a numeric address: names are resolved by the caller)"),
    })
}

impl TcpTransport {
    /// A transport that accepts connections on `listen` (if given) and
    /// refuses frames with payloads above `max_payload` bytes (control frames
    /// up to [`MAX_INLINE`] bytes always pass; the RPC layer checks requests
    /// and responses against its own limit).
    pub fn new(listen: Option<&str>, max_payload: u32) -> Result<Self, FabricError> {
        let max_payload = max_payload.max(MAX_INLINE as u32);
        let poller = Poller::new().map_err(|e| FabricError::socket("creating an epoll set for", "tcp", e))?;
        let (listener, local) = match listen {
            Some(a) => {
                let addr = parse_addr(a)?;
                let l = TcpSocket::listen(&addr).map_err(|e| FabricError::socket("listening on", addr, e))?;
                let local = l.local_addr().map_err(|e| FabricError::socket("reading the address of", addr, e))?;
                poller.add(l.as_raw_fd(), LISTENER, false).map_err(|e| FabricError::socket("watching", local, e))?;
                (Some(l), local.to_string())
            }
            None => (None, String::new()),
        };
        Ok(Self {
            poller,
            listener,
            local,
            links: Slab::default(),
            dirty: Vec::new(),
            ready: Vec::new(),
            pending: Vec::new(),
            max_payload,
            keepalive_secs: 10,
        })
    }

    fn add_link(
        &mut self,
        sock: TcpSocket,
        peer: SocketAddr,
        connecting: bool,
        now: u64,
    ) -> Result<LinkId, FabricError> {
        if let Err(e) = sock.tune(self.keepalive_secs) {
            tracing::debug!(%peer, "setting TCP_NODELAY/keepalive failed: {e}");
        }
        let fd = sock.as_raw_fd();
        let link = Link {
            sock,
            peer,
            connecting,
            reader: FrameReader::new(self.max_payload),
            out: VecDeque::new(),
            out_off: 0,
            want_write: connecting,
            dirty: false,
            last_rx: now,
        };
        let key = self.links.insert(link);
        if let Err(e) = self.poller.add(fd, key, connecting) {
            self.links.remove(key);
            return Err(FabricError::socket("watching the socket of", peer, e));
        }
        Ok(key)
    }

    fn drop_link(&mut self, key: LinkId) -> Option<Link> {
        let link = self.links.remove(key)?;
        self.poller.remove(link.sock.as_raw_fd());
        Some(link)
    }

    fn fail(&mut self, key: LinkId, error: FabricError, events: &mut Vec<TransportEvent>) {
        if self.drop_link(key).is_some() {
            events.push(TransportEvent::Closed { link: key, error: Box::new(error) });
        }
    }

    fn accept_all(&mut self, now: u64, events: &mut Vec<TransportEvent>) {
        for _ in 0..64 {
            let Some(listener) = &self.listener else { return };
            match listener.accept() {
                Ok(Some((sock, peer))) => match self.add_link(sock, peer, false, now) {
                    Ok(link) => events.push(TransportEvent::Accepted { link }),
                    Err(e) => tracing::warn!("dropping a connection from {peer}: {e}"),
                },
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(listener = %self.local, "accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Reads what the socket has; returns false if the link died.
    fn read_link(&mut self, key: LinkId, now: u64, events: &mut Vec<TransportEvent>) -> bool {
        let Some(link) = self.links.get_mut(key) else { return false };
        let mut budget = READ_BUDGET;
        let result: Result<(), FabricError> = loop {
            let buf = link.reader.buf();
            let want = buf.len();
            match link.sock.read(buf) {
                Ok(Some(0)) => {
                    let peer = link.peer.to_string();
                    break Err(match link.reader.partial() {
                        0 => FabricError::ConnectionLost { peer, reason: "the peer closed the connection".into() },
                        got => FabricError::Protocol {
                            peer,
                            source: FrameError::Truncated {
                                what: "frame (the peer closed the connection)",
                                needed: link.reader.needed(),
                                got,
                            },
                        },
                    });
                }
                Ok(Some(n)) => {
                    link.reader.advance(n);
                    link.last_rx = now;
                    let mut bad = None;
                    loop {
                        match link.reader.next_frame() {
                            Ok(Some((header, payload))) => {
                                events.push(TransportEvent::Frame { link: key, header, payload })
                            }
                            Ok(None) => break,
                            Err(e) => {
                                bad = Some(e);
                                break;
                            }
                        }
                    }
                    if let Some(source) = bad {
                        break Err(FabricError::Protocol { peer: link.peer.to_string(), source });
                    }
                    budget = budget.saturating_sub(n);
                    if n < want || budget == 0 {
                        break Ok(());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    break Err(FabricError::ConnectionLost { peer: link.peer.to_string(), reason: e.to_string() });
                }
            }
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                self.fail(key, e, events);
                false
            }
        }
    }

    /// Writes what the link has queued; an error closes it.
    fn write_link(&mut self, key: LinkId, events: &mut Vec<TransportEvent>) {
        let Some(link) = self.links.get_mut(key) else { return };
        link.dirty = false;
        let result = loop {
            if link.out.is_empty() {
                break Ok(());
            }
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(2 * IOV_FRAMES);
            for (i, out) in link.out.iter().take(IOV_FRAMES).enumerate() {
                let skip = if i == 0 { link.out_off } else { 0 };
                if skip < HEADER_LEN {
                    iov.push(IoSlice::new(&out.header[skip..]));
                }
                let p = skip.saturating_sub(HEADER_LEN);
                if p < out.payload.len() {
                    iov.push(IoSlice::new(&out.payload[p..]));
                }
            }
            match link.sock.write_vectored(&iov) {
                Ok(0) => break Ok(()),
                Ok(mut n) => {
                    while n > 0 {
                        let front = link.out.front().expect("bytes were written from a queued frame");
                        let left = HEADER_LEN + front.payload.len() - link.out_off;
                        if n >= left {
                            n -= left;
                            link.out.pop_front();
                            link.out_off = 0;
                        } else {
                            link.out_off += n;
                            n = 0;
                        }
                    }
                }
                Err(e) => {
                    break Err(FabricError::ConnectionLost { peer: link.peer.to_string(), reason: e.to_string() });
                }
            }
        };
        if let Err(e) = result {
            self.fail(key, e, events);
            return;
        }
        let want = !link.out.is_empty();
        if want != link.want_write {
            link.want_write = want;
            if let Err(e) = self.poller.modify(link.sock.as_raw_fd(), key, want) {
                let peer = link.peer;
                self.fail(key, FabricError::socket("watching the socket of", peer, e), events);
            }
        }
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &str {
        "tcp"
    }

    fn local_addr(&self) -> String {
        self.local.clone()
    }

    fn address_bytes(&self) -> Vec<u8> {
        Vec::new()
    }

    fn max_frame_payload(&self) -> usize {
        usize::MAX
    }

    fn rma(&self) -> bool {
        false
    }

    fn connect(&mut self, now: u64, addr: &str) -> Result<LinkId, FabricError> {
        let peer = parse_addr(addr)?;
        match TcpSocket::connect(&peer).map_err(|e| FabricError::socket("connecting to", peer, e))? {
            Connecting::Done(sock) => {
                let link = self.add_link(sock, peer, false, now)?;
                self.pending.push(TransportEvent::Connected { link });
                Ok(link)
            }
            Connecting::Pending(sock) => self.add_link(sock, peer, true, now),
        }
    }

    fn peer_addr(&self, link: LinkId) -> String {
        self.links.get(link).map_or_else(String::new, |l| l.peer.to_string())
    }

    fn send(&mut self, link: LinkId, header: Header, payload: Payload) -> Result<(), FabricError> {
        // A link the transport dropped itself (its Closed event is on the way) takes nothing more.
        let Some(l) = self.links.get_mut(link) else { return Ok(()) };
        debug_assert_eq!(header.length as usize, payload.len());
        l.out.push_back(Out { header: header.encode(), payload });
        if !l.dirty && !l.connecting {
            l.dirty = true;
            self.dirty.push(link);
        }
        Ok(())
    }

    fn token(&self, link: LinkId) -> u32 {
        Slab::<Link>::short(link).unwrap_or(0)
    }

    fn close(&mut self, link: LinkId) {
        self.drop_link(link);
    }

    fn flush(&mut self) {
        let mut events = Vec::new();
        for key in std::mem::take(&mut self.dirty) {
            self.write_link(key, &mut events);
        }
        self.pending.extend(events);
    }

    fn poll(&mut self, now: u64, events: &mut Vec<TransportEvent>) -> bool {
        let before = events.len();
        events.append(&mut self.pending);
        let mut ready = std::mem::take(&mut self.ready);
        if let Err(e) = self.poller.ready(&mut ready) {
            tracing::error!(transport = "tcp", "epoll_wait failed: {e}");
        }
        for r in ready.drain(..) {
            if r.token == LISTENER {
                self.accept_all(now, events);
                continue;
            }
            let Some(link) = self.links.get_mut(r.token) else { continue };
            if link.connecting {
                if !(r.write || r.read) {
                    continue;
                }
                let err = match link.sock.take_error() {
                    Ok(None) => None,
                    Ok(Some(e)) | Err(e) => Some(e),
                };
                match err {
                    None => {
                        link.connecting = false;
                        link.last_rx = now;
                        events.push(TransportEvent::Connected { link: r.token });
                        if !link.out.is_empty() {
                            link.dirty = true;
                            self.dirty.push(r.token);
                        }
                    }
                    Some(e) => {
                        let peer = link.peer;
                        self.fail(r.token, FabricError::socket("connecting to", peer, e), events);
                    }
                }
                continue;
            }
            if r.read && !self.read_link(r.token, now, events) {
                continue;
            }
            if r.write {
                self.write_link(r.token, events);
            }
        }
        self.ready = ready;
        events.len() > before
    }

    fn last_rx(&self, link: LinkId) -> u64 {
        self.links.get(link).map_or(0, |l| l.last_rx)
    }

    fn expose(&mut self, _payload: Payload) -> Result<(BulkDesc, ExposeId), FabricError> {
        Err(no_rma())
    }

    fn unexpose(&mut self, _id: ExposeId) -> Option<Payload> {
        None
    }

    fn read_bulk(&mut self, _link: LinkId, _desc: &BulkDesc, _token: u64) -> Result<(), FabricError> {
        Err(no_rma())
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.poller.as_raw_fd())
    }

    fn arm(&self) -> bool {
        self.pending.is_empty() && self.dirty.is_empty()
    }

    fn busy(&self) -> bool {
        !self.pending.is_empty()
    }
}

fn no_rma() -> FabricError {
    FabricError::Protocol {
        peer: "tcp".into(),
        source: FrameError::Invalid { field: "bulk", reason: "the plain TCP transport has no RMA".into() },
    }
}
