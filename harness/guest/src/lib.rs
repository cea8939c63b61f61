//! vloop-guest: the plan a harness gives a guest, the results the guest sends back, and the
//! deterministic file contents both sides generate.
//!
//! The library is shared by the host (`vloop-harness`, which writes a [`Plan`] into the
//! initramfs and parses [`Event`] lines) and the guest agent (the `vloop-guest` binary that
//! runs as `/init`), so the two can never disagree about the protocol. [`frame`] is the
//! data channel of `vloop-harness exec`: the command's output and the files copied out;
//! [`io`] is the protocol of the agent's I/O tool (`/init io PLAN`), which times O_DIRECT
//! phases on a disk for `vloop-bench --guest`.

use serde::{Deserialize, Serialize};

pub mod frame;
pub mod io;
use sha2::{Digest, Sha256};

/// Path of the plan inside the initramfs.
pub const PLAN_PATH: &str = "/vloop/plan.json";
/// Directory holding the kernel modules inside the initramfs.
pub const MODULES_DIR: &str = "/vloop/modules";
/// Path of busybox inside the initramfs.
pub const BUSYBOX_PATH: &str = "/bin/busybox";
/// The serial port the guest writes its JSON-lines results to (the console is ttyS0).
pub const RESULTS_PORT: &str = "/dev/ttyS1";
/// The console the kernel and an interactive command use.
pub const CONSOLE_PORT: &str = "/dev/ttyS0";
/// Name of the virtio-serial port that carries [`frame`]s to the host.
pub const DATA_PORT_NAME: &str = "org.vloop.data";
/// Where the per-boot archive puts the files copied into the guest (`<dir>/<index>/<name>`).
pub const COPY_IN_DIR: &str = "/vloop/in";
/// The command's working directory and `HOME`.
pub const HOME: &str = "/root";
/// `PATH` of the command: where the busybox applets are linked.
pub const PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";

/// Everything the guest does in one boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Scenario name, echoed in the results.
    pub scenario: String,
    /// Module file names under [`MODULES_DIR`], in load order (dependencies first).
    pub modules: Vec<String>,
    /// Block devices (names under /dev, e.g. `vda`) to wait for before the first step.
    pub devices: Vec<String>,
    /// The steps, run in order; the first failure stops the plan.
    pub steps: Vec<Step>,
    /// Open the virtio-serial port [`DATA_PORT_NAME`] for [`frame`]s, and once done, send
    /// [`frame::Tag::End`] and wait for the host to stop the machine instead of powering off
    /// at once (the host then knows every byte arrived).
    #[serde(default)]
    pub data_port: bool,
}

/// A file the guest writes: `size` bytes of [`content`]`(seed, size)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Path relative to the step's directory; parent directories are created.
    pub path: String,
    /// Length in bytes.
    pub size: u64,
    /// Seed of the content generator.
    pub seed: u64,
}

/// What the guest expects to find at a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// A regular file with this length and SHA-256 (lower-case hex).
    File {
        /// Path relative to the verified directory.
        path: String,
        /// Length in bytes.
        size: u64,
        /// SHA-256 of the content, lower-case hex.
        sha256: String,
    },
    /// A directory.
    Dir {
        /// Path relative to the verified directory.
        path: String,
    },
    /// A symbolic link with this target.
    Symlink {
        /// Path relative to the verified directory.
        path: String,
        /// The link's target, as stored.
        target: String,
    },
}

impl Entry {
    /// The entry's path relative to the verified directory.
    pub fn path(&self) -> &str {
        match self {
            Entry::File { path, .. } | Entry::Dir { path } | Entry::Symlink { path, .. } => path,
        }
    }
}

/// One action of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    /// Make an ext2 filesystem on a device with busybox mke2fs.
    Mkfs {
        /// Device path, e.g. `/dev/vda`.
        dev: String,
        /// Extra mke2fs options (before the device).
        #[serde(default)]
        args: Vec<String>,
    },
    /// Mount a device.
    Mount {
        /// Device path.
        dev: String,
        /// Mount point (created).
        dir: String,
        /// Filesystem type (`ext2`, `iso9660`).
        fstype: String,
        /// Mount read-only.
        readonly: bool,
        /// Filesystem options (the data argument of mount(2)), may be empty.
        options: String,
    },
    /// Unmount a directory.
    Umount {
        /// Mount point.
        dir: String,
    },
    /// Write files (each fsynced, then its directory), `writers` threads at once.
    WriteFiles {
        /// Directory the paths are relative to.
        dir: String,
        /// The files.
        files: Vec<FileSpec>,
        /// Number of threads sharing the files round-robin (1 = sequential).
        writers: u32,
    },
    /// Create directories and symbolic links.
    MakeEntries {
        /// Directory the paths are relative to.
        dir: String,
        /// Only `Dir` and `Symlink` entries are created; `File` entries are an error.
        entries: Vec<Entry>,
    },
    /// Remove files or empty directories.
    Remove {
        /// Directory the paths are relative to.
        dir: String,
        /// Paths to remove.
        paths: Vec<String>,
    },
    /// Check entries; with `exact`, also check that nothing else exists (except `ignore`).
    Verify {
        /// Directory the paths are relative to.
        dir: String,
        /// What must exist.
        entries: Vec<Entry>,
        /// Fail on any entry not listed.
        exact: bool,
        /// Top-level names exempt from the `exact` check (e.g. `lost+found`).
        ignore: Vec<String>,
    },
    /// sync(2) and drop the page, dentry and inode caches.
    DropCaches,
    /// FITRIM the filesystem mounted at `dir` and report the trimmed bytes.
    Fstrim {
        /// Mount point.
        dir: String,
    },
    /// Check that the device is read-only and that writing to it fails.
    WriteMustFail {
        /// Device path.
        dev: String,
    },
    /// Check that the device has at least this many virtqueues (blk-mq hardware queues).
    Queues {
        /// Device name under /sys/block, e.g. `vda`.
        name: String,
        /// Minimum number of queues.
        min: u32,
    },
    /// Check that the device's capacity is exactly this many bytes (the size the backend
    /// exported: an image format's virtual size, not its file's length).
    DiskSize {
        /// Device name under /sys/block, e.g. `vda`.
        name: String,
        /// Expected capacity in bytes.
        bytes: u64,
    },
    /// Move (or copy, across file systems) a file or folder the archive brought in to its
    /// place: into `to` when that is a folder, else to `to` itself; parents are created.
    CopyIn {
        /// Where the archive put it (under [`COPY_IN_DIR`]).
        from: String,
        /// Where it goes; relative paths are relative to [`HOME`].
        to: String,
    },
    /// Run a command; its end is reported as [`Event::Exit`] (the step fails only when the
    /// agent cannot wait for it). Without `console`, stdin is empty and stdout and stderr go
    /// to the host as [`frame`]s; with it, the command runs on the console as its
    /// controlling terminal.
    Exec {
        /// Program and arguments; a program without `/` is looked up in [`PATH`].
        argv: Vec<String>,
        /// Extra environment variables (`PATH`, `HOME` and `TERM` are set).
        env: Vec<(String, String)>,
        /// Run on the console, interactively.
        console: bool,
    },
    /// Send files or folders to the host as [`frame`]s, item `i` of `paths` tagged `i`;
    /// fails when any of them cannot be read, after trying every one.
    CopyOut {
        /// Guest paths; relative paths are relative to [`HOME`].
        paths: Vec<String>,
    },
}

impl Step {
    /// Short name of the step, as reported.
    pub fn op(&self) -> &'static str {
        match self {
            Step::Mkfs { .. } => "mkfs",
            Step::Mount { .. } => "mount",
            Step::Umount { .. } => "umount",
            Step::WriteFiles { .. } => "write_files",
            Step::MakeEntries { .. } => "make_entries",
            Step::Remove { .. } => "remove",
            Step::Verify { .. } => "verify",
            Step::DropCaches => "drop_caches",
            Step::Fstrim { .. } => "fstrim",
            Step::WriteMustFail { .. } => "write_must_fail",
            Step::Queues { .. } => "queues",
            Step::DiskSize { .. } => "disk_size",
            Step::CopyIn { .. } => "copy_in",
            Step::Exec { .. } => "exec",
            Step::CopyOut { .. } => "copy_out",
        }
    }
}

/// One line the guest writes on [`RESULTS_PORT`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The agent started.
    Start {
        /// Scenario name from the plan.
        scenario: String,
        /// Seconds since the kernel started (/proc/uptime) when /init began.
        uptime_s: f64,
        /// Milliseconds spent loading modules and waiting for the devices.
        setup_ms: u64,
    },
    /// A step finished.
    Step {
        /// Index in the plan.
        index: usize,
        /// [`Step::op`].
        op: String,
        /// Whether it succeeded.
        ok: bool,
        /// Duration in milliseconds.
        ms: u64,
        /// What happened (the error when `ok` is false).
        detail: String,
    },
    /// The command of an [`Step::Exec`] ended.
    Exit {
        /// Its exit status: the code, 128 + the signal number when a signal ended it, 127
        /// when the program was not found and 126 when it could not be run.
        status: i32,
        /// Milliseconds from its start to its end (guest clock).
        ms: u64,
        /// How it ended, in words.
        detail: String,
    },
    /// The agent is done and powers off.
    Done {
        /// Whether every step succeeded.
        ok: bool,
        /// Seconds since the kernel started.
        uptime_s: f64,
    },
    /// The agent could not run the plan at all.
    Fatal {
        /// What went wrong.
        error: String,
    },
}

/// Deterministic content: `size` bytes from a SplitMix64 stream started at `seed`.
///
/// Seed 0 is not special; every (seed, size) gives one fixed byte string.
pub fn content(seed: u64, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    let _ = content_chunks::<()>(seed, size, &mut |c| {
        out.extend_from_slice(c);
        Ok(())
    });
    out
}

/// SHA-256 (lower-case hex) of [`content`]`(seed, size)` without holding it in memory.
pub fn content_sha256(seed: u64, size: u64) -> String {
    let mut hasher = Sha256::new();
    let _ = content_chunks::<()>(seed, size, &mut |c| {
        hasher.update(c);
        Ok(())
    });
    hex::encode(hasher.finalize())
}

/// Hands [`content`]`(seed, size)` to `sink` in chunks of at most 256 KiB, in order; stops at
/// the first error `sink` returns.
pub fn content_chunks<E>(
    seed: u64,
    size: u64,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut gen = ContentStream::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        gen.fill(&mut buf[..n]);
        sink(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// SHA-256 (lower-case hex) of a byte string.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A SplitMix64 byte stream: the generator behind [`content`].
#[derive(Debug, Clone)]
pub struct ContentStream {
    state: u64,
    pending: [u8; 8],
    used: usize,
}

impl ContentStream {
    /// A stream starting at `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            pending: [0; 8],
            used: 8,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fill `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && self.used < 8 {
            buf[i] = self.pending[self.used];
            self.used += 1;
            i += 1;
        }
        let mut chunks = buf[i..].chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            self.pending = self.next_u64().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&self.pending[..n]);
            self.used = n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_deterministic_and_seed_dependent() {
        assert_eq!(content(7, 4097), content(7, 4097));
        assert_ne!(content(7, 64), content(8, 64));
        assert_eq!(content(7, 0), Vec::<u8>::new());
    }

    #[test]
    fn content_prefixes_agree_across_chunk_boundaries() {
        let long = content(3, 200_000);
        let short = content(3, 4095);
        assert_eq!(&long[..4095], &short[..]);
        let mut s = ContentStream::new(3);
        let mut a = vec![0u8; 3];
        let mut b = vec![0u8; 70_000];
        s.fill(&mut a);
        s.fill(&mut b);
        assert_eq!(&long[..3], &a[..]);
        assert_eq!(&long[3..70_003], &b[..]);
    }

    #[test]
    fn streamed_hash_matches_buffered_hash() {
        for size in [0u64, 1, 4095, 4096, 4097, 150_001] {
            assert_eq!(content_sha256(11, size), sha256_hex(&content(11, size)));
        }
    }

    #[test]
    fn plan_round_trips_through_json() {
        let plan = Plan {
            scenario: "x".into(),
            modules: vec!["virtio_ring.ko".into()],
            devices: vec!["vda".into()],
            steps: vec![
                Step::Mkfs {
                    dev: "/dev/vda".into(),
                    args: vec![],
                },
                Step::Verify {
                    dir: "/mnt".into(),
                    entries: vec![Entry::Symlink {
                        path: "l".into(),
                        target: "t".into(),
                    }],
                    exact: true,
                    ignore: vec![],
                },
                Step::Exec {
                    argv: vec!["true".into()],
                    env: vec![],
                    console: false,
                },
                Step::DiskSize {
                    name: "vda".into(),
                    bytes: 32 << 20,
                },
            ],
            data_port: true,
        };
        let text = serde_json::to_string(&plan).unwrap();
        assert!(text.contains("\"op\":\"mkfs\""));
        assert!(text.contains("\"op\":\"disk_size\",\"name\":\"vda\",\"bytes\":33554432"));
        assert_eq!(serde_json::from_str::<Plan>(&text).unwrap(), plan);
        let old = r#"{"scenario":"s","modules":[],"devices":[],"steps":[]}"#;
        assert!(!serde_json::from_str::<Plan>(old).unwrap().data_port);
    }
}
