//! Every system call of the bdev layer outside io_uring itself, in one place
//! (STYLE.md item 3): opening backing files and block devices, their sizes
//! and alignment.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::error::BdevError;

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// A file or block device opened for a bdev.
#[derive(Debug)]
pub(crate) struct Backing {
    pub(crate) file: File,
    pub(crate) size: u64,
    /// Smallest block size the file accepts (the logical sector size of a
    /// block device, the O_DIRECT offset alignment of a file), 0 if unknown.
    pub(crate) min_block: u32,
    /// Whether the file was created by this call.
    pub(crate) created: bool,
}

fn file_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BdevError + 'a {
    move |source| BdevError::File { action, path: path.to_path_buf(), source }
}

/// Opens `path` read-write (with O_DIRECT when `direct`). A missing regular
/// file is created as a sparse file of `create_size` bytes if that is given.
pub(crate) fn open_backing(path: &Path, direct: bool, create_size: Option<u64>) -> Result<Backing, BdevError> {
    let mut created = false;
    if !path.exists() {
        let size = create_size.ok_or_else(|| BdevError::FileMissing(path.to_path_buf()))?;
        let f = OpenOptions::new().write(true).create_new(true).open(path).map_err(file_err("creating", path))?;
        f.set_len(size).map_err(file_err("sizing", path))?;
        created = true;
    }
    let result = open_existing(path, direct, create_size, created);
    if result.is_err() && created {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn open_existing(path: &Path, direct: bool, create_size: Option<u64>, created: bool) -> Result<Backing, BdevError> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let file = match opts.open(path) {
        Ok(f) => f,
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
            return Err(BdevError::NoDirectIo(path.to_path_buf()));
        }
        Err(e) => return Err(file_err("opening", path)(e)),
    };
    let meta = file.metadata().map_err(file_err("inspecting", path))?;
    let is_block_device = meta.file_type().is_block_device();
    let (size, min_block) = if is_block_device {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 to the pointer we pass, which is live.
        if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) } < 0 {
            return Err(file_err("reading the size of", path)(io::Error::last_os_error()));
        }
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int to the pointer we pass, which is live.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut ssz) } < 0 {
            return Err(file_err("reading the sector size of", path)(io::Error::last_os_error()));
        }
        (size, ssz.max(0) as u32)
    } else if meta.file_type().is_file() {
        (meta.len(), if direct { dio_offset_align(&file) } else { 0 })
    } else {
        return Err(file_err("using", path)(io::Error::other("not a regular file or block device")));
    };
    if let (Some(want), false) = (create_size, created) {
        if want != size {
            return Err(BdevError::File {
                action: "using",
                path: path.to_path_buf(),
                source: io::Error::other(format!(
                    "it exists with {size} bytes, not the {want} bytes asked for; leave out `size` to use it as it is"
                )),
            });
        }
    }
    Ok(Backing { file, size, min_block, created })
}

/// The O_DIRECT file-offset alignment the file system reports (statx
/// STATX_DIOALIGN, Linux 6.1+), or 0 when it does not say.
fn dio_offset_align(file: &File) -> u32 {
    // SAFETY: statx is plain old data; all-zero is valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open, the empty path with AT_EMPTY_PATH refers to it, and `stx` is writable.
    let rc =
        unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 { stx.stx_dio_offset_align } else { 0 }
}
