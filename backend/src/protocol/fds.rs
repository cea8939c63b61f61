//! Checks on the file descriptors a frontend sends. Whoever connects to the socket chooses
//! them, and the daemon maps, reads, writes and polls them, so each must be what its message
//! says it is before the daemon uses it:
//!
//! - kick, call and error fds must be eventfds, and are made non-blocking (a blocking eventfd
//!   at its maximum count would block the thread that signals it forever); an eventfd in
//!   semaphore mode is refused (each read takes one from its counter, so a kick eventfd with a
//!   large count would wake its worker without end; kernels that do not say whether an
//!   eventfd is a semaphore in `/proc/self/fdinfo` let it through);
//! - guest memory fds must be regular files (memfds, or files on tmpfs or hugetlbfs) that
//!   cover the region they back. A memfd that allows sealing is sealed against shrinking (QEMU's
//!   `memory-backend-memfd` seals it so by default), so it can never be cut under the mapping;
//!   a file that cannot be sealed (`memory-backend-file`, `memfd,seal=off`) is accepted, and a
//!   later truncation is caught by [`crate::fault`]: the access reads zeroes and the connection
//!   is dropped;
//! - the backend request channel must be a unix stream socket.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// Why a descriptor is refused.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// Not an eventfd.
    #[error("the {0} descriptor is not an eventfd")]
    NotEventFd(&'static str),
    /// An eventfd in semaphore mode.
    #[error("the {0} eventfd is in semaphore mode")]
    Semaphore(&'static str),
    /// Not a regular file.
    #[error("a guest memory descriptor is not a regular file (memfd, tmpfs or hugetlbfs)")]
    NotMemory,
    /// Shorter than the region it backs.
    #[error("a guest memory file of {len} bytes cannot back {need} bytes at offset {offset}")]
    TooShort {
        /// File size.
        len: u64,
        /// Offset of the region in the file.
        offset: u64,
        /// Region size.
        need: u64,
    },
    /// Sealing a memfd that allows it failed.
    #[error("cannot seal a guest memory memfd against shrinking")]
    Unsealed(#[source] io::Error),
    /// Not a unix stream socket.
    #[error("the backend request descriptor is not a unix stream socket")]
    NotUnixStream,
    /// A system call on it failed.
    #[error("cannot inspect a descriptor")]
    Io(#[from] io::Error),
}

/// Check that `fd` is an eventfd and make it non-blocking; `what` names it in errors.
pub fn eventfd(fd: BorrowedFd<'_>, what: &'static str) -> Result<(), FdError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(FdError::NotEventFd(what));
    }
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    if is_semaphore(&info) {
        return Err(FdError::Semaphore(what));
    }
    set_nonblocking(fd)?;
    Ok(())
}

/// Whether the fdinfo text of an eventfd says it is in semaphore mode.
fn is_semaphore(fdinfo: &str) -> bool {
    fdinfo.lines().any(|l| {
        l.strip_prefix("eventfd-semaphore:")
            .is_some_and(|v| v.trim() == "1")
    })
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor borrowed for the call.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::O_NONBLOCK == 0
            && libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Check that `file` can back `size` bytes of guest memory at `offset` and will keep doing
/// so (see the module docs).
pub fn guest_memory(file: &File, offset: u64, size: u64) -> Result<(), FdError> {
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(FdError::NotMemory);
    }
    // SAFETY: F_GET_SEALS on an fd owned by `file`.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 && seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL) == 0 {
        // A memfd that can shrink and still allows sealing: seal it.
        // SAFETY: F_ADD_SEALS on an fd owned by `file`, with an integer argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } < 0 {
            return Err(FdError::Unsealed(io::Error::last_os_error()));
        }
    }
    // Checked after sealing: a memfd cannot shrink below this any more.
    let len = file.metadata()?.len();
    match offset.checked_add(size) {
        Some(end) if end <= len => Ok(()),
        _ => Err(FdError::TooShort {
            len,
            offset,
            need: size,
        }),
    }
}

/// Check that `fd` is a unix stream socket.
pub fn unix_stream(fd: BorrowedFd<'_>) -> Result<(), FdError> {
    let int = |opt| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, a live local.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r == 0 {
            Ok(v)
        } else {
            Err(io::Error::last_os_error())
        }
    };
    match (int(libc::SO_DOMAIN), int(libc::SO_TYPE)) {
        (Ok(libc::AF_UNIX), Ok(libc::SOCK_STREAM)) => Ok(()),
        _ => Err(FdError::NotUnixStream),
    }
}

/// Whether `file` is a memfd-like file that cannot shrink (for tests and logs).
pub fn is_sealed_against_shrinking(file: &impl AsFd) -> bool {
    // SAFETY: F_GET_SEALS on a borrowed descriptor.
    let seals = unsafe { libc::fcntl(file.as_fd().as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    fn memfd(flags: libc::c_uint, len: u64) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), flags) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nobody else owns.
        let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn eventfds_are_made_non_blocking_and_others_refused() {
        let e = EventFd::new(0).unwrap();
        // SAFETY: the eventfd stays open for the whole test.
        let fd = unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) };
        eventfd(fd, "call").unwrap();
        // SAFETY: F_GETFL on a live descriptor.
        let flags = unsafe { libc::fcntl(e.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0);
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(matches!(
            eventfd(r.as_fd(), "kick"),
            Err(FdError::NotEventFd("kick"))
        ));
        let sem = EventFd::new(libc::EFD_SEMAPHORE).unwrap();
        // SAFETY: the eventfd stays open for the whole test.
        let fd = unsafe { BorrowedFd::borrow_raw(sem.as_raw_fd()) };
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", sem.as_raw_fd()));
        if info.is_ok_and(|i| i.contains("eventfd-semaphore")) {
            assert!(matches!(
                eventfd(fd, "kick"),
                Err(FdError::Semaphore("kick"))
            ));
        }
        assert!(is_semaphore(
            "pos:\t0\neventfd-count: 5\neventfd-semaphore: 1\n"
        ));
        assert!(!is_semaphore("eventfd-count: 5\neventfd-semaphore: 0\n"));
        assert!(!is_semaphore("eventfd-count: 5\n"));
    }

    #[test]
    fn guest_memory_must_cover_the_region_and_stay() {
        // A sealable memfd gets sealed; too short is refused.
        let m = memfd(libc::MFD_ALLOW_SEALING, 1 << 20);
        guest_memory(&m, 4096, (1 << 20) - 4096).unwrap();
        assert!(is_sealed_against_shrinking(&m));
        assert!(m.set_len(0).is_err());
        assert!(matches!(
            guest_memory(&m, 4096, 1 << 20),
            Err(FdError::TooShort { .. })
        ));
        assert!(matches!(
            guest_memory(&m, u64::MAX, 2),
            Err(FdError::TooShort { .. })
        ));
        // A memfd that does not allow sealing is accepted as it is (the fault guard covers
        // it).
        let m = memfd(0, 1 << 20);
        guest_memory(&m, 0, 4096).unwrap();
        assert!(!is_sealed_against_shrinking(&m));
        // A plain file is accepted; a socket or a directory is not memory.
        let f = tempfile::tempfile().unwrap();
        f.set_len(8192).unwrap();
        guest_memory(&f, 0, 8192).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(unix_stream(a.as_fd()).is_ok());
        let dir = File::open("/").unwrap();
        assert!(matches!(guest_memory(&dir, 0, 1), Err(FdError::NotMemory)));
        assert!(matches!(
            unix_stream(f.as_fd()),
            Err(FdError::NotUnixStream)
        ));
    }
}
