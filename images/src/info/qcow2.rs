//! The qcow2 part of `info`: the top image's header, allocation and backing chain, as the
//! chain it was opened with sees them.

use std::path::PathBuf;

use serde::Serialize;
use vloop_qcow2::header::COMPAT_LAZY_REFCOUNTS;

use super::error::InfoError;
use crate::image::{self, Disk, Format, ImageError};

/// A qcow2 image, described.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Qcow2Info {
    /// 2 (compat 0.10) or 3 (compat 1.1).
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Compression type of compressed clusters: `zlib` or `zstd`.
    pub compression: String,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// The lazy refcounts feature is set.
    pub lazy_refcounts: bool,
    /// Clusters of the virtual disk (the virtual size in clusters, rounded up).
    pub virtual_clusters: u64,
    /// Host clusters this file's L2 tables reference: data, compressed and preallocated zero
    /// clusters (what `qemu-img check` calls allocated).
    pub allocated_clusters: u64,
    /// Those clusters' bytes (a compressed cluster counted whole).
    pub allocated_bytes: u64,
    /// Of the allocated clusters, compressed ones.
    pub compressed_clusters: u64,
    /// Of the allocated clusters, zero clusters that keep a preallocated host cluster.
    pub zero_preallocated_clusters: u64,
    /// The backing file name as stored in the header.
    pub backing_file: Option<String>,
    /// The backing format as stored in the header (`None`: probed when opened).
    pub backing_format: Option<String>,
    /// The files of the chain, this image first; just this image when the chain could not
    /// be opened.
    pub chain: Vec<LayerInfo>,
}

/// One file of a backing chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerInfo {
    /// The file (backing files: resolved from the name the image above stores).
    pub path: PathBuf,
    /// Its format.
    #[serde(serialize_with = "image::serialize_format")]
    pub format: Format,
    /// Its virtual size in bytes.
    pub virtual_size: u64,
}

/// The qcow2 part of the description of `disk`; `None` for a raw disk.
pub(super) fn describe_qcow2(disk: &Disk) -> Result<Option<Qcow2Info>, InfoError> {
    let Some(chain) = disk.chain() else {
        return Ok(None);
    };
    let Some(h) = chain.header() else {
        return Ok(None);
    };
    let counts = chain
        .cluster_counts()
        .map_err(ImageError::from)?
        .unwrap_or_default();
    let cs = h.cluster_size();
    Ok(Some(Qcow2Info {
        version: h.version,
        cluster_size: cs,
        compression: h.compression.name().to_string(),
        refcount_bits: 1 << h.refcount_order,
        lazy_refcounts: h.compatible & COMPAT_LAZY_REFCOUNTS != 0,
        virtual_clusters: h.size.div_ceil(cs),
        allocated_clusters: counts.allocated,
        allocated_bytes: counts.allocated.saturating_mul(cs),
        compressed_clusters: counts.compressed,
        zero_preallocated_clusters: counts.zero_preallocated,
        backing_file: h
            .backing_file
            .as_deref()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        backing_format: h.backing_format.clone(),
        chain: disk
            .layers()?
            .into_iter()
            .map(|l| LayerInfo {
                path: l.path,
                format: l.format,
                virtual_size: l.virtual_size,
            })
            .collect(),
    }))
}
