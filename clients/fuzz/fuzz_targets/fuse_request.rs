//! Fuzzes the FUSE request decoder with the two layouts requests arrive in:
//! one buffer from /dev/fuse (header, op header, tail), and a ring entry's
//! op header and payload apart. Nothing may panic, and what decodes must
//! hold together: names without NULs, write data of the size the request
//! says, whole BATCH_FORGET items.
#![no_main]

use clients::fuse::proto::{Header, IN_HEADER, Op, forgets, op_header_len};
use libfuzzer_sys::fuzz_target;

fn check(op: &Op<'_>) {
    match op {
        Op::Lookup { name } | Op::Unlink { name } | Op::Rmdir { name } | Op::Removexattr { name } => {
            assert!(!name.contains(&0))
        }
        Op::Symlink { name, target } => assert!(!name.contains(&0) && !target.contains(&0)),
        Op::Rename { name, newname, .. } => assert!(!name.contains(&0) && !newname.contains(&0)),
        Op::BatchForget { items } => {
            assert_eq!(items.len() % 16, 0);
            assert_eq!(forgets(items).count(), items.len() / 16);
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the layout.
    let Some((&layout, rest)) = data.split_first() else { return };
    if layout & 1 == 0 {
        let Ok(h) = Header::parse(rest) else { return };
        let body = &rest[IN_HEADER.min(rest.len())..];
        let (head, tail) = body.split_at(op_header_len(h.opcode).min(body.len()));
        if let Ok(op) = Op::decode(h.opcode, head, tail) {
            if let Op::Write { data, .. } = &op {
                let size = u32::from_ne_bytes(head[16..20].try_into().unwrap());
                assert_eq!(data.len(), size as usize);
            }
            check(&op);
        }
    } else if rest.len() >= 4 {
        let opcode = u32::from_ne_bytes(rest[..4].try_into().unwrap());
        let rest = &rest[4..];
        let (head, tail) = rest.split_at(128.min(rest.len()));
        if let Ok(op) = Op::decode(opcode, head, tail) {
            check(&op);
        }
    }
});
