//! vloop-frontend: a vhost-user-blk frontend, the way QEMU and a guest driver drive a backend,
//! and the backend processes it talks to. The backend's protocol tests, the fuzzers, the
//! harness and the load generator all build on it.
//!
//! Layers, bottom up:
//! - [`skip`]: how a test that cannot run says so (a failure under CI);
//! - [`loopdev`]: loop devices over files, for tests of block-device images;
//! - [`process`]: child processes that are always reaped (kill on drop, waits with time-outs);
//! - [`backend`]: command lines of the backend programs (vloop-blk, qemu-storage-daemon) and a
//!   running backend process;
//! - [`blk`]: virtio-blk wire formats (config space, request header, segments, status codes);
//! - [`mem`]: guest memory as a shared memfd the backend maps;
//! - [`ring`]: split virtqueues laid out in that memory;
//! - [`client`]: the vhost-user negotiation, queues and a request API, plus a raw descriptor API
//!   for hostile-driver tests;
//! - [`raw`]: a frontend that sends any message with any descriptors, and a device set up step
//!   by step, for hostile-frontend tests.

pub mod backend;
pub mod blk;
pub mod client;
pub mod loopdev;
pub mod mem;
pub mod process;
pub mod raw;
pub mod ring;
pub mod skip;

pub use blk::{BlkConfig, RequestType};
pub use client::{Client, ClientError, ClientOptions, Completion, Queue, QueueStats, Request};
pub use mem::GuestMem;
pub use raw::{RawDevice, RawError, RawFrontend};
pub use ring::{Descriptor, RingLayout, SplitRing, UsedElem};
