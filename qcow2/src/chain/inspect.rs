//! Inspection: the top image's format, header, geometry and allocation, and the layers of the
//! chain.

use std::path::PathBuf;

use super::error::Result;
use super::state::{lock, Chain};
use crate::format::Format;
use crate::header::Header;
use crate::table::ClusterCounts;

/// Inspection results, from [`Chain::info`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// The top image's format.
    pub format: Format,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// qcow2: cluster size.
    pub cluster_size: Option<u64>,
    /// qcow2: version (2 or 3).
    pub version: Option<u32>,
    /// qcow2: compression type of compressed clusters.
    pub compression: Option<&'static str>,
    /// qcow2: data clusters allocated in the top image (standard and compressed).
    pub allocated_clusters: Option<u64>,
    /// Bytes allocated in the top image (allocated clusters times the cluster size; a raw
    /// image: its length).
    pub allocated_bytes: u64,
    /// The layers, top first.
    pub chain: Vec<LayerInfo>,
}

/// One layer, from [`Chain::info`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// Its file.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Its virtual size.
    pub virtual_size: u64,
}

impl Chain {
    /// Format, size, allocation and the backing chain.
    pub fn info(&self) -> Result<Info> {
        let mut meta = lock(&self.meta);
        let chain = self
            .files
            .iter()
            .map(|f| LayerInfo {
                path: f.path.clone(),
                format: f.format,
                virtual_size: f.size,
            })
            .collect();
        let st = self.files[0].st.as_ref();
        Ok(match meta.q[0].as_mut() {
            None => Info {
                format: Format::Raw,
                virtual_size: self.size(),
                cluster_size: None,
                version: None,
                compression: None,
                allocated_clusters: None,
                allocated_bytes: self.size(),
                chain,
            },
            Some(q) => {
                let n = q.cluster_counts(st).map_err(self.layer_err(0))?.data();
                Info {
                    format: Format::Qcow2,
                    virtual_size: self.size(),
                    cluster_size: Some(q.geo.cluster_size()),
                    version: Some(q.geo.version),
                    compression: Some(q.header.compression.name()),
                    allocated_clusters: Some(n),
                    allocated_bytes: n * q.geo.cluster_size(),
                    chain,
                }
            }
        })
    }

    /// The top image's header as it was read (a read-write open has cleared unknown
    /// autoclear bits in it); `None` for a raw image.
    pub fn header(&self) -> Option<Header> {
        lock(&self.meta).q[0].as_ref().map(|q| q.header.clone())
    }

    /// The host clusters the top image's L2 tables reference, counted as `qemu-img check`
    /// counts them; `None` for a raw image.
    pub fn cluster_counts(&self) -> Result<Option<ClusterCounts>> {
        let mut meta = lock(&self.meta);
        let st = self.files[0].st.as_ref();
        match meta.q[0].as_mut() {
            None => Ok(None),
            Some(q) => Ok(Some(q.cluster_counts(st).map_err(self.layer_err(0))?)),
        }
    }
}
