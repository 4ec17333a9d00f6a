//! `fabric-echo TRANSPORT ADDRESS [MAX_MESSAGE]`: an RPC echo server on one
//! reactor, in a process of its own. It prints the address it listens on,
//! then answers every request with its payload until it is killed.
//!
//! The fabric's process tests run it as the peer they kill mid-transfer and
//! restart; it is also handy by hand:
//! `fabric-echo 'tcp;ofi_rxm' 127.0.0.1:7000`, `fabric-echo shm my-echo`.

use std::io::Write;
use std::process::ExitCode;

use fabric::reactor::{attach, echo};
use fabric::rpc::{Rpc, RpcOptions};
use fabric::transport::TransportConfig;
use pmd::{CoreMask, Runtime, RuntimeOptions};

fn run(args: &[String]) -> Result<(), String> {
    let [transport, address, rest @ ..] = args else {
        return Err("usage: fabric-echo TRANSPORT ADDRESS [MAX_MESSAGE]".into());
    };
    let mut opts = RpcOptions { name: format!("fabric-echo-{}", std::process::id()), ..Default::default() };
    if let Some(m) = rest.first() {
        opts.max_message = m.parse().map_err(|e| format!("MAX_MESSAGE {m:?}: {e}"))?;
    }
    let cfg = TransportConfig::new(transport, Some(address));
    let rpc = Rpc::new(cfg.open(opts.max_message).map_err(|e| e.to_string())?, opts).map_err(|e| e.to_string())?;
    let local = rpc.local_addr();
    let runtime = Runtime::start(RuntimeOptions { mask: CoreMask::first(1), pin: false, ..Default::default() })
        .map_err(|e| e.to_string())?;
    runtime.reactors()[0]
        .call(move |ctx| attach(ctx, rpc, echo).map(|_| ()).map_err(|e| e.to_string()))
        .blocking_recv()
        .map_err(|_| "the reactor stopped".to_string())??;
    println!("{local}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    loop {
        std::thread::park();
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fabric-echo: {e}");
            ExitCode::from(1)
        }
    }
}
