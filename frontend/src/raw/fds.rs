//! The odd descriptors attacks send: memfds with or without sealing, blocking eventfds (full
//! or not), full pipes, blocking descriptors and full sockets. The bottom of
//! [`raw`](super): it imports nothing from its siblings.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::eventfd::EventFd;

/// The largest value an eventfd counter holds; one more write blocks (or fails with
/// EAGAIN when non-blocking).
pub const EVENTFD_MAX: u64 = u64::MAX - 1;

/// A memfd of `len` bytes that allows sealing (as QEMU's `memory-backend-memfd` creates
/// them) or does not (`seal=off`).
pub fn memfd(len: u64, allow_sealing: bool) -> io::Result<File> {
    let mut flags = libc::MFD_CLOEXEC;
    if allow_sealing {
        flags |= libc::MFD_ALLOW_SEALING;
    }
    memfd_with(len, flags)
}

/// A memfd on hugetlbfs of `len` bytes (a multiple of the huge page size) that allows sealing:
/// where the huge page pool is empty, a first access to any of its pages raises SIGBUS.
pub fn hugetlb_memfd(len: u64) -> io::Result<File> {
    memfd_with(
        len,
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_HUGETLB,
    )
}

fn memfd_with(len: u64, flags: libc::c_uint) -> io::Result<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vloop-raw".as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor owned by nobody else.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len)?;
    Ok(f)
}

/// A blocking eventfd whose counter is `count` (at [`EVENTFD_MAX`], a write blocks).
pub fn blocking_eventfd(count: u64) -> io::Result<EventFd> {
    let e = EventFd::new(0)?;
    if count > 0 {
        e.write(count)?;
    }
    Ok(e)
}

/// A pipe whose buffer is full: (read end, write end), the write end blocking, so any
/// write to it blocks until someone reads.
pub fn full_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    let chunk = [0u8; 4096];
    loop {
        match nix::unistd::write(&w, &chunk) {
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => return Err(e.into()),
        }
    }
    set_blocking(&w)?;
    Ok((r, w))
}

/// Clears O_NONBLOCK on `fd`.
pub fn set_blocking(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller keeps open for the call.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Fills the send buffer of `sock` (non-blocking writes until EAGAIN) so that the next
/// write on it blocks as long as nobody reads the other end; returns the bytes written.
pub fn fill_socket(sock: &std::os::unix::net::UnixStream) -> io::Result<usize> {
    sock.set_nonblocking(true)?;
    let chunk = [0u8; 4096];
    let mut total = 0;
    loop {
        match io::Write::write(&mut &*sock, &chunk) {
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    sock.set_nonblocking(false)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn odd_descriptors() {
        let e = blocking_eventfd(EVENTFD_MAX).unwrap();
        // SAFETY: F_GETFL on a live descriptor.
        let fl = unsafe { libc::fcntl(e.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_NONBLOCK, 0);
        let (_r, w) = full_pipe().unwrap();
        // SAFETY: F_GETFL on a live descriptor.
        let fl = unsafe { libc::fcntl(w.as_fd().as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_NONBLOCK, 0);
        let mut p = [libc::pollfd {
            fd: w.as_fd().as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        }];
        // SAFETY: one live pollfd for the call.
        let ready = unsafe { libc::poll(p.as_mut_ptr(), 1, 0) };
        assert_eq!(ready, 0, "pipe not full");
        let m = memfd(4096, true).unwrap();
        // SAFETY: F_GET_SEALS on a live descriptor.
        assert_eq!(unsafe { libc::fcntl(m.as_raw_fd(), libc::F_GET_SEALS) }, 0);
        let m = memfd(4096, false).unwrap();
        // SAFETY: as above.
        let seals = unsafe { libc::fcntl(m.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals, libc::F_SEAL_SEAL);
    }
}
