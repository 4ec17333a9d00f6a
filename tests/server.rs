//! `claudefs server` and `claudefs rpc` as a user runs them: a real process,
//! a real socket, and every kind of bad input the control plane must survive.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use clients::control::{Client, ClientError};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_claudefs");

struct Server {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    /// Everything the server wrote to stderr, read by a thread so it never blocks.
    log: common::Captured,
}

impl Server {
    fn start(extra: &[&str], config: Option<Value>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, extra, config)
    }

    fn start_in(dir: tempfile::TempDir, extra: &[&str], config: Option<Value>) -> Server {
        let socket = dir.path().join("s.sock");
        let mut cmd = Command::new(BIN);
        cmd.arg("server").arg("-r").arg(&socket).args(["--hugepages", "never"]).args(extra);
        if let Some(c) = config {
            let path = dir.path().join("config.json");
            std::fs::write(&path, c.to_string()).unwrap();
            cmd.arg("-c").arg(path);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let log = common::capture_stderr(&mut child);
        let mut server = Server { child, socket, _dir: dir, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&server.socket).is_err() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("server exited with {status}: {}", server.log());
            }
            assert!(Instant::now() < deadline, "server did not open its socket: {}", server.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket, Duration::from_secs(10)).unwrap()
    }

    fn call(&self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        let params = if params.is_null() { None } else { Some(params) };
        self.client().call(method, params).map_err(|e| match e {
            ClientError::Rpc { code, message } => (code, message),
            other => panic!("{method}: transport error {other}"),
        })
    }

    fn dir(&self) -> &Path {
        self._dir.path()
    }

    fn log(&self) -> String {
        self.log.text()
    }

    fn stop(mut self) -> Output {
        self.call("framework_shutdown", Value::Null).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        Output { status, stdout: Vec::new(), stderr: self.log.all().into_bytes() }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `claudefs` to completion.
fn claudefs(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Sends raw bytes on a fresh connection and returns what comes back until the server closes or 2 s pass.
fn raw_exchange(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // The server may close the connection before all of an oversized request is sent.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn serves_bdevs_from_a_config_and_save_config_round_trips() {
    let images = tempfile::tempdir().unwrap();
    let img = images.path().join("disk.img");
    let config = json!([
        {"method": "bdev_uring_set_options", "params": {"queue_depth": 256}},
        {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 2048, "block_size": 512}},
        {"method": "bdev_uring_create", "params": {"name": "Uring0", "filename": img, "size": 8 << 20}},
        {"method": "bdev_error_create", "params": {"base_name": "Malloc0"}},
    ]);
    let s = Server::start(&[], Some(config));
    let bdevs = s.call("bdev_get_bdevs", Value::Null).unwrap();
    let names: Vec<&str> = bdevs.as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Malloc0", "Uring0", "EE_Malloc0"]);
    assert_eq!(bdevs[0]["claimed_by"], "EE_Malloc0");
    assert_eq!(bdevs[1]["num_blocks"], 2048);
    assert_eq!(bdevs[1]["driver_specific"]["uring"]["filename"], json!(img));
    assert!(img.exists(), "the image file was created");
    let one = s.call("bdev_get_bdevs", json!({"name": "Uring0"})).unwrap();
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(s.call("bdev_uring_get_options", Value::Null).unwrap()["queue_depth"], 256);

    let saved = s.call("save_config", Value::Null).unwrap();
    let uuids: Vec<Value> = bdevs.as_array().unwrap().iter().map(|b| b["uuid"].clone()).collect();
    let out = s.stop();
    assert!(out.status.success(), "{}", stderr(&out));

    // A server started from the saved config has the same bdevs with the same identities.
    let s2 = Server::start(&[], Some(saved.clone()));
    let again = s2.call("bdev_get_bdevs", Value::Null).unwrap();
    let uuids2: Vec<Value> = again.as_array().unwrap().iter().map(|b| b["uuid"].clone()).collect();
    assert_eq!(uuids, uuids2);
    assert_eq!(s2.call("save_config", Value::Null).unwrap(), saved);
}

#[test]
fn control_methods_report_reactors_pollers_memory_and_iostat() {
    let s = Server::start(
        &["-m", "0x3"],
        Some(json!([{"method": "bdev_null_create", "params": {"name": "Null0", "num_blocks": 1024}}])),
    );
    let version = s.call("framework_get_version", Value::Null).unwrap();
    assert!(version["version"].as_str().unwrap().starts_with("ClaudeFS v"));
    let reactors = s.call("framework_get_reactors", Value::Null).unwrap();
    assert_eq!(reactors["reactors"].as_array().unwrap().len(), 2);
    assert_eq!(reactors["core_mask"], "0x3");
    assert_eq!(reactors["idle_policy"], "adaptive");
    let pollers = s.call("thread_get_pollers", Value::Null).unwrap();
    assert_eq!(pollers["reactors"].as_array().unwrap().len(), 2);
    let mem = s.call("env_get_mem_stats", Value::Null).unwrap();
    assert_eq!(mem["hugepage_mode"], "never");
    let stat = s.call("bdev_get_iostat", Value::Null).unwrap();
    assert_eq!(stat["bdevs"][0]["name"], "Null0");
    assert_eq!(stat["bdevs"][0]["num_read_ops"], 0);
    let methods = s.call("rpc_get_methods", Value::Null).unwrap();
    for m in [
        "rpc_get_methods",
        "framework_get_version",
        "framework_get_reactors",
        "thread_get_pollers",
        "env_get_mem_stats",
        "bdev_get_bdevs",
        "bdev_get_iostat",
        "bdev_null_create",
        "bdev_null_delete",
        "bdev_malloc_create",
        "bdev_malloc_delete",
        "bdev_uring_create",
        "bdev_uring_delete",
        "bdev_error_create",
        "bdev_error_inject",
        "save_config",
        "framework_start_init",
    ] {
        assert!(methods.as_array().unwrap().contains(&json!(m)), "{m} missing");
    }
}

#[test]
fn bad_requests_get_json_rpc_errors_naming_the_problem() {
    let s =
        Server::start(&[], Some(json!([{"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 64}}])));
    let err = |m: &str, p: Value| s.call(m, p).unwrap_err();
    assert_eq!(err("no_such_method", Value::Null).0, -32601);
    let (code, msg) = err("bdev_malloc_create", json!({"num_blocks": 8}));
    assert_eq!(code, -32602);
    assert!(msg.contains("missing field `name`"), "{msg}");
    let (code, msg) = err("bdev_malloc_create", json!({"name": "x", "num_blocks": "many"}));
    assert_eq!(code, -32602);
    assert!(msg.contains("parameter `num_blocks`"), "{msg}");
    let (code, msg) = err("bdev_malloc_create", json!({"name": "x", "num_blocks": 8, "colour": 1}));
    assert_eq!(code, -32602);
    assert!(msg.contains("unknown field `colour`"), "{msg}");
    let (code, msg) = err("bdev_malloc_create", json!({"name": "M0", "num_blocks": 64}));
    assert_eq!(code, -libc::EEXIST as i64, "{msg}");
    assert!(msg.contains("already exists"));
    let (code, msg) = err("bdev_malloc_delete", json!({"name": "nope"}));
    assert_eq!(code, -libc::ENODEV as i64, "{msg}");
    s.call("bdev_error_create", json!({"base_name": "M0"})).unwrap();
    let (code, msg) = err("bdev_malloc_delete", json!({"name": "M0"}));
    assert_eq!(code, -libc::EBUSY as i64);
    assert!(msg.contains("claimed by EE_M0"), "{msg}");
    let (_, msg) = err("bdev_null_delete", json!({"name": "EE_M0"}));
    assert!(msg.contains("is a error bdev, not a null bdev"), "{msg}");
    let (code, msg) = err("bdev_uring_create", json!({"name": "U", "filename": s.dir().join("absent.img")}));
    assert_eq!(code, -libc::ENOENT as i64);
    assert!(msg.contains("does not exist"), "{msg}");
    let odd = s.dir().join("odd.img");
    std::fs::write(&odd, vec![0u8; 5000]).unwrap();
    let (_, msg) = err("bdev_uring_create", json!({"name": "U", "filename": odd}));
    assert!(msg.contains("not a multiple of the 4096-byte block size"), "{msg}");
    let (_, msg) = err("bdev_uring_set_options", json!({"queue_depth": 64}));
    assert!(msg.contains("only be called before framework_start_init"), "{msg}");

    // Protocol errors on a raw connection.
    let wrong_version = raw_exchange(&s.socket, br#"{"jsonrpc":"1.0","method":"rpc_get_methods","id":5}"#);
    let v: Value = serde_json::from_str(wrong_version.trim()).unwrap();
    assert_eq!((v["error"]["code"].clone(), v["id"].clone()), (json!(-32600), json!(5)));
    let garbage = raw_exchange(&s.socket, b"{\"jsonrpc\": \"2.0\", \"method\": oops}");
    let v: Value = serde_json::from_str(garbage.trim()).unwrap();
    assert_eq!(v["error"]["code"], -32700);
    assert!(v["error"]["message"].as_str().unwrap().contains("malformed JSON"));
    let batch = raw_exchange(
        &s.socket,
        br#"[{"jsonrpc":"2.0","method":"framework_get_version","id":1},{"jsonrpc":"2.0","method":"x","id":2}]"#,
    );
    let v: Value = serde_json::from_str(batch.trim()).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    // A request over the limit (1 MiB by default) is refused and the connection closed.
    let mut huge = br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","id":1,"params":{"name":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 2 << 20));
    let big = raw_exchange(&s.socket, &huge);
    let v: Value = serde_json::from_str(big.lines().next().unwrap()).unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("larger than the 1048576-byte limit"), "{big}");
    // A client that disconnects mid-request leaves the server unharmed.
    {
        let mut c = UnixStream::connect(&s.socket).unwrap();
        c.write_all(br#"{"jsonrpc":"2.0","method":"bdev_get"#).unwrap();
    }
    assert!(s.call("bdev_get_bdevs", Value::Null).is_ok());
}

#[test]
fn many_clients_at_once() {
    let s = Server::start(&[], None);
    let socket = s.socket.clone();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket, Duration::from_secs(10)).unwrap();
                for i in 0..50 {
                    let name = format!("N{t}_{i}");
                    c.call("bdev_null_create", Some(json!({"name": name, "num_blocks": 8}))).unwrap();
                    c.call("bdev_get_bdevs", Some(json!({"name": name}))).unwrap();
                }
            })
        })
        .collect();
    // A slow client holding a half-sent request does not block the others.
    let mut slow = UnixStream::connect(&socket).unwrap();
    slow.write_all(b"{\"jsonrpc\":").unwrap();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(s.call("bdev_get_bdevs", Value::Null).unwrap().as_array().unwrap().len(), 400);
}

#[test]
fn wait_for_rpc_defers_initialisation_and_the_config_tail() {
    let config = json!([
        {"method": "bdev_uring_set_options", "params": {"queue_depth": 128}},
        {"method": "framework_start_init"},
        {"method": "bdev_null_create", "params": {"name": "Late", "num_blocks": 8}},
    ]);
    let s = Server::start(&["--wait-for-rpc"], Some(config));
    assert_eq!(s.call("bdev_get_bdevs", Value::Null).unwrap(), json!([]), "runtime calls of the config wait");
    let (code, msg) = s.call("bdev_null_create", json!({"name": "N", "num_blocks": 8})).unwrap_err();
    assert_eq!(code, -1);
    assert!(msg.contains("call framework_start_init first"), "{msg}");
    s.call("bdev_uring_set_options", json!({"queue_depth": 64})).unwrap();
    let current = s.call("rpc_get_methods", json!({"current": true})).unwrap();
    assert!(current.as_array().unwrap().contains(&json!("bdev_uring_set_options")));
    assert!(!current.as_array().unwrap().contains(&json!("bdev_null_create")));
    assert_eq!(s.call("framework_start_init", Value::Null).unwrap(), json!(true));
    assert_eq!(s.call("bdev_get_bdevs", Value::Null).unwrap()[0]["name"], "Late");
    assert_eq!(s.call("bdev_uring_get_options", Value::Null).unwrap()["queue_depth"], 64);
    let (code, msg) = s.call("framework_start_init", Value::Null).unwrap_err();
    assert_eq!(code, -libc::EALREADY as i64);
    assert!(msg.contains("already initialized"), "{msg}");
}

#[test]
fn startup_errors_are_reported_and_the_server_exits() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    let bad_mask = claudefs(&["server", "-r", sock, "-m", "0xZ"]);
    assert!(!bad_mask.status.success());
    assert!(stderr(&bad_mask).contains("invalid core mask \"0xZ\""), "{}", stderr(&bad_mask));
    let absent_core = claudefs(&["server", "-r", sock, "-m", "[900]"]);
    assert!(stderr(&absent_core).contains("names core 900"), "{}", stderr(&absent_core));
    let missing = claudefs(&["server", "-r", sock, "-c", "/nonexistent/config.json"]);
    assert!(stderr(&missing).contains("reading config /nonexistent/config.json"), "{}", stderr(&missing));
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{\"method\": 1").unwrap();
    let out = claudefs(&["server", "-r", sock, "-c", garbage.to_str().unwrap()]);
    assert!(stderr(&out).contains("is not a JSON list"), "{}", stderr(&out));

    // A config failing at its third call says which, and that the first two stay applied.
    let halfway = dir.path().join("halfway.json");
    std::fs::write(
        &halfway,
        json!([
            {"method": "bdev_null_create", "params": {"name": "A", "num_blocks": 8}},
            {"method": "bdev_null_create", "params": {"name": "B", "num_blocks": 8}},
            {"method": "bdev_null_create", "params": {"name": "A", "num_blocks": 8}},
            {"method": "bdev_null_create", "params": {"name": "C", "num_blocks": 8}},
        ])
        .to_string(),
    )
    .unwrap();
    let out = claudefs(&["server", "-r", sock, "--hugepages", "never", "-c", halfway.to_str().unwrap()]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("config call #3 (bdev_null_create) failed: bdev \"A\" already exists"), "{e}");
    assert!(e.contains("calls 1 to 2 were applied"), "{e}");
    assert!(!Path::new(sock).exists(), "the socket is removed on exit");
}

#[test]
fn the_socket_is_private_stale_sockets_are_replaced_and_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    // A stale socket: bound, then its listener gone.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let s = Server::start_in(dir, &[], None);
    assert_eq!(std::fs::metadata(&s.socket).unwrap().permissions().mode() & 0o777, 0o600);
    // A second server on the same socket refuses, leaving the first alone.
    let out = claudefs(&["server", "-r", s.socket.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is in use by a running server"), "{}", stderr(&out));
    assert!(s.call("framework_get_version", Value::Null).is_ok());
    // A regular file in the way is not deleted.
    let file = s.dir().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let out = claudefs(&["server", "-r", file.to_str().unwrap()]);
    assert!(stderr(&out).contains("is not a socket"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn the_rpc_command_takes_flags_or_json_and_explains_methods() {
    let s = Server::start(&[], None);
    let sock = s.socket.to_str().unwrap();
    let out = claudefs(&[
        "rpc",
        "-s",
        sock,
        "bdev_malloc_create",
        "--name",
        "M1",
        "--num-blocks",
        "128",
        "--block-size",
        "512",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "\"M1\"");
    let out = claudefs(&["rpc", "-s", sock, "bdev_null_create", r#"{"name": "N1", "num_blocks": 8}"#]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = claudefs(&["rpc", "-s", sock, "bdev_get_bdevs", "--name", "M1"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["block_size"], 512);
    let help = claudefs(&["rpc", "-s", sock, "bdev_malloc_create", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--num-blocks") && text.contains("(required)") && text.contains("Number of blocks"),
        "{text}"
    );
    let help = claudefs(&["rpc", "-s", sock, "bdev_error_inject", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("One of: failure, timeout, torn, busy, clear"));
    let bad = claudefs(&["rpc", "-s", sock, "bdev_malloc_create", "--name", "M2", "--num-blocks", "lots"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("--num-blocks expects an integer"), "{}", stderr(&bad));
    let failed = claudefs(&["rpc", "-s", sock, "bdev_malloc_delete", "--name", "none"]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(stderr(&failed).contains("error -19: no bdev named \"none\""), "{}", stderr(&failed));
    let nosock = claudefs(&["rpc", "-s", "/nonexistent.sock", "rpc_get_methods"]);
    assert!(stderr(&nosock).contains("is `claudefs server` running?"), "{}", stderr(&nosock));
    // A reader that stops early (`| grep -q`) is the normal end of the output, not a panic.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let closed = Command::new(BIN).args(["rpc", "-s", sock, "rpc_get_methods"]).stdout(writer).output().unwrap();
    assert!(closed.status.success(), "{}", stderr(&closed));
    assert!(!stderr(&closed).contains("panicked"), "{}", stderr(&closed));
}

#[test]
fn bdevperf_verifies_every_byte_and_fails_loudly_on_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(&good, json!([
        {"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 4096, "block_size": 512}},
        {"method": "bdev_uring_create", "params": {"name": "U0", "filename": dir.path().join("u.img"), "size": 16 << 20}},
    ]).to_string()).unwrap();
    let out = claudefs(&[
        "bdevperf",
        "-c",
        good.to_str().unwrap(),
        "-q",
        "16",
        "-o",
        "4k",
        "-w",
        "verify",
        "-t",
        "1",
        "--json",
        "--hugepages",
        "never",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let jobs = report["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 3, "two jobs and the total");
    assert!(jobs.iter().all(|j| j["iops"].as_f64().unwrap() > 0.0 && j["fail_per_s"] == 0.0));

    // Torn writes from the error bdev are caught by the comparison.
    let torn = dir.path().join("torn.json");
    std::fs::write(&torn, json!([
        {"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 4096, "block_size": 512}},
        {"method": "bdev_error_create", "params": {"base_name": "M0"}},
        {"method": "bdev_error_inject", "params": {"name": "EE_M0", "io_type": "write", "error_type": "torn", "num": 1, "skip": 100}},
    ]).to_string()).unwrap();
    let out = claudefs(&[
        "bdevperf",
        "-c",
        torn.to_str().unwrap(),
        "-q",
        "8",
        "-o",
        "4k",
        "-w",
        "verify",
        "-t",
        "2",
        "--hugepages",
        "never",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("VERIFY FAILED: bdev EE_M0: data mismatch at block"), "{e}");

    let bad =
        claudefs(&["bdevperf", "-c", good.to_str().unwrap(), "-q", "4", "-o", "1000", "-w", "randread", "-t", "1"]);
    assert!(stderr(&bad).contains("-o 1000 is not a multiple of the 512-byte block size of M0"), "{}", stderr(&bad));
}

#[test]
fn bdevperf_verifies_a_uring_bdev_with_sqpoll_and_without_fixed_buffers() {
    let dir = tempfile::tempdir().unwrap();
    for options in [json!({"sqpoll": true, "queue_depth": 64}), json!({"fixed_buffers": false})] {
        let cfg = dir.path().join("c.json");
        std::fs::write(&cfg, json!([
            {"method": "bdev_uring_set_options", "params": options},
            {"method": "framework_start_init"},
            {"method": "bdev_uring_create", "params": {"name": "U0", "filename": dir.path().join("u.img"), "size": 16 << 20}},
        ]).to_string()).unwrap();
        let out = claudefs(&[
            "bdevperf",
            "-c",
            cfg.to_str().unwrap(),
            "-q",
            "32",
            "-o",
            "16k",
            "-w",
            "verify",
            "-t",
            "1",
            "--json",
            "--hugepages",
            "never",
        ]);
        assert!(out.status.success(), "{options}: {}", stderr(&out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(report["jobs"][0]["ios"].as_u64().unwrap() > 0, "{options}: no I/O verified: {report}");
        std::fs::remove_file(dir.path().join("u.img")).unwrap();
    }
}

#[test]
fn bdevperf_runs_every_workload_on_several_cores() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.json");
    std::fs::write(
        &cfg,
        json!([{"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 8192}}]).to_string(),
    )
    .unwrap();
    for w in ["read", "write", "randread", "randwrite", "rw", "randrw", "unmap", "write-zeroes", "flush"] {
        let out = claudefs(&[
            "bdevperf",
            "-c",
            cfg.to_str().unwrap(),
            "-q",
            "8",
            "-o",
            "8k",
            "-w",
            w,
            "-t",
            "0.2",
            "-m",
            "0x3",
            "-C",
            "--json",
            "--hugepages",
            "never",
        ]);
        assert!(out.status.success(), "{w}: {}", stderr(&out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["jobs"].as_array().unwrap().len(), 3, "{w}: one job per core plus the total");
        assert!(report["jobs"][2]["iops"].as_f64().unwrap() > 0.0, "{w}");
    }
}

#[test]
fn blobstores_and_blobs_through_the_control_socket() {
    let images = tempfile::tempdir().unwrap();
    let img = images.path().join("bs.img");
    let config = json!([{"method": "bdev_uring_create", "params": {"name": "U0", "filename": img, "size": 64 << 20}}]);
    let s = Server::start(&[], Some(config));
    let stats = s.call("blobstore_create", json!({"bdev_name": "U0", "cluster_size": 65536})).unwrap();
    assert_eq!(stats["cluster_size"], 65536);
    let a = s.call("blob_create", json!({"bdev_name": "U0", "num_clusters": 4, "xattrs": {"name": "log"}})).unwrap();
    let b = s.call("blob_create", json!({"bdev_name": "U0", "num_clusters": 100, "thin": true})).unwrap();
    s.call("blob_resize", json!({"bdev_name": "U0", "blob_id": a, "num_clusters": 6})).unwrap();
    s.call("blob_set_xattr", json!({"bdev_name": "U0", "blob_id": a, "name": "owner", "value": "raft"})).unwrap();
    let snap = s.call("blob_snapshot", json!({"bdev_name": "U0", "blob_id": a})).unwrap();
    let clone = s.call("blob_clone", json!({"bdev_name": "U0", "blob_id": snap, "xattrs": {"name": "copy"}})).unwrap();
    s.call("blob_inflate", json!({"bdev_name": "U0", "blob_id": clone})).unwrap();
    s.call("blobstore_set_super", json!({"bdev_name": "U0", "blob_id": a})).unwrap();
    let x = s.call("blob_get_xattrs", json!({"bdev_name": "U0", "blob_id": a})).unwrap();
    assert_eq!(x, json!({"name": "log", "owner": "raft"}));
    let (code, msg) = s.call("blob_delete", json!({"bdev_name": "U0", "blob_id": snap})).unwrap_err();
    assert_eq!(code, -libc::EBUSY as i64, "{msg}");
    assert!(msg.contains("has clones"), "{msg}");
    let (code, msg) = s.call("blob_create", json!({"bdev_name": "U0", "num_clusters": 5000})).unwrap_err();
    assert_eq!(code, -libc::ENOSPC as i64, "{msg}");
    let (code, _) = s.call("blob_list", json!({"bdev_name": "nope"})).unwrap_err();
    assert_eq!(code, -libc::ENODEV as i64);
    let (code, msg) = s.call("bdev_uring_delete", json!({"name": "U0"})).unwrap_err();
    assert_eq!(code, -libc::EBUSY as i64);
    assert!(msg.contains("claimed by blobstore"), "{msg}");
    let list = s.call("blob_list", json!({"bdev_name": "U0"})).unwrap();
    assert_eq!(
        list.as_array().unwrap().iter().map(|b| b["id"].clone()).collect::<Vec<_>>(),
        vec![a.clone(), b.clone(), snap.clone(), clone.clone()]
    );
    let stats = s.call("blobstore_get_stats", json!({})).unwrap();
    assert_eq!(stats[0]["blobs"], 4);
    let saved = s.call("save_config", Value::Null).unwrap();
    assert!(saved.as_array().unwrap().iter().any(|c| c["method"] == "blobstore_load"));
    // A clean stop unloads the store; the saved config loads it again, clean.
    let out = s.stop();
    assert!(out.status.success(), "{}", stderr(&out));
    let s = Server::start(&[], Some(saved));
    let again = s.call("blob_list", json!({"bdev_name": "U0"})).unwrap();
    assert_eq!(again, list);
    let st = s.call("blobstore_get_stats", json!({"bdev_name": "U0"})).unwrap();
    assert_eq!(st[0]["super_blob"], a);
    s.call("blobstore_unload", json!({"bdev_name": "U0"})).unwrap();
    let report = s.call("blobstore_check", json!({"bdev_name": "U0"})).unwrap();
    assert_eq!(report["consistent"], true, "{report}");
    assert_eq!(report["load"]["clean"], true, "{report}");
    let report = s.call("blobstore_load", json!({"bdev_name": "U0"})).unwrap();
    assert_eq!((report["clean"].clone(), report["blobs"].clone()), (json!(true), json!(4)));
}

#[test]
fn rpc_reference_in_docs_matches_the_server() {
    let s = Server::start(&[], None);
    let detail = s.call("rpc_get_methods", json!({"detail": true})).unwrap();
    let md = clients::control::render_reference(detail.as_array().unwrap());
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/rpc.md");
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &md).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == md,
        "docs/rpc.md is stale: regenerate it with UPDATE_DOCS=1 cargo test --test server rpc_reference"
    );
}

#[test]
fn nvme_methods_name_what_is_wrong_without_hardware() {
    let s = Server::start(&[], None);
    assert_eq!(s.call("bdev_nvme_get_controllers", Value::Null).unwrap(), json!([]));
    let (code, msg) =
        s.call("bdev_nvme_attach_controller", json!({"name": "Nvme0", "traddr": "0000:7f:1f.7"})).unwrap_err();
    assert_eq!(code, -(libc::ENODEV as i64), "{msg}");
    assert!(msg.contains("no PCI device 0000:7f:1f.7") && msg.contains("hack/setup.sh status"), "{msg}");
    let (code, msg) = s.call("bdev_nvme_attach_controller", json!({"name": "Nvme0", "traddr": "7f:1f.7"})).unwrap_err();
    assert_eq!(code, -(libc::EINVAL as i64));
    assert!(msg.contains("domain:bus:device.function"), "{msg}");
    let (code, msg) = s
        .call("bdev_nvme_attach_controller", json!({"name": "Nvme0", "traddr": "0000:00:05.0", "trtype": "tcp"}))
        .unwrap_err();
    assert_eq!(code, -(libc::EINVAL as i64));
    assert!(msg.contains("\"tcp\" is not supported"), "{msg}");
    let (code, _) = s.call("bdev_nvme_detach_controller", json!({"name": "Nvme0"})).unwrap_err();
    assert_eq!(code, -(libc::ENODEV as i64));
    let (code, _) = s.call("bdev_nvme_get_controller_health_info", json!({"name": "Nvme0"})).unwrap_err();
    assert_eq!(code, -(libc::ENODEV as i64));
    let (code, msg) = s.call("bdev_nvme_attach_controller", json!({"traddr": "0000:00:05.0"})).unwrap_err();
    assert_eq!(code, -32602, "a missing name is an invalid parameter: {msg}");
    assert!(s.stop().status.success());
}

// ---- fabric listeners -------------------------------------------------------

mod fabric_listeners {
    use super::*;
    use fabric::frame::Payload;
    use fabric::rpc::{Event, Rpc, RpcOptions};
    use fabric::transport::TransportConfig;

    const TRANSPORTS: [&str; 3] = ["tcp", "tcp;ofi_rxm", "shm"];

    fn listen_address(transport: &str) -> String {
        match transport {
            "shm" => fabric::transport::ofi::unique_shm_name(),
            _ => "127.0.0.1:0".into(),
        }
    }

    fn client(transport: &str, opts: RpcOptions) -> Rpc {
        let bind = match transport {
            "tcp" | "shm" => None,
            _ => Some("127.0.0.1"),
        };
        Rpc::new(TransportConfig::new(transport, bind).open(opts.max_message).unwrap(), opts).unwrap()
    }

    /// Echoes `payloads` through the listener at `addr`; returns the client (still connected).
    fn echo(transport: &str, addr: &str, payloads: &[Vec<u8>]) -> Rpc {
        let mut c = client(transport, RpcOptions { name: "test-client".into(), ..Default::default() });
        let conn = c.connect(pmd::clock::now(), addr).unwrap();
        for (tag, p) in payloads.iter().enumerate() {
            c.call(pmd::clock::now(), conn, 0, Payload::copy_from(p), tag as u64).unwrap();
        }
        let (mut done, mut events) = (0, Vec::new());
        let start = Instant::now();
        while done < payloads.len() {
            assert!(start.elapsed() < Duration::from_secs(30), "{transport}: {done} of {} echoes", payloads.len());
            c.poll(pmd::clock::now(), &mut events);
            for e in events.drain(..) {
                if let Event::Completion(x) = e {
                    assert_eq!(x.result.unwrap()[..], payloads[x.tag as usize][..], "{transport}: echo {}", x.tag);
                    done += 1;
                }
            }
        }
        c
    }

    #[test]
    fn listeners_serve_echo_report_connections_and_survive_save_config() {
        let s = Server::start(&["-m", "0x3"], None);
        let mut rng = fastrand::Rng::with_seed(5);
        let payloads: Vec<Vec<u8>> =
            [0, 1, 64, 4096, 65_536, 1 << 20].iter().map(|&n| (0..n).map(|_| rng.u8(..)).collect()).collect();
        let mut addrs = Vec::new();
        for (i, t) in TRANSPORTS.iter().enumerate() {
            let r = s
                .call(
                    "fabric_listen",
                    json!({"name": format!("l{i}"), "transport": t, "address": listen_address(t), "reactor": i % 2}),
                )
                .unwrap();
            assert_eq!(r["transport"], *t);
            addrs.push(r["address"].as_str().unwrap().to_string());
        }
        let transports = s.call("fabric_get_transports", Value::Null).unwrap();
        let names: Vec<&str> =
            transports["transports"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        for t in TRANSPORTS {
            assert!(names.contains(&t), "{t} is offered: {names:?}");
        }
        assert_eq!(transports["listeners"].as_array().unwrap().len(), 3);
        assert_eq!(transports["auto"], "tcp;ofi_rxm", "no RDMA here: auto picks tcp;ofi_rxm");
        let mut clients = Vec::new();
        for (t, a) in TRANSPORTS.iter().zip(&addrs) {
            clients.push(echo(t, a, &payloads));
        }
        let conns = s.call("fabric_get_connections", Value::Null).unwrap();
        let total: usize = payloads.iter().map(Vec::len).sum();
        for (l, t) in conns.as_array().unwrap().iter().zip(TRANSPORTS) {
            assert_eq!(l["transport"], t);
            let c = &l["connections"][0];
            assert_eq!(c["state"], "established", "{t}: {c}");
            assert_eq!(c["peer_name"], "test-client");
            assert_eq!(c["direction"], "inbound");
            assert_eq!(c["requests_received"], payloads.len());
            assert!(c["bytes_received"].as_u64().unwrap() >= total as u64, "{t}: {c}");
            assert!(c["bytes_sent"].as_u64().unwrap() >= total as u64, "{t}: {c}");
        }
        // Mistakes are named.
        let (code, msg) =
            s.call("fabric_listen", json!({"name": "l0", "transport": "tcp", "address": "127.0.0.1:0"})).unwrap_err();
        assert_eq!(code, -libc::EEXIST as i64, "{msg}");
        let (_, msg) =
            s.call("fabric_listen", json!({"name": "x", "transport": "carrier-pigeon", "address": "a"})).unwrap_err();
        assert!(msg.contains("carrier-pigeon"), "{msg}");
        let (code, msg) =
            s.call("fabric_listen", json!({"name": "y", "transport": "tcp", "address": "localhost"})).unwrap_err();
        assert_eq!(code, -libc::EINVAL as i64, "{msg}");
        assert!(msg.contains("IP:PORT"), "{msg}");
        let (code, _) = s.call("fabric_get_connections", json!({"name": "nope"})).unwrap_err();
        assert_eq!(code, -libc::ENOENT as i64);

        // Stopping a listener closes its connections.
        s.call("fabric_stop_listener", json!({"name": "l0"})).unwrap();
        let mut events = Vec::new();
        let start = Instant::now();
        while !events.iter().any(|e| matches!(e, Event::Disconnected { .. })) {
            assert!(start.elapsed() < Duration::from_secs(10), "the client of a stopped listener was not disconnected");
            clients[0].poll(pmd::clock::now(), &mut events);
        }
        drop(clients);

        // save_config recreates the remaining listeners at the same addresses.
        let saved = s.call("save_config", Value::Null).unwrap();
        let listens: Vec<&Value> =
            saved.as_array().unwrap().iter().filter(|c| c["method"] == "fabric_listen").collect();
        assert_eq!(listens.len(), 2, "{saved}");
        assert_eq!(listens[0]["params"]["address"], addrs[1], "the port picked for port 0 is saved");
        let out = s.stop();
        assert!(out.status.success(), "{}", stderr(&out));
        let s2 = Server::start(&["-m", "0x3"], Some(saved));
        for (t, a) in TRANSPORTS.iter().zip(&addrs).skip(1) {
            echo(t, a, &payloads[..3]);
        }
        drop(s2);
    }

    #[test]
    fn a_killed_server_fails_pending_calls_and_nothing_hangs() {
        // Not shm: a killed libfabric 1.17 shm peer can leave its survivor
        // spinning on a lock for good (docs/fabric.md).
        for t in TRANSPORTS.into_iter().filter(|&t| t != "shm") {
            let mut s = Server::start(&[], None);
            let r =
                s.call("fabric_listen", json!({"name": "k", "transport": t, "address": listen_address(t)})).unwrap();
            let addr = r["address"].as_str().unwrap();
            let opts = RpcOptions {
                keepalive_interval_ms: 100,
                keepalive_timeout_ms: 1_500,
                reconnect_attempts: 0,
                ..Default::default()
            };
            let mut c = client(t, opts);
            let conn = c.connect(pmd::clock::now(), addr).unwrap();
            // A closed loop of 16 calls in flight; the server dies after 20 answers.
            let (n, depth) = (400u64, 16u64);
            for tag in 0..depth {
                c.call(pmd::clock::now(), conn, 0, Payload::from(vec![7u8; 256 << 10]), tag).unwrap();
            }
            let (mut submitted, mut ok, mut failed, mut events, mut killed) = (depth, 0, 0, Vec::new(), false);
            let start = Instant::now();
            while ok + failed < submitted {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "{t}: {ok} ok, {failed} failed of {submitted}: hung"
                );
                c.poll(pmd::clock::now(), &mut events);
                for e in events.drain(..) {
                    if let Event::Completion(x) = e {
                        if x.result.is_ok() {
                            ok += 1
                        } else {
                            failed += 1
                        }
                        if submitted < n && c.state(conn).is_some() {
                            c.call(pmd::clock::now(), conn, 0, Payload::from(vec![7u8; 256 << 10]), submitted).unwrap();
                            submitted += 1;
                        }
                    }
                }
                if ok >= 20 && !killed {
                    s.child.kill().unwrap();
                    s.child.wait().unwrap();
                    fabric::transport::ofi::remove_shm_regions(addr);
                    killed = true;
                }
            }
            assert!(failed > 0, "{t}: the kill came after every call was answered");
            assert_eq!(c.state(conn), None, "{t}: the connection is closed");
        }
    }
}
