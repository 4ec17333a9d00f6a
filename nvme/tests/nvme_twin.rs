//! The NVMe driver against the test twin: emulated controllers behind an
//! in-memory VFIO (no hardware, no hugepages). The scenarios shared with the
//! real run in the QEMU guest (`vfio.rs`), plus the faults only an emulator
//! can inject: commands that never complete (timeout, Abort, reset), IOMMU
//! mapping failures, a controller without SGLs.

mod common;

use std::sync::Arc;

use common::scenarios::{self as scenario, CtrlSpec, Rig};
use common::{Harness, pattern};
use nvme::nvme::{NvmeAttachConfig, attach_twin, controller};
use nvme::vfio::twin::{EmuConfig, EmuNamespace, TwinKernel, TwinSpec};
use nvme::{Io, IoError};
use pmd::DmaBuf;

fn twin() -> Arc<TwinKernel> {
    let mut dual = TwinSpec::nvme("0000:00:05.0", 5);
    dual.nvme = Some(EmuConfig {
        namespaces: vec![
            EmuNamespace { block_size: 512, blocks: 131072 },
            EmuNamespace { block_size: 4096, blocks: 8192 },
        ],
        ..EmuConfig::new("CFSNVME0", 512, 1)
    });
    let mut small = TwinSpec::nvme("0000:00:06.0", 6);
    // MDTS 2 (16 KiB) and no SGLs: scattered blocks go out one command per buffer.
    small.nvme = Some(EmuConfig { mdts: 2, sgl: false, max_entries: 64, ..EmuConfig::new("CFSNVME1", 4096, 8192) });
    TwinKernel::new(vec![dual, small])
}

fn rig() -> (Rig, Arc<TwinKernel>) {
    let kernel = twin();
    let k = kernel.clone();
    let spec = |name, traddr: &str, serial, namespaces, mdts_bytes| CtrlSpec {
        name,
        traddr: traddr.into(),
        serial,
        model: "ClaudeFS emulated NVMe",
        namespaces,
        mdts_bytes,
    };
    let rig = Rig {
        h: Harness::new(),
        dual: spec("Nvme0", "0000:00:05.0", "CFSNVME0", vec![(512, 131072), (4096, 8192)], 128 << 10),
        small: spec("Nvme1", "0000:00:06.0", "CFSNVME1", vec![(4096, 8192)], 16 << 10),
        attach: Box::new(move |registry, config| attach_twin(registry, config, &k)),
    };
    (rig, kernel)
}

#[test]
fn identify_matches_the_configuration() {
    scenario::identify_matches_the_configuration(&mut rig().0);
}

#[test]
fn random_data_round_trips_and_transfers_are_split_at_mdts() {
    let (mut rig, kernel) = rig();
    scenario::random_data_round_trips(&mut rig, 3 << 20);
    let small = kernel.emu("0000:00:06.0").unwrap();
    let small = small.lock().unwrap();
    assert_eq!(small.largest_transfer, 16 << 10, "no command beyond MDTS");
    assert_eq!(small.sgl_commands, 0);
    assert!(kernel.emu("0000:00:05.0").unwrap().lock().unwrap().sgl_commands > 0, "odd layouts use SGLs where offered");
}

#[test]
fn two_reactors_use_their_own_queue_pairs() {
    scenario::two_reactors_use_their_own_queue_pairs(&mut rig().0);
}

#[test]
fn flush_zeroes_deallocate_and_range_errors() {
    scenario::flush_zeroes_deallocate_and_range_errors(&mut rig().0);
}

#[test]
fn reset_during_io_recovers() {
    scenario::reset_during_io_recovers(&mut rig().0);
}

#[test]
fn detach_and_reattach() {
    let (mut rig, kernel) = rig();
    scenario::detach_and_reattach(&mut rig);
    assert!(kernel.emu("0000:00:06.0").unwrap().lock().unwrap().enables >= 2);
    rig.detach_both();
    assert!(kernel.emu("0000:00:05.0").unwrap().lock().unwrap().shut_down, "detach shuts down normally (CC.SHN)");
    assert_eq!(kernel.open_handles(), 0, "every VFIO handle is closed");
}

#[test]
fn a_command_that_never_completes_is_aborted_then_the_controller_reset() {
    let (mut rig, kernel) = rig();
    let config = NvmeAttachConfig { io_timeout_ms: 5, ..Rig::config(&rig.dual) };
    (rig.attach)(&rig.h.registry, &config).unwrap();
    let emu = kernel.emu("0000:00:05.0").unwrap();
    let mut ch = rig.h.channel("Nvme0n2", true);
    // Held once: the timeout sends an Abort, which ends the command.
    emu.lock().unwrap().hold_io(1);
    let c = rig.h.run(&mut ch, Io::write(3, DmaBuf::copy_from(&[1; 4096]).unwrap(), 1));
    assert_eq!(c.status, Err(IoError::Aborted));
    assert!(c.bufs.into_one().is_some(), "an aborted request hands its buffer back");
    // Ignoring the Abort too: one more timeout later the controller is reset.
    emu.lock().unwrap().hold_io(1);
    emu.lock().unwrap().ignore_aborts(true);
    let ctrl = controller("Nvme0").unwrap();
    let resets = ctrl.resets();
    let c = rig.h.run(&mut ch, Io::read(3, DmaBuf::new(4096).unwrap(), 2));
    assert_eq!(c.status, Err(IoError::Aborted));
    assert_eq!(ctrl.resets(), resets + 1);
    emu.lock().unwrap().ignore_aborts(false);
    assert_eq!(rig.h.write(&mut ch, 3, &pattern(3, 4096)), Ok(()), "I/O works after the reset");
    assert_eq!(rig.h.read(&mut ch, 3, 4096).unwrap(), pattern(3, 4096));
}

#[test]
fn device_errors_are_surfaced_and_named() {
    let (mut rig, kernel) = rig();
    rig.attach_both();
    let mut ch = rig.h.channel("Nvme1n1", true);
    kernel.emu("0000:00:06.0").unwrap().lock().unwrap().fail_io(2, 0x81, 1);
    assert_eq!(rig.h.read(&mut ch, 0, 4096), Err(IoError::Device));
    // A split request fails as a whole when one of its commands fails.
    kernel.emu("0000:00:06.0").unwrap().lock().unwrap().fail_io(0, 0x80, 1);
    assert_eq!(rig.h.read(&mut ch, 0, 64 << 10), Err(IoError::OutOfRange));
    assert_eq!(rig.h.read(&mut ch, 0, 64 << 10).map(|d| d.len()), Ok(64 << 10));
}

#[test]
fn a_buffer_the_iommu_could_not_map_is_refused_not_sent() {
    let (mut rig, kernel) = rig();
    rig.attach_both();
    let mut ch = rig.h.channel("Nvme1n1", true);
    kernel.fail_next_maps(2); // in both controllers' containers
    let big = DmaBuf::new(3 << 20).unwrap(); // a mapping of its own, announced to the driver
    let before = kernel.emu("0000:00:06.0").unwrap().lock().unwrap().io_commands;
    let c = rig.h.run(&mut ch, Io::write(0, big, 0));
    assert_eq!(c.status, Err(IoError::Invalid));
    assert_eq!(kernel.emu("0000:00:06.0").unwrap().lock().unwrap().io_commands, before, "nothing reached the device");
}

#[test]
fn attaching_bad_devices_fails_with_the_reason() {
    let (rig, kernel) = rig();
    kernel.set_driver("0000:00:06.0", Some("nvme"));
    let e = (rig.attach)(&rig.h.registry, &Rig::config(&rig.small)).unwrap_err().to_string();
    assert!(e.contains("bound to nvme") && e.contains("hack/setup.sh"), "{e}");
    let e = (rig.attach)(&rig.h.registry, &NvmeAttachConfig { trtype: "rdma".into(), ..Rig::config(&rig.dual) })
        .unwrap_err();
    assert!(e.to_string().contains("\"rdma\" is not supported"), "{e}");
    kernel.fail_next_maps(1000);
    let e = (rig.attach)(&rig.h.registry, &Rig::config(&rig.dual)).unwrap_err().to_string();
    assert!(e.contains("VFIO_IOMMU_MAP_DMA") && e.contains("48-bit"), "{e}");
    kernel.fail_next_maps(0);
    kernel.emu("0000:00:05.0").unwrap().lock().unwrap().set_never_ready(true);
    let e = (rig.attach)(&rig.h.registry, &Rig::config(&rig.dual)).unwrap_err().to_string();
    assert!(e.contains("CSTS.RDY after CC.EN = 1") && e.contains("1000 ms"), "{e}");
    assert!(rig.h.registry.list().is_empty());
    assert_eq!(kernel.open_handles(), 0, "a failed attach leaves nothing open");
}

#[test]
fn a_channel_dropped_with_requests_in_flight_leaves_them_to_finish() {
    let (mut rig, kernel) = rig();
    rig.attach_both();
    let emu = kernel.emu("0000:00:05.0").unwrap();
    let mut ch = rig.h.channel("Nvme0n2", true);
    let keep = rig.h.channel("Nvme0n1", true); // keeps the queue pair alive
    kernel.set_manual(true); // the controller runs only when stepped here
    for i in 0..10 {
        ch.submit(rig.h.now, Io::write(i, DmaBuf::copy_from(&[7; 4096]).unwrap(), i));
    }
    rig.h.reactor.poll(1, 1); // the queue pair's poller rings the doorbell
    drop(ch);
    emu.lock().unwrap().step();
    rig.h.reactor.poll(2, 1);
    assert_eq!(&emu.lock().unwrap().namespace_data(2)[..4096], &[7; 4096][..], "the writes were done");
    kernel.set_manual(false);
    drop(keep);
    assert_eq!(controller("Nvme0").unwrap().io_queues_in_use(), 0, "the queue pair went with its last channel");
}
