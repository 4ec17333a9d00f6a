//! blobstore_* and blob_* methods.

use std::collections::BTreeMap;
use std::sync::Arc;

use blobfs::{BlobError, BlobOptions, Blobstore, FormatOptions};
use pmd::rpc::{Allowed, Methods, RpcError};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::app::App;

fn blob_err(e: BlobError) -> RpcError {
    RpcError::errno(e.errno(), e.to_string())
}

/// Parameters naming a blobstore.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Store {
    /// The bdev holding the blobstore.
    bdev_name: String,
}

/// Parameters of `blobstore_create`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Create {
    /// The bdev to format (its previous content is gone).
    bdev_name: String,
    /// Bytes per cluster: a power of two from 4096 (default 1 MiB).
    #[serde(default = "default_cluster")]
    cluster_size: u32,
    /// Pages of 4 KiB in the metadata journal (default: 1/256 of the bdev, 64 to 4096).
    #[serde(default)]
    journal_pages: Option<u64>,
}

fn default_cluster() -> u32 {
    1 << 20
}

/// Parameters optionally naming a blobstore.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct MaybeStore {
    /// Only this blobstore; all loaded ones if absent.
    #[serde(default)]
    bdev_name: Option<String>,
}

/// Parameters naming one blob.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct BlobRef {
    /// The bdev holding the blobstore.
    bdev_name: String,
    /// The blob.
    blob_id: u64,
}

/// Parameters of `blob_create`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct BlobCreate {
    /// The bdev holding the blobstore.
    bdev_name: String,
    /// Size in clusters.
    #[serde(default)]
    num_clusters: u64,
    /// Allocate clusters on first write instead of now.
    #[serde(default)]
    thin: bool,
    /// Extended attributes to start with.
    #[serde(default)]
    xattrs: BTreeMap<String, String>,
}

/// Parameters of `blob_resize`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Resize {
    /// The bdev holding the blobstore.
    bdev_name: String,
    /// The blob.
    blob_id: u64,
    /// New size in clusters.
    num_clusters: u64,
}

/// Parameters of `blob_set_xattr`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SetXattr {
    /// The bdev holding the blobstore.
    bdev_name: String,
    /// The blob.
    blob_id: u64,
    /// Attribute name (1 to 255 bytes).
    name: String,
    /// Value (UTF-8; up to 64 KiB).
    value: String,
}

/// Parameters of `blob_snapshot` and `blob_clone`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Derive {
    /// The bdev holding the blobstore.
    bdev_name: String,
    /// The blob to snapshot, or the snapshot to clone.
    blob_id: u64,
    /// Xattrs of the new blob.
    #[serde(default)]
    xattrs: BTreeMap<String, String>,
}

/// Parameters of `blobstore_set_super`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SetSuper {
    /// The bdev holding the blobstore.
    bdev_name: String,
    /// The application's root blob; absent to clear it.
    #[serde(default)]
    blob_id: Option<u64>,
}

fn bytes_map(x: BTreeMap<String, String>) -> BTreeMap<String, Vec<u8>> {
    x.into_iter().map(|(k, v)| (k, v.into_bytes())).collect()
}

/// Xattr values as strings when they are UTF-8, else as 0x-prefixed hex.
fn show_xattrs(x: BTreeMap<String, Vec<u8>>) -> Value {
    let shown: serde_json::Map<String, Value> = x
        .into_iter()
        .map(|(k, v)| {
            let text = String::from_utf8(v).unwrap_or_else(|e| {
                format!("0x{}", e.as_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>())
            });
            (k, Value::String(text))
        })
        .collect();
    Value::Object(shown)
}

/// Registers a method that runs `f` on the named blobstore.
macro_rules! on_store {
    // A method that changes blobs: refused on the store of a mounted file
    // system, whose blobs change only through it.
    (changes $($args:tt)*) => {
        on_store!(@get blobstore_to_change $($args)*)
    };
    (@get $get:ident $m:expr, $app:expr, $name:literal, $desc:literal, $p:ty, |$s:ident, $q:ident| $body:expr) => {{
        let a = $app.clone();
        $m.add($name, $desc, Allowed::Runtime, move |$q: $p| {
            let store = a.$get(&$q.bdev_name);
            async move {
                let $s = store?;
                $body.await.map_err(blob_err)
            }
        });
    }};
    ($($args:tt)*) => {
        on_store!(@get blobstore $($args)*)
    };
}

pub fn register(m: &mut Methods, app: &Arc<App>) {
    let a = app.clone();
    m.add(
        "blobstore_create",
        "Format a bdev as an empty blobstore and load it (home reactor: reactor 0).",
        Allowed::Runtime,
        move |p: Create| {
            let a = a.clone();
            async move {
                let home = a.reactors[0].clone();
                let opts = FormatOptions { cluster_size: p.cluster_size, journal_pages: p.journal_pages };
                let store = Blobstore::format(&a.registry, &p.bdev_name, home, opts).await.map_err(blob_err)?;
                let stats = store.stats().await.map_err(blob_err)?;
                a.blobstores.lock().unwrap_or_else(|e| e.into_inner()).insert(p.bdev_name, store);
                Ok(stats)
            }
        },
    );
    let a = app.clone();
    m.add(
        "blobstore_load",
        "Load the blobstore on a bdev, replaying its journal if it was not unloaded cleanly.",
        Allowed::Runtime,
        move |p: Store| {
            let a = a.clone();
            async move {
                let (store, report) =
                    Blobstore::load(&a.registry, &p.bdev_name, a.reactors[0].clone()).await.map_err(blob_err)?;
                a.blobstores.lock().unwrap_or_else(|e| e.into_inner()).insert(p.bdev_name, store);
                Ok(report)
            }
        },
    );
    let a = app.clone();
    m.add(
        "blobstore_unload",
        "Sync every blob, write a clean checkpoint and give the bdev back.",
        Allowed::Runtime,
        move |p: Store| {
            let a = a.clone();
            async move {
                let store = a.blobstore(&p.bdev_name)?;
                store.unload().await.map_err(blob_err)?;
                a.blobstores.lock().unwrap_or_else(|e| e.into_inner()).remove(&p.bdev_name);
                Ok(true)
            }
        },
    );
    let a = app.clone();
    m.add(
        "blobstore_get_stats",
        "Clusters (total, free, metadata), journal size, blob count, checkpoint and metadata work of loaded blobstores.",
        Allowed::Always,
        move |p: MaybeStore| {
            let stores: Vec<Blobstore> = {
                let all = a.blobstores.lock().unwrap_or_else(|e| e.into_inner());
                match &p.bdev_name {
                    Some(n) => all.get(n).cloned().into_iter().collect(),
                    None => all.values().cloned().collect(),
                }
            };
            let missing = p.bdev_name.filter(|_| stores.is_empty());
            async move {
                if let Some(n) = missing {
                    return Err(RpcError::errno(libc::ENODEV, format!("no blobstore is loaded on bdev {n:?}")));
                }
                let mut out = Vec::new();
                for s in stores {
                    out.push(s.stats().await.map_err(blob_err)?);
                }
                Ok(out)
            }
        },
    );
    let a = app.clone();
    m.add(
        "blobstore_check",
        "Verify a blobstore that is not loaded, writing nothing: every metadata page checks, every cluster is owned once, none leaked.",
        Allowed::Runtime,
        move |p: Store| {
            let a = a.clone();
            async move { Blobstore::check_offline(&a.registry, &p.bdev_name, a.reactors[0].clone()).await.map_err(blob_err) }
        },
    );
    on_store!(
        changes m,
        app,
        "blobstore_set_super",
        "Set (or clear) the blobstore's super blob, the application's root.",
        SetSuper,
        |s, p| s.set_super(p.blob_id)
    );

    on_store!(
        changes m,
        app,
        "blob_create",
        "Create a blob (durable when this returns); returns its id.",
        BlobCreate,
        |s, p| {
            s.create_blob(BlobOptions { num_clusters: p.num_clusters, thin: p.thin, xattrs: p.xattrs, no_zero: false })
        }
    );
    on_store!(
        changes m,
        app,
        "blob_delete",
        "Delete a closed blob that no clone reads through.",
        BlobRef,
        |s, p| s.delete_blob(p.blob_id)
    );
    on_store!(
        changes m,
        app,
        "blob_resize",
        "Resize a blob and sync it.",
        Resize,
        |s, p| async move {
            s.resize_blob(p.blob_id, p.num_clusters).await?;
            s.sync_blob(p.blob_id).await
        }
    );
    on_store!(
        m,
        app,
        "blob_list",
        "Every blob: size, allocated clusters, thin/read-only/snapshot, parent, clones, xattr names.",
        Store,
        |s, _p| s.list()
    );
    on_store!(
        m,
        app,
        "blob_get_xattrs",
        "A blob's xattrs (values as UTF-8, or 0x-hex when not).",
        BlobRef,
        |s, p| async move { s.xattrs(p.blob_id).await.map(show_xattrs) }
    );
    on_store!(
        changes m,
        app,
        "blob_set_xattr",
        "Set an xattr of a blob and sync it.",
        SetXattr,
        |s, p| async move {
            s.set_xattr(p.blob_id, &p.name, p.value.as_bytes()).await?;
            s.sync_blob(p.blob_id).await
        }
    );
    on_store!(
        changes m,
        app,
        "blob_snapshot",
        "Snapshot a blob: a read-only blob takes over its clusters; returns the snapshot's id.",
        Derive,
        |s, p| s.snapshot(p.blob_id, bytes_map(p.xattrs))
    );
    on_store!(
        changes m,
        app,
        "blob_clone",
        "Create a writable thin clone of a snapshot; returns its id.",
        Derive,
        |s, p| s.clone_blob(p.blob_id, bytes_map(p.xattrs))
    );
    on_store!(
        changes m,
        app,
        "blob_inflate",
        "Give a blob clusters of its own for all it reads through its parents.",
        BlobRef,
        |s, p| s.inflate(p.blob_id)
    );
    on_store!(
        changes m,
        app,
        "blob_decouple",
        "Copy what a blob's parent holds; the grandparent becomes its parent.",
        BlobRef,
        |s, p| s.decouple(p.blob_id)
    );
}
