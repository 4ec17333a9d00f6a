//! What the process tests share.

use std::io::Read;
use std::process::Child;
use std::sync::{Arc, Mutex};

/// Everything `child` writes to its (piped) stderr, collected by a thread so
/// the child never blocks on a full pipe.
pub fn capture_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let (mut pipe, sink) = (child.stderr.take().expect("stderr is piped"), log.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    log
}
