//! framework_*, thread_*, env_* and save_config.

use std::sync::Arc;

use pmd::rpc::{Allowed, Methods, NoParams, RpcError};
use serde_json::{Value, json};

use crate::app::{App, run_calls};

pub fn register(m: &mut Methods, app: &Arc<App>) {
    m.add_sync("framework_get_version", "The server's version.", Allowed::Always, |_: NoParams| {
        Ok(json!({ "version": format!("ClaudeFS v{}", pmd::VERSION), "fields": { "major": 0, "minor": 1, "patch": 0 } }))
    });

    let a = app.clone();
    m.add_sync(
        "framework_get_reactors",
        "Reactors with their core, idle policy and busy/idle/sleep time (ns).",
        Allowed::Always,
        move |_: NoParams| {
            let reactors: Vec<Value> = a
                .reactors
                .iter()
                .map(|r| {
                    let s = r.stats();
                    json!({
                        "id": r.id(), "lcore": r.core(), "busy_ns": s.busy_ns, "idle_ns": s.idle_ns,
                        "sleep_ns": s.sleep_ns, "rounds": s.rounds, "messages": s.messages,
                        "pollers": s.pollers, "sleeping": r.is_sleeping(),
                    })
                })
                .collect();
            Ok(json!({
                "tick_rate": 1_000_000_000u64, "clock": pmd::clock::source(), "core_mask": a.mask.to_string(),
                "idle_policy": a.idle.as_str(), "reactors": reactors,
            }))
        },
    );

    let a = app.clone();
    m.add(
        "thread_get_pollers",
        "The pollers of every reactor: active (every round), timed and paused, with run and busy counts.",
        Allowed::Always,
        move |_: NoParams| {
            let a = a.clone();
            async move {
                let mut out = Vec::new();
                for r in a.reactors.iter() {
                    let pollers = r.call(|ctx| ctx.pollers()).await.map_err(|_| RpcError::internal(format!("reactor {} stopped", r.id())))?;
                    let pick = |state: &str| pollers.iter().filter(|p| p.state == state).cloned().collect::<Vec<_>>();
                    out.push(json!({
                        "id": r.id(), "lcore": r.core(),
                        "active_pollers": pick("active"), "timed_pollers": pick("timed"), "paused_pollers": pick("paused"),
                    }));
                }
                Ok(json!({ "tick_rate": 1_000_000_000u64, "reactors": out }))
            }
        },
    );

    m.add_sync(
        "env_get_mem_stats",
        "DMA memory: hugepage use, regions and size classes.",
        Allowed::Always,
        |_: NoParams| Ok(pmd::dma::mem_stats()),
    );

    let a = app.clone();
    m.add(
        "framework_start_init",
        "Initialise the framework (fixing startup options) and run the config calls that waited for it (--wait-for-rpc).",
        Allowed::Always,
        move |_: NoParams| {
            let a = a.clone();
            async move {
                if !a.init() {
                    return Err(RpcError::errno(libc::EALREADY, "the framework is already initialized"));
                }
                let deferred = std::mem::take(&mut *a.deferred.lock().unwrap_or_else(|p| p.into_inner()));
                if !deferred.is_empty() {
                    let methods = a.methods.get().and_then(std::sync::Weak::upgrade).ok_or_else(|| RpcError::internal("method table gone"))?;
                    run_calls(&methods, deferred).await.map_err(|e| {
                        tracing::error!("{e}");
                        RpcError::errno(libc::EINVAL, e.to_string())
                    })?;
                }
                Ok(true)
            }
        },
    );

    let a = app.clone();
    m.add_sync(
        "save_config",
        "The calls that rebuild this server's configuration, as a JSON list for `claudefs server -c`.",
        Allowed::Always,
        move |_: NoParams| {
            let mut calls = vec![
                json!({ "method": "bdev_uring_set_options", "params": nvme::uring::options() }),
                json!({ "method": "framework_start_init" }),
            ];
            for bdev in a.registry.list() {
                let config = bdev.config();
                let call = json!({ "method": config.method(), "params": config });
                // An NVMe controller's namespaces share one attach call.
                if !calls.contains(&call) {
                    calls.push(call);
                }
            }
            for bdev in a.blobstores.lock().unwrap_or_else(|p| p.into_inner()).keys() {
                calls.push(json!({ "method": "blobstore_load", "params": { "bdev_name": bdev } }));
            }
            calls.extend(a.fabric.save_config());
            calls.extend(a.fs.config());
            Ok(calls)
        },
    );

    let a = app.clone();
    m.add_sync(
        "framework_shutdown",
        "Stop the server cleanly (as on SIGTERM).",
        Allowed::Always,
        move |_: NoParams| {
            a.shutdown.notify_one();
            Ok(true)
        },
    );
}
