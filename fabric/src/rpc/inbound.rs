//! What arrives: frames by opcode, fragments, bulk descriptors and the RMA
//! reads they start, and the requests and completions they become.

use super::{CallState, Completion, ConnId, Event, Partial, Request, Rpc};
use crate::error::FabricError;
use crate::frame::{
    BulkDesc, Fragment, FrameError, Header, Hello, MAX_ERROR_MESSAGE, Opcode, Payload, RemoteError, flags,
};
use crate::stats::{ConnState, ConnStats};
use crate::transport::Transport;

/// Error responses are exempt from the size limit (their message is bounded).
fn is_error_response(header: &Header, len: usize) -> bool {
    header.opcode == Opcode::Response && header.has(flags::ERROR) && len <= 4 + MAX_ERROR_MESSAGE
}

impl<T: Transport> Rpc<T> {
    fn violation(&mut self, conn: ConnId, reason: String) {
        let peer = self.conns.get(conn).map_or_else(String::new, |c| c.peer_text());
        self.lose(self.now, conn, FabricError::Violation { peer, reason });
    }

    fn protocol(&mut self, conn: ConnId, source: FrameError) {
        let peer = self.conns.get(conn).map_or_else(String::new, |c| c.peer_text());
        self.lose(self.now, conn, FabricError::Protocol { peer, source });
    }

    pub(super) fn on_frame(&mut self, now: u64, conn: ConnId, header: Header, payload: Payload) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        ConnStats::add(&c.stats.frames_rx, 1);
        ConnStats::add(&c.stats.bytes_rx, (crate::frame::HEADER_LEN + payload.len()) as u64);
        let state = c.state;
        match header.opcode {
            Opcode::Hello | Opcode::HelloAck => {
                let hello = match Hello::decode(&payload) {
                    Ok(h) => h,
                    Err(e) => return self.protocol(conn, e),
                };
                if header.opcode == Opcode::Hello {
                    // A hello in any state: a new peer, a simultaneous open, or a restarted peer.
                    self.send_hello(now, conn, Opcode::HelloAck);
                    self.establish(now, conn, hello, header.credits);
                } else if state == ConnState::Handshaking {
                    self.establish(now, conn, hello, header.credits);
                } else if state != ConnState::Established {
                    self.violation(conn, format!("a hello-ack while {state:?}"));
                }
                return;
            }
            _ if state != ConnState::Established => {
                return self.violation(conn, format!("a {:?} frame before the handshake", header.opcode));
            }
            Opcode::Request | Opcode::Response
                if payload.len() > self.opts.max_message as usize && !is_error_response(&header, payload.len()) =>
            {
                let (length, max) = (payload.len() as u64, u64::from(self.opts.max_message));
                return self.protocol(conn, FrameError::TooLong { length, max });
            }
            Opcode::Request => self.on_request(conn, header, payload),
            Opcode::Response => self.on_response(conn, header, payload),
            Opcode::Cancel => {
                if c.served.contains(header.request_id) {
                    self.events.push(Event::Cancelled { conn, id: header.request_id });
                }
            }
            Opcode::Ping => self.send_frame(conn, Header::new(Opcode::Pong, header.request_id), Payload::empty()),
            Opcode::Pong => c.ping_sent = None,
            Opcode::BulkDone => {
                let key = (header.request_id, header.has(flags::OF_RESPONSE));
                match c.exposed.remove(&key) {
                    Some(h) => {
                        self.t.unexpose(h);
                    }
                    None => {
                        return self
                            .violation(conn, format!("bulk-done for request {}, which has no bulk payload", key.0));
                    }
                }
            }
            Opcode::Goodbye => {
                let error = FabricError::ConnectionLost {
                    peer: c.peer_text(),
                    reason: "the peer closed the connection".into(),
                };
                return self.lose(now, conn, error);
            }
        }
        if header.credits > 0
            && let Some(c) = self.conns.get_mut(conn)
            && c.state == ConnState::Established
        {
            c.send_credits = c.send_credits.saturating_add(u32::from(header.credits));
            self.pump(conn);
        }
    }

    /// Frames without [`flags::FRAGMENT`] pass through; a fragment is added,
    /// and the whole payload comes back once every piece is in. Inline, so
    /// that the frames of every message do not go through a call by value.
    #[inline(always)]
    fn reassemble(
        &mut self,
        conn: ConnId,
        header: Header,
        payload: Payload,
        is_response: bool,
    ) -> Option<(Header, Payload)> {
        match header.has(flags::FRAGMENT) {
            false => Some((header, payload)),
            true => self.add_fragment(conn, header, payload, is_response),
        }
    }

    fn add_fragment(
        &mut self,
        conn: ConnId,
        header: Header,
        payload: Payload,
        is_response: bool,
    ) -> Option<(Header, Payload)> {
        let (f, piece) = match Fragment::decode(&payload, self.opts.max_message) {
            Ok(x) => x,
            Err(e) => {
                self.protocol(conn, e);
                return None;
            }
        };
        let c = self.conns.get_mut(conn)?;
        let key = (header.request_id, is_response);
        let p = c.partial.entry(key).or_insert_with(|| Partial {
            header: Header { flags: header.flags & !flags::FRAGMENT, credits: 0, ..header },
            bytes: Vec::with_capacity(f.total as usize),
            total: f.total,
            ranges: Vec::new(),
        });
        if p.total != f.total || !p.add_range(f.offset, f.offset + piece.len() as u64) {
            let reason = format!("fragment of request {} disagrees with the earlier ones", header.request_id);
            self.violation(conn, reason);
            return None;
        }
        // Fragments come in order: appended, with no zeroing ahead of them.
        // One out of order zero-fills up to where it goes.
        let (start, end) = (f.offset as usize, f.offset as usize + piece.len());
        if start == p.bytes.len() {
            p.bytes.extend_from_slice(piece);
        } else {
            if p.bytes.len() < end {
                p.bytes.resize(end, 0);
            }
            p.bytes[start..end].copy_from_slice(piece);
        }
        if !p.complete() {
            return None;
        }
        let p = c.partial.remove(&key).expect("present");
        Some((Header { length: p.bytes.len() as u32, ..p.header }, Payload::from(p.bytes)))
    }

    fn on_request(&mut self, conn: ConnId, header: Header, payload: Payload) {
        let credits = self.opts.credits as usize;
        let Some(c) = self.conns.get_mut(conn) else { return };
        let first = c.partial.is_empty() || !c.partial.contains_key(&(header.request_id, false));
        if first {
            if c.served.len() >= credits {
                return self.violation(conn, format!("more than the {credits} outstanding requests it was granted"));
            }
            if !c.served.insert(header.request_id) {
                return self.violation(conn, format!("request id {} reused while outstanding", header.request_id));
            }
        }
        let Some((header, payload)) = self.reassemble(conn, header, payload, false) else { return };
        if header.has(flags::BULK) {
            return self.start_bulk_read(conn, header, &payload);
        }
        self.deliver(conn, header, payload);
    }

    fn on_response(&mut self, conn: ConnId, header: Header, payload: Payload) {
        let id = header.request_id;
        let owner = self.calls.get(id).map(|k| (k.conn, k.state));
        match owner {
            Some((c, CallState::Sent | CallState::Abandoned)) if c == conn => {}
            _ => return self.violation(conn, format!("a response to request {id}, which it was not sent")),
        }
        let Some((header, payload)) = self.reassemble(conn, header, payload, true) else { return };
        if header.has(flags::BULK) {
            if owner.is_some_and(|(_, s)| s == CallState::Abandoned) {
                // Nobody wants the data: let the peer free it without reading it.
                let done = Header::new(Opcode::BulkDone, id).flag(flags::OF_RESPONSE);
                self.send_frame(conn, done, Payload::empty());
                return self.deliver(conn, header, Payload::empty());
            }
            return self.start_bulk_read(conn, header, &payload);
        }
        self.deliver(conn, header, payload);
    }

    fn start_bulk_read(&mut self, conn: ConnId, header: Header, desc: &[u8]) {
        if !self.t.rma() {
            return self.violation(conn, "a bulk descriptor on a transport without RMA".into());
        }
        let desc = match BulkDesc::decode(desc, self.opts.max_message) {
            Ok(d) => d,
            Err(e) => return self.protocol(conn, e),
        };
        let Some(link) = self.conns.get(conn).and_then(|c| c.link) else { return };
        let token = self.bulk_in.insert(super::BulkIn { conn, header, data_crc: desc.data_crc });
        if let Err(e) = self.t.read_bulk(link, &desc, token) {
            self.bulk_in.remove(token);
            self.lose(self.now, conn, e);
        }
    }

    pub(super) fn on_bulk_read(&mut self, now: u64, token: u64, result: Result<Payload, FabricError>) {
        let Some(b) = self.bulk_in.remove(token) else { return };
        let payload = match result {
            Ok(p) => p,
            Err(e) => return self.lose(now, b.conn, e),
        };
        if let Some(stored) = b.data_crc {
            let computed = crate::frame::crc32c(&payload);
            if computed != stored {
                return self.protocol(b.conn, FrameError::PayloadCrc { length: payload.len(), computed, stored });
            }
        }
        if let Some(c) = self.conns.get(b.conn) {
            ConnStats::add(&c.stats.bulk_rx, 1);
            ConnStats::add(&c.stats.bytes_rx, payload.len() as u64);
        }
        let mut done = Header::new(Opcode::BulkDone, b.header.request_id);
        if b.header.opcode == Opcode::Response {
            done = done.flag(flags::OF_RESPONSE);
        }
        self.send_frame(b.conn, done, Payload::empty());
        self.deliver(b.conn, b.header, payload);
    }

    /// Hands a whole request to the service, or completes the call a response answers.
    fn deliver(&mut self, conn: ConnId, header: Header, payload: Payload) {
        let id = header.request_id;
        if header.opcode == Opcode::Request {
            if let Some(c) = self.conns.get(conn) {
                ConnStats::add(&c.stats.requests_rx, 1);
            }
            return crate::push_in_place(&mut self.events, || {
                Event::Request(Request { conn, id, method: header.method, payload })
            });
        }
        let Some(call) = self.calls.remove(id) else { return };
        if let Some(c) = self.conns.get_mut(conn) {
            c.in_flight = c.in_flight.saturating_sub(1);
            c.stats.set_in_flight(c.in_flight);
        }
        if call.state != CallState::Sent {
            return;
        }
        let result = if header.has(flags::ERROR) {
            let peer = self.conns.get(conn).map_or_else(String::new, |c| c.peer_text());
            match RemoteError::decode(&payload) {
                Ok(e) => Err(FabricError::Remote { peer, method: call.method, code: e.code, message: e.message }),
                Err(e) => Err(FabricError::Protocol { peer, source: e }),
            }
        } else {
            Ok(payload)
        };
        crate::push_in_place(&mut self.events, || {
            Event::Completion(Completion { call: id, tag: call.tag, result: result.map_err(Box::new) })
        });
    }
}
