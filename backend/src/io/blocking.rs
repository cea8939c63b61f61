//! Operations run with plain syscalls: the blocking engine, and what the ring leaves to
//! finish (short transfers, O_DIRECT refusals, modes a file system does not support).

use std::io;
use std::os::unix::io::RawFd;

use tracing::debug;

use super::op::{advance, Op, OpKind, Unsupported, FALLOC_FL_NO_HIDE_STALE, IOV_MAX};

/// What a reaped ring entry means for its op.
#[derive(Debug)]
pub enum Reaped {
    /// The op is complete.
    Done(io::Result<()>),
    /// The op needs a second step in the ring (the sync after a fallocate): start it again.
    Again,
}

/// The outcome `res` of the ring entry of `op`: short or refused transfers are finished with
/// blocking syscalls; a successful fallocate that must be durable becomes a sync (the caller
/// starts it again).
pub fn finish(op: &mut Op, res: i32) -> Reaped {
    if res < 0 {
        let err = -res;
        return Reaped::Done(match op.kind {
            _ if op.is_rw() && err == libc::EINVAL && op.fallback_fd != op.fd => {
                rw_blocking(op, op.fallback_fd, 0)
            }
            // EBADF: a polling ring refused the file (it only takes registered ones on some
            // kernels); the fd itself is open.
            _ if matches!(err, libc::EINTR | libc::EAGAIN | libc::EBADF) => run_blocking(op, 0),
            OpKind::Fallocate { .. } => fallocate_refused(op, io::Error::from_raw_os_error(err)),
            _ => Err(io::Error::from_raw_os_error(err)),
        });
    }
    match op.kind {
        OpKind::Read | OpKind::Write { .. } if (res as u64) < op.len => {
            // Short transfer: finish the rest synchronously.
            Reaped::Done(run_blocking(op, res as u64))
        }
        OpKind::Fallocate { sync: true, .. } => {
            *op = Op::sync(op.fd);
            Reaped::Again
        }
        _ => Reaped::Done(Ok(())),
    }
}

/// Complete `op` with blocking syscalls, `done` bytes of a read or write being already
/// transferred.
pub fn run_blocking(op: &Op, done: u64) -> io::Result<()> {
    match op.kind {
        OpKind::Read | OpKind::Write { .. } => match rw_blocking(op, op.fd, done) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && op.fallback_fd != op.fd => {
                debug!("O_DIRECT refused a request ({e}); retrying buffered");
                rw_blocking(op, op.fallback_fd, done)
            }
            r => r,
        },
        OpKind::Sync => fdatasync(op.fd),
        OpKind::Fallocate { mode, sync, .. } => {
            match fallocate(op.fd, mode, op.offset, op.len) {
                Ok(()) => {}
                Err(e) => fallocate_refused(op, e)?,
            }
            if sync {
                fdatasync(op.fd)?;
            }
            Ok(())
        }
    }
}

/// A fallocate failed with `e`: a mode the file system or device does not support becomes
/// what the op asks for; anything else stays an error.
fn fallocate_refused(op: &Op, e: io::Error) -> io::Result<()> {
    let OpKind::Fallocate {
        mode,
        sync,
        unsupported,
    } = op.kind
    else {
        return Err(e);
    };
    let refused = matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::ENODEV)
    );
    if !refused {
        return Err(e);
    }
    match unsupported {
        Unsupported::Ignore => {
            // A block device before fallocate support (Linux 4.9) still takes BLKDISCARD.
            if mode & FALLOC_FL_NO_HIDE_STALE != 0 {
                let range = [op.offset, op.len];
                // SAFETY: BLKDISCARD reads two u64 through the pointer, which points to a live
                // local; the fd is open. Failure is ignored: a discard is a hint.
                let _ = unsafe { blk_discard(op.fd, &range) };
            }
            Ok(())
        }
        Unsupported::WriteZeroes => {
            write_zero_buffers(op.fallback_fd, op.offset, op.len)?;
            if sync {
                fdatasync(op.fallback_fd)?;
            }
            Ok(())
        }
    }
}

nix::ioctl_write_ptr_bad!(blk_discard, nix::request_code_none!(0x12, 119), [u64; 2]);

/// fdatasync, retried on EINTR.
pub fn fdatasync(fd: RawFd) -> io::Result<()> {
    loop {
        // SAFETY: fdatasync on an fd the caller keeps open.
        if unsafe { libc::fdatasync(fd) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let l = libc::off64_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate on an fd the caller keeps open, with plain integer arguments.
        if unsafe { libc::fallocate64(fd, mode, off, l) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Write zero-filled buffers over `len` bytes at `offset` (file systems without
/// FALLOC_FL_ZERO_RANGE).
fn write_zero_buffers(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    // SAFETY: the fd is open for this call; ManuallyDrop keeps the File from closing it.
    let f = std::mem::ManuallyDrop::new(unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        f.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn rw_blocking(op: &Op, fd: RawFd, mut done: u64) -> io::Result<()> {
    let (write, dsync) = match op.kind {
        OpKind::Write { dsync } => (true, dsync),
        _ => (false, false),
    };
    while done < op.len {
        let iov = advance(&op.iov, done);
        let cnt = iov.len().min(IOV_MAX) as libc::c_int;
        let off = libc::off64_t::try_from(op.offset + done)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let call = if write { libc::pwritev2 } else { libc::preadv2 };
        // SAFETY: every iovec points into guest memory that the caller keeps mapped until the
        // op completes, with the length of the guest buffer it came from; the fd is open.
        let n = unsafe { call(fd, iov.as_ptr(), cnt, off, flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image ended before the request did (was it truncated?)",
            ));
        }
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::io::AsRawFd;

    use super::*;

    #[test]
    fn zero_range_refused_falls_back_to_zero_buffers() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        let op = Op {
            kind: OpKind::Fallocate {
                mode: libc::FALLOC_FL_ZERO_RANGE,
                sync: false,
                unsupported: Unsupported::WriteZeroes,
            },
            offset: 512,
            len: 1024,
            ..Op::sync(f.as_raw_fd())
        };
        fallocate_refused(&op, io::Error::from_raw_os_error(libc::EOPNOTSUPP)).unwrap();
        let mut all = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut all, 0).unwrap();
        assert!(all[512..1536].iter().all(|&x| x == 0));
        assert!(all[..512].iter().chain(&all[1536..]).all(|&x| x == 7));
        // Other errors stay errors; a refused discard is a success.
        assert!(fallocate_refused(&op, io::Error::from_raw_os_error(libc::EIO)).is_err());
        let discard = Op {
            kind: OpKind::Fallocate {
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                sync: false,
                unsupported: Unsupported::Ignore,
            },
            ..op
        };
        assert!(fallocate_refused(&discard, io::Error::from_raw_os_error(libc::ENOTTY)).is_ok());
    }
}
