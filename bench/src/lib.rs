//! vloop-bench: a vhost-user-blk frontend (client) and load generator.
//!
//! [`client`] connects to any vhost-user-blk backend the way QEMU and a guest driver would,
//! and exposes a request API and a raw descriptor API; [`ring`] is its split virtqueue code;
//! the load generator and the comparison against qemu-storage-daemon and raw io_uring build
//! on it.

pub mod blk;
pub mod client;
pub mod mem;
pub mod ring;

pub use blk::{BlkConfig, RequestType};
pub use client::{Client, ClientError, ClientOptions, Completion, Queue, QueueStats, Request};
pub use mem::GuestMem;
pub use ring::{Descriptor, RingLayout, SplitRing, UsedElem};
pub mod compare;
pub mod daemon;
pub mod hist;
pub mod load;
pub mod procfs;
pub mod verify;
