//! The whole pipeline over a buffer, in parallel: chunk, then hash,
//! compress and encrypt the chunks on every core; and the reverse.
//!
//! Encoding runs `threads` scoped workers while the calling thread cuts
//! chunks and queues them (chunking is serial by nature; this way it
//! overlaps the workers' hashing, compressing and encrypting instead of
//! preceding it). Each worker pops the next chunk and encodes it with a
//! codec of its own; results are put back in order. (A first version had
//! each worker cut its own next chunk under a lock: on random data, where
//! encoding a chunk takes only about twice as long as cutting it, the
//! workers spent much of their time asleep on that lock, and two workers
//! were no faster than one.) Decoding splits the output
//! buffer by the frames' raw lengths and decodes frames in parallel
//! straight into it.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};

use super::compress::Codec;
use super::error::ReduceError;
use super::frame::{FrameHeader, decode_into, encode_with};
use super::hash::ChunkHash;
use super::keys::ScopeKeys;
use super::policy::ReducePolicy;

/// One encoded chunk of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChunk {
    /// Where the chunk lies in the input.
    pub range: Range<usize>,
    /// Its content hash.
    pub hash: ChunkHash,
    /// Its frame.
    pub frame: Vec<u8>,
}

/// The number of workers [`encode_all`] and [`decode_all`] use: the cores
/// this process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Chunks `data` and encodes every chunk with `policy`, on every core.
pub fn encode_all(policy: &ReducePolicy, keys: &ScopeKeys, data: &[u8]) -> Result<Vec<EncodedChunk>, ReduceError> {
    encode_all_threads(policy, keys, data, default_threads())
}

/// [`encode_all`] on `threads` workers (1: on the calling thread only).
pub fn encode_all_threads(
    policy: &ReducePolicy,
    keys: &ScopeKeys,
    data: &[u8],
    threads: usize,
) -> Result<Vec<EncodedChunk>, ReduceError> {
    let chunker = policy.chunking.chunker()?;
    policy.compression.validate()?;
    if policy.encrypt && !keys.has_key() {
        return Err(ReduceError::NoKey { scope: keys.scope() });
    }
    let encode = |codec: &mut Codec, range: Range<usize>| {
        encode_with(codec, policy, keys, &data[range.clone()]).map(|(hash, frame)| EncodedChunk { range, hash, frame })
    };
    let threads = threads.clamp(1, data.len().div_ceil(policy.chunking.max_chunk()).max(1));
    if threads == 1 {
        let mut codec = Codec::default();
        return chunker.chunks(data).map(|range| encode(&mut codec, range)).collect();
    }
    // The calling thread cuts and queues (index, range); the workers take
    // them in turn. The queue lock is held only to pop.
    let (tx, rx) = mpsc::channel::<(usize, Range<usize>)>();
    let rx = Mutex::new(rx);
    let work = || -> Result<Vec<(usize, EncodedChunk)>, ReduceError> {
        let mut codec = Codec::default();
        let mut done = Vec::new();
        loop {
            // The guard must go before encoding (a `while let` would keep
            // it for the loop body). A worker that panicked holding the
            // lock left the queue intact.
            let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
            let Ok((i, range)) = next else { return Ok(done) };
            done.push((i, encode(&mut codec, range)?));
        }
    };
    let cut = || {
        for item in chunker.chunks(data).enumerate() {
            if tx.send(item).is_err() {
                break;
            }
        }
        drop(tx);
    };
    let mut parts = run_workers(threads, work, cut)?;
    let mut all: Vec<_> = parts.iter_mut().flat_map(std::mem::take).collect();
    all.sort_unstable_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, c)| c).collect())
}

/// Decodes `chunks` (each its expected hash and frame) in parallel and
/// returns their plaintexts concatenated.
pub fn decode_all(keys: &ScopeKeys, chunks: &[(ChunkHash, &[u8])]) -> Result<Vec<u8>, ReduceError> {
    decode_all_threads(keys, chunks, default_threads())
}

/// [`decode_all`] on `threads` workers (1: on the calling thread only).
pub fn decode_all_threads(
    keys: &ScopeKeys,
    chunks: &[(ChunkHash, &[u8])],
    threads: usize,
) -> Result<Vec<u8>, ReduceError> {
    let headers = chunks
        .iter()
        .map(|(hash, frame)| FrameHeader::parse(frame).map_err(|problem| ReduceError::Chunk { chunk: *hash, problem }))
        .collect::<Result<Vec<_>, _>>()?;
    let total = headers.iter().map(|h| h.raw_len as usize).sum();
    let mut out = vec![0; total];
    // Each frame's slice of the output, handed out by index.
    let mut rest = &mut out[..];
    let slots: Vec<Mutex<&mut [u8]>> = headers
        .iter()
        .map(|h| {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(h.raw_len as usize);
            rest = tail;
            Mutex::new(mine)
        })
        .collect();
    let next = AtomicUsize::new(0);
    let work = || -> Result<(), ReduceError> {
        let (mut codec, mut scratch) = (Codec::default(), Vec::new());
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let (Some((hash, frame)), Some(header), Some(slot)) = (chunks.get(i), headers.get(i), slots.get(i)) else {
                return Ok(());
            };
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            decode_into(&mut codec, &mut scratch, keys, hash, header, frame, &mut slot)?;
        }
    };
    run_workers(threads.clamp(1, chunks.len().max(1)), work, || {})?;
    drop(slots);
    Ok(out)
}

/// Runs `work` on `threads` scoped threads while `feed` runs on the calling
/// thread (with a single thread: `feed`, then `work`, both here), and
/// collects their results; the first error wins, a panic is passed on.
fn run_workers<T: Send>(
    threads: usize,
    work: impl Fn() -> Result<T, ReduceError> + Sync,
    feed: impl FnOnce(),
) -> Result<Vec<T>, ReduceError> {
    if threads <= 1 {
        feed();
        return Ok(vec![work()?]);
    }
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads).map(|_| s.spawn(&work)).collect();
        feed();
        workers.into_iter().map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}
