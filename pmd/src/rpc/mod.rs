//! The JSON-RPC 2.0 control server (SPDK style).
//!
//! Methods are named `<subsystem>_<action>` and take named parameters. The
//! server speaks on a Unix socket (default [`DEFAULT_SOCKET`], mode 0600);
//! requests may be sent back to back or newline-separated, and batches are
//! answered as arrays. This module is the only place below the binary that
//! knows JSON; the handlers that touch devices live where the devices are
//! wired together (the `claudefs` binary).
//!
//! ```
//! use pmd::rpc::{Allowed, FrameworkState, Methods, NoParams};
//! let mut methods = Methods::new(Default::default());
//! methods.add_sync("framework_get_version", "Version.", Allowed::Always, |_: NoParams| Ok("0.1"));
//! assert!(methods.names().contains(&"rpc_get_methods".to_string()));
//! ```

mod methods;
mod protocol;
mod server;

pub use methods::{Allowed, FrameworkState, HandlerFuture, Methods, NoParams, decode_params};
pub use protocol::{
    FrameError, FrameReader, Request, RpcError, codes, kind, parse_request, request, response_err, response_ok,
};
pub use server::{DEFAULT_MAX_REQUEST, DEFAULT_SOCKET, RpcServer, ServerError, serve_connection};
