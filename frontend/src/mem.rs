//! "Guest memory" for the frontend: one memfd, mapped shared in this process and handed to
//! the backend with SET_MEM_TABLE. Guest physical address 0 is the start of the memfd.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use vhost::VhostUserMemoryRegionInfo;

/// Errors of the guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// memfd_create, ftruncate or mmap failed.
    #[error("cannot create {len} bytes of shared guest memory")]
    Create {
        /// Requested size.
        len: u64,
        /// The failing system call's error.
        #[source]
        source: nix::Error,
    },
    /// An access falls outside the guest memory.
    #[error("guest range {gpa:#x}+{len} is outside guest memory of {size} bytes")]
    OutOfRange {
        /// Guest physical address of the access.
        gpa: u64,
        /// Length of the access.
        len: u64,
        /// Size of guest memory.
        size: u64,
    },
}

/// A shared memfd mapped into this process; guest physical address 0 is its first byte.
#[derive(Debug)]
pub struct GuestMem {
    file: File,
    ptr: NonNull<u8>,
    len: u64,
}

// SAFETY: the mapping is owned by `GuestMem` and lives until drop; it is shared memory that
// the backend process writes concurrently anyway, so no access relies on exclusive ownership.
unsafe impl Send for GuestMem {}
// SAFETY: as above; all accesses copy bytes through raw pointers or atomics.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    /// Creates `len` bytes (rounded up to 2 MiB) of zeroed shared memory.
    pub fn new(len: u64) -> Result<Self, MemError> {
        let len = len.max(1).next_multiple_of(2 << 20);
        let err = |source| MemError::Create { len, source };
        let fd = memfd_create(c"vloop-bench-guest", MemFdCreateFlag::MFD_CLOEXEC).map_err(err)?;
        let file = File::from(fd);
        nix::unistd::ftruncate(file.as_fd(), len as i64).map_err(err)?;
        Self::from_file(file)
    }

    /// Maps all of `file` (a memfd, sealable or not, or a file on tmpfs or hugetlbfs) as guest
    /// memory.
    pub fn from_file(file: File) -> Result<Self, MemError> {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let err = |source| MemError::Create { len, source };
        let size = std::num::NonZeroUsize::new(len as usize).ok_or(MemError::Create {
            len,
            source: nix::Error::EINVAL,
        })?;
        // SAFETY: a fresh shared mapping of a file we own, at an address the kernel picks; it
        // is unmapped in `drop` only.
        let ptr = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file.as_fd(),
                0,
            )
        }
        .map_err(err)?;
        Ok(Self {
            file,
            ptr: ptr.cast(),
            len,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: guest memory has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd, to pass to the backend.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Raw fd of the memfd.
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Host address of guest address 0.
    pub fn host_base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The whole memfd as one memory region at guest address 0, for SET_MEM_TABLE.
    pub fn region_info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.len(),
            userspace_addr: self.host_base() as u64,
            mmap_offset: 0,
            mmap_handle: self.raw_fd(),
        }
    }

    fn check(&self, gpa: u64, len: u64) -> Result<*mut u8, MemError> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.len => {
                // SAFETY: `gpa < len` of the mapping, checked just above.
                Ok(unsafe { self.ptr.as_ptr().add(gpa as usize) })
            }
            _ => Err(MemError::OutOfRange {
                gpa,
                len,
                size: self.len,
            }),
        }
    }

    /// Host address of guest range `gpa..gpa+len`.
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Result<*mut u8, MemError> {
        self.check(gpa, len)
    }

    /// Copies `data` to guest address `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let p = self.check(gpa, data.len() as u64)?;
        // SAFETY: `p..p+data.len()` is inside the mapping (checked); `data` is a different
        // allocation.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Copies guest bytes at `gpa` into `out`.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), MemError> {
        let p = self.check(gpa, out.len() as u64)?;
        // SAFETY: `p..p+out.len()` is inside the mapping (checked); `out` is a different
        // allocation.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Fills guest range `gpa..gpa+len` with `byte`.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<(), MemError> {
        let p = self.check(gpa, len)?;
        // SAFETY: the range is inside the mapping (checked).
        unsafe { std::ptr::write_bytes(p, byte, len as usize) };
        Ok(())
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, unmapped only here.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len as usize) } {
            tracing::warn!("munmap of guest memory failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let m = GuestMem::new(4096).unwrap();
        assert_eq!(m.len(), 2 << 20);
        m.write(10, b"abc").unwrap();
        let mut out = [0u8; 3];
        m.read(10, &mut out).unwrap();
        assert_eq!(&out, b"abc");
        assert!(m.write(m.len() - 2, b"abc").is_err());
        assert!(m.read(u64::MAX, &mut out).is_err());
        m.fill(0, 4, 0xee).unwrap();
        m.read(0, &mut out).unwrap();
        assert_eq!(out, [0xee; 3]);
    }
}
