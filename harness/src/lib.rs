//! vloop-harness: boots real QEMU guests against a vhost-user-blk backend and proves, inside
//! the guest and again on the host, that the disks work.
//!
//! The pieces, in the order a run uses them ([`mod@run`] drives them): [`kernel`] finds or
//! fetches a guest kernel and resolves its modules, [`pvh`] extracts its vmlinux for a direct
//! boot; [`initramfs`] packs the guest agent (crate `vloop-guest`), busybox
//! and the modules into a reproducible [`cpio`] archive; [`accel`] picks KVM or TCG;
//! [`scenario`] prepares images ([`images`]), starts one [`backend`] per disk, boots
//! [`qemu`], reads the agent's results and checks the disks on the host ([`manifest`]);
//! [`report`] prints the table, JSON and JUnit XML.

pub mod accel;
pub mod backend;
pub mod cpio;
pub mod images;
pub mod initramfs;
pub mod kernel;
pub mod manifest;
pub mod pvh;
pub mod qemu;
pub mod report;
pub mod run;
pub mod scenario;

pub use run::{run, RunError, RunOptions};
