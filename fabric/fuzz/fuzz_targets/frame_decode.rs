//! Fuzzes everything that decodes bytes from the network: the stream reader
//! (bytes cut into reads at points the input chooses), frame headers, hellos,
//! bulk descriptors, fragment prefixes and error payloads. Nothing may panic,
//! allocate beyond the limit, or accept a frame whose checksums do not hold.
#![no_main]

use fabric::frame::{
    BulkDesc, Fragment, FrameReader, HEADER_LEN, Header, Hello, RemoteError, crc32c, flags,
};
use libfuzzer_sys::fuzz_target;

const MAX: u32 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the stream is cut into reads.
    let Some((&cut, stream)) = data.split_first() else { return };
    let piece = usize::from(cut).max(1);
    let mut reader = FrameReader::new(MAX);
    let mut off = 0;
    'feed: while off < stream.len() {
        let buf = reader.buf();
        assert!(!buf.is_empty(), "the reader always has room after frames are taken");
        let n = piece.min(buf.len()).min(stream.len() - off);
        buf[..n].copy_from_slice(&stream[off..off + n]);
        reader.advance(n);
        off += n;
        loop {
            match reader.next_frame() {
                Ok(Some((h, payload))) => {
                    assert_eq!(payload.len(), h.length as usize);
                    assert!(h.length <= MAX);
                    if h.has(flags::DIGEST) {
                        assert_eq!(crc32c(&payload), h.payload_crc);
                    }
                    let _ = Hello::decode(&payload);
                    let _ = BulkDesc::decode(&payload, MAX);
                    let _ = Fragment::decode(&payload, MAX);
                    let _ = RemoteError::decode(&payload);
                }
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
    // Every decoder on the raw bytes too.
    if let Ok(h) = Header::decode(stream, MAX) {
        assert_eq!(h.encode()[..], stream[..HEADER_LEN], "a decoded header re-encodes to its bytes");
    }
    if let Ok(h) = Hello::decode(stream) {
        assert_eq!(h.encode().unwrap(), stream, "a decoded hello re-encodes to its bytes");
    }
    if let Ok(d) = BulkDesc::decode(stream, MAX) {
        assert!(d.len <= u64::from(MAX));
    }
    if let Ok((f, piece)) = Fragment::decode(stream, MAX) {
        assert!(f.offset + piece.len() as u64 <= f.total);
    }
    let _ = RemoteError::decode(stream);
});
