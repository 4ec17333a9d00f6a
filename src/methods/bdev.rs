//! bdev_* methods.

use std::sync::Arc;

use nvme::{Bdev, IoType, crash, error_bdev, malloc, null, uring};
use pmd::rpc::{Allowed, Methods, NoParams, RpcError};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::bdev_err;
use crate::app::App;

/// Parameters naming one bdev.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Name {
    /// Name (or UUID) of the bdev.
    name: String,
}

/// Parameters optionally naming one bdev.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct MaybeName {
    /// Only this bdev (name or UUID); all if absent.
    #[serde(default)]
    name: Option<String>,
}

fn selected(app: &App, name: Option<String>) -> Result<Vec<Arc<Bdev>>, RpcError> {
    match name {
        Some(n) => Ok(vec![app.registry.get(&n).map_err(bdev_err)?]),
        None => Ok(app.registry.list()),
    }
}

fn describe(b: &Bdev) -> Value {
    let config = b.config();
    let io_types: serde_json::Map<String, Value> =
        IoType::ALL.iter().map(|t| (t.as_str().to_string(), json!(b.supports(*t)))).collect();
    json!({
        "name": b.name(),
        "aliases": [],
        "product_name": b.product_name(),
        "block_size": b.block_size(),
        "num_blocks": b.num_blocks(),
        "uuid": b.uuid(),
        "claimed": b.claimed_by().is_some(),
        "claimed_by": b.claimed_by(),
        "open_descriptors": b.open_count(),
        "supported_io_types": io_types,
        "driver_specific": { config.kind(): config },
    })
}

fn latency(s: &nvme::stats::OpSnapshot) -> Value {
    let us = |ns: u64| ns as f64 / 1000.0;
    json!({
        "avg_us": s.latency_ns.checked_div(s.ops).map_or(0.0, us),
        "p50_us": us(s.latency.quantile(0.5)),
        "p99_us": us(s.latency.quantile(0.99)),
        "p999_us": us(s.latency.quantile(0.999)),
        "max_us": us(s.latency.max()),
    })
}

fn iostat(b: &Bdev) -> Value {
    let s = b.stats();
    let (r, w, u, f, z) =
        (s.op(IoType::Read), s.op(IoType::Write), s.op(IoType::Unmap), s.op(IoType::Flush), s.op(IoType::WriteZeroes));
    json!({
        "name": b.name(),
        "bytes_read": r.bytes, "num_read_ops": r.ops, "read_latency_ns": r.latency_ns,
        "bytes_written": w.bytes, "num_write_ops": w.ops, "write_latency_ns": w.latency_ns,
        "bytes_unmapped": u.bytes, "num_unmap_ops": u.ops, "unmap_latency_ns": u.latency_ns,
        "bytes_zeroed": z.bytes, "num_write_zeroes_ops": z.ops,
        "num_flush_ops": f.ops,
        "io_errors": IoType::ALL.iter().map(|t| s.op(*t).errors).sum::<u64>(),
        "timeouts": s.timeouts,
        "queued": s.queued,
        "latency": { "read": latency(r), "write": latency(w), "flush": latency(f) },
    })
}

/// Registers a create method whose parameters are the backend's config type.
macro_rules! create {
    ($m:expr, $app:expr, $name:literal, $desc:literal, $cfg:ty, $f:path) => {{
        let a = $app.clone();
        $m.add_sync($name, $desc, Allowed::Runtime, move |cfg: $cfg| {
            $f(&a.registry, &cfg).map(|b| b.name().to_string()).map_err(bdev_err)
        });
    }};
}

/// Registers a delete method for bdevs of one kind.
macro_rules! delete {
    ($m:expr, $app:expr, $name:literal, $desc:literal, $kind:literal) => {{
        let a = $app.clone();
        $m.add_sync($name, $desc, Allowed::Runtime, move |p: Name| {
            a.registry.unregister(&p.name, Some($kind)).map(|()| true).map_err(bdev_err)
        });
    }};
}

pub fn register(m: &mut Methods, app: &Arc<App>) {
    let a = app.clone();
    m.add_sync(
        "bdev_get_bdevs",
        "List bdevs (or one) with size, UUID, claim, supported I/O types and backend parameters.",
        Allowed::Always,
        move |p: MaybeName| Ok(selected(&a, p.name)?.iter().map(|b| describe(b)).collect::<Vec<_>>()),
    );
    let a = app.clone();
    m.add_sync(
        "bdev_get_iostat",
        "I/O statistics of bdevs (or one): ops, bytes, errors, timeouts, queueing and latency percentiles.",
        Allowed::Always,
        move |p: MaybeName| {
            Ok(json!({ "tick_rate": 1_000_000_000u64, "bdevs": selected(&a, p.name)?.iter().map(|b| iostat(b)).collect::<Vec<_>>() }))
        },
    );

    create!(
        m,
        app,
        "bdev_null_create",
        "Create a null bdev: completes every request at once, data untouched.",
        null::NullConfig,
        null::create
    );
    delete!(m, app, "bdev_null_delete", "Delete a null bdev.", "null");
    create!(m, app, "bdev_malloc_create", "Create a RAM bdev, zero-filled.", malloc::MallocConfig, malloc::create);
    delete!(m, app, "bdev_malloc_delete", "Delete a malloc bdev (its data is gone).", "malloc");
    create!(
        m,
        app,
        "bdev_uring_create",
        "Create a bdev on a file or block device through io_uring (O_DIRECT unless direct is false). With size, a missing file is created sparse.",
        uring::UringConfig,
        uring::create
    );
    delete!(m, app, "bdev_uring_delete", "Delete a uring bdev (the file stays).", "uring");
    m.add_sync(
        "bdev_uring_set_options",
        "Set io_uring options for every reactor's ring: queue_depth, sqpoll, sqpoll_idle_ms, fixed_buffers.",
        Allowed::Startup,
        |o: uring::UringOptions| uring::set_options(o).map(|()| true).map_err(bdev_err),
    );
    m.add_sync("bdev_uring_get_options", "The io_uring options in force.", Allowed::Always, |_: NoParams| {
        Ok(uring::options())
    });

    create!(
        m,
        app,
        "bdev_error_create",
        "Wrap a bdev in an error-injection bdev named EE_<base_name> (claims the base).",
        error_bdev::ErrorConfig,
        error_bdev::create
    );
    delete!(m, app, "bdev_error_delete", "Delete an error bdev, releasing its base.", "error");
    let a = app.clone();
    m.add_sync(
        "bdev_error_inject",
        "Make an error bdev fail (failure), hold until aborted (timeout), half-transfer (torn) or refuse as full (busy) the next num requests of io_type; error_type clear removes rules.",
        Allowed::Runtime,
        move |p: error_bdev::InjectConfig| error_bdev::inject(&a.registry, &p).map(|()| true).map_err(bdev_err),
    );

    create!(
        m,
        app,
        "bdev_crash_create",
        "Put a simulated volatile write cache in front of a bdev, for power-cut tests (claims the base).",
        crash::CrashConfig,
        crash::create
    );
    delete!(m, app, "bdev_crash_delete", "Delete a crash bdev, releasing its base.", "crash");
    let a = app.clone();
    m.add_sync(
        "bdev_crash_power_cut",
        "Cut a crash bdev's power: unflushed writes are dropped, kept, or kept per block at random (mode, seed).",
        Allowed::Runtime,
        move |p: crash::PowerCutConfig| crash::power_cut(&a.registry, &p).map(|()| true).map_err(bdev_err),
    );
    let a = app.clone();
    m.add_sync("bdev_crash_power_on", "Turn a cut crash bdev back on.", Allowed::Runtime, move |p: Name| {
        crash::power_on(&a.registry, &p.name).map(|()| true).map_err(bdev_err)
    });
    let a = app.clone();
    m.add_sync(
        "bdev_crash_get_status",
        "Power state and unflushed blocks of a crash bdev.",
        Allowed::Always,
        move |p: Name| crash::status(&a.registry, &p.name).map_err(bdev_err),
    );
}
