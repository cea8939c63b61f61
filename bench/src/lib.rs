//! vloop-bench: a load generator for vhost-user-blk backends, and a side-by-side comparison of
//! vloop-blk, qemu-storage-daemon (main loop and iothread) and raw io_uring on the same image
//! (or, in qcow2 mode, of vloop-blk and qemu-storage-daemon on a qcow2 copy of it and on empty
//! overlays, against vloop-blk on the raw image), from the host or from inside a guest.
//! It drives backends through the project's frontend client (crate `vloop-frontend`) and boots
//! guests through the harness library (crate `vloop-harness`).
//!
//! The modules, bottom up; each imports only modules above it in this list:
//!
//! - [`hist`]: the latency histogram and its percentiles.
//! - [`procfs`]: a process's CPU time (in all and per thread) and memory from /proc.
//! - [`machine`]: the machine the figures come from, and its load average.
//! - [`load`]: one workload against one export over vhost-user, or straight on a file.
//! - [`verify`]: a workload whose every read is checked against the last write.
//! - [`target`]: the sides compared, the cache mode they serve in, their programs.
//! - [`figures`]: medians, ranges and per-round ratios over rounds (pure).
//! - [`text`]: durations read; figures, header lines and errors written for the tables.
//! - [`images`]: the benchmark image, its qcow2 copy and the empty overlays.
//! - [`session`]: the frame of a comparison run: machine, load, time budget, turns.
//! - [`compare`]: `--compare`, each backend in turn from the host, and its table.
//! - [`plot`]: a comparison drawn as an SVG chart.
//! - [`guest`]: `--guest`, each backend in turn seen from inside a guest, and its table.

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
