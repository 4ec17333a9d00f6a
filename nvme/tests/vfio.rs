//! The NVMe driver for real: QEMU's emulated NVMe controllers bound to
//! vfio-pci behind an emulated IOMMU, in the guest `hack/vm-test.sh` boots
//! (which runs this binary with `--test-threads=1`: the controllers belong
//! to one test at a time).
//!
//! The tests find the controllers through the environment the guest sets:
//! `CLAUDEFS_NVME_DUAL` (namespaces of 512 B and 4 KiB blocks),
//! `CLAUDEFS_NVME_SMALL` (MDTS 16 KiB), `CLAUDEFS_NVME_KERNEL` (a controller
//! left to the kernel's nvme driver). Without them each test says it is
//! skipped and passes; `hack/test.sh` runs them for real through
//! `hack/vm-test.sh`.

mod common;

use std::sync::Arc;

use common::Harness;
use common::scenarios::{self as scenario, CtrlSpec, Rig};
use nvme::nvme::{NvmeAttachConfig, attach};
use pmd::dma::{DmaOptions, HugepageMode};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The rig, or `None` (and a message) outside the guest.
fn rig(test: &str) -> Option<Rig> {
    let (Some(dual), Some(small)) = (env("CLAUDEFS_NVME_DUAL"), env("CLAUDEFS_NVME_SMALL")) else {
        eprintln!(
            "{test}: skipped: no NVMe controllers bound to vfio-pci here (CLAUDEFS_NVME_DUAL/SMALL unset); \
             hack/vm-test.sh runs this test in a QEMU guest"
        );
        return None;
    };
    let _ = pmd::dma::init(DmaOptions { hugepages: HugepageMode::Require, max_bytes: None });
    let spec = |name, traddr, serial, namespaces, mdts_bytes| CtrlSpec {
        name,
        traddr,
        serial,
        model: "QEMU NVMe Ctrl",
        namespaces,
        mdts_bytes,
    };
    // What hack/vm-test.sh gives QEMU: 64 MiB of 512 B blocks and 32 MiB of 4 KiB
    // blocks; 32 MiB with MDTS 2 (QEMU's default MDTS is 7: 512 KiB).
    Some(Rig {
        h: Harness::new(),
        dual: spec("Nvme0", dual, "CFSNVME0", vec![(512, 131072), (4096, 8192)], 512 << 10),
        small: spec("Nvme1", small, "CFSNVME1", vec![(4096, 8192)], 16 << 10),
        attach: Box::new(|registry: &Arc<nvme::BdevRegistry>, config: &NvmeAttachConfig| attach(registry, config)),
    })
}

#[test]
fn identify_matches_what_qemu_was_told() {
    let Some(mut rig) = rig("identify_matches_what_qemu_was_told") else { return };
    scenario::identify_matches_the_configuration(&mut rig);
}

#[test]
fn random_data_round_trips_through_prp_lists_sgls_and_mdts_splits() {
    let Some(mut rig) = rig("random_data_round_trips") else { return };
    scenario::random_data_round_trips(&mut rig, 3 << 20);
}

#[test]
fn two_reactors_use_their_own_queue_pairs() {
    let Some(mut rig) = rig("two_reactors_use_their_own_queue_pairs") else { return };
    scenario::two_reactors_use_their_own_queue_pairs(&mut rig);
}

#[test]
fn flush_zeroes_deallocate_and_range_errors() {
    let Some(mut rig) = rig("flush_zeroes_deallocate_and_range_errors") else { return };
    scenario::flush_zeroes_deallocate_and_range_errors(&mut rig);
}

#[test]
fn reset_during_io_recovers() {
    let Some(mut rig) = rig("reset_during_io_recovers") else { return };
    scenario::reset_during_io_recovers(&mut rig);
}

#[test]
fn detach_and_reattach() {
    let Some(mut rig) = rig("detach_and_reattach") else { return };
    scenario::detach_and_reattach(&mut rig);
}

#[test]
fn bad_devices_are_refused_with_the_reason() {
    let Some(rig) = rig("bad_devices_are_refused_with_the_reason") else { return };
    let registry = &rig.h.registry;
    if let Some(kernel_owned) = env("CLAUDEFS_NVME_KERNEL") {
        let e = attach(registry, &NvmeAttachConfig::pcie("Bad0", &kernel_owned)).unwrap_err().to_string();
        assert!(e.contains("not to vfio-pci") && e.contains("hack/setup.sh"), "{e}");
    }
    // The host bridge at 00:00.0 is no NVMe controller.
    let e = attach(registry, &NvmeAttachConfig::pcie("Bad1", "0000:00:00.0")).unwrap_err().to_string();
    assert!(e.contains("not an NVMe controller"), "{e}");
    let e = attach(registry, &NvmeAttachConfig::pcie("Bad2", "0000:00:1e.7")).unwrap_err().to_string();
    assert!(e.contains("no PCI device"), "{e}");
    let e = attach(registry, &NvmeAttachConfig::pcie("Bad3", "00:05.0")).unwrap_err().to_string();
    assert!(e.contains("domain:bus:device.function"), "{e}");
    assert!(registry.list().is_empty());
}
