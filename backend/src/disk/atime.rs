//! Access times of served images. Their descriptors are O_NOATIME where the daemon may set it
//! (it owns the image, or has CAP_FOWNER): otherwise every read from the page cache also
//! reads the clock and checks whether the inode's atime is due, a few percent of a cached
//! 4 KiB read. So that an image in use still looks used (to `find -atime`, systemd-tmpfiles
//! and other cleaners by age), the daemon sets its atime itself when it opens it and then at
//! most once a day while it serves requests, as a relatime mount updates it at most once a
//! day.

use std::fs::File;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::futimens;
use nix::sys::time::TimeSpec;

/// How long an atime set by [`Atime`] stands before the next one.
pub const REFRESH: Duration = Duration::from_secs(24 * 60 * 60);

/// Make reads through `file` leave its atime alone where this process may; the file keeps
/// its atime updates elsewhere.
pub fn no_atime(file: &File) {
    let Ok(flags) = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL) else {
        return;
    };
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NOATIME;
    if let Err(e) = fcntl(file.as_raw_fd(), FcntlArg::F_SETFL(flags)) {
        tracing::debug!("reads keep updating the image's access time: {e}");
    }
}

/// Whether reads through `fd` leave its atime alone.
pub fn is_no_atime(fd: RawFd) -> bool {
    fcntl(fd, FcntlArg::F_GETFL).is_ok_and(|f| f & libc::O_NOATIME != 0)
}

/// The atime refreshes of one image's files (a qcow2 image and its backing files): those
/// whose descriptors are O_NOATIME.
#[derive(Debug)]
pub struct Atime {
    /// One descriptor per file, kept open by the image's owner.
    fds: Vec<RawFd>,
    opened: Instant,
    /// When the atime was last set, in seconds since `opened`.
    set_at: AtomicU64,
}

impl Atime {
    /// The refreshes of the files behind `fds` (one each; they must stay open as long as the
    /// result); sets their atime now.
    pub fn new(fds: impl IntoIterator<Item = RawFd>) -> Atime {
        let atime = Atime {
            fds: fds.into_iter().filter(|&fd| is_no_atime(fd)).collect(),
            opened: Instant::now(),
            set_at: AtomicU64::new(0),
        };
        atime.set();
        atime
    }

    /// Set the atime again if the last one is [`REFRESH`] old at `now` (one atomic load
    /// otherwise).
    pub fn refresh(&self, now: Instant) {
        let at = now.saturating_duration_since(self.opened).as_secs();
        let last = self.set_at.load(Ordering::Relaxed);
        if at < last.saturating_add(REFRESH.as_secs()) {
            return;
        }
        if self
            .set_at
            .compare_exchange(last, at, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.set();
        }
    }

    fn set(&self) {
        for &fd in &self.fds {
            // The owner (or CAP_FOWNER), which O_NOATIME needed too, may set it.
            if let Err(e) = futimens(fd, &TimeSpec::UTIME_NOW, &TimeSpec::UTIME_OMIT) {
                tracing::debug!("cannot set the image's access time: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn atime(f: &File) -> i64 {
        f.metadata().unwrap().atime()
    }

    fn age(f: &File, secs: i64) {
        let t = TimeSpec::new(atime(f) - secs, 0);
        futimens(f.as_raw_fd(), &t, &TimeSpec::UTIME_OMIT).unwrap();
    }

    #[test]
    fn an_image_in_use_has_its_atime_set_once_a_day() {
        let f = tempfile::tempfile().unwrap();
        no_atime(&f);
        assert!(is_no_atime(f.as_raw_fd()), "the test owns its file");
        age(&f, 10 * 86400);
        let old = atime(&f);
        let a = Atime::new([f.as_raw_fd()]);
        let opened = atime(&f);
        assert!(opened >= old + 10 * 86400 - 1, "set when opened");
        age(&f, 2 * 86400);
        let aged = atime(&f);
        a.refresh(Instant::now() + REFRESH / 2);
        assert_eq!(atime(&f), aged, "not again within a day");
        a.refresh(Instant::now() + REFRESH + Duration::from_secs(60));
        assert!(atime(&f) >= aged + 2 * 86400 - 1, "again after a day");
        age(&f, 2 * 86400);
        let aged = atime(&f);
        a.refresh(Instant::now() + REFRESH + Duration::from_secs(120));
        assert_eq!(
            atime(&f),
            aged,
            "a day from the last refresh, not from the open"
        );
    }

    #[test]
    fn files_that_keep_their_atime_updates_are_left_alone() {
        let f = tempfile::tempfile().unwrap();
        age(&f, 10 * 86400);
        let old = atime(&f);
        let _a = Atime::new([f.as_raw_fd()]);
        assert_eq!(atime(&f), old);
    }

    #[test]
    fn every_layer_of_a_qcow2_chain_leaves_its_atime_alone() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        File::create(&base).unwrap().set_len(1 << 20).unwrap();
        let top = dir.path().join("top.qcow2");
        let mut opts = vloop_qcow2::CreateOptions::new(1 << 20);
        opts.backing = Some(("base.raw".into(), vloop_qcow2::Format::Raw));
        vloop_qcow2::create(&File::create(&top).unwrap(), &opts).unwrap();
        for direct in [false, true] {
            let mut cfg = crate::config::Config::new(&top);
            cfg.format = crate::config::ImageFormat::Qcow2;
            cfg.direct = direct;
            let disk = match super::super::Disk::open(&cfg) {
                Ok(d) => d,
                Err(e) if direct => {
                    vloop_frontend::skip::skip(&format!("O_DIRECT in the temp directory: {e}"));
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            let super::super::Layout::Qcow2(q) = disk.layout() else {
                panic!("not served as qcow2");
            };
            assert_eq!(q.buffered_fds.len(), 2, "top and backing file");
            for &fd in q.data_fds.iter().chain(&q.buffered_fds) {
                assert!(is_no_atime(fd), "direct {direct}: fd {fd} updates atime");
            }
            assert_eq!(disk.atime.fds.len(), 2, "one refresh per file");
        }
    }
}
