//! The generic bdev layer on null, malloc and error bdevs: registry rules,
//! request checks, statistics, queueing, timeouts and error injection.

mod common;

use std::time::Duration;

use common::{Harness, pattern};
use nvme::error_bdev::{self, ErrorConfig, InjectConfig, InjectIoType, InjectKind};
use nvme::{BdevError, Io, IoBufs, IoError, IoType, malloc, null};
use pmd::DmaBuf;

fn malloc_cfg(name: &str, blocks: u64, bs: u32) -> malloc::MallocConfig {
    malloc::MallocConfig { name: name.into(), num_blocks: blocks, block_size: bs, uuid: None }
}

fn inject(h: &Harness, io_type: InjectIoType, kind: InjectKind, num: u32) {
    let cfg = InjectConfig { name: "EE_m0".into(), io_type, error_type: kind, num, skip: 0, torn_blocks: None };
    error_bdev::inject(&h.registry, &cfg).unwrap();
}

#[test]
fn names_uuids_claims_and_opens_are_enforced() {
    let h = Harness::new();
    let r = &h.registry;
    let m = malloc::create(r, &malloc_cfg("m0", 64, 512)).unwrap();
    assert!(matches!(malloc::create(r, &malloc_cfg("m0", 64, 512)), Err(BdevError::Exists(n)) if n == "m0"));
    let same_uuid = malloc::MallocConfig { uuid: Some(m.uuid()), ..malloc_cfg("m1", 64, 512) };
    let err = malloc::create(r, &same_uuid).unwrap_err().to_string();
    assert!(err.contains("already the UUID of bdev \"m0\""), "{err}");
    assert_eq!(r.get(&m.uuid().to_string()).unwrap().name(), "m0");
    for bad in [0, 1000, 100, 1 << 20] {
        let err = malloc::create(r, &malloc_cfg("bad", 64, bad)).unwrap_err();
        assert!(err.to_string().contains("block_size"), "{err}");
    }
    assert!(malloc::create(r, &malloc_cfg("bad", 0, 512)).is_err());
    assert!(malloc::create(r, &malloc_cfg("a/b", 1, 512)).is_err());

    // A wrapper claims its base: the base can be neither claimed nor deleted.
    error_bdev::create(r, &ErrorConfig { base_name: "m0".into(), uuid: None }).unwrap();
    assert_eq!(m.claimed_by().as_deref(), Some("EE_m0"));
    let err = r.unregister("m0", None).unwrap_err();
    assert!(matches!(&err, BdevError::Claimed { by, .. } if by == "EE_m0"), "{err}");
    assert!(err.to_string().contains("delete EE_m0 first"));
    assert!(error_bdev::create(r, &ErrorConfig { base_name: "m0".into(), uuid: None }).is_err());
    assert!(matches!(r.unregister("EE_m0", Some("malloc")), Err(BdevError::WrongKind { .. })));

    // An open descriptor blocks deletion.
    let desc = r.open("EE_m0", false).unwrap();
    assert!(matches!(r.unregister("EE_m0", None), Err(BdevError::Busy { opens: 1, .. })));
    drop(desc);
    r.unregister("EE_m0", Some("error")).unwrap();
    assert_eq!(m.claimed_by(), None, "deleting the wrapper releases the claim");
    r.unregister("m0", Some("malloc")).unwrap();
    assert!(matches!(r.get("m0"), Err(BdevError::NotFound(_))));
    assert!(matches!(r.unregister("m0", None), Err(BdevError::NotFound(_))));
}

#[test]
fn malloc_reads_what_was_written_in_any_shape() {
    let mut h = Harness::new();
    malloc::create(&h.registry, &malloc_cfg("m0", 256, 512)).unwrap();
    let mut ch = h.channel("m0", true);
    let data = pattern(1, 8 * 512);
    h.write(&mut ch, 10, &data).unwrap();
    assert_eq!(h.read(&mut ch, 10, data.len()).unwrap(), data);
    // Vectored read across buffers of different sizes.
    let bufs = vec![DmaBuf::new(512).unwrap(), DmaBuf::new(3 * 512).unwrap(), DmaBuf::new(4 * 512).unwrap()];
    let c = h.run(&mut ch, Io::read(10, bufs, 9));
    assert_eq!((c.tag, c.status), (9, Ok(())));
    let mut got = vec![0; data.len()];
    c.bufs.copy_out(0, &mut got);
    assert_eq!(got, data);
    // Vectored write.
    let parts = vec![DmaBuf::copy_from(&data[..1024]).unwrap(), DmaBuf::copy_from(&data[1024..2048]).unwrap()];
    assert_eq!(h.run(&mut ch, Io::write(100, parts, 0)).status, Ok(()));
    assert_eq!(h.read(&mut ch, 100, 2048).unwrap(), data[..2048]);
    // Unmap and write zeroes read back as zeros.
    assert_eq!(h.run(&mut ch, Io::unmap(11, 2, 0)).status, Ok(()));
    assert_eq!(h.run(&mut ch, Io::write_zeroes(14, 1, 0)).status, Ok(()));
    let after = h.read(&mut ch, 10, data.len()).unwrap();
    let mut expect = data.clone();
    expect[512..1536].fill(0);
    expect[2048..2560].fill(0);
    assert_eq!(after, expect);
    assert_eq!(h.flush(&mut ch), Ok(()));
}

#[test]
fn bad_requests_complete_with_errors_naming_the_problem() {
    let mut h = Harness::new();
    malloc::create(&h.registry, &malloc_cfg("m0", 16, 512)).unwrap();
    let mut ch = h.channel("m0", true);
    let cases = [
        (Io::read(16, DmaBuf::new(512).unwrap(), 0), IoError::OutOfRange),
        (Io::read(15, DmaBuf::new(1024).unwrap(), 0), IoError::OutOfRange),
        (Io::read(u64::MAX, DmaBuf::new(512).unwrap(), 0), IoError::OutOfRange),
        (Io::write(0, DmaBuf::new(100).unwrap(), 0), IoError::Invalid),
        (Io::read(0, IoBufs::None, 0), IoError::Invalid),
        (Io::unmap(0, 0, 0), IoError::Invalid),
        (Io::write_zeroes(10, 7, 0), IoError::OutOfRange),
    ];
    for (io, want) in cases {
        let what = format!("{:?} at {}", io.op, io.offset_blocks);
        let c = h.run(&mut ch, io);
        assert_eq!(c.status, Err(want), "{what}");
    }
    let mut ro = h.channel("m0", false);
    let c = h.run(&mut ro, Io::write(0, DmaBuf::new(512).unwrap(), 0));
    assert_eq!(c.status, Err(IoError::ReadOnly));
    assert!(c.bufs.into_one().is_some(), "a refused request hands its buffer back");
    assert_eq!(h.read(&mut ro, 0, 512).map(|v| v.len()), Ok(512));
    assert_eq!(ch.outstanding(), 0);
}

#[test]
fn statistics_count_ops_bytes_and_latency() {
    let mut h = Harness::new();
    let bdev = null::create(
        &h.registry,
        &null::NullConfig { name: "n0".into(), num_blocks: 1 << 20, block_size: 4096, uuid: None },
    )
    .unwrap();
    let mut ch = h.channel("n0", true);
    for i in 0..10 {
        h.read(&mut ch, i, 4096).unwrap();
    }
    h.write(&mut ch, 0, &[0; 8192]).unwrap();
    h.flush(&mut ch).unwrap();
    let s = bdev.stats();
    assert_eq!((s.op(IoType::Read).ops, s.op(IoType::Read).bytes), (10, 40960));
    assert_eq!((s.op(IoType::Write).ops, s.op(IoType::Write).bytes), (1, 8192));
    assert_eq!(s.op(IoType::Flush).ops, 1);
    // The harness advances time by 1 us per poll and each request takes one poll.
    assert_eq!(s.op(IoType::Read).latency_ns, 10 * 1000);
    assert_eq!(s.op(IoType::Read).latency.quantile(0.99), 1000);
    drop(ch);
    assert_eq!(bdev.stats().op(IoType::Read).ops, 10, "a closed channel's counts are kept");
}

#[test]
fn requests_wait_in_order_while_the_backend_is_busy() {
    let mut h = Harness::new();
    let base = malloc::create(&h.registry, &malloc_cfg("m0", 64, 512)).unwrap();
    let ee = error_bdev::create(&h.registry, &ErrorConfig { base_name: "m0".into(), uuid: None }).unwrap();
    let mut ch = h.channel("EE_m0", true);
    inject(&h, InjectIoType::Write, InjectKind::Busy, 3);
    // Three writes to the same block: the last one must win, so order matters.
    for (i, byte) in [1u8, 2, 3].into_iter().enumerate() {
        ch.submit(h.now, Io::write(5, DmaBuf::copy_from(&[byte; 512]).unwrap(), i as u64));
    }
    let done = h.wait(&mut ch, 3);
    assert_eq!(done.iter().map(|c| c.tag).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(done.iter().all(|c| c.status.is_ok()));
    assert_eq!(h.read(&mut ch, 5, 512).unwrap(), vec![3; 512]);
    assert!(ee.stats().queued >= 3, "{:?}", ee.stats().queued);
    assert_eq!(base.stats().op(IoType::Write).ops, 3);
}

#[test]
fn timed_out_requests_complete_without_their_buffers_and_are_aborted() {
    let mut h = Harness::new();
    malloc::create(&h.registry, &malloc_cfg("m0", 64, 512)).unwrap();
    let ee = error_bdev::create(&h.registry, &ErrorConfig { base_name: "m0".into(), uuid: None }).unwrap();
    let mut ch = h.channel("EE_m0", true);
    ch.set_timeout(Some(Duration::from_millis(1)));
    inject(&h, InjectIoType::Read, InjectKind::Timeout, 1);
    ch.submit(h.now, Io::read(0, DmaBuf::new(512).unwrap(), 42));
    let start = h.now;
    let c = h.wait(&mut ch, 1).pop().unwrap();
    assert_eq!((c.tag, c.status), (42, Err(IoError::TimedOut)));
    assert!(matches!(c.bufs, IoBufs::None), "the buffer stays with the device");
    assert!(h.now - start >= 1_000_000, "not before the deadline");
    assert!(h.now - start < 3_000_000, "and soon after it");
    // The abort released the request; nothing is left outstanding.
    assert!(h.settle(&mut ch).is_empty(), "no second completion for the timed-out request");
    assert_eq!(ee.stats().timeouts, 1);
    // Later requests work.
    assert!(h.read(&mut ch, 0, 512).is_ok());
}

#[test]
fn injected_failures_and_torn_requests() {
    let mut h = Harness::new();
    malloc::create(&h.registry, &malloc_cfg("m0", 64, 512)).unwrap();
    error_bdev::create(&h.registry, &ErrorConfig { base_name: "m0".into(), uuid: None }).unwrap();
    let mut ch = h.channel("EE_m0", true);
    let old = pattern(1, 4 * 512);
    h.write(&mut ch, 0, &old).unwrap();

    inject(&h, InjectIoType::Write, InjectKind::Failure, 1);
    assert_eq!(h.write(&mut ch, 0, &[9; 512]), Err(IoError::Device));
    assert_eq!(h.write(&mut ch, 1, &old[512..1024]), Ok(()), "a rule is used up");

    // A torn write reports success but only the first half lands.
    inject(&h, InjectIoType::Write, InjectKind::Torn, 1);
    let new = pattern(2, 4 * 512);
    let c = h.run(&mut ch, Io::write(0, DmaBuf::copy_from(&new).unwrap(), 0));
    assert_eq!(c.status, Ok(()));
    assert_eq!(&c.bufs.into_one().unwrap()[..], &new[..], "the caller's buffer comes back intact");
    let got = h.read(&mut ch, 0, 4 * 512).unwrap();
    assert_eq!(got[..1024], new[..1024]);
    assert_eq!(got[1024..], old[1024..]);

    // A torn read garbles the tail.
    let cfg = InjectConfig {
        name: "EE_m0".into(),
        io_type: InjectIoType::Read,
        error_type: InjectKind::Torn,
        num: 1,
        skip: 1,
        torn_blocks: Some(1),
    };
    error_bdev::inject(&h.registry, &cfg).unwrap();
    assert_eq!(h.read(&mut ch, 0, 2048).unwrap(), got, "skip lets the first read through");
    let torn = h.read(&mut ch, 0, 2048).unwrap();
    assert_eq!(torn[..512], got[..512]);
    assert!(torn[512..].iter().all(|&b| b == 0xEE));

    // Clearing removes pending rules.
    inject(&h, InjectIoType::All, InjectKind::Failure, 5);
    let clear = InjectConfig {
        name: "EE_m0".into(),
        io_type: InjectIoType::All,
        error_type: InjectKind::Clear,
        num: 1,
        skip: 0,
        torn_blocks: None,
    };
    error_bdev::inject(&h.registry, &clear).unwrap();
    assert!(h.read(&mut ch, 0, 512).is_ok());
    let err = error_bdev::inject(&h.registry, &InjectConfig { name: "m0".into(), ..clear }).unwrap_err();
    assert!(matches!(err, BdevError::WrongKind { .. }), "{err}");
}
