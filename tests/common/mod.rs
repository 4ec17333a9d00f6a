//! What the process tests share.

use std::io::Read;
use std::process::Child;
use std::sync::{Arc, Mutex};

/// What a child process writes to its (piped) stderr, collected by a thread
/// so the child never blocks on a full pipe.
pub struct Captured {
    text: Arc<Mutex<String>>,
    reader: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Captured {
    /// What has been read so far.
    pub fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Everything, once the child has closed its stderr (call after it
    /// exited: the reader may still be behind the child's last lines).
    pub fn all(&self) -> String {
        if let Some(reader) = self.reader.lock().unwrap().take() {
            let _ = reader.join();
        }
        self.text()
    }
}

/// Starts collecting `child`'s stderr.
pub fn capture_stderr(child: &mut Child) -> Captured {
    let text = Arc::new(Mutex::new(String::new()));
    let (mut pipe, sink) = (child.stderr.take().expect("stderr is piped"), text.clone());
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    Captured { text, reader: Mutex::new(Some(reader)) }
}

/// `len` pseudo-random bytes (xorshift64*): incompressible test data.
#[allow(dead_code)]
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}
