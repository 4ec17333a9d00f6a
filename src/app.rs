//! What a running ClaudeFS process holds: reactors, bdevs, the framework
//! state, and the startup config still to be replayed.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use anyhow::Context;
use nvme::BdevRegistry;
use pmd::rpc::{FrameworkState, Methods, RpcError};
use pmd::{CoreMask, IdlePolicy, ReactorHandle};
use serde_json::Value;

/// One call of a startup config (the list `save_config` writes).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigCall {
    /// Method name.
    pub method: String,
    /// Parameters, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
}

/// Reads a startup config, naming the file and the place of any error.
pub fn read_config(path: &Path) -> anyhow::Result<Vec<ConfigCall>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!("config {} is not a JSON list of {{\"method\": ..., \"params\": {{...}}}} calls", path.display())
    })
}

/// The state behind the control methods.
pub struct App {
    pub registry: Arc<BdevRegistry>,
    pub reactors: Arc<[ReactorHandle]>,
    pub mask: CoreMask,
    pub idle: IdlePolicy,
    pub state: Arc<FrameworkState>,
    /// Config calls waiting for `framework_start_init` (`--wait-for-rpc`).
    pub deferred: Mutex<Vec<(usize, ConfigCall)>>,
    /// Asks the server to exit (framework_shutdown, signals).
    pub shutdown: Arc<tokio::sync::Notify>,
    /// The method table, for replaying deferred calls from a method.
    pub methods: OnceLock<Weak<Methods>>,
    /// Fabric listeners.
    pub fabric: crate::methods::fabric::FabricState,
    /// Mounted file systems.
    pub fs: crate::methods::fs::FsState,
    /// Loaded blobstores, by bdev name.
    pub blobstores: Mutex<std::collections::BTreeMap<String, blobfs::Blobstore>>,
}

impl App {
    pub fn new(reactors: Arc<[ReactorHandle]>, mask: CoreMask, idle: IdlePolicy) -> Arc<Self> {
        Arc::new(Self {
            registry: BdevRegistry::new(),
            reactors,
            mask,
            idle,
            state: Arc::default(),
            deferred: Mutex::new(Vec::new()),
            shutdown: Arc::default(),
            methods: OnceLock::new(),
            fabric: Default::default(),
            fs: Default::default(),
            blobstores: Mutex::default(),
        })
    }

    /// The loaded blobstore on `bdev`.
    pub fn blobstore(&self, bdev: &str) -> Result<blobfs::Blobstore, RpcError> {
        self.blobstores.lock().unwrap_or_else(|p| p.into_inner()).get(bdev).cloned().ok_or_else(|| {
            RpcError::errno(
                libc::ENODEV,
                format!("no blobstore is loaded on bdev {bdev:?} (blobstore_create or blobstore_load)"),
            )
        })
    }

    /// The blobstore loaded on `bdev`, for a method that changes its blobs:
    /// refused (EBUSY) while a file system on it is mounted, since its
    /// blobs (root, metadata log, data) change only through the file system.
    pub fn blobstore_to_change(&self, bdev: &str) -> Result<blobfs::Blobstore, RpcError> {
        let store = self.blobstore(bdev)?;
        match self.fs.mounted_from(bdev) {
            Some(at) => Err(RpcError::errno(
                libc::EBUSY,
                format!(
                    "the blobstore on bdev {bdev:?} holds the file system mounted on {}; unmount it first",
                    at.display()
                ),
            )),
            None => Ok(store),
        }
    }

    /// Unloads every blobstore cleanly (at shutdown); failures are logged.
    pub async fn unload_blobstores(&self) {
        let stores: Vec<(String, blobfs::Blobstore)> =
            std::mem::take(&mut *self.blobstores.lock().unwrap_or_else(|p| p.into_inner())).into_iter().collect();
        for (bdev, store) in stores {
            if let Err(e) = store.unload().await {
                tracing::error!(
                    bdev,
                    "unloading the blobstore failed: {e}; it will be recovered from its journal at the next load"
                );
            }
        }
    }

    /// Initialises the framework: fixes the options only startup may set.
    /// Returns false if it was already initialised.
    pub fn init(&self) -> bool {
        if !self.state.set_initialized() {
            return false;
        }
        nvme::uring::freeze_options();
        tracing::info!("framework initialized");
        true
    }
}

/// A config call that failed: which one, and why. Calls before it stay applied.
#[derive(Debug, thiserror::Error)]
#[error("config call #{index} ({method}) failed: {error}; calls 1 to {} were applied and stay applied", index - 1)]
pub struct ConfigError {
    pub index: usize,
    pub method: String,
    /// Not a `#[source]`: the message already says it.
    pub error: RpcError,
}

/// Replays config calls in order. Calls allowed before initialisation run
/// first; at the first call that needs an initialised framework (or an
/// explicit `framework_start_init`) the framework is initialised, unless
/// `wait_for_rpc`: then the rest waits for the `framework_start_init` RPC.
pub async fn replay(
    app: &App,
    methods: &Methods,
    calls: Vec<ConfigCall>,
    wait_for_rpc: bool,
) -> Result<(), ConfigError> {
    let mut calls = calls.into_iter().enumerate().map(|(i, c)| (i + 1, c));
    while let Some((index, call)) = calls.next() {
        if !app.state.is_initialized()
            && (call.method == "framework_start_init" || !methods.allowed_at_startup(&call.method))
        {
            // framework_start_init is allowed in both states; it marks the end of the startup part.
            let rest: Vec<(usize, ConfigCall)> = if call.method == "framework_start_init" {
                calls.by_ref().collect()
            } else {
                std::iter::once((index, call)).chain(calls.by_ref()).collect()
            };
            if wait_for_rpc {
                tracing::info!(
                    calls = rest.len(),
                    "config: waiting for framework_start_init before the remaining calls"
                );
                *app.deferred.lock().unwrap_or_else(|p| p.into_inner()) = rest;
                return Ok(());
            }
            app.init();
            return run_calls(methods, rest).await;
        }
        run_calls(methods, vec![(index, call)]).await?;
    }
    if !wait_for_rpc {
        app.init();
    }
    Ok(())
}

pub async fn run_calls(methods: &Methods, calls: Vec<(usize, ConfigCall)>) -> Result<(), ConfigError> {
    for (index, call) in calls {
        tracing::debug!(index, method = call.method, "config call");
        methods.call(&call.method, call.params).await.map_err(|error| ConfigError {
            index,
            method: call.method.clone(),
            error,
        })?;
    }
    Ok(())
}
