//! fabric_* methods: the transports this host offers, listeners serving
//! RPC on them, and their connections.

use std::sync::{Arc, Mutex};

use fabric::reactor::{attach, echo};
use fabric::rpc::{Rpc, RpcOptions};
use fabric::stats::EndpointStats;
use fabric::transport::TransportConfig;
use pmd::PollerId;
use pmd::rpc::{Allowed, Methods, NoParams, RpcError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::app::App;

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    /// Answers every request with its own payload (for checks and benchmarks).
    #[default]
    Echo,
}

/// Parameters of `fabric_listen` (and what `save_config` writes for a listener).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenParams {
    /// A name for the listener, unique on this server.
    pub name: String,
    /// "tcp" (plain sockets), a libfabric provider ("tcp;ofi_rxm", "shm",
    /// "verbs;ofi_rxm"), or "auto" (verbs;ofi_rxm, else tcp;ofi_rxm, else tcp).
    pub transport: String,
    /// Where to listen: "IP:PORT" (port 0: any) or, for shm, a name.
    pub address: String,
    /// The reactor that serves it.
    #[serde(default)]
    pub reactor: u32,
    /// What it serves.
    #[serde(default)]
    pub service: Service,
    /// Move bulk payloads by RMA when the provider can.
    #[serde(default = "yes")]
    pub rma: bool,
    /// RPC options (credits, maximum message size, timeouts, keepalive...).
    #[serde(default)]
    pub options: Option<RpcOptions>,
}

fn yes() -> bool {
    true
}

struct Listener {
    /// As given (with the picked port for port 0): what save_config replays.
    params: ListenParams,
    transport: String,
    /// The address peers connect to.
    address: String,
    pollers: [PollerId; 2],
    stats: Arc<EndpointStats>,
}

/// The listeners of this server.
#[derive(Default)]
pub struct FabricState {
    listeners: Mutex<Vec<Listener>>,
}

impl FabricState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Listener>> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `fabric_listen` calls that recreate the listeners (with the
    /// addresses they got, so a restarted server is found where it was).
    pub fn save_config(&self) -> Vec<Value> {
        self.lock().iter().map(|l| json!({ "method": "fabric_listen", "params": l.params })).collect()
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Name {
    /// The listener's name.
    name: String,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct MaybeName {
    /// Only this listener; all if absent.
    #[serde(default)]
    name: Option<String>,
}

fn fabric_err(e: fabric::FabricError) -> RpcError {
    RpcError::errno(e.errno(), e.to_string())
}

async fn listen(app: Arc<App>, mut p: ListenParams) -> Result<Value, RpcError> {
    if app.fabric.lock().iter().any(|l| l.params.name == p.name) {
        return Err(RpcError::errno(libc::EEXIST, format!("a listener named {:?} exists", p.name)));
    }
    let reactor = app.reactors.get(p.reactor as usize).cloned().ok_or_else(|| {
        RpcError::errno(libc::EINVAL, format!("no reactor {} (this server has {})", p.reactor, app.reactors.len()))
    })?;
    let opts = p.options.clone().unwrap_or_default();
    let mut cfg = TransportConfig::new(&p.transport, Some(&p.address));
    cfg.rma = p.rma;
    // Opening may wait on the provider (address resolution, device probing): done here, not on a reactor.
    let rpc = Rpc::new(cfg.open(opts.max_message).map_err(fabric_err)?, opts).map_err(fabric_err)?;
    let transport = rpc.transport_name().to_string();
    let address = rpc.local_addr();
    let stats = rpc.stats().clone();
    let service = p.service;
    let pollers = reactor
        .call(move |ctx| {
            let attached = match service {
                Service::Echo => attach(ctx, rpc, echo),
            };
            attached.map(|a| a.pollers())
        })
        .await
        .map_err(|_| RpcError::internal(format!("reactor {} stopped", p.reactor)))?
        .map_err(fabric_err)?;
    tracing::info!(name = %p.name, %transport, %address, reactor = p.reactor, "fabric listener started");
    // Saved configs name the port that was picked for port 0 (peers find the
    // server where it was); names (shm) are kept as given.
    if p.address.parse::<std::net::SocketAddr>().is_ok_and(|a| a.port() == 0) {
        p.address = address.clone();
    }
    let name = p.name.clone();
    app.fabric.lock().push(Listener {
        params: p,
        transport: transport.clone(),
        address: address.clone(),
        pollers,
        stats,
    });
    Ok(json!({ "name": name, "transport": transport, "address": address }))
}

pub fn register(m: &mut Methods, app: &Arc<App>) {
    let a = app.clone();
    m.add_sync(
        "fabric_get_transports",
        "Transports this host offers (plain tcp and each libfabric provider, with capabilities), what \"auto\" picks, and the transport each listener uses.",
        Allowed::Always,
        move |_: NoParams| {
            let transports = fabric::transport::available().map_err(fabric_err)?;
            let listeners: Vec<Value> = a
                .fabric
                .lock()
                .iter()
                .map(|l| json!({ "name": l.params.name, "transport": l.transport, "address": l.address }))
                .collect();
            Ok(json!({
                "libfabric": fabric::transport::libfabric_version(),
                "auto": TransportConfig::new("auto", None).resolve(),
                "transports": transports,
                "listeners": listeners,
            }))
        },
    );

    let a = app.clone();
    m.add(
        "fabric_listen",
        "Serve RPC on a transport: a listener on an address, run by one reactor. Returns its name, transport and actual address.",
        Allowed::Runtime,
        move |p: ListenParams| listen(a.clone(), p),
    );

    let a = app.clone();
    m.add(
        "fabric_stop_listener",
        "Stop a listener: its connections close and its calls fail.",
        Allowed::Runtime,
        move |p: Name| {
            let a = a.clone();
            async move {
                let l = {
                    let mut ls = a.fabric.lock();
                    let i = ls
                        .iter()
                        .position(|l| l.params.name == p.name)
                        .ok_or_else(|| RpcError::errno(libc::ENOENT, format!("no listener named {:?}", p.name)))?;
                    ls.remove(i)
                };
                let reactor = a.reactors[l.params.reactor as usize].clone();
                let pollers = l.pollers;
                reactor
                    .call(move |ctx| pollers.into_iter().for_each(|id| ctx.unregister_poller(id)))
                    .await
                    .map_err(|_| RpcError::internal("the reactor stopped"))?;
                Ok(true)
            }
        },
    );

    let a = app.clone();
    m.add_sync(
        "fabric_get_connections",
        "Connections of the listeners (or one): peer, state, bytes, frames, requests, bulk transfers, errors and the last error.",
        Allowed::Always,
        move |p: MaybeName| {
            let ls = a.fabric.lock();
            if let Some(n) = &p.name
                && !ls.iter().any(|l| &l.params.name == n)
            {
                return Err(RpcError::errno(libc::ENOENT, format!("no listener named {n:?}")));
            }
            let out: Vec<Value> = ls
                .iter()
                .filter(|l| p.name.as_ref().is_none_or(|n| *n == l.params.name))
                .map(|l| {
                    json!({
                        "listener": l.params.name,
                        "transport": l.stats.transport,
                        "address": l.stats.local_addr,
                        "connections": l.stats.connections(),
                    })
                })
                .collect();
            Ok(out)
        },
    );
}
