//! vloop-qcow2: qcow2 images and backing chains, mapped for a zero-copy data path.
//!
//! The crate turns a virtual disk range into extents of files, so that the daemon (vloop-blk)
//! can read and write allocated clusters with iovecs straight into guest memory on its own
//! io_uring, and offers synchronous slow paths for the rest. The image tool (vloop-image)
//! uses the same [`Chain`] through buffered [`Chain::read_at`] / [`Chain::write_at`], plus
//! [`create`](mod@create) and [`Chain::info`].
//!
//! # Modules, bottom up
//! - [`format`](mod@format): format names, probing (raw or qcow2) and the probed-raw write guard against
//!   the CVE-2008-2004 class of attacks.
//! - [`header`]: the qcow2 header and its extensions, parsed and validated (pure).
//! - [`table`]: L1, L2 and refcount entries (pure).
//! - [`compress`]: deflate and zstd decompression of compressed clusters, capped at a cluster.
//! - [`storage`]: the file interface all I/O goes through ([`Storage`], implemented for
//!   `File`); tests record writes through it to replay power cuts.
//! - `layer`: one qcow2 image's metadata: L1 table, L2 cache (LRU within a byte budget),
//!   refcounts, cluster allocation, and the metadata write order.
//! - [`chain`]: the top image and its backing files as one disk: mapping, slow paths, discard,
//!   write zeroes, flush, freed-cluster quarantine, inspection.
//! - [`create`](mod@create): new empty images.
//!
//! # What is supported
//! qcow2 versions 2 and 3, cluster sizes 512 B to 2 MiB, refcount widths 1 to 64 bits (read and
//! write), compressed clusters (deflate and zstd; read, and rewritten as standard clusters on
//! write), zero clusters, backing chains of raw and qcow2 files up to [`MAX_CHAIN`] deep.
//! Refused with an error naming the fix: encryption, external data files, extended L2
//! entries, the corrupt bit, unknown incompatible features; for writing also the dirty bit,
//! consistent persistent bitmaps and internal snapshots (all of which open read-only).
//! Unknown autoclear bits are cleared on a read-write open, as QEMU does.
//!
//! # Crash safety
//! A SIGKILL at any instant loses no completed write: every request writes the metadata it
//! changed into the file before it returns (into the page cache, which outlives the process;
//! the backend that restarts reads it back). A power cut at any instant leaves an image
//! `qemu-img check` finds free of corruption (leaked clusters are possible) that holds every
//! write completed before the last successful [`Chain::flush`], in which every sector written
//! since holds its old content or a new one. The ordering, with fdatasync (`sync` below)
//! where an order between writes must survive a power cut:
//! 1. **Refcounts before use.** Clusters are reserved in batches (1 MiB at first, doubling up to
//!    64 MiB): their refcounts are set to one and written when the batch is reserved, and
//!    synced before the first table entry that names one of them is written. A crash leaves
//!    unused reserved clusters as leaks. A new refcount block is written and synced before the
//!    refcount table entry that points to it; a grown refcount table (and its blocks) is
//!    written and synced before the header points to it (a 12-byte write inside one sector),
//!    and that is synced before the old table is freed.
//! 2. **Data before the L2 entry.** A slow write writes its data, syncs it where the new entry
//!    would otherwise let a sector read as neither old nor new (a cluster that held other
//!    data, copy-on-write copies and zero fill of partly written clusters, a cluster whose old
//!    content was not zeroes), then writes the changed L2 entries before it returns. A
//!    cluster appended to the file while the old content read as zeroes needs no sync.
//! 3. **L2 table before the L1 entry.** A new L2 table is written and synced before its L1
//!    entry is written: an L1 entry on disk always names a complete table.
//! 4. **L2 entry cleared before the refcount drops.** Discard, write-zeroes with unmap, and
//!    copy-on-write out of compressed clusters only queue the decrement; the flush applies it
//!    after the sync that made the cleared L2 entries durable. A crash in between leaks.
//! 5. **No reuse while in flight.** A cluster whose refcount dropped to zero waits in a
//!    quarantine until [`Chain::reclaim_freed`] (see [`Chain::free_mark`]), so a request the
//!    daemon mapped before the free cannot land in a cluster that now holds other data.
//!
//! A flush costs one sync, and one more when it applies queued refcount decrements. The dirty
//! bit is never set (refcounts are always exact on disk up to leaks); nothing marks an image
//! corrupt. [`Chain::close`] flushes, returns the unused reserve and trims the file, leaving
//! no leaks.

pub mod chain;
pub mod compress;
pub mod create;
pub mod format;
pub mod header;
mod layer;
pub mod storage;
pub mod table;

pub use chain::{
    resolve_backing, Backing, Chain, Error, Extent, FreeMark, Info, LayerId, LayerInfo,
    OpenOptions, Opener, WritePath, DEFAULT_CACHE_BYTES, DEFAULT_RESERVE_BYTES, MAX_CHAIN,
};
pub use create::{create, CreateError, CreateOptions, DEFAULT_CLUSTER_SIZE};
pub use format::{probe, probed_raw_write, Format, ProbeError, ProbedRawWriteError};
pub use header::{Compression, HeaderError};
pub use layer::LayerError;
pub use storage::{open_image, Storage};

#[cfg(test)]
mod error_display_tests {
    //! Every error that carries a cause in `#[source]` leaves it out of its own message, so
    //! that printing the chain of causes says everything exactly once.

    use std::io;
    use std::path::PathBuf;

    use crate::{CreateError, Error, LayerError};

    const CAUSE: &str = "a very particular cause";

    fn check(e: &(dyn std::error::Error + 'static)) {
        let mut chain = String::new();
        let mut next = Some(e);
        while let Some(err) = next {
            chain.push_str(&err.to_string());
            chain.push_str(": ");
            next = err.source();
        }
        assert_eq!(chain.matches(CAUSE).count(), 1, "{chain}");
    }

    #[test]
    fn causes_are_not_repeated() {
        let cause = || io::Error::other(CAUSE);
        let path = || PathBuf::from("/x/img.qcow2");
        check(&Error::Io {
            what: "reading data",
            path: path(),
            offset: 512,
            source: cause(),
        });
        check(&Error::OpenBacking {
            path: path(),
            by: path(),
            source: cause(),
        });
        check(&Error::Layer {
            path: path(),
            source: LayerError::Io {
                what: "L2 table",
                offset: 65536,
                source: cause(),
            },
        });
        check(&CreateError::Io(cause()));
    }
}
