//! bdev_nvme_* methods: the userspace NVMe driver's controllers.
//!
//! Attach, detach, reset and health reads wait for the controller (bring-up
//! within CAP.TO, admin commands), so they run on tokio's blocking threads,
//! never on the control thread's event loop.

use std::sync::Arc;

use ::nvme::nvme::{self as driver, Controller, NvmeAttachConfig};
use pmd::rpc::{Allowed, Methods, RpcError};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::bdev_err;
use crate::app::App;

/// Parameters naming one controller.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Name {
    /// Controller name (as given to bdev_nvme_attach_controller).
    name: String,
}

/// Parameters optionally naming one controller.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct MaybeName {
    /// Only this controller; all if absent.
    #[serde(default)]
    name: Option<String>,
}

fn describe(c: &Controller) -> Value {
    let d = c.data();
    let namespaces: Vec<Value> = c
        .namespaces()
        .iter()
        .map(|n| {
            json!({
                "nsid": n.nsid, "bdev": format!("{}n{}", c.name(), n.nsid), "block_size": n.data.block_size,
                "num_blocks": n.data.nsze, "metadata_size": n.data.metadata_size, "lba_format": n.data.format,
                "deallocate_zeroes": n.data.deallocate_zeroes,
            })
        })
        .collect();
    json!({
        "name": c.name(),
        "trid": { "trtype": "pcie", "traddr": c.traddr() },
        "model": d.model, "serial": d.serial, "firmware": d.firmware, "vid": d.vid, "cntlid": d.cntlid,
        "nvme_version": c.version(),
        "max_transfer_bytes": c.max_transfer(), "sgl": d.sgl, "volatile_write_cache": d.vwc,
        "io_queues": c.io_queues(), "io_queues_in_use": c.io_queues_in_use(), "io_queue_entries": c.queue_entries(),
        "resets": c.resets(),
        "namespaces": namespaces,
    })
}

/// Runs blocking driver work off the control thread's event loop.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ::nvme::BdevError> + Send + 'static,
) -> Result<T, RpcError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RpcError::internal(format!("NVMe worker failed: {e}")))?
        .map_err(bdev_err)
}

pub fn register(m: &mut Methods, app: &Arc<App>) {
    let a = app.clone();
    m.add(
        "bdev_nvme_attach_controller",
        "Attach the NVMe controller at a PCI address (bound to vfio-pci by hack/setup.sh); its namespaces become bdevs <name>n<nsid>. Returns their names.",
        Allowed::Runtime,
        move |cfg: NvmeAttachConfig| {
            let registry = a.registry.clone();
            blocking(move || driver::attach(&registry, &cfg))
        },
    );
    let a = app.clone();
    m.add(
        "bdev_nvme_detach_controller",
        "Detach a controller: delete its namespace bdevs (none may be open) and shut it down normally (CC.SHN).",
        Allowed::Runtime,
        move |p: Name| {
            let registry = a.registry.clone();
            async move { blocking(move || driver::detach(&registry, &p.name)).await.map(|()| true) }
        },
    );
    m.add_sync(
        "bdev_nvme_get_controllers",
        "Attached NVMe controllers (or one): model, serial, firmware, queues, namespaces.",
        Allowed::Always,
        |p: MaybeName| {
            let list = match p.name {
                Some(n) => vec![driver::controller(&n).map_err(bdev_err)?],
                None => driver::controllers(),
            };
            Ok(list.iter().map(|c| describe(c)).collect::<Vec<_>>())
        },
    );
    m.add(
        "bdev_nvme_get_controller_health_info",
        "A controller's SMART / health log page (temperature, spare, wear, data units, errors) and its error log.",
        Allowed::Always,
        |p: Name| {
            blocking(move || {
                let c = driver::controller(&p.name)?;
                let health = c.health()?;
                let errors = c.error_log()?;
                Ok(json!({ "name": c.name(), "health": health, "error_log": errors }))
            })
        },
    );
    m.add(
        "bdev_nvme_reset_controller",
        "Reset a controller: disable and re-enable it; requests in flight complete as aborted, queues are re-created.",
        Allowed::Runtime,
        |p: Name| async move { blocking(move || driver::controller(&p.name)?.reset()).await.map(|()| true) },
    );
}
