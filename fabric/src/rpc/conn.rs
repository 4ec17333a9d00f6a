//! Connection life: the hello exchange, keepalive, handshake deadlines,
//! failure and reconnection.

use super::{Completion, ConnId, Event, PeerInfo, Rpc, ms};
use crate::error::FabricError;
use crate::frame::{HELLO_BULK_DIGEST, HELLO_LOCAL_DIGEST, HELLO_RMA, Header, Hello, Opcode, Payload};
use crate::stats::{ConnState, ConnStats};
use crate::transport::Transport;

impl<T: Transport> Rpc<T> {
    /// Sends our hello (opening) or hello-ack (answering), granting our credits.
    pub(super) fn send_hello(&mut self, now: u64, conn: ConnId, opcode: Opcode) {
        let Some(link) = self.conns.get(conn).and_then(|c| c.link) else { return };
        let hello = Hello {
            max_message: self.opts.max_message,
            flags: if self.t.rma() { HELLO_RMA } else { 0 }
                | if self.opts.bulk_digest { HELLO_BULK_DIGEST } else { 0 }
                | if self.opts.local_digest { HELLO_LOCAL_DIGEST } else { 0 },
            incarnation: self.incarnation,
            token: self.t.token(link),
            name: self.opts.name.clone(),
            addr: self.t.address_bytes(),
        };
        let bytes = match hello.encode() {
            Ok(b) => b,
            Err(e) => {
                let peer = self.conns.get(conn).map_or_else(String::new, |c| c.peer_text());
                return self.lose(now, conn, FabricError::Handshake { peer, reason: e.to_string() });
            }
        };
        if opcode == Opcode::Hello
            && let Some(c) = self.conns.get_mut(conn)
        {
            c.set_state(ConnState::Handshaking, now);
        }
        let header = Header::new(opcode, 0).credits(self.opts.credits).payload(&bytes);
        self.send_frame(conn, header, Payload::from(bytes));
    }

    /// The peer's hello arrived: the connection is up (again).
    pub(super) fn establish(&mut self, now: u64, conn: ConnId, hello: Hello, credits: u16) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        let addr = c.link.map(|l| self.t.peer_addr(l)).unwrap_or_default();
        let restarted = c.peer.as_ref().is_some_and(|p| p.incarnation != hello.incarnation);
        let peer = PeerInfo {
            name: hello.name,
            addr,
            incarnation: hello.incarnation,
            max_message: hello.max_message,
            rma: hello.flags & HELLO_RMA != 0,
            bulk_digest: hello.flags & HELLO_BULK_DIGEST != 0,
            local_digest: hello.flags & HELLO_LOCAL_DIGEST != 0,
        };
        if restarted && c.state == ConnState::Established {
            // The peer restarted behind the same address (a connectionless
            // transport sees no disconnect): what it had of ours is lost.
            let error = FabricError::ConnectionLost { peer: c.peer_text(), reason: "the peer restarted".into() };
            self.fail_sent(conn, &error);
            let c = self.conns.get_mut(conn).expect("checked above");
            c.served.clear();
            c.partial.clear();
            for (_, h) in c.exposed.drain() {
                self.t.unexpose(h);
            }
        }
        let c = self.conns.get_mut(conn).expect("checked above");
        if c.peer.is_some() && c.state != ConnState::Established {
            ConnStats::add(&c.stats.reconnects, 1);
        }
        c.stats.set_peer(&peer.name, &peer.addr);
        c.peer = Some(peer.clone());
        c.send_credits = u32::from(credits);
        c.ping_sent = None;
        if let Some(o) = &mut c.outbound {
            o.attempts = 0;
        }
        c.set_state(ConnState::Established, now);
        tracing::debug!(conn, peer = %c.peer_text(), credits, "connection established");
        self.events.push(Event::Connected { conn, peer });
        self.pump(conn);
    }

    /// Fails every call of `conn` that is on the wire (and forgets abandoned ones).
    fn fail_sent(&mut self, conn: ConnId, error: &FabricError) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.in_flight == 0 {
            return;
        }
        c.in_flight = 0;
        c.stats.set_in_flight(0);
        let sent: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, k)| k.conn == conn && k.state != super::CallState::Queued)
            .map(|(id, _)| id)
            .collect();
        for call in sent {
            if let Some(k) = self.calls.remove(call)
                && k.state == super::CallState::Sent
            {
                self.events.push(Event::Completion(Completion {
                    call,
                    tag: k.tag,
                    result: Err(Box::new(error.clone())),
                }));
            }
        }
    }

    /// Keepalive pings and deadlines of connections being set up or retried.
    pub(super) fn check_conns(&mut self, now: u64) {
        let (interval, timeout) = (ms(self.opts.keepalive_interval_ms), ms(self.opts.keepalive_timeout_ms));
        let handshake = ms(self.opts.handshake_timeout_ms);
        for conn in self.conns.keys() {
            let Some(c) = self.conns.get_mut(conn) else { continue };
            match c.state {
                ConnState::Established => {
                    let Some(link) = c.link else { continue };
                    let idle = now.saturating_sub(self.t.last_rx(link).max(c.since));
                    if idle >= timeout {
                        let error = FabricError::KeepaliveTimeout { peer: c.peer_text(), ms: idle / 1_000_000 };
                        self.lose(now, conn, error);
                    } else if idle >= interval && c.ping_sent.is_none_or(|t| now.saturating_sub(t) >= interval) {
                        c.ping_sent = Some(now);
                        self.send_frame(conn, Header::new(Opcode::Ping, now), Payload::empty());
                    }
                }
                ConnState::Connecting | ConnState::Handshaking | ConnState::AwaitingHello => {
                    if now.saturating_sub(c.since) >= handshake {
                        let reason = format!("no hello within {} ms", self.opts.handshake_timeout_ms);
                        let error = FabricError::Handshake { peer: c.peer_text(), reason };
                        self.lose(now, conn, error);
                    }
                }
                ConnState::Backoff => {
                    if c.outbound.as_ref().is_some_and(|o| now >= o.retry_at) {
                        self.reconnect(now, conn);
                    }
                }
                ConnState::Closed => {}
            }
        }
    }

    fn reconnect(&mut self, now: u64, conn: ConnId) {
        let Some(addr) = self.conns.get(conn).and_then(|c| c.outbound.as_ref()).map(|o| o.addr.clone()) else { return };
        match self.t.connect(now, &addr) {
            Ok(link) => {
                self.by_link.insert(link, conn);
                let c = self.conns.get_mut(conn).expect("checked above");
                c.link = Some(link);
                c.set_state(ConnState::Connecting, now);
                tracing::debug!(conn, %addr, "reconnecting");
            }
            Err(e) => self.lose(now, conn, e),
        }
    }

    /// The connection failed (or was closed): tear down its link, fail its
    /// calls on the wire, and either schedule a reconnect (outbound
    /// connections with attempts left: queued calls wait) or drop it (queued
    /// calls fail too).
    pub(super) fn lose(&mut self, now: u64, conn: ConnId, error: FabricError) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.state == ConnState::Closed {
            return;
        }
        if let Some(link) = c.link.take() {
            self.by_link.remove(link);
            self.t.close(link);
        }
        for (_, h) in c.exposed.drain() {
            self.t.unexpose(h);
        }
        c.partial.clear();
        c.served.clear();
        c.ping_sent = None;
        c.stats.set_error(&error.to_string());
        let peer = c.peer_text();
        let stale: Vec<u64> = self.bulk_in.iter().filter(|(_, b)| b.conn == conn).map(|(k, _)| k).collect();
        for k in stale {
            self.bulk_in.remove(k);
        }
        self.fail_sent(conn, &error);
        let c = self.conns.get_mut(conn).expect("checked above");
        let attempts_allowed = self.opts.reconnect_attempts;
        let reconnecting = match &mut c.outbound {
            Some(o) if o.attempts < attempts_allowed => {
                o.attempts += 1;
                let backoff = self.opts.reconnect_backoff_ms.saturating_mul(1 << (o.attempts - 1).min(20));
                o.retry_at = now + ms(backoff.min(self.opts.reconnect_backoff_max_ms));
                true
            }
            _ => false,
        };
        match (&error, reconnecting) {
            (FabricError::Protocol { .. } | FabricError::Violation { .. }, _) => {
                tracing::warn!(conn, %peer, "closing the connection: {error}")
            }
            (_, true) => tracing::info!(conn, %peer, "connection lost, reconnecting: {error}"),
            (_, false) => tracing::info!(conn, %peer, "connection closed: {error}"),
        }
        if reconnecting {
            c.set_state(ConnState::Backoff, now);
        } else {
            let final_error = match &c.outbound {
                Some(o) if o.attempts > 0 => {
                    FabricError::ReconnectFailed { peer: peer.clone(), attempts: o.attempts, last: error.to_string() }
                }
                _ => error.clone(),
            };
            let queued: Vec<u64> = c.queue.drain(..).collect();
            c.set_state(ConnState::Closed, now);
            self.conns.remove(conn);
            for call in queued {
                if let Some(k) = self.calls.remove(call) {
                    self.events.push(Event::Completion(Completion {
                        call,
                        tag: k.tag,
                        result: Err(Box::new(final_error.clone())),
                    }));
                }
            }
        }
        self.events.push(Event::Disconnected { conn, error, reconnecting });
    }
}
