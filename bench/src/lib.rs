//! vloop-bench: a load generator for vhost-user-blk backends, and a side-by-side comparison of
//! vloop-blk, qemu-storage-daemon (main loop and iothread) and raw io_uring on the same image
//! (or, in qcow2 mode, of vloop-blk and qemu-storage-daemon on a qcow2 copy of it and on empty
//! overlays, against vloop-blk on the raw image).
//!
//! It drives backends through the project's frontend client (crate `vloop-frontend`):
//! [`load`] runs one workload against one export, [`verify`] checks data integrity under load,
//! [`compare`] starts each backend in turn and tabulates the figures, [`plot`] draws them as
//! SVG; [`guest`] measures the backends from inside a real guest booted through the harness
//! library; [`hist`], [`procfs`] and [`machine`] measure latency, CPU time and memory, and
//! the machine the figures come from.

pub mod compare;
pub mod figures;
pub mod guest;
pub mod hist;
pub mod images;
pub mod load;
pub mod machine;
pub mod plot;
pub mod procfs;
pub mod session;
pub mod target;
pub mod text;
pub mod verify;
