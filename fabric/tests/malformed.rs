//! Malformed, truncated and garbage frames: the connection that sent them is
//! closed with a logged error, and the server keeps serving everyone else.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Kind, Pair, Raw, capture_logs, hello, keep_serving, kinds, now};
use fabric::frame::{Fragment, FrameReader, Header, Opcode, crc32c, flags};
use fabric::rpc::RpcOptions;
use fabric::stats::ConnState;

/// A request frame carrying the piece of `whole` at `offset` as a fragment.
fn fragment(id: u64, whole: &[u8], offset: usize, len: usize) -> Vec<u8> {
    let mut payload = Fragment { offset: offset as u64, total: whole.len() as u64 }.encode().to_vec();
    payload.extend_from_slice(&whole[offset..offset + len]);
    let mut frame = Header::new(Opcode::Request, id).flag(flags::FRAGMENT).payload(&payload).encode().to_vec();
    frame.extend_from_slice(&payload);
    frame
}

/// Steps the pair until every closed inbound connection of the server counts
/// `closed`, checking the good client stays served.
fn serve_until_closed(p: &mut Pair, closed: usize, served: &mut usize) {
    let start = Instant::now();
    loop {
        keep_serving(p, served);
        let conns = p.server.stats().connections();
        if conns.iter().filter(|c| c.state == ConnState::Closed).count() >= closed {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}: the bad connections were not closed: {conns:#?}",
            p.kind
        );
    }
}

#[test]
fn bad_bytes_on_tcp_close_only_their_connection() {
    let (_, logs) = capture_logs(|| {
        let mut p = Pair::new(Kind::Tcp, RpcOptions::default(), RpcOptions::default());
        let addr = p.server.local_addr();
        let mut served = 0;
        let open = || {
            let s = TcpStream::connect(&addr).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        };
        let mut garbage = open();
        garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut bad_crc = open();
        bad_crc.write_all(&hello(Vec::new(), 0, 0)).unwrap();
        let mut frame = Header::new(Opcode::Request, 1).payload(b"abc").encode();
        frame[10] ^= 0xff;
        bad_crc.write_all(&frame).unwrap();
        let mut truncated = open();
        truncated.write_all(&hello(Vec::new(), 0, 0)).unwrap();
        let h = Header::new(Opcode::Request, 1).payload(&[7u8; 1000]).encode();
        truncated.write_all(&h).unwrap();
        truncated.write_all(&[7u8; 10]).unwrap();
        truncated.shutdown(std::net::Shutdown::Write).unwrap();
        let mut bad_payload = open();
        bad_payload.write_all(&hello(Vec::new(), 0, 0)).unwrap();
        let mut frame = Header::new(Opcode::Request, 1).payload(b"payload").encode().to_vec();
        frame.extend_from_slice(b"PAYLOAD");
        bad_payload.write_all(&frame).unwrap();
        let mut no_hello = open();
        let mut frame = Header::new(Opcode::Request, 1).payload(b"hi").encode().to_vec();
        frame.extend_from_slice(b"hi");
        no_hello.write_all(&frame).unwrap();
        // Requests in one write arrive in one poll, before any is answered.
        let request = |id: u64| Header::new(Opcode::Request, id).encode().to_vec();
        let mut same_id = open();
        let mut bytes = hello(Vec::new(), 0, 0);
        bytes.extend(request(5).into_iter().chain(request(6)).chain(request(5)));
        same_id.write_all(&bytes).unwrap();
        let mut too_many = open();
        let mut bytes = hello(Vec::new(), 0, 0);
        let granted = u64::from(RpcOptions::default().credits);
        bytes.extend((1..=granted + 1).flat_map(request));
        too_many.write_all(&bytes).unwrap();
        // Fragments that add up to the whole length but cover a part twice.
        let whole: Vec<u8> = (0..20).collect();
        let mut overlap = open();
        let mut bytes = hello(Vec::new(), 0, 0);
        bytes.extend(
            fragment(3, &whole, 0, 5).into_iter().chain(fragment(3, &whole, 0, 5)).chain(fragment(3, &whole, 10, 10)),
        );
        overlap.write_all(&bytes).unwrap();
        // A well-formed request in fragments sent last piece first: answered whole.
        let mut reversed = open();
        let mut bytes = hello(Vec::new(), 0, 0);
        bytes.extend(fragment(4, &whole, 12, 8).into_iter().chain(fragment(4, &whole, 0, 12)));
        reversed.write_all(&bytes).unwrap();
        let (mut reader, mut frames) = (FrameReader::new(1 << 20), Vec::new());
        let start = Instant::now();
        let answer = loop {
            if let Ok(n) = reversed.read(reader.buf()) {
                reader.advance(n);
            }
            while let Some(frame) = reader.next_frame().expect("the server's frames are well formed") {
                frames.push(frame);
            }
            // The hello-ack, then the response.
            if let Some((h, payload)) = frames.get(1) {
                assert_eq!((h.opcode, h.request_id), (Opcode::Response, 4));
                break payload.to_vec();
            }
            keep_serving(&mut p, &mut served);
            assert!(start.elapsed() < Duration::from_secs(10), "no answer to the reversed fragments");
        };
        assert_eq!(answer, whole, "fragments out of order reassemble");

        serve_until_closed(&mut p, 8, &mut served);
        // Each attacker sees its connection closed by the server.
        for (name, s) in [
            ("garbage", &mut garbage),
            ("bad crc", &mut bad_crc),
            ("truncated", &mut truncated),
            ("bad payload", &mut bad_payload),
            ("no hello", &mut no_hello),
            ("same id", &mut same_id),
            ("too many", &mut too_many),
            ("overlap", &mut overlap),
        ] {
            let start = Instant::now();
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                    Ok(_) => {} // the hello-ack
                }
                keep_serving(&mut p, &mut served);
                assert!(start.elapsed() < Duration::from_secs(5), "{name}: connection still open");
            }
        }
        let before = served;
        while served < before + 100 {
            keep_serving(&mut p, &mut served);
        }
        let conns = p.server.stats().connections();
        let errors: Vec<String> = conns.iter().filter_map(|c| c.last_error.clone()).collect();
        for want in [
            "bad magic",
            "header checksum mismatch",
            "truncated frame",
            "payload checksum mismatch",
            "before the handshake",
            "request id 5 reused while outstanding",
            "more than the 128 outstanding requests it was granted",
            "fragment of request 3 disagrees with the earlier ones",
        ] {
            assert!(errors.iter().any(|e| e.contains(want)), "a connection closed for {want:?}: {errors:#?}");
        }
        let open_now = conns.iter().filter(|c| c.state == ConnState::Established).count();
        assert_eq!(open_now, 2, "the good client and the reversed-fragments one stay");
    });
    for want in [
        "bad magic",
        "header checksum mismatch",
        "truncated frame",
        "payload checksum mismatch",
        "before the handshake",
    ] {
        assert!(
            logs.lines().any(|l| l.contains("WARN") && l.contains("closing the connection") && l.contains(want)),
            "logged: {want}\n{logs}"
        );
    }
}

#[test]
fn bad_messages_on_libfabric_close_only_their_connection() {
    for kind in kinds().into_iter().filter(|k| *k != Kind::Tcp) {
        let Kind::Ofi(provider) = kind else { unreachable!() };
        let (_, logs) = capture_logs(|| {
            let mut p = Pair::new(kind, RpcOptions::default(), RpcOptions::default());
            let server = p.server.local_addr();
            let mut served = 0;
            // Garbage from nobody: dropped, no connection made.
            let mut stranger = Raw::new(provider, &server);
            stranger.send(&mut p, b"\x00\x01garbage that is long enough to look like a header....", 0, &mut served);
            // A frame from nobody that is not a hello: dropped.
            let req = Header::new(Opcode::Request, 1).encode();
            stranger.send(&mut p, &req, 0, &mut served);
            // A proper hello, then garbage tagged with the token the server gave us.
            let mut bad = Raw::new(provider, &server);
            let addr = bad.ep.name().to_vec();
            bad.send(&mut p, &hello(addr, 77, 0), 0, &mut served);
            let token = bad.hello_ack_token(&mut p, &mut served);
            bad.send(&mut p, b"not a frame: nonsense, nonsense, nonsense", token, &mut served);
            // A proper hello, then a frame announcing more than it carries.
            let mut cut = Raw::new(provider, &server);
            let addr = cut.ep.name().to_vec();
            cut.send(&mut p, &hello(addr, 78, 0), 0, &mut served);
            let token = cut.hello_ack_token(&mut p, &mut served);
            let mut frame = Header::new(Opcode::Request, 5).payload(&[1u8; 100]).encode().to_vec();
            frame.extend_from_slice(&[1u8; 10]);
            cut.send(&mut p, &frame, token, &mut served);
            serve_until_closed(&mut p, 2, &mut served);
            let before = served;
            while served < before + 100 {
                keep_serving(&mut p, &mut served);
            }
            let conns = p.server.stats().connections();
            let errors: Vec<String> = conns.iter().filter_map(|c| c.last_error.clone()).collect();
            assert!(errors.iter().any(|e| e.contains("bad magic")), "{kind}: {errors:?}");
            assert!(errors.iter().any(|e| e.contains("truncated")), "{kind}: {errors:?}");
            assert_eq!(
                conns.iter().filter(|c| c.state == ConnState::Established).count(),
                1,
                "{kind}: the good one stays"
            );
            let fabric::transport::AnyTransport::Ofi(t) = p.server.transport() else { unreachable!() };
            assert_eq!(t.rejected(), 2, "{kind}: both messages from the stranger were dropped");
        });
        assert!(logs.contains("dropped a message from an unknown sender"), "{kind}: {logs}");
        assert!(
            logs.lines().any(|l| l.contains("WARN") && l.contains("closing the connection") && l.contains("bad magic")),
            "{kind}: {logs}"
        );
        assert!(
            logs.lines().any(|l| l.contains("WARN") && l.contains("closing the connection") && l.contains("truncated")),
            "{kind}: {logs}"
        );
    }
}

#[test]
fn the_stream_reader_is_not_fooled_by_a_huge_length() {
    // A header announcing 4 GiB: refused before any allocation, connection closed.
    let (_, logs) = capture_logs(|| {
        let mut p = Pair::new(Kind::Tcp, RpcOptions::default(), RpcOptions::default());
        let mut served = 0;
        let mut s = TcpStream::connect(p.server.local_addr()).unwrap();
        let mut h = Header::new(Opcode::Request, 1).encode();
        h[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32c(&h[..28]);
        h[28..].copy_from_slice(&crc.to_le_bytes());
        s.write_all(&h).unwrap();
        serve_until_closed(&mut p, 1, &mut served);
        let _ = now();
    });
    assert!(logs.contains("exceeds the maximum message size"), "{logs}");
}
