//! Loop devices over files, for tests of block-device images (they need root and /dev/loop*).

use std::path::Path;
use std::process::Command;

/// A loop device over a file, detached on drop.
#[derive(Debug)]
pub struct Loop(String);

impl Loop {
    /// Attaches a loop device to `file` (`read_only`: a read-only device). When none can be
    /// set up the test cannot run: [`crate::skip::skip`] says so (a failure under CI) and
    /// this returns `None`.
    pub fn attach(file: &Path, read_only: bool) -> Option<Loop> {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if read_only {
            cmd.arg("--read-only");
        }
        match cmd.arg(file).output() {
            Ok(o) if o.status.success() => {
                Some(Loop(String::from_utf8_lossy(&o.stdout).trim().to_owned()))
            }
            other => {
                crate::skip::skip(&format!(
                    "cannot set up a loop device here (needs root and /dev/loop*): {other:?}"
                ));
                None
            }
        }
    }

    /// The device's path, e.g. `/dev/loop0`.
    pub fn path(&self) -> &str {
        &self.0
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}
