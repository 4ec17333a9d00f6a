//! Errors of the fabric: setting up transports, connections, and calls.
//! Malformed bytes are [`crate::frame::FrameError`]s, wrapped in
//! [`FabricError::Protocol`] when they end a connection.

use std::sync::Arc;

use crate::frame::FrameError;

/// Why a fabric operation failed. Cheap to clone: one connection failure
/// fails every call that was waiting on it with the same error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FabricError {
    /// A libfabric call failed.
    #[error("libfabric {call} failed{}: {message} ({code})", context_suffix(context))]
    Ofi {
        /// The libfabric function.
        call: &'static str,
        /// What it was doing it for ("" when obvious).
        context: String,
        /// The (positive) libfabric error number.
        code: i32,
        /// libfabric's text for it.
        message: String,
    },
    /// No libfabric provider offers what was asked for.
    #[error("no libfabric provider matches {wanted}: {reason}")]
    NoProvider {
        /// The provider name or capabilities asked for.
        wanted: String,
        /// What libfabric said, or what was missing.
        reason: String,
    },
    /// This build has no libfabric support.
    #[error(
        "transport {0:?} needs libfabric, but this build of ClaudeFS has none (rebuild with the `libfabric` feature \
         after installing libfabric-dev >= 1.17 and libclang-dev), use the plain \"tcp\" transport instead"
    )]
    NoLibfabric(String),
    /// A socket operation failed.
    #[error("{op} {addr}: {source}")]
    Socket {
        /// What was being done ("connecting to", "listening on", ...).
        op: &'static str,
        /// The address involved.
        addr: String,
        /// The OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// An address could not be used.
    #[error("invalid address {addr:?} for {transport}: {reason}")]
    BadAddress {
        /// The address as given.
        addr: String,
        /// The transport it was meant for.
        transport: String,
        /// What is wrong.
        reason: String,
    },
    /// The peer sent bytes that are not a valid frame; the connection was closed.
    #[error("protocol error from {peer}: {source}")]
    Protocol {
        /// The peer.
        peer: String,
        /// What was wrong with the frame.
        #[source]
        source: FrameError,
    },
    /// The peer broke the protocol with valid frames (e.g. a response to nothing).
    #[error("protocol violation by {peer}: {reason}")]
    Violation {
        /// The peer.
        peer: String,
        /// What it did.
        reason: String,
    },
    /// The connection went away (closed, reset, or failed).
    #[error("connection to {peer} lost: {reason}")]
    ConnectionLost {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// Nothing arrived from the peer for too long.
    #[error("connection to {peer} timed out: nothing received for {ms} ms")]
    KeepaliveTimeout {
        /// The peer.
        peer: String,
        /// Milliseconds of silence.
        ms: u64,
    },
    /// The handshake did not finish in time or was refused.
    #[error("handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// Reconnecting gave up.
    #[error("connection to {peer} failed after {attempts} reconnect attempts: {last}")]
    ReconnectFailed {
        /// The peer.
        peer: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// A call got no answer before its deadline.
    #[error("request {request_id} (method {method}) to {peer} timed out after {ms} ms")]
    TimedOut {
        /// The peer.
        peer: String,
        /// The request id.
        request_id: u64,
        /// The method.
        method: u16,
        /// The timeout.
        ms: u64,
    },
    /// The caller cancelled the call.
    #[error("request {request_id} to {peer} was cancelled")]
    Cancelled {
        /// The peer.
        peer: String,
        /// The request id.
        request_id: u64,
    },
    /// A payload larger than the peer accepts.
    #[error("a {len}-byte payload exceeds the maximum message size {max} of {peer}")]
    TooLarge {
        /// The peer.
        peer: String,
        /// Payload bytes.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// Too many calls waiting for credits on one connection.
    #[error("{queued} requests already wait for credits on the connection to {peer} (limit {limit})")]
    Backpressure {
        /// The peer.
        peer: String,
        /// Calls queued.
        queued: usize,
        /// The limit.
        limit: usize,
    },
    /// No such connection.
    #[error("no connection with id {0}")]
    UnknownConnection(u32),
    /// The peer's service answered with an error.
    #[error("{peer} answered method {method} with error {code}: {message}")]
    Remote {
        /// The peer.
        peer: String,
        /// The method.
        method: u16,
        /// The error code.
        code: i32,
        /// The error text.
        message: String,
    },
    /// DMA memory ran out.
    #[error("DMA memory for a {len}-byte payload: {reason}")]
    Memory {
        /// Bytes wanted.
        len: usize,
        /// The pool's error.
        reason: String,
    },
    /// A configuration value is out of range.
    #[error("invalid fabric option {option}: {reason}")]
    Config {
        /// The option.
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn context_suffix(context: &str) -> String {
    if context.is_empty() { String::new() } else { format!(" ({context})") }
}

impl FabricError {
    /// A socket error with its operation and address.
    pub(crate) fn socket(op: &'static str, addr: impl ToString, source: std::io::Error) -> Self {
        Self::Socket { op, addr: addr.to_string(), source: Arc::new(source) }
    }

    /// The negative errno a control method reports for this error.
    pub fn errno(&self) -> i32 {
        -match self {
            Self::Ofi { code, .. } => *code,
            Self::NoProvider { .. } | Self::NoLibfabric(_) => libc::ENODEV,
            Self::Socket { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Self::BadAddress { .. } | Self::Config { .. } => libc::EINVAL,
            Self::Protocol { .. } | Self::Violation { .. } => libc::EPROTO,
            Self::ConnectionLost { .. } | Self::ReconnectFailed { .. } => libc::ECONNRESET,
            Self::KeepaliveTimeout { .. } | Self::TimedOut { .. } | Self::Handshake { .. } => libc::ETIMEDOUT,
            Self::Cancelled { .. } => libc::ECANCELED,
            Self::TooLarge { .. } => libc::EMSGSIZE,
            Self::Backpressure { .. } => libc::EAGAIN,
            Self::UnknownConnection(_) => libc::ENOTCONN,
            Self::Remote { code, .. } => code.abs(),
            Self::Memory { .. } => libc::ENOMEM,
        }
    }
}
