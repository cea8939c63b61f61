//! Made-up settings for the tests of the guest comparison.

use std::time::Duration;

use vloop_harness::setup::SetupOptions;

use super::options::{default_phases, targets, GuestOptions};
use crate::target::Mode;

/// The default phases of 1 s on vloop-blk and qemu-storage-daemon's iothread, in `mode`, on
/// a 1 MiB image, with a vloop-blk argument.
pub(crate) fn options(mode: Mode) -> GuestOptions {
    GuestOptions {
        image: "/tmp/i.img".into(),
        image_size: 1 << 20,
        fresh_image: false,
        vloop_bin: "/bin/vloop-blk".into(),
        qsd_bin: "qemu-storage-daemon".into(),
        rounds: 1,
        mode,
        phases: default_phases(Duration::from_secs(1)),
        targets: targets(false, false),
        vloop_args: vec!["--queue-size=512".into()],
        setup: SetupOptions::default(),
        gap: Duration::from_millis(200),
        time_budget: None,
    }
}
