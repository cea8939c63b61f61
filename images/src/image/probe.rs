//! Probing: the format of a file whose format is not named, and the rule that decides when
//! a qcow2 header found that way is trusted (see [`Probing`]).

use std::fs::File;
use std::io;
use std::path::Path;

use vloop_qcow2::format::PROBE_BYTES;
use vloop_qcow2::{Format, ProbeError};

use super::error::{ImageError, UnnamedBacking};
use crate::input::{read_full_at, FileSource};

/// The name ending that makes a probed qcow2 header trusted.
pub const QCOW2_EXTENSION: &str = "qcow2";

/// How much a probe is trusted when no format is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probing {
    /// Whatever the content looks like is the format (inspecting only).
    Content,
    /// A qcow2 header counts only in a file named `*.qcow2`, for the image and for backing
    /// files that the image names without a format; other files that look like qcow2 are
    /// refused. `option` is the command-line option that names the image's format, for the
    /// error message.
    Guarded {
        /// E.g. `--source-format`.
        option: &'static str,
    },
}

/// Serialises a [`Format`] as its name (`raw`, `qcow2`), for summaries.
pub fn serialize_format<S: serde::Serializer>(f: &Format, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(f.name())
}

/// Whether `path`'s name ends in `.qcow2` (any case).
pub fn has_qcow2_name(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(QCOW2_EXTENSION))
}

/// What probing the first sector of a file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probed {
    /// Raw or qcow2.
    Format(Format),
    /// Another image format (named), which vloop does not read.
    Foreign(&'static str),
}

/// Probes the first sector of `file` (named `path` in errors).
pub fn probe_file(file: &File, path: &Path) -> Result<Probed, ImageError> {
    let mut first = [0u8; PROBE_BYTES];
    let n = read_full_at(
        &FileSource::regular(file.try_clone().map_err(|source| ImageError::ProbeRead {
            path: path.to_path_buf(),
            source,
        })?),
        &mut first,
        0,
    )
    .map_err(|(_, source)| ImageError::ProbeRead {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(match vloop_qcow2::probe(&first[..n]) {
        Ok(f) => Probed::Format(f),
        Err(ProbeError::Foreign(name)) => Probed::Foreign(name),
    })
}

/// Opens backing files read-only, applying `probing`'s rule to those opened without a
/// format.
pub(super) fn open_backing(
    path: &Path,
    format: Option<Format>,
    probing: Probing,
) -> io::Result<File> {
    let file = vloop_qcow2::open_image(path, false, 0)?;
    if format.is_none() && matches!(probing, Probing::Guarded { .. }) && !has_qcow2_name(path) {
        let probed = probe_file(&file, path).map_err(io::Error::other)?;
        if probed == Probed::Format(Format::Qcow2) {
            return Err(io::Error::other(UnnamedBacking));
        }
    }
    Ok(file)
}
