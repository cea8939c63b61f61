//! vloop-harness: boots real QEMU guests on vhost-user-blk disks, runs the project's
//! scenarios in them (`run`, also the conformance suite of any backend) or any command
//! (`exec`), and checks the disks again on the host.
//!
//! Modules in layer order, bottom up; each imports only from modules above it in this list:
//! - [`file_error`]: an I/O error on one file, the shape every error enum wraps;
//! - [`cpio`]: the reproducible newc archive writer;
//! - [`modules`]: the kernel modules a guest needs, with their dependencies, in load order;
//! - [`kernel`]: finds or fetches a guest kernel and its modules tree;
//! - [`pvh`]: extracts the kernel's vmlinux for a direct PVH boot;
//! - [`accel`]: the KVM probe, KVM or TCG;
//! - [`interrupt`]: Ctrl-C and SIGTERM as a flag the watch loops poll;
//! - [`initramfs`]: the guest agent (crate `vloop-guest`), busybox and its applets, the
//!   modules, and per boot the plan and the files copied in;
//! - [`images`]: the image writers (the `vloop_images` and `vloop_qcow2` libraries, or
//!   system tools on request), file-system probing, and qcow2 chains opened for reading;
//! - [`manifest`]: what a disk must hold, and the host-side checks;
//! - [`backend`]: the backend process of one disk (vloop-blk, qemu-storage-daemon, a
//!   `--backend-cmd` template);
//! - [`qemu`]: QEMU's command line and a run under a watch;
//! - [`setup`]: what every guest of a run shares (QEMU, accelerator, kernel, initramfs);
//! - [`guest`]: one boot: backends, initramfs, QEMU, the agent's verdict;
//! - [`scenario`]: the scenario registry and the scenarios, by family;
//! - [`report`]: the table, JSON and JUnit XML;
//! - [`mod@run`]: `vloop-harness run`;
//! - [`exec`](mod@exec): `vloop-harness exec`.

pub mod file_error;

pub mod cpio;

pub mod modules;

pub mod kernel;

pub mod pvh;

pub mod accel;

pub mod interrupt;

pub mod initramfs;

pub mod images;

pub mod manifest;

pub mod backend;

pub mod qemu;

pub mod setup;

pub mod guest;

pub mod scenario;

pub mod report;

pub mod run;

pub mod exec;

pub use exec::{exec, exec_with, ExecError, ExecHooks, ExecOptions};
pub use run::{run, BackendChoice, RunError, RunOptions};
