//! Image locking compatible with QEMU.
//!
//! QEMU's `block/file-posix.c` expresses block-layer permissions as open-file-description
//! (OFD) byte-range locks: for each permission bit `i` it holds a shared lock on byte
//! `100 + i` while it *has* that permission, and on byte `200 + i` while it does *not share*
//! it. Before using an image it tests, with an exclusive F_OFD_GETLK, byte `200 + i` for every
//! permission it wants and byte `100 + i` for every permission it refuses to share. vloop-blk
//! takes the same bytes, so QEMU, `qemu-img`, `qemu-io` and other vloop-blk processes see an
//! image we serve as in use, and we see theirs.
//!
//! A read-write export holds CONSISTENT_READ and WRITE and shares neither WRITE nor RESIZE
//! (what a QEMU guest disk holds): nobody else may write, readers that share writing (such as
//! `qemu-img info -U`) still may look. A read-only export holds CONSISTENT_READ and refuses
//! WRITE and RESIZE, so any number of read-only exports can share an image but no writer can
//! open it.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// First byte of the "permission held" range.
pub const PERM_BASE: i64 = 100;
/// First byte of the "permission not shared" range.
pub const SHARED_BASE: i64 = 200;

/// QEMU block permission bits (`BLK_PERM_*`), by bit number.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const PERM_CONSISTENT_READ: u32 = 1 << 0;
const PERM_WRITE: u32 = 1 << 1;
const PERM_RESIZE: u32 = 1 << 3;

/// Errors while locking an image.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds a conflicting lock.
    #[error("the image is in use by another process (failed to get {what} lock, byte {byte}): stop the QEMU, qemu-img or vloop-blk process using it first")]
    Conflict {
        /// The permission in QEMU's words.
        what: String,
        /// The lock byte that conflicts.
        byte: i64,
    },
    /// fcntl failed.
    #[error("locking byte {byte} of the image failed")]
    Fcntl {
        /// The lock byte.
        byte: i64,
        /// The system error.
        #[source]
        source: io::Error,
    },
}

/// How the image is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Read and write; no other writer.
    ReadWrite,
    /// Read only; no writer, other readers welcome.
    ReadOnly,
}

impl LockMode {
    /// Permissions held, and permissions not shared.
    fn bits(self) -> (u32, u32) {
        match self {
            LockMode::ReadWrite => (PERM_CONSISTENT_READ | PERM_WRITE, PERM_WRITE | PERM_RESIZE),
            LockMode::ReadOnly => (PERM_CONSISTENT_READ, PERM_WRITE | PERM_RESIZE),
        }
    }
}

fn flock(kind: libc::c_int, start: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

/// Take a shared OFD lock on one byte.
fn lock_byte(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock(libc::F_RDLCK, byte);
    // SAFETY: the fd is open for the lifetime of `file`, and `fl` is a valid flock that
    // fcntl only reads.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// True when someone else holds a lock on the byte (what an exclusive lock would conflict
/// with). Our own OFD locks on this open file description never conflict with the test.
fn byte_taken(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: the fd is open for the lifetime of `file`, and `fl` is a valid flock that
    // fcntl reads and overwrites in place.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(libc::ENOLCK) | Some(libc::ENOSYS)
    )
}

/// Lock `file` as QEMU would for `mode`. The locks live as long as the open file description
/// (closing the file releases them).
///
/// Returns `Ok(false)` when the file system does not support OFD locks (EINVAL, ENOTSUP,
/// ENOLCK, ENOSYS): the caller decides whether to serve the image unlocked.
pub fn lock_image(file: &File, mode: LockMode) -> Result<bool, LockError> {
    let r = try_lock(file, mode);
    if matches!(r, Err(_) | Ok(false)) {
        // Leave no stray bytes behind (the file may stay open); like QEMU, undo on failure.
        unlock_all(file);
    }
    r
}

/// Release every lock byte this open file description holds.
fn unlock_all(file: &File) {
    let mut fl = flock(libc::F_UNLCK, PERM_BASE);
    fl.l_len = SHARED_BASE - PERM_BASE + PERM_NAMES.len() as i64;
    // SAFETY: the fd is open for the lifetime of `file`, and `fl` is a valid flock that
    // fcntl only reads.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
}

fn try_lock(file: &File, mode: LockMode) -> Result<bool, LockError> {
    let (perm, unshared) = mode.bits();
    for (i, _) in PERM_NAMES.iter().enumerate() {
        let bit = 1u32 << i;
        for (set, base) in [(perm, PERM_BASE), (unshared, SHARED_BASE)] {
            if set & bit != 0 {
                let byte = base + i as i64;
                if let Err(source) = lock_byte(file, byte) {
                    if unsupported(&source) {
                        return Ok(false);
                    }
                    if source.raw_os_error() == Some(libc::EAGAIN)
                        || source.raw_os_error() == Some(libc::EACCES)
                    {
                        return Err(LockError::Conflict {
                            what: format!("{:?}", PERM_NAMES[i]),
                            byte,
                        });
                    }
                    return Err(LockError::Fcntl { byte, source });
                }
            }
        }
    }
    // What we want must be shared by everyone else, and nobody else may hold what we refuse
    // to share.
    for (mask, base, prefix) in [(perm, SHARED_BASE, ""), (unshared, PERM_BASE, "shared ")] {
        for (i, name) in PERM_NAMES.iter().enumerate() {
            if mask & (1u32 << i) == 0 {
                continue;
            }
            let byte = base + i as i64;
            if byte_taken(file, byte).map_err(|source| LockError::Fcntl { byte, source })? {
                return Err(LockError::Conflict {
                    what: format!("{prefix}{name:?}"),
                    byte,
                });
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::process::Command;

    use super::*;

    fn open(path: &std::path::Path, rw: bool) -> File {
        OpenOptions::new().read(true).write(rw).open(path).unwrap()
    }

    #[test]
    fn two_writers_conflict() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let a = open(f.path(), true);
        assert!(lock_image(&a, LockMode::ReadWrite).unwrap());
        let b = open(f.path(), true);
        let e = lock_image(&b, LockMode::ReadWrite).unwrap_err();
        assert!(matches!(e, LockError::Conflict { .. }), "{e}");
        let c = open(f.path(), false);
        assert!(lock_image(&c, LockMode::ReadOnly).is_err());
        drop(a);
        // Released with the first open file description.
        let d = open(f.path(), true);
        assert!(lock_image(&d, LockMode::ReadWrite).is_ok());
    }

    #[test]
    fn readers_share_but_block_writers() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let a = open(f.path(), false);
        lock_image(&a, LockMode::ReadOnly).unwrap();
        let b = open(f.path(), false);
        lock_image(&b, LockMode::ReadOnly).unwrap();
        let c = open(f.path(), true);
        let e = lock_image(&c, LockMode::ReadWrite).unwrap_err();
        assert!(e.to_string().contains("\"write\""), "{e}");
    }

    fn have(tool: &str) -> bool {
        Command::new(tool).arg("--version").output().is_ok()
    }

    #[test]
    fn qemu_sees_our_lock_and_we_see_qemus() {
        if !have("qemu-io") {
            vloop_frontend::skip::skip("qemu-io is not installed (apt-get install qemu-utils)");
            return;
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let a = open(f.path(), true);
        lock_image(&a, LockMode::ReadWrite).unwrap();
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 512"])
            .arg(f.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Failed to get") && text.contains("lock"),
            "qemu-io did not see the lock: {text}"
        );
        drop(a);

        // QEMU holding the image (qemu-io waits on stdin) blocks us.
        let child = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(f.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _guard = Kill(child);
        // Wait until qemu-io holds its "write" permission byte, then try to take the image.
        let probe = open(f.path(), false);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !byte_taken(&probe, PERM_BASE + 1).unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-io never locked the image"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let b = open(f.path(), true);
        let e = lock_image(&b, LockMode::ReadWrite).unwrap_err();
        assert!(matches!(e, LockError::Conflict { .. }), "{e}");
        let c = open(f.path(), false);
        assert!(lock_image(&c, LockMode::ReadOnly).is_err());
    }
}
