//! # fabric — the network layer of ClaudeFS
//!
//! Servers and clients talk through *endpoints* that move *frames*: a
//! 32-byte header (magic, version, opcode, request id, flags, length,
//! credits, CRC32C of header and payload) and a payload ([`frame`]). Two
//! kinds of transport carry them ([`transport`]):
//!
//! - **libfabric** ([`ofi`], [`transport::ofi`]): a reliable-datagram
//!   endpoint of a provider chosen by name — `verbs;ofi_rxm` on RDMA NICs,
//!   `tcp;ofi_rxm` anywhere, `shm` between processes of one host. Large
//!   payloads move by RMA read straight into DMA memory. Needs the
//!   `libfabric` feature (on by default) and libfabric >= 1.17.
//! - **plain TCP** ([`transport::tcp`]): non-blocking sockets, for hosts
//!   without libfabric.
//!
//! On top, [`rpc::Rpc`] is message RPC: a hello exchange per connection
//! (identity, limits, credits), requests matched to responses by id,
//! credit-based flow control, per-call deadlines and cancellation, keepalive,
//! reconnection, a maximum message size, and bulk payloads. It is a state
//! machine driven by `poll(now)`; [`reactor::attach`] runs it from a
//! [`pmd`] reactor poller, and a sleeping reactor is woken by the transport's
//! fd. Nothing here ever blocks a reactor.
//!
//! ```
//! use fabric::frame::Payload;
//! use fabric::rpc::{Event, Rpc, RpcOptions};
//! use fabric::transport::tcp::TcpTransport;
//!
//! // A server and a client endpoint on loopback, stepped by hand.
//! let opts = RpcOptions::default();
//! let mut server = Rpc::new(TcpTransport::new(Some("127.0.0.1:0"), opts.max_message).unwrap(), opts.clone()).unwrap();
//! let mut client = Rpc::new(TcpTransport::new(None, opts.max_message).unwrap(), opts).unwrap();
//! let now = || pmd::clock::now();
//! let conn = client.connect(now(), &server.local_addr()).unwrap();
//! let call = client.call(now(), conn, 7, Payload::copy_from(b"ping"), 42).unwrap();
//! let (mut events, mut answer) = (Vec::new(), None);
//! while answer.is_none() {
//!     server.poll(now(), &mut events);
//!     for ev in events.drain(..) {
//!         if let Event::Request(r) = ev {
//!             server.respond(r.conn, r.id, r.method, Ok(r.payload)).unwrap();
//!         }
//!     }
//!     server.flush();
//!     client.poll(now(), &mut events);
//!     for ev in events.drain(..) {
//!         if let Event::Completion(c) = ev {
//!             answer = Some((c.call, c.tag, c.result.unwrap().to_vec()));
//!         }
//!     }
//! }
//! assert_eq!(answer, Some((call, 42, b"ping".to_vec())));
//! ```

#![deny(missing_docs)]

mod error;
pub mod frame;
#[cfg(feature = "libfabric")]
pub mod ofi;
pub mod reactor;
pub mod rpc;
mod slab;
pub mod stats;
mod sys;
pub mod transport;

pub use error::FabricError;
pub use frame::FrameError;

/// Appends `make()` to `v`, built where it lands: `Vec::push` builds the
/// value on the stack first and copies it over, and for the events of every
/// message that copy reads back bytes just written in other widths (a
/// store-forwarding stall each time).
#[inline(always)]
pub(crate) fn push_in_place<T>(v: &mut Vec<T>, make: impl FnOnce() -> T) {
    v.reserve(1);
    let len = v.len();
    // SAFETY: reserve(1) left room for one more element at `len`; it is
    // written before the length covers it.
    unsafe {
        v.as_mut_ptr().add(len).write(make());
        v.set_len(len + 1);
    }
}
