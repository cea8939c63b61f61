//! A backing chain: the top image (qcow2 or raw) and its backing files, as one virtual disk.
//!
//! [`Chain`] is what the daemon and the image tool use. The fast path, [`Chain::map_read`] and
//! [`Chain::map_write`], turns a virtual byte range into [`Extent`]s of files without doing any
//! data I/O, so the caller can issue it with iovecs straight into guest memory. Everything the
//! fast path cannot express (compressed clusters, allocation, copy-on-write, discard, write
//! zeroes, flush) is a synchronous slow path, safe to call from several threads at once.
//!
//! Locking: the metadata of every layer sits behind one mutex, taken briefly by the map
//! functions (an L2 table cache miss reads the table with a plain pread while holding it).
//! Operations that change metadata also take a second mutex, so they run one at a time; they
//! release the metadata mutex while they do data I/O and syncs.
//!
//! Reuse of freed clusters: a discarded cluster's host offset may still be named by an extent
//! the caller mapped earlier and has not finished writing. Freed clusters therefore wait in a
//! quarantine until the caller passes [`Chain::reclaim_freed`] a [`FreeMark`] taken at a time
//! after which no such extent is in flight (see [`Chain::free_mark`]).
//!
//! # Parts, bottom up
//! Each part uses only those listed before it.
//! - `options`: the open options, the backing file choice and the chain's limits;
//! - `error`: the error type;
//! - `state`: the files, the metadata lock, accessors and error helpers;
//! - `iov`: byte ranges of scatter lists;
//! - `map`: virtual ranges mapped to pieces and [`Extent`]s (the fast path);
//! - `read`: the read slow path and decompression;
//! - `flush`: flush, the freed-cluster quarantine and close;
//! - `write`: the write slow path (allocation, copy-on-write);
//! - `zero`: discard and write zeroes;
//! - `buffered`: whole-buffer reads and writes for tools;
//! - `open`: opening the top image and its backing files;
//! - `inspect`: format, geometry, allocation and layers.

mod buffered;
mod error;
mod flush;
mod inspect;
mod iov;
mod map;
mod open;
mod options;
mod read;
mod state;
mod write;
mod zero;

pub use self::error::{Error, Result};
pub use self::flush::FreeMark;
pub use self::inspect::{Info, LayerInfo};
pub use self::map::{Extent, WritePath};
pub use self::open::resolve_backing;
pub use self::options::{
    Backing, LayerId, OpenOptions, Opener, DEFAULT_CACHE_BYTES, DEFAULT_RESERVE_BYTES, MAX_CHAIN,
};
pub use self::state::Chain;
