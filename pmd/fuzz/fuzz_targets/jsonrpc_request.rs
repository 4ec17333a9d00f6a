//! Fuzzes the control socket's request path: bytes split at an arbitrary
//! point, framed into JSON values, checked as JSON-RPC requests and
//! dispatched to typed methods (parameter decoding included). Nothing may
//! panic, and every request must get exactly the answer the protocol says.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pmd::rpc::{Allowed, FrameReader, Methods, NoParams};
use serde_json::Value;

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Params {
    name: String,
    num_blocks: u64,
    #[serde(default)]
    block_size: Option<u32>,
    #[serde(default)]
    flag: bool,
    #[serde(default)]
    list: Vec<i32>,
}

fn methods() -> &'static Methods {
    static M: OnceLock<Methods> = OnceLock::new();
    M.get_or_init(|| {
        let mut m = Methods::new(Default::default());
        m.add_sync("typed", "Typed params.", Allowed::Always, |p: Params| Ok(p.name.len() as u64 + p.num_blocks));
        m.add_sync("none", "No params.", Allowed::Always, |_: NoParams| Ok(true));
        m.add_sync("startup", "Startup only.", Allowed::Startup, |_: NoParams| Ok(true));
        m
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let rt = runtime();
    let cut = data.first().map_or(0, |&b| b as usize).min(data.len());
    let mut frames = FrameReader::new(2048);
    for chunk in [&data[..cut], &data[cut..]] {
        frames.push(chunk);
        loop {
            match frames.next_value() {
                Ok(Some(v)) => {
                    let answer = rt.block_on(methods().handle(v));
                    if let Some(a) = &answer {
                        assert!(a.is_object() || a.is_array(), "answers are objects or batches");
                        if let Value::Object(o) = a {
                            assert_eq!(o.get("jsonrpc"), Some(&Value::from("2.0")));
                            assert!(o.contains_key("result") != o.contains_key("error"));
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
