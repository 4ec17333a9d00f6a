//! The 4 KiB metadata page: a 40-byte header with a CRC32C and a sequence
//! number, then payload. Every metadata page on disk — super blocks, journal
//! pages, checkpoint pages — has this shape (docs/blobfs.md draws it).
//!
//! ```text
//! offset size field
//!  0      4   magic    b"CFSm"
//!  4      4   crc32c   seeded with the store's 16-byte UUID (super blocks: unseeded),
//!                      then over bytes 0..4 and 8..4096 (the crc field left out)
//!  8      8   seq      super: commit number; journal: record number; checkpoint: generation
//! 16      8   aux      journal: first record number of the write that carried the page;
//!                      checkpoint and super: 0
//! 24      4   index    page number within its record or checkpoint
//! 28      4   count    pages in the record or checkpoint
//! 32      4   len      payload bytes used in this page (<= 4056)
//! 36      2   kind     1 super, 2 journal record, 3 journal wrap marker, 4 checkpoint
//! 38      2   version  format version (1)
//! 40   4056   payload
//! ```

/// Bytes in a metadata page (and the unit of blob I/O).
pub const PAGE_SIZE: usize = 4096;
/// Bytes of the page header.
pub const HEADER_LEN: usize = 40;
/// Payload bytes a page can carry.
pub const PAYLOAD_LEN: usize = PAGE_SIZE - HEADER_LEN;
/// Magic at the start of every metadata page.
pub const MAGIC: [u8; 4] = *b"CFSm";
/// The on-disk format version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// What a page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum PageKind {
    /// A super block.
    Super = 1,
    /// A page of a journal record.
    Journal = 2,
    /// The journal continues at the start of its ring.
    JournalWrap = 3,
    /// A page of a checkpoint.
    Checkpoint = 4,
}

impl PageKind {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Super,
            2 => Self::Journal,
            3 => Self::JournalWrap,
            4 => Self::Checkpoint,
            _ => return None,
        })
    }
}

/// The decoded header of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageHeader {
    /// What the page holds.
    pub kind: PageKind,
    /// Sequence number (see the module docs).
    pub seq: u64,
    /// Kind-specific (see the module docs).
    pub aux: u64,
    /// Page number within its record or checkpoint.
    pub index: u32,
    /// Pages in its record or checkpoint.
    pub count: u32,
}

/// Why a page is not a valid metadata page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    /// All zeros or another magic: never written, or not ours.
    #[error("no metadata page here (magic {0:02x?})")]
    NotAPage([u8; 4]),
    /// The bytes changed since they were written (or the write was torn).
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// A version this code does not know.
    #[error("format version {0}, but this ClaudeFS reads version {FORMAT_VERSION} only")]
    Version(u16),
    /// Checksum fine, header impossible.
    #[error("impossible header: {0}")]
    Header(&'static str),
}

/// What a page's checksum is seeded with: the store's UUID, so that pages a
/// previous store left on the device never check as this store's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seed(u32);

impl Seed {
    /// The seed of super blocks (read before the UUID is known).
    pub const NONE: Seed = Seed(0);

    /// The seed of a store's other pages.
    pub fn of(uuid: &[u8; 16]) -> Seed {
        Seed(crc32c::crc32c(uuid))
    }
}

fn crc(page: &[u8], seed: Seed) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c_append(seed.0, &page[0..4]), &page[8..PAGE_SIZE])
}

/// Writes a page: header, `payload` (at most [`PAYLOAD_LEN`] bytes), zero fill, checksum.
pub fn encode_page(page: &mut [u8], header: &PageHeader, payload: &[u8], seed: Seed) {
    assert_eq!(page.len(), PAGE_SIZE, "a metadata page is {PAGE_SIZE} bytes");
    assert!(payload.len() <= PAYLOAD_LEN, "payload of {} bytes does not fit a page", payload.len());
    page[0..4].copy_from_slice(&MAGIC);
    page[8..16].copy_from_slice(&header.seq.to_le_bytes());
    page[16..24].copy_from_slice(&header.aux.to_le_bytes());
    page[24..28].copy_from_slice(&header.index.to_le_bytes());
    page[28..32].copy_from_slice(&header.count.to_le_bytes());
    page[32..36].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    page[36..38].copy_from_slice(&(header.kind as u16).to_le_bytes());
    page[38..40].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    page[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    page[HEADER_LEN + payload.len()..].fill(0);
    let c = crc(page, seed);
    page[4..8].copy_from_slice(&c.to_le_bytes());
}

/// Checks and decodes a page; returns its header and the used payload.
pub fn decode_page(page: &[u8], seed: Seed) -> Result<(PageHeader, &[u8]), PageError> {
    if page.len() != PAGE_SIZE {
        return Err(PageError::Header("page is not 4096 bytes"));
    }
    let magic: [u8; 4] = page[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(PageError::NotAPage(magic));
    }
    let le32 = |at: usize| u32::from_le_bytes(page[at..at + 4].try_into().expect("4 bytes"));
    let le64 = |at: usize| u64::from_le_bytes(page[at..at + 8].try_into().expect("8 bytes"));
    let le16 = |at: usize| u16::from_le_bytes(page[at..at + 2].try_into().expect("2 bytes"));
    let stored = le32(4);
    let computed = crc(page, seed);
    if stored != computed {
        return Err(PageError::Checksum { stored, computed });
    }
    let version = le16(38);
    if version != FORMAT_VERSION {
        return Err(PageError::Version(version));
    }
    let kind = PageKind::from_u16(le16(36)).ok_or(PageError::Header("unknown page kind"))?;
    let len = le32(32) as usize;
    if len > PAYLOAD_LEN {
        return Err(PageError::Header("payload length beyond the page"));
    }
    let (index, count) = (le32(24), le32(28));
    if count == 0 || index >= count {
        return Err(PageError::Header("page index not below the page count"));
    }
    let header = PageHeader { kind, seq: le64(8), aux: le64(16), index, count };
    Ok((header, &page[HEADER_LEN..HEADER_LEN + len]))
}

/// Splits `payload` into pages of `kind` numbered from `seq`: every page gets
/// the same `seq` and `aux`, its index and the page count. Returns the pages
/// as one buffer of `n * PAGE_SIZE` bytes.
pub fn encode_pages(kind: PageKind, seq: u64, aux: u64, payload: &[u8], seed: Seed) -> Vec<u8> {
    let count = payload.len().div_ceil(PAYLOAD_LEN).max(1);
    let mut out = vec![0u8; count * PAGE_SIZE];
    for (i, page) in out.chunks_exact_mut(PAGE_SIZE).enumerate() {
        let chunk = payload.chunks(PAYLOAD_LEN).nth(i).unwrap_or(&[]);
        encode_page(page, &PageHeader { kind, seq, aux, index: i as u32, count: count as u32 }, chunk, seed);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PageHeader {
        PageHeader { kind: PageKind::Journal, seq: 9, aux: 7, index: 1, count: 3 }
    }

    #[test]
    fn round_trips_and_detects_every_flipped_byte() {
        let mut page = vec![0u8; PAGE_SIZE];
        let seed = Seed::of(&[7; 16]);
        encode_page(&mut page, &header(), b"hello", seed);
        let (h, payload) = decode_page(&page, seed).unwrap();
        assert_eq!((h, payload), (header(), &b"hello"[..]));
        for i in (0..PAGE_SIZE).step_by(97).chain([4, 5, 6, 7, 36, 38, 4095]) {
            let mut bad = page.clone();
            bad[i] ^= 0x40;
            assert!(decode_page(&bad, seed).is_err(), "a flip at byte {i} went unnoticed");
        }
        let other_store = Seed::of(&[8; 16]);
        assert!(matches!(decode_page(&page, other_store), Err(PageError::Checksum { .. })), "another store's page");
    }

    #[test]
    fn names_what_is_wrong() {
        let s = Seed::NONE;
        assert!(matches!(decode_page(&[0u8; PAGE_SIZE], s), Err(PageError::NotAPage([0, 0, 0, 0]))));
        let mut page = vec![0u8; PAGE_SIZE];
        encode_page(&mut page, &header(), b"x", s);
        page[38] = 9;
        let c = crc(&page, s);
        page[4..8].copy_from_slice(&c.to_le_bytes());
        assert_eq!(decode_page(&page, s), Err(PageError::Version(9)));
        assert!(decode_page(&page, s).unwrap_err().to_string().contains("reads version 1 only"));
        encode_page(&mut page, &PageHeader { index: 3, ..header() }, b"x", s);
        assert_eq!(decode_page(&page, s), Err(PageError::Header("page index not below the page count")));
    }

    #[test]
    fn long_payloads_span_pages() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let pages = encode_pages(PageKind::Checkpoint, 4, 0, &payload, Seed::NONE);
        assert_eq!(pages.len(), 3 * PAGE_SIZE);
        let mut back = Vec::new();
        for (i, p) in pages.chunks(PAGE_SIZE).enumerate() {
            let (h, body) = decode_page(p, Seed::NONE).unwrap();
            assert_eq!((h.index, h.count, h.seq), (i as u32, 3, 4));
            back.extend_from_slice(body);
        }
        assert_eq!(back, payload);
        assert_eq!(
            encode_pages(PageKind::Journal, 1, 0, &[], Seed::NONE).len(),
            PAGE_SIZE,
            "an empty payload still takes a page"
        );
    }
}
