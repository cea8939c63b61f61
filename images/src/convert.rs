//! `vloop-image convert SRC DST`: an image's virtual disk written as a raw or qcow2 image.
//!
//! The source is opened as a [`Disk`] ([`crate::image`]): raw, or qcow2 read through its
//! whole backing chain, so a chain is flattened into one image without a backing file. The
//! walk is [`crate::copy`]'s: 1 MiB chunks, the holes of the source (unallocated and zero
//! clusters, holes of sparse files) never read, the SHA-256 of the virtual disk computed on
//! the way, the progress bar advanced, the [`Cancel`] flag honoured between chunks. Only the
//! non-zero 4 KiB blocks are written, so the output keeps the holes: a raw output stays
//! sparse, a qcow2 output allocates only the clusters that hold data.
//!
//! The output goes through [`crate::output`] (temporary file, renamed into place when
//! complete, `force` rules), so a failed or interrupted conversion leaves nothing. `verify`
//! drops the source's and the output's files from the page cache and reads both virtual
//! disks again, comparing their hashes. A qcow2 output's virtual size is the source's rounded
//! up to a whole sector (what qcow2 can hold); the added bytes read as zeroes and the hashes
//! cover the source's size.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde::Serialize;
use thiserror::Error;
use tracing::debug;
use vloop_qcow2::{Backing, Chain, OpenOptions};

use crate::copy::{nonzero_runs, ZERO_BLOCK};
use crate::create::DEFAULT_CLUSTER_SIZE;
use crate::image::{self, has_qcow2_name, Disk, Format, ImageError, Probing};
use crate::input::{allocated_bytes, Cancel, ReadFailure};
use crate::output::{Output, OutputError, OutputFile};
use crate::size::{transfer, Size};
use crate::verify::{read_back, walk_hashed, ReadBack, Verdict, WalkFailure};

/// Errors from converting an image.
#[derive(Debug, Error)]
pub enum ConvertError {
    /// The source cannot be opened as a disk.
    #[error(transparent)]
    Source(#[from] ImageError),
    /// The output is the source or one of its backing files.
    #[error(
        "{0} is the source or a file of its backing chain: write the conversion to another file"
    )]
    SameFile(PathBuf),
    /// A qcow2-only option for a raw output.
    #[error("--cluster-size needs a qcow2 output (--format qcow2, or a DST named *.qcow2)")]
    RawClusterSize,
    /// Reading the source failed at an offset of its virtual disk.
    #[error("read error in {path} at byte {offset} (sector {}); the conversion was discarded", offset / 512)]
    Read {
        /// The source.
        path: PathBuf,
        /// First byte of the failed read.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The source ended before its size.
    #[error("{path} ended at byte {offset}, before its size of {size} bytes; the conversion was discarded")]
    Short {
        /// The source.
        path: PathBuf,
        /// Where it ended.
        offset: u64,
        /// Its size.
        size: u64,
    },
    /// Writing the raw output failed.
    #[error("write error in {path} at byte {offset}; the conversion was discarded")]
    Write {
        /// The output.
        path: PathBuf,
        /// First byte of the failed write.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Laying out the qcow2 output failed.
    #[error("cannot create the qcow2 image {path}")]
    Create {
        /// The output.
        path: PathBuf,
        /// Why.
        #[source]
        source: vloop_qcow2::CreateError,
    },
    /// Writing the qcow2 output failed.
    #[error("writing {path} failed; the conversion was discarded")]
    Qcow2 {
        /// The output.
        path: PathBuf,
        /// Why.
        #[source]
        source: vloop_qcow2::Error,
    },
    /// Reading the output back for verification failed.
    #[error("reading {path} back failed; the conversion was discarded")]
    ReadBack {
        /// The output.
        path: PathBuf,
        /// Why.
        #[source]
        source: ImageError,
    },
    /// The output read back differs from the source.
    #[error(
        "verification failed: {src} has SHA-256 {src_sha} but the output read back as \
         {dst_sha}; the conversion was discarded"
    )]
    Mismatch {
        /// The source.
        src: PathBuf,
        /// The source's hash when read again.
        src_sha: String,
        /// The output's hash when read back.
        dst_sha: String,
    },
    /// The source changed while it was converted.
    #[error("{src} changed while it was converted (SHA-256 {first} then {second}); the conversion was discarded")]
    SourceChanged {
        /// The source.
        src: PathBuf,
        /// The hash while converting.
        first: String,
        /// The hash when read again.
        second: String,
    },
    /// Stopped by the [`ConvertOptions::cancel`] flag (Ctrl-C).
    #[error("interrupted; the conversion was discarded")]
    Interrupted,
    /// Preparing or committing the output file failed.
    #[error(transparent)]
    Output(#[from] OutputError),
}

impl ReadFailure for ConvertError {
    fn read(path: &Path, offset: u64, source: io::Error) -> Self {
        ConvertError::Read {
            path: path.to_path_buf(),
            offset,
            source,
        }
    }

    fn short(path: &Path, offset: u64, size: u64) -> Self {
        ConvertError::Short {
            path: path.to_path_buf(),
            offset,
            size,
        }
    }
}

impl WalkFailure for ConvertError {
    fn interrupted() -> Self {
        ConvertError::Interrupted
    }
}

/// Options for [`convert`].
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The output's format; `None`: qcow2 when DST is named `*.qcow2`, else raw.
    pub format: Option<Format>,
    /// The source's format; `None` probes it (a qcow2 header counts only in a `*.qcow2`
    /// file, see [`crate::image`]).
    pub source_format: Option<Format>,
    /// qcow2 output: the cluster size (default 64 KiB).
    pub cluster_size: Option<Size>,
    /// Read the source and the output back afterwards and compare their hashes.
    pub verify: bool,
    /// Replace an existing output file.
    pub force: bool,
    /// Advanced by the bytes of virtual disk processed; hidden by default.
    pub progress: ProgressBar,
    /// Stops the conversion at the next chunk when raised ([`ConvertError::Interrupted`]).
    pub cancel: Cancel,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            format: None,
            source_format: None,
            cluster_size: None,
            verify: false,
            force: false,
            progress: ProgressBar::hidden(),
            cancel: Cancel::new(),
        }
    }
}

/// What [`convert`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertSummary {
    /// The source.
    pub src: PathBuf,
    /// The output.
    pub dst: PathBuf,
    /// The source's format.
    #[serde(serialize_with = "image::serialize_format")]
    pub source_format: Format,
    /// Files in the source's chain (1: no backing file).
    pub source_layers: usize,
    /// The output's format.
    #[serde(serialize_with = "image::serialize_format")]
    pub format: Format,
    /// qcow2 output: its cluster size.
    pub cluster_size: Option<u64>,
    /// Bytes of virtual disk converted (the source's virtual size).
    pub bytes: u64,
    /// The output's virtual size, when it had to be rounded up to a whole sector.
    pub rounded_to: Option<u64>,
    /// Bytes written; the rest are holes.
    pub data_bytes: u64,
    /// Bytes left as holes (never allocated in the output).
    pub holes_bytes: u64,
    /// SHA-256 of the virtual disk, lower-case hex.
    pub sha256: String,
    /// True when source and output were read back and their hashes matched.
    pub verified: bool,
    /// Bytes the output occupies on disk (`st_blocks * 512`).
    pub allocated: u64,
    /// Wall time taken.
    #[serde(serialize_with = "ser_secs")]
    pub elapsed: Duration,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Where the converted disk goes.
enum Target<'a> {
    Raw(&'a File),
    Qcow2(Chain),
}

impl Target<'_> {
    /// Writes `data` (not all zero) at virtual byte `off`.
    fn write(&self, data: &[u8], off: u64, path: &Path) -> Result<(), ConvertError> {
        match self {
            Target::Raw(f) => f
                .write_all_at(data, off)
                .map_err(|source| ConvertError::Write {
                    path: path.to_path_buf(),
                    offset: off,
                    source,
                }),
            Target::Qcow2(c) => c.write_at(data, off).map_err(|source| ConvertError::Qcow2 {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Completes the output: a raw file gets its length, a qcow2 image its metadata
    /// flushed, its unused reserved clusters returned and its file trimmed.
    fn finish(self, len: u64, path: &Path) -> Result<(), ConvertError> {
        match self {
            Target::Raw(f) => f.set_len(len).map_err(|source| ConvertError::Write {
                path: path.to_path_buf(),
                offset: len,
                source,
            }),
            Target::Qcow2(c) => c.close().map_err(|source| ConvertError::Qcow2 {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// Converts the image `src` into a new image `dst`.
pub fn convert(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertSummary, ConvertError> {
    let start = Instant::now();
    let format = opts.format.unwrap_or(if has_qcow2_name(dst) {
        Format::Qcow2
    } else {
        Format::Raw
    });
    if format == Format::Raw && opts.cluster_size.is_some() {
        return Err(ConvertError::RawClusterSize);
    }
    let disk = image::open(
        src,
        opts.source_format,
        Probing::Guarded {
            option: "--source-format",
        },
    )?;
    let same = disk.contains_file(dst).map_err(|source| OutputError::Io {
        path: dst.to_path_buf(),
        source,
    })?;
    if same {
        return Err(ConvertError::SameFile(dst.to_path_buf()));
    }
    let source_layers = disk.fds().len();
    let len = disk.size();
    let out = OutputFile::create(&Output {
        path: dst,
        force: opts.force,
        unfinished: None,
    })?;
    let (target, out_size, cluster_size) = match format {
        Format::Raw => (Target::Raw(out.file()), len, None),
        Format::Qcow2 => {
            let cs = opts.cluster_size.map_or(DEFAULT_CLUSTER_SIZE, Size::bytes);
            let out_size = Size(len).round_up_to_sector().bytes();
            let mut q = vloop_qcow2::CreateOptions::new(out_size);
            q.cluster_size = cs;
            vloop_qcow2::create(out.file(), &q).map_err(|source| ConvertError::Create {
                path: dst.to_path_buf(),
                source,
            })?;
            (Target::Qcow2(open_output(&out, dst)?), out_size, Some(cs))
        }
    };
    opts.progress.set_length(len);
    opts.progress.set_message("converting");
    let mut written = 0u64;
    let sha = walk_hashed::<ConvertError>(
        &disk,
        src,
        len,
        &opts.progress,
        &opts.cancel,
        |off, chunk| {
            for (s, e) in nonzero_runs(chunk, ZERO_BLOCK) {
                target.write(&chunk[s..e], off + s as u64, dst)?;
                written += (e - s) as u64;
            }
            Ok(())
        },
    )?;
    target.finish(out_size, dst)?;
    let sha256 = hex::encode(sha);
    out.file()
        .sync_all()
        .map_err(|source| ConvertError::Write {
            path: dst.to_path_buf(),
            offset: out_size,
            source,
        })?;
    if opts.verify {
        verify(&disk, &out, format, dst, &sha256, opts)?;
    }
    let file = out.commit()?;
    opts.progress.finish_and_clear();
    let allocated = file.metadata().map(|m| allocated_bytes(&m)).unwrap_or(0);
    debug!(allocated, "conversion committed");
    Ok(ConvertSummary {
        src: src.to_path_buf(),
        dst: dst.to_path_buf(),
        source_format: disk.format(),
        source_layers,
        format,
        cluster_size,
        bytes: len,
        rounded_to: (out_size != len).then_some(out_size),
        data_bytes: written,
        holes_bytes: len - written,
        sha256,
        verified: opts.verify,
        allocated,
        elapsed: start.elapsed(),
    })
}

/// The fresh qcow2 image in `out`, opened for writing (no backing file).
fn open_output(out: &OutputFile, dst: &Path) -> Result<Chain, ConvertError> {
    let file = out
        .file()
        .try_clone()
        .map_err(|source| ConvertError::Write {
            path: dst.to_path_buf(),
            offset: 0,
            source,
        })?;
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        backing: Backing::None,
        ..OpenOptions::default()
    };
    let mut no_backing = |_: &Path, _: Option<Format>| -> io::Result<File> {
        Err(io::Error::other("the output has no backing file"))
    };
    Chain::open(file, out.temp_path(), &opts, &mut no_backing).map_err(|source| {
        ConvertError::Qcow2 {
            path: dst.to_path_buf(),
            source,
        }
    })
}

/// Reads the output and the source back from the device and compares them with `sha256`.
fn verify(
    disk: &Disk,
    out: &OutputFile,
    format: Format,
    dst: &Path,
    sha256: &str,
    opts: &ConvertOptions,
) -> Result<(), ConvertError> {
    let back = image::open(out.temp_path(), Some(format), Probing::Content).map_err(|source| {
        ConvertError::ReadBack {
            path: dst.to_path_buf(),
            source,
        }
    })?;
    let verdict = read_back::<ConvertError>(
        &ReadBack {
            source: &back,
            name: dst,
            fds: vec![out.file().as_raw_fd()],
            message: "verifying output",
        },
        &ReadBack {
            source: disk,
            name: disk.path(),
            fds: disk.fds(),
            message: "verifying source",
        },
        disk.size(),
        sha256,
        &opts.progress,
        &opts.cancel,
    )?;
    match verdict {
        Verdict::Same => Ok(()),
        Verdict::SourceChanged { second } => Err(ConvertError::SourceChanged {
            src: disk.path().to_path_buf(),
            first: sha256.to_owned(),
            second,
        }),
        Verdict::Mismatch { src_sha, dst_sha } => Err(ConvertError::Mismatch {
            src: disk.path().to_path_buf(),
            src_sha,
            dst_sha,
        }),
    }
}

/// A short line for humans: `converted 10 GiB (… bytes, 9 GiB in holes) in 1.20 s, 8 GiB/s`.
pub fn describe(s: &ConvertSummary) -> String {
    transfer("converted", s.bytes, s.holes_bytes, s.elapsed)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::input::sparse_file;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| ((i % 251) as u8 ^ seed) | 1).collect()
    }

    /// Converts `src` to `dst` with verification; it must succeed.
    fn convert_verified(src: &Path, dst: &Path) -> ConvertSummary {
        let opts = ConvertOptions {
            verify: true,
            ..Default::default()
        };
        convert(src, dst, &opts).unwrap()
    }

    #[test]
    fn raw_to_qcow2_to_raw_round_trips_and_keeps_holes() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src.raw");
        let a = pattern(3 << 20, 1);
        let b = pattern(5000, 2);
        sparse_file(&src, 40 << 20, &[(1 << 20, &a), ((30 << 20) + 123, &b)]);
        let want = hex::encode(Sha256::digest(fs::read(&src).unwrap()));
        let q = d.path().join("out.qcow2");
        let s = convert_verified(&src, &q);
        assert_eq!((s.format, s.source_format), (Format::Qcow2, Format::Raw));
        assert_eq!(s.sha256, want);
        assert!(s.verified);
        assert_eq!(s.data_bytes, (3 << 20) + 8192);
        let disk = image::open(&q, None, Probing::Content).unwrap();
        let info = disk.chain().unwrap().info().unwrap();
        // 48 clusters of data, one more for the 5000 bytes that straddle a block boundary
        // but not a cluster boundary.
        assert_eq!(info.allocated_clusters, Some(49));
        let r = d.path().join("back.raw");
        let s2 = convert(&q, &r, &ConvertOptions::default()).unwrap();
        assert_eq!(s2.sha256, want);
        assert_eq!(fs::read(&r).unwrap(), fs::read(&src).unwrap());
        let m = fs::metadata(&r).unwrap();
        assert!(allocated_bytes(&m) <= (4 << 20), "{}", allocated_bytes(&m));
    }

    #[test]
    fn odd_sized_source_and_refusals() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("odd.raw");
        fs::write(&src, pattern(1000, 3)).unwrap();
        let q = d.path().join("odd.qcow2");
        let s = convert_verified(&src, &q);
        assert_eq!(s.rounded_to, Some(1024));
        let back = d.path().join("odd.back");
        convert(&q, &back, &ConvertOptions::default()).unwrap();
        let mut want = pattern(1000, 3);
        want.resize(1024, 0);
        assert_eq!(fs::read(&back).unwrap(), want);

        let err = convert(&src, &q, &ConvertOptions::default()).unwrap_err();
        assert!(
            matches!(err, ConvertError::Output(OutputError::Exists(_))),
            "{err}"
        );
        let err = convert(
            &q,
            &q,
            &ConvertOptions {
                force: true,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, ConvertError::SameFile(_)), "{err}");
        let err = convert(
            &src,
            &d.path().join("x.raw"),
            &ConvertOptions {
                cluster_size: Some(Size(4096)),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, ConvertError::RawClusterSize), "{err}");
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            3,
            "nothing else left"
        );
    }

    #[test]
    fn cancelled_conversion_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src.raw");
        fs::write(&src, pattern(3 << 20, 4)).unwrap();
        let cancel = Cancel::new();
        cancel.cancel();
        let err = convert(
            &src,
            &d.path().join("o.qcow2"),
            &ConvertOptions {
                cancel,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, ConvertError::Interrupted), "{err}");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
