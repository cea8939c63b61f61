//! Examining an image: its format probed, the disk opened (a qcow2 image alone when its
//! chain cannot be opened), the qcow2 part and the content described, with notes where name
//! and content disagree.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::content::{content_of, Content};
use super::error::InfoError;
use super::qcow2::{describe_qcow2, Qcow2Info};
use crate::image::{self, has_qcow2_name, Format, Probed, Probing};
use crate::input::{allocated_bytes, open_source, KIND_FILE};

/// What `info` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Info {
    /// The file examined.
    pub path: PathBuf,
    /// Its format (`raw` or `qcow2`).
    #[serde(serialize_with = "image::serialize_format")]
    pub format: Format,
    /// The virtual size in bytes: what a guest sees (a raw image: the file's size).
    pub size: u64,
    /// The file's length (a block device: its size).
    pub file_size: u64,
    /// Bytes allocated on disk (`st_blocks * 512`); `None` for a block device.
    pub allocated: Option<u64>,
    /// A qcow2 image's header, allocation and backing chain.
    pub qcow2: Option<Qcow2Info>,
    /// What the virtual disk holds.
    pub content: Content,
    /// Remarks: a name that does not match the content, a backing chain that cannot be
    /// opened.
    pub notes: Vec<String>,
}

/// The error and its causes on one line, `: `-separated (the form of the notes `info`
/// writes).
pub fn error_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        next = cause.source();
    }
    line
}

/// Examines `path`.
pub fn info(path: &Path) -> Result<Info, InfoError> {
    let (source, file_size, kind) = open_source(path)?;
    let allocated = if kind == KIND_FILE {
        source.file().metadata().ok().map(|m| allocated_bytes(&m))
    } else {
        None
    };
    let probed = image::probe_file(source.file(), path)?;
    let mut notes = Vec::new();
    let mut qcow2 = None;
    let mut chain_ok = true;
    let disk = match probed {
        Probed::Format(Format::Qcow2) if kind == KIND_FILE => {
            if !has_qcow2_name(path) {
                notes.push(
                    "the content is a qcow2 image but the name does not end in .qcow2: convert \
                     reads it as qcow2 only with --source-format qcow2, create --backing only \
                     with --backing-format qcow2"
                        .to_string(),
                );
            }
            let disk = match image::open(path, Some(Format::Qcow2), Probing::Content) {
                Ok(d) => d,
                Err(e) => match image::open_without_backing(path) {
                    Ok(d) => {
                        notes.push(format!(
                            "the backing chain cannot be opened ({}); the image is described \
                             alone and its content is not examined",
                            error_line(&e)
                        ));
                        chain_ok = false;
                        d
                    }
                    Err(_) => return Err(e.into()),
                },
            };
            qcow2 = describe_qcow2(&disk)?;
            disk
        }
        other => {
            match other {
                Probed::Format(Format::Qcow2) => notes.push(
                    "the content is a qcow2 image on a block device, which vloop does not \
                     read as qcow2: shown as raw"
                        .to_string(),
                ),
                Probed::Foreign(name) => notes.push(format!(
                    "the content looks like a {name} image, which vloop does not read: shown \
                     as raw"
                )),
                Probed::Format(Format::Raw) if has_qcow2_name(path) => notes.push(
                    "the name ends in .qcow2 but the content is not a qcow2 image: it is raw"
                        .to_string(),
                ),
                Probed::Format(Format::Raw) => {}
            }
            image::open(path, Some(Format::Raw), Probing::Content)?
        }
    };
    drop(source);
    let content = if chain_ok {
        content_of(&disk, path, disk.size())?
    } else {
        Content::Unknown
    };
    Ok(Info {
        path: path.to_path_buf(),
        format: disk.format(),
        size: disk.size(),
        file_size,
        allocated,
        qcow2,
        content,
        notes,
    })
}
