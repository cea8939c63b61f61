//! One qcow2 image's metadata: the L1 table, cached L2 tables, refcounts and the allocator.
//!
//! [`Qcow2`] knows nothing of backing files or locks; [`crate::chain`] keeps one per qcow2
//! layer behind the chain's metadata lock and does the data I/O. This module owns the
//! metadata write order that makes the image crash safe (the scheme is described in the crate
//! docs): clusters are reserved in batches whose refcounts are written before any of them is
//! used (and durable before any table entry naming them is written); L2 and L1 changes are
//! gathered by [`Qcow2::flush_plan`] for the chain to write (each request writes its own
//! before it completes, after the data it points to where that must be durable first);
//! refcount decrements wait until the L2 entries that dropped the reference are durable, and
//! freed clusters then sit in a quarantine until the caller says no I/O mapped before the free
//! is still in flight.
//!
//! # Parts, bottom up
//! Each part uses only those listed before it.
//! - `error`: the error type;
//! - `state`: the in-memory metadata ([`Qcow2`]) and table reading helpers;
//! - `open`: header, L1 table and refcount table loaded and checked;
//! - `refcount`: refcount blocks cached, entries read and set, changes written;
//! - `alloc`: batched reservation, new refcount blocks, refcount table growth, release;
//! - `free`: queued decrements, applied after the L2 entries are durable, and the quarantine;
//! - `l2`: the L2 table cache, entries read and replaced, tables allocated, counts;
//! - `flush`: what a flush writes, and marking it clean.

mod alloc;
mod error;
mod flush;
mod free;
mod l2;
mod open;
mod refcount;
mod state;

pub use self::error::LayerError;
pub(crate) use self::state::{Fresh, Qcow2};
