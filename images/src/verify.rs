//! Hashing walks and read-back verification, shared by `copy` and `convert`.
//!
//! [`walk_hashed`] is [`walk_data`] with every byte hashed (holes as zeros) while the data
//! chunks are handed on; [`read_back`] drops a written image and its source from the page
//! cache, reads both again and compares their hashes with the one taken while writing, so a
//! write the disk lost, or a source that changed meanwhile, is found.

use std::os::fd::RawFd;
use std::path::Path;

use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

use crate::input::{drop_cache, walk_data, Cancel, ReadFailure, Source};

/// How the caller of [`walk_hashed`] reports an interruption in its own error type (its read
/// failures are [`ReadFailure`]s).
pub trait WalkFailure: ReadFailure {
    /// The walk stopped because its [`Cancel`] flag was raised.
    fn interrupted() -> Self;
}

/// [`walk_data`] with every byte hashed (holes as zeros), `data` called for data chunks;
/// stops with `E::interrupted()` once `cancel` is raised. Returns the SHA-256.
pub fn walk_hashed<E: WalkFailure>(
    src: &dyn Source,
    name: &Path,
    len: u64,
    progress: &ProgressBar,
    cancel: &Cancel,
    mut data: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<[u8; 32], E> {
    let mut hasher = Sha256::new();
    walk_data(src, name, len, progress, |off, bytes, hole| {
        if cancel.is_cancelled() {
            return Err(E::interrupted());
        }
        hasher.update(bytes);
        if !hole {
            data(off, bytes)?;
        }
        Ok(true)
    })?;
    Ok(hasher.finalize().into())
}

/// Hashes `src`'s first `len` bytes (named `name` in errors); lower-case hex.
pub fn hash<E: WalkFailure>(
    src: &dyn Source,
    name: &Path,
    len: u64,
    progress: &ProgressBar,
    cancel: &Cancel,
) -> Result<String, E> {
    walk_hashed(src, name, len, progress, cancel, |_, _| Ok(())).map(hex::encode)
}

/// One side of a read-back: what to read, its name in errors, the files to drop from the
/// page cache first, and the progress message while it is read.
pub struct ReadBack<'a> {
    /// The bytes to read.
    pub source: &'a dyn Source,
    /// Its name in errors.
    pub name: &'a Path,
    /// Its files' descriptors.
    pub fds: Vec<RawFd>,
    /// The progress bar's message while it is read.
    pub message: &'static str,
}

/// What [`read_back`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Both read back with the hash taken while writing.
    Same,
    /// The source now hashes to `second`: it changed while it was read.
    SourceChanged {
        /// The source's hash read again.
        second: String,
    },
    /// The source still has its hash but the output read back differs.
    Mismatch {
        /// The source's hash read again.
        src_sha: String,
        /// The output's hash read back.
        dst_sha: String,
    },
}

/// Reads `len` bytes of the output `dst` and then of its source `src` back from the disk,
/// each dropped from the page cache first, and compares both hashes with `sha256`, the one
/// taken while writing.
pub fn read_back<E: WalkFailure>(
    dst: &ReadBack<'_>,
    src: &ReadBack<'_>,
    len: u64,
    sha256: &str,
    progress: &ProgressBar,
    cancel: &Cancel,
) -> Result<Verdict, E> {
    let read = |side: &ReadBack<'_>| {
        progress.reset();
        progress.set_message(side.message);
        for &fd in &side.fds {
            drop_cache(fd);
        }
        hash::<E>(side.source, side.name, len, progress, cancel)
    };
    let dst_sha = read(dst)?;
    let src_sha = read(src)?;
    Ok(if src_sha != sha256 {
        Verdict::SourceChanged { second: src_sha }
    } else if dst_sha != sha256 {
        Verdict::Mismatch { src_sha, dst_sha }
    } else {
        Verdict::Same
    })
}
