//! The JSON-RPC methods of a ClaudeFS server, by subsystem.

mod bdev;
mod blobstore;
pub mod fabric;
mod framework;
pub mod fs;
mod nvme;

use std::sync::Arc;

use pmd::rpc::{Methods, RpcError};

use crate::app::App;

/// Builds the method table of `app`.
pub fn build(app: &Arc<App>) -> Arc<Methods> {
    let mut methods = Methods::new(app.state.clone());
    framework::register(&mut methods, app);
    bdev::register(&mut methods, app);
    fabric::register(&mut methods, app);
    blobstore::register(&mut methods, app);
    fs::register(&mut methods, app);
    nvme::register(&mut methods, app);
    let methods = Arc::new(methods);
    let _ = app.methods.set(Arc::downgrade(&methods));
    methods
}

/// A bdev-layer error as a JSON-RPC error (negative errno, as SPDK does).
pub fn bdev_err(e: ::nvme::BdevError) -> RpcError {
    RpcError::errno(e.errno(), e.to_string())
}
