//! Opening a chain: the top image and each backing file it names, probed or in the format
//! given, checked for loops and depth.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::error::{Error, Result};
use super::options::{Backing, OpenOptions, Opener, MAX_CHAIN};
use super::state::{Chain, LayerFile, Meta};
use crate::format::{self, Format, PROBE_BYTES};
use crate::layer::Qcow2;
use crate::storage::{StickySync, Storage};

/// The path QEMU uses for backing name `name` of the image at `image`: relative names are
/// relative to the directory of the image.
pub fn resolve_backing(image: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(name),
        None => name.to_path_buf(),
    }
}

fn probe_storage(st: &dyn Storage, path: &Path) -> Result<Format> {
    let mut first = [0u8; PROBE_BYTES];
    let n = st.read_at(&mut first, 0).map_err(|source| Error::Io {
        what: "probing",
        path: path.to_path_buf(),
        offset: 0,
        source,
    })?;
    format::probe(&first[..n]).map_err(|source| Error::Probe {
        path: path.to_path_buf(),
        source,
    })
}

impl Chain {
    /// Opens the image `top` (its path `top_path` resolves relative backing names) and its
    /// backing chain, opening each backing file with `opener`.
    pub fn open(
        top: File,
        top_path: &Path,
        opts: &OpenOptions,
        opener: Opener<'_>,
    ) -> Result<Chain> {
        Self::open_storage(Box::new(top), top_path, opts, opener)
    }

    /// [`Chain::open`] over any [`Storage`] for the top image (tests record its writes).
    pub fn open_storage(
        top: Box<dyn Storage>,
        top_path: &Path,
        opts: &OpenOptions,
        opener: Opener<'_>,
    ) -> Result<Chain> {
        let mut files: Vec<LayerFile> = Vec::new();
        let mut metas = Vec::new();
        let mut seen = HashSet::new();
        let mut probed_raw = false;
        let mut next: Option<(Box<dyn Storage>, PathBuf, Option<Format>)> =
            Some((top, top_path.to_path_buf(), opts.format));
        while let Some((st, path, fmt)) = next.take() {
            let depth = files.len();
            if depth >= MAX_CHAIN {
                return Err(Error::TooLong {
                    top: top_path.to_path_buf(),
                });
            }
            let id = st.identity().map_err(|source| Error::Io {
                what: "stat",
                path: path.clone(),
                offset: 0,
                source,
            })?;
            if !seen.insert(id) {
                return Err(Error::Loop { path });
            }
            let format = match fmt {
                Some(f) => f,
                None => {
                    let f = probe_storage(st.as_ref(), &path)?;
                    if depth == 0 && f == Format::Raw {
                        probed_raw = true;
                    }
                    f
                }
            };
            let writable = depth == 0 && !opts.read_only;
            let st: Box<dyn Storage> = if writable {
                Box::new(StickySync::new(st))
            } else {
                st
            };
            let layer_err = |p: &Path| {
                let p = p.to_path_buf();
                move |source| Error::Layer { path: p, source }
            };
            let (size, backing) = match format {
                Format::Raw => {
                    if depth == 0 && matches!(opts.backing, Backing::Path(..)) {
                        return Err(Error::RawBacking);
                    }
                    let len = st.file_size().map_err(|source| Error::Io {
                        what: "size",
                        path: path.clone(),
                        offset: 0,
                        source,
                    })?;
                    metas.push(None);
                    (len, None)
                }
                Format::Qcow2 => {
                    let q =
                        Qcow2::open(st.as_ref(), writable, opts.cache_bytes, opts.reserve_bytes)
                            .map_err(layer_err(&path))?;
                    let size = q.header.size;
                    let named = match q.header.backing_file.as_deref() {
                        None => None,
                        Some(name) => {
                            use std::os::unix::ffi::OsStrExt;
                            let name = Path::new(std::ffi::OsStr::from_bytes(name));
                            let fmt = match q.header.backing_format.as_deref() {
                                None => None,
                                Some(n) => Some(Format::from_name(n).ok_or_else(|| {
                                    Error::BackingFormat {
                                        name: n.to_owned(),
                                        by: path.clone(),
                                    }
                                })?),
                            };
                            Some((resolve_backing(&path, name), fmt))
                        }
                    };
                    let backing = if depth == 0 {
                        match &opts.backing {
                            Backing::FromImage => named,
                            Backing::None => None,
                            Backing::Path(p, f) => Some((p.clone(), *f)),
                        }
                    } else {
                        named
                    };
                    metas.push(Some(q));
                    (size, backing)
                }
            };
            let fd = st.fd();
            files.push(LayerFile {
                st,
                fd,
                path: path.clone(),
                format,
                size,
            });
            if let Some((bpath, bfmt)) = backing {
                if bpath.as_os_str().is_empty() {
                    return Err(Error::BackingName { by: path });
                }
                // Checked before the opener runs too, so that a chain looping back says so
                // rather than what the opener would (that the file is locked, by this very
                // chain's top image); the identity of the opened file above stays the check
                // that counts.
                if std::fs::metadata(&bpath).is_ok_and(|m| seen.contains(&(m.dev(), m.ino()))) {
                    return Err(Error::Loop { path: bpath });
                }
                let f = opener(&bpath, bfmt).map_err(|source| Error::OpenBacking {
                    path: bpath.clone(),
                    by: path.clone(),
                    source,
                })?;
                next = Some((Box::new(f), bpath, bfmt));
            }
        }
        Ok(Chain {
            files,
            meta: Mutex::new(Meta { q: metas, seq: 0 }),
            alloc: Mutex::new(()),
            read_only: opts.read_only,
            probed_raw,
            punch_freed: opts.punch_freed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_resolve_relative_to_the_image() {
        assert_eq!(
            resolve_backing(Path::new("/a/b/top.qcow2"), Path::new("base.raw")),
            PathBuf::from("/a/b/base.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("/a/b/top.qcow2"), Path::new("/c/base.raw")),
            PathBuf::from("/c/base.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("top.qcow2"), Path::new("../base")),
            PathBuf::from("../base")
        );
    }
}
