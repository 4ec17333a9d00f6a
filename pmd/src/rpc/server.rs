//! The control socket: JSON-RPC 2.0 over a Unix stream socket.
//!
//! Each connection is served by its own task, requests on one connection in
//! order. A connection that sends bytes that are not JSON, or a request
//! larger than the limit, gets one error response and is closed; other
//! connections are unaffected.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::methods::Methods;
use super::protocol::{FrameError, FrameReader, RpcError, response_err};

/// Where the server listens unless told otherwise (`-r PATH`).
pub const DEFAULT_SOCKET: &str = "/var/tmp/claudefs.sock";
/// Largest request accepted by default.
pub const DEFAULT_MAX_REQUEST: usize = 1 << 20;
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 128;

/// Why the control socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another server answers on the path.
    #[error("control socket {0} is in use by a running server; stop it or pass another path with -r")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; refusing to replace it (pass another path with -r)")]
    NotASocket(PathBuf),
    /// Binding, removing a stale socket or setting its mode failed.
    #[error("cannot open control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// A bound control socket, ready to serve. Removes its socket file when dropped.
#[derive(Debug)]
pub struct RpcServer {
    listener: UnixListener,
    path: PathBuf,
    methods: Arc<Methods>,
    max_request: usize,
}

impl RpcServer {
    /// Binds `path` with mode 0600. A stale socket left by a crashed server is
    /// removed; a socket a live server answers on is left alone and reported.
    /// Must be called within a tokio runtime.
    pub fn bind(path: &Path, methods: Arc<Methods>, max_request: usize) -> Result<Self, ServerError> {
        let io_err = |source| ServerError::Io { path: path.to_path_buf(), source };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing stale control socket");
                    std::fs::remove_file(path).map_err(io_err)?;
                }
                Err(e) => return Err(io_err(e)),
            },
            Ok(_) => return Err(ServerError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let std_listener = std::os::unix::net::UnixListener::bind(path).map_err(io_err)?;
        // With the default umask (022) others cannot connect in the instant before this.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        std_listener.set_nonblocking(true).map_err(io_err)?;
        let listener = UnixListener::from_std(std_listener).map_err(io_err)?;
        tracing::info!(path = %path.display(), "control socket listening");
        Ok(Self { listener, path: path.to_path_buf(), methods, max_request })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections until `shutdown` completes.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
            };
            let stream = tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!("accepting a control connection failed: {e}");
                        continue;
                    }
                },
            };
            let methods = self.methods.clone();
            let limit = self.max_request;
            tokio::spawn(async move {
                serve_connection(stream, &methods, limit).await;
                drop(permit);
            });
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn send(stream: &mut UnixStream, value: &Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    stream.write_all(&bytes).await
}

/// Serves one connection until the peer closes it or breaks the protocol.
pub async fn serve_connection(mut stream: UnixStream, methods: &Methods, limit: usize) {
    let mut frames = FrameReader::new(limit);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        loop {
            match frames.next_value() {
                Ok(Some(value)) => {
                    if let Some(reply) = methods.handle(value).await {
                        if let Err(e) = send(&mut stream, &reply).await {
                            tracing::debug!("control client went away before its response: {e}");
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let err = match &e {
                        FrameError::Syntax { .. } => RpcError::parse(e.to_string()),
                        FrameError::TooLarge { .. } => RpcError::invalid_request(e.to_string()),
                    };
                    tracing::warn!("closing control connection: {e}");
                    let _ = send(&mut stream, &response_err(Value::Null, &err)).await;
                    return;
                }
            }
        }
        match stream.read(&mut buf).await {
            Ok(0) => {
                if frames.pending() > 0 {
                    tracing::warn!(
                        bytes = frames.pending(),
                        "control client disconnected in the middle of a request; it was dropped"
                    );
                }
                return;
            }
            Ok(n) => frames.push(&buf[..n]),
            Err(e) => {
                tracing::debug!("reading from a control client failed: {e}");
                return;
            }
        }
    }
}
