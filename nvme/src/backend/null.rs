//! The null bdev: completes every request at once without touching data.
//! It measures the cost of the software path (bdevperf on null).

use std::sync::Arc;

use crate::bdev::{Bdev, BdevRegistry, Completion, Io};
use crate::error::BdevError;

/// Parameters of `bdev_null_create`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NullConfig {
    /// Name of the new bdev.
    pub name: String,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Block size in bytes (power of two, 512 to 65536).
    #[serde(default = "crate::default_block_size")]
    pub block_size: u32,
    /// UUID (generated if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<uuid::Uuid>,
}

impl NullConfig {
    pub(crate) fn of(bdev: &Bdev) -> Self {
        Self {
            name: bdev.name().into(),
            num_blocks: bdev.num_blocks(),
            block_size: bdev.block_size(),
            uuid: Some(bdev.uuid()),
        }
    }
}

pub(crate) struct NullDev;

#[derive(Default)]
pub(crate) struct NullChannel {
    pub(crate) done: Vec<Completion>,
}

impl NullChannel {
    #[inline]
    pub(crate) fn submit(&mut self, io: Io) {
        self.done.push(Completion::of(io, Ok(())));
    }
}

/// Creates a null bdev.
pub fn create(registry: &BdevRegistry, config: &NullConfig) -> Result<Arc<Bdev>, BdevError> {
    let bdev =
        Bdev::new(&config.name, config.uuid, config.block_size, config.num_blocks, super::Backend::Null(NullDev))?;
    registry.register(bdev)
}
