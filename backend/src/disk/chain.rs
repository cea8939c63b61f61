//! The qcow2 side of opening an image: its backing chain, each backing file opened read-only
//! under the shared lock, and the descriptors data I/O goes through.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use vloop_qcow2::{Backing, Chain, Format};

use super::format::{decide_format, read_first};
use super::DiskError;
use crate::config::{BackingChoice, Config, ImageFormat, Locking};
use crate::lock::{lock_image, LockMode};

/// A qcow2 chain and the descriptors its data goes through.
pub struct Qcow2Files {
    /// The chain (metadata, mappings, slow paths).
    pub chain: Arc<Chain>,
    /// Per layer, top first: the descriptor data I/O uses (O_DIRECT with `--direct`).
    pub data_fds: Vec<RawFd>,
    /// Per layer: a buffered descriptor for buffers O_DIRECT refuses.
    pub buffered_fds: Vec<RawFd>,
    /// The O_DIRECT descriptors behind `data_fds`, kept open.
    _direct: Vec<File>,
}

impl std::fmt::Debug for Qcow2Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Files")
            .field("layers", &self.data_fds.len())
            .finish()
    }
}

/// Open the qcow2 chain of the top image at `path` (already open and locked by the caller):
/// backing files are opened read-only with the shared lock, their format decided as
/// `--format auto` decides when the naming image does not record it; with `--direct`, each
/// layer also gets an O_DIRECT descriptor for data.
pub(super) fn open_chain(config: &Config, path: &Path) -> Result<Qcow2Files, DiskError> {
    let qcow_err = |source| DiskError::Qcow2 {
        path: path.to_path_buf(),
        source,
    };
    // Metadata goes through a buffered descriptor of its own (the top image's may be
    // O_DIRECT); the locks are those of the top image's descriptor.
    let top =
        vloop_qcow2::open_image(path, !config.read_only, 0).map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            hint: "",
            source,
        })?;
    super::no_atime(&top);
    let mut paths = vec![path.to_path_buf()];
    let locking = config.locking;
    let mut opener = |p: &Path, fmt: Option<Format>| -> io::Result<File> {
        let f = vloop_qcow2::open_image(p, false, 0)?;
        super::no_atime(&f);
        if locking == Locking::On {
            match lock_image(&f, LockMode::ReadOnly) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(io::Error::other(
                        "its file system does not support OFD locks (--locking off)",
                    ))
                }
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        if fmt.is_none() {
            let first = read_first(&f)?;
            decide_format(p, &first).map_err(|why| {
                io::Error::other(format!(
                    "its format is not recorded and {why}: record it with `qemu-img rebase -u -F FORMAT -b BACKING IMAGE`"
                ))
            })?;
        }
        paths.push(p.to_path_buf());
        Ok(f)
    };
    let backing = match &config.backing {
        BackingChoice::FromImage => Backing::FromImage,
        BackingChoice::None => Backing::None,
        BackingChoice::Path(p, f) => Backing::Path(
            p.clone(),
            match f {
                Some(ImageFormat::Raw) => Some(Format::Raw),
                Some(ImageFormat::Qcow2) => Some(Format::Qcow2),
                _ => None,
            },
        ),
    };
    let opts = vloop_qcow2::OpenOptions {
        format: Some(Format::Qcow2),
        read_only: config.read_only,
        backing,
        // `--discard ignore` keeps the file's blocks, as QEMU's discard=ignore does.
        punch_freed: config.discard == crate::config::DiscardMode::Unmap,
        ..vloop_qcow2::OpenOptions::default()
    };
    let chain = Chain::open(top, path, &opts, &mut opener).map_err(qcow_err)?;
    // Metadata goes through the page cache; with clusters smaller than a page an L2 table or
    // a refcount block shares a page with data the guest writes with O_DIRECT, and a
    // write-back of that page can put old data over a completed direct write.
    match chain.cluster_size() {
        Some(cs) if config.direct && !config.read_only && cs < 4096 => {
            return Err(DiskError::DirectSmallClusters {
                path: path.to_path_buf(),
                cluster_size: cs,
            });
        }
        _ => {}
    }
    let buffered_fds = chain.fds();
    let mut direct = Vec::new();
    let data_fds = if config.direct {
        for (i, p) in paths.iter().enumerate() {
            let f = vloop_qcow2::open_image(p, i == 0 && !config.read_only, libc::O_DIRECT)
                .map_err(|source| DiskError::Open {
                    path: p.clone(),
                    hint: ": the file system does not support O_DIRECT (drop --direct)",
                    source,
                })?;
            super::no_atime(&f);
            direct.push(f);
        }
        direct.iter().map(AsRawFd::as_raw_fd).collect()
    } else {
        buffered_fds.clone()
    };
    Ok(Qcow2Files {
        chain: Arc::new(chain),
        data_fds,
        buffered_fds,
        _direct: direct,
    })
}
