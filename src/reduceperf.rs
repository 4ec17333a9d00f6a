//! `claudefs reduceperf`: the data-reduction stages alone, one core each,
//! against the whole pipeline on every core, on compressible (text-like)
//! and incompressible (random) data; and a sweep of chunking parameters
//! (dedupe after small edits against throughput). Prints JSON;
//! hack/bench/reduce.py runs it and checks the goal (pipeline at least 70%
//! of its slowest stage).

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::Instant;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use blobfs::reduce::compress::{Codec, Encoding};
use blobfs::reduce::{
    ChunkHash, Chunking, Compression, MasterKey, ReducePolicy, decode_all_threads, default_threads, encode_all_threads,
};
use serde_json::{Value, json};

/// Options of `claudefs reduceperf`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// MiB of each data set.
    #[arg(long, default_value_t = 256)]
    size_mib: usize,
    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Workers of the pipeline (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// MiB of the chunking sweep's data set (0: no sweep).
    #[arg(long, default_value_t = 64)]
    sweep_mib: usize,
    /// Only the pipeline (to profile it, e.g. under `perf record`).
    #[arg(long)]
    pipeline_only: bool,
}

/// Bytes per piece for the stages measured alone (the default average chunk).
const PIECE: usize = 64 << 10;

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let threads = args.threads.unwrap_or_else(default_threads).max(1);
    let len = args.size_mib << 20;
    let reps = args.reps.max(1);
    let mut data = serde_json::Map::new();
    for (name, bytes) in [("compressible", text(len, 1)), ("incompressible", random(len, 2))] {
        let stages = if args.pipeline_only { Value::Null } else { stages(&bytes, reps)? };
        data.insert(name.into(), json!({ "stages": stages, "pipeline": pipeline(&bytes, reps, threads)? }));
    }
    let sweep = if args.sweep_mib > 0 && !args.pipeline_only {
        sweep(args.sweep_mib << 20, reps, threads)?
    } else {
        Value::Null
    };
    let report = json!({
        "size_mib": args.size_mib, "reps": reps, "threads": threads, "piece_bytes": PIECE,
        "policy": policy().to_string(), "data": data, "chunking_sweep": sweep,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// The pipeline measured: the default policy, encrypted.
fn policy() -> ReducePolicy {
    ReducePolicy { encrypt: true, ..ReducePolicy::default() }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0; len];
    rng.fill(&mut v);
    v
}

/// Text-like data: lines of words drawn from a vocabulary of a few thousand
/// (LZ4 makes it about 2x smaller, like source code or logs).
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let vocab: Vec<Vec<u8>> = (0..4000).map(|_| (0..rng.usize(2..10)).map(|_| rng.u8(b'a'..=b'z')).collect()).collect();
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        for _ in 0..rng.usize(4..14) {
            // Zipf-like: common words far more often than rare ones.
            let w = &vocab[(rng.f64().powi(3) * vocab.len() as f64) as usize];
            out.extend_from_slice(w);
            out.push(b' ');
        }
        out.extend_from_slice(format!("{}\n", rng.u32(..100_000)).as_bytes());
    }
    out.truncate(len);
    out
}

/// GB/s over `bytes` of the median of `reps` runs of `f`.
fn rate(bytes: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    let secs = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    median_rate(bytes, secs)
}

/// GB/s over `bytes` of the median of the times `secs`.
fn median_rate(bytes: usize, mut secs: Vec<f64>) -> f64 {
    secs.sort_by(f64::total_cmp);
    bytes as f64 / secs[secs.len() / 2] / 1e9
}

fn gbps(x: f64) -> Value {
    json!((x * 1000.0).round() / 1000.0)
}

/// Each stage alone on one core, over `PIECE`-byte pieces of `data`.
fn stages(data: &[u8], reps: usize) -> anyhow::Result<Value> {
    let n = data.len();
    let pieces: Vec<&[u8]> = data.chunks(PIECE).collect();
    let mut codec = Codec::default();
    let mut stages = serde_json::Map::new();

    let key = [7u8; 32];
    stages.insert(
        "blake3".into(),
        gbps(rate(n, reps, || pieces.iter().for_each(|p| _ = std::hint::black_box(ChunkHash::keyed(&key, p))))),
    );
    let chunker = policy().chunking.chunker()?;
    stages.insert("fastcdc".into(), gbps(rate(n, reps, || _ = std::hint::black_box(chunker.chunks(data).count()))));
    for (name, c) in [("lz4", Compression::Lz4), ("zstd3", Compression::Zstd { level: 3 })] {
        let mut stored = 0;
        let compress = rate(n, reps, || {
            stored = 0;
            for p in &pieces {
                stored += codec.compress(c, p).1.len();
            }
        });
        stages.insert(format!("{name}_compress"), gbps(compress));
        stages.insert(format!("{name}_stored_fraction"), json!((stored as f64 / n as f64 * 1000.0).round() / 1000.0));
        // What the decompressor gets: the compressed pieces (raw ones are
        // copied, as the decoder does).
        let compressed: Vec<(Encoding, Vec<u8>)> = pieces
            .iter()
            .map(|p| {
                let (e, z) = codec.compress(c, p);
                (e, z.to_vec())
            })
            .collect();
        let mut back = vec![0; PIECE];
        let mut failed = None;
        let decompress = rate(n, reps, || {
            for ((e, z), p) in compressed.iter().zip(&pieces) {
                if let Err(err) = codec.decompress(*e, z, &mut back[..p.len()]) {
                    failed = Some(err);
                }
            }
        });
        if let Some(err) = failed {
            anyhow::bail!("{name} decompression failed: {err}");
        }
        stages.insert(format!("{name}_decompress"), gbps(decompress));
    }
    let cipher = Aes256Gcm::new(&key.into());
    let nonce = Nonce::from([0; 12]);
    let mut buf = data.to_vec();
    // Encrypting in place over and over: the bytes do not matter.
    let encrypt = rate(n, reps, || {
        for p in buf.chunks_mut(PIECE) {
            _ = std::hint::black_box(cipher.encrypt_in_place_detached(&nonce, b"", p));
        }
    });
    stages.insert("aes256gcm_encrypt".into(), gbps(encrypt));
    buf.copy_from_slice(data);
    let tags = buf
        .chunks_mut(PIECE)
        .map(|p| cipher.encrypt_in_place_detached(&nonce, b"", p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| anyhow::anyhow!("AES-GCM refused to encrypt"))?;
    let sealed = buf.clone();
    let mut ok = true;
    // Each run decrypts the sealed copy; restoring it is not timed.
    let secs = (0..reps)
        .map(|_| {
            buf.copy_from_slice(&sealed);
            let t = Instant::now();
            ok &= buf
                .chunks_mut(PIECE)
                .zip(&tags)
                .all(|(p, t)| cipher.decrypt_in_place_detached(&nonce, b"", p, t).is_ok());
            t.elapsed().as_secs_f64()
        })
        .collect();
    stages.insert("aes256gcm_decrypt".into(), gbps(median_rate(n, secs)));
    anyhow::ensure!(ok && buf == data, "AES-GCM round trip failed");

    Ok(Value::Object(stages))
}

/// The whole pipeline: encode_all and decode_all on 1 and `threads` workers.
fn pipeline(data: &[u8], reps: usize, threads: usize) -> anyhow::Result<Value> {
    let n = data.len();
    let keys = MasterKey::from_bytes([7; 32]).scope(1);
    let p = policy();
    let mut pipeline = serde_json::Map::new();
    let mut chunks = Vec::new();
    let mut failed = None;
    for (name, t) in [("encode_1_thread", 1), ("encode", threads)] {
        let r = rate(n, reps, || match encode_all_threads(&p, &keys, data, t) {
            Ok(c) => chunks = c,
            Err(e) => failed = Some(e),
        });
        pipeline.insert(name.into(), gbps(r));
    }
    if let Some(e) = failed {
        anyhow::bail!("encode_all failed: {e}");
    }
    let frames: Vec<_> = chunks.iter().map(|c| (c.hash, &c.frame[..])).collect();
    let stored: usize = chunks.iter().map(|c| c.frame.len()).sum();
    let mut back = Vec::new();
    for (name, t) in [("decode_1_thread", 1), ("decode", threads)] {
        let r = rate(n, reps, || match decode_all_threads(&keys, &frames, t) {
            Ok(b) => back = b,
            Err(e) => failed = Some(e),
        });
        pipeline.insert(name.into(), gbps(r));
    }
    if let Some(e) = failed {
        anyhow::bail!("decode_all failed: {e}");
    }
    anyhow::ensure!(back == data, "the pipeline did not give the data back");
    pipeline.insert("chunks".into(), json!(chunks.len()));
    pipeline.insert("stored_fraction".into(), json!((stored as f64 / n as f64 * 1000.0).round() / 1000.0));
    Ok(Value::Object(pipeline))
}

/// Chunking candidates: dedupe of data after small edits, FastCDC alone
/// and the whole pipeline.
fn sweep(len: usize, reps: usize, threads: usize) -> anyhow::Result<Value> {
    // Half text, half random; then one edit per MiB on average: insert or
    // delete 1 to 64 bytes at a random place.
    let mut base = text(len / 2, 3);
    base.extend(random(len - len / 2, 4));
    let mut edited = base.clone();
    let mut rng = fastrand::Rng::with_seed(5);
    for _ in 0..len >> 20 {
        let at = rng.usize(..edited.len() - 64);
        let k = rng.usize(1..=64);
        if rng.bool() {
            edited.splice(at..at, random(k, rng.u64(..)));
        } else {
            edited.drain(at..at + k);
        }
    }
    let keys = MasterKey::from_bytes([9; 32]).scope(1);
    let kib = |k: u32| k << 10;
    let candidates = [
        Chunking::Fixed { size: kib(64) },
        Chunking::FastCdc { min: kib(2), avg: kib(8), max: kib(32) },
        Chunking::FastCdc { min: kib(4), avg: kib(16), max: kib(64) },
        Chunking::FastCdc { min: kib(8), avg: kib(32), max: kib(128) },
        Chunking::FastCdc { min: kib(16), avg: kib(64), max: kib(256) },
        Chunking::FastCdc { min: kib(32), avg: kib(128), max: kib(512) },
        Chunking::FastCdc { min: kib(64), avg: kib(256), max: kib(1024) },
    ];
    let mut rows = Vec::new();
    for chunking in candidates {
        let chunker = chunking.chunker()?;
        let hashes =
            |d: &[u8]| chunker.chunks(d).map(|r| (ChunkHash::plain(&d[r.clone()]), r.len())).collect::<Vec<_>>();
        let before: HashSet<_> = hashes(&base).into_iter().map(|(h, _)| h).collect();
        let after = hashes(&edited);
        let shared: usize = after.iter().filter(|(h, _)| before.contains(h)).map(|(_, l)| l).sum();
        let cdc = rate(base.len(), reps, || _ = std::hint::black_box(chunker.chunks(&base).count()));
        let p = ReducePolicy { chunking, ..policy() };
        let mut failed = None;
        let encode = rate(base.len(), reps, || {
            if let Err(e) = encode_all_threads(&p, &keys, &base, threads) {
                failed = Some(e);
            }
        });
        if let Some(e) = failed {
            anyhow::bail!("encode_all failed: {e}");
        }
        rows.push(json!({
            "chunking": p.to_string().split(',').next(),
            "mean_chunk_kib": (edited.len() as f64 / after.len() as f64 / 1024.0 * 10.0).round() / 10.0,
            "dedupe_after_edits": (shared as f64 / edited.len() as f64 * 1000.0).round() / 1000.0,
            "chunker_gbps": gbps(cdc),
            "encode_gbps": gbps(encode),
        }));
    }
    Ok(json!({ "mib": len >> 20, "edits": len >> 20, "rows": rows }))
}
