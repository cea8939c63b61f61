//! Creating empty qcow2 images (the `vloop-image create --format qcow2` path).
//!
//! [`create`] lays out a new image as QEMU does: the header in cluster 0, then the refcount
//! table, the refcount blocks counting every metadata cluster, and the L1 table, all zero
//! beyond that. The image is then opened with [`crate::Chain`] like any other.

use std::io;

use thiserror::Error;

use crate::format::Format;
use crate::header::{self, HeaderError, NewHeader};
use crate::storage::Storage;
use crate::table;

/// Errors creating an image.
#[derive(Debug, Error)]
pub enum CreateError {
    /// A cluster size that is not a power of two from 512 B to 2 MiB.
    #[error("cluster size {0} is invalid: it must be a power of two from 512 to 2097152 bytes")]
    ClusterSize(u64),
    /// A version other than 2 or 3.
    #[error("qcow2 version {0} is invalid: use 2 (compat 0.10) or 3 (compat 1.1)")]
    Version(u32),
    /// A size that is not a multiple of 512 or too large.
    #[error(
        "size {0} is invalid: it must be a multiple of 512 and small enough for a 32 MiB L1 table"
    )]
    Size(u64),
    /// The backing name or format does not fit the header cluster.
    #[error("the backing file name does not fit in the header (at most 1023 bytes, and less with small clusters)")]
    Backing(#[source] HeaderError),
    /// Writing the image failed.
    #[error("writing the new image failed")]
    Io(#[source] io::Error),
}

/// Default cluster size (QEMU's).
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;

/// What to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Cluster size in bytes (power of two, 512 B to 2 MiB; default 64 KiB).
    pub cluster_size: u64,
    /// Backing file name as stored in the image (resolved relative to the image's directory
    /// when relative) and its format.
    pub backing: Option<(String, Format)>,
    /// 2 or 3 (default 3).
    pub version: u32,
}

impl CreateOptions {
    /// A version 3 image of `size` bytes with 64 KiB clusters and no backing file.
    pub fn new(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            backing: None,
            version: 3,
        }
    }
}

/// Writes a new, empty qcow2 image into `file` (truncated first) and syncs it.
pub fn create(file: &dyn Storage, opts: &CreateOptions) -> Result<(), CreateError> {
    let cs = opts.cluster_size;
    let cluster_sizes = (1 << header::MIN_CLUSTER_BITS)..=(1 << header::MAX_CLUSTER_BITS);
    if !cs.is_power_of_two() || !cluster_sizes.contains(&cs) {
        return Err(CreateError::ClusterSize(cs));
    }
    if opts.version != 2 && opts.version != 3 {
        return Err(CreateError::Version(opts.version));
    }
    let bits = cs.trailing_zeros();
    let per_l1 = cs * (cs / 8);
    let l1_size = opts.size.div_ceil(per_l1).max(1);
    if !opts.size.is_multiple_of(512)
        || l1_size * 8 > header::MAX_L1_BYTES
        || opts.size > i64::MAX as u64
    {
        return Err(CreateError::Size(opts.size));
    }
    let l1c = (l1_size * 8).div_ceil(cs);
    let rb_entries = cs * 8 / 16;
    let (mut rtc, mut rbc) = (1u64, 1u64);
    for _ in 0..16 {
        let total = 1 + rtc + rbc + l1c;
        let rbc2 = total.div_ceil(rb_entries);
        let rtc2 = (rbc2 * 8).div_ceil(cs);
        if rbc2 == rbc && rtc2 == rtc {
            break;
        }
        rbc = rbc2;
        rtc = rtc2;
    }
    let total = 1 + rtc + rbc + l1c;
    let rt_off = cs;
    let rb_off = (1 + rtc) * cs;
    let l1_off = (1 + rtc + rbc) * cs;
    let backing = opts.backing.as_ref().map(|(n, f)| (n.as_bytes(), f.name()));
    let head = header::encode(&NewHeader {
        version: opts.version,
        cluster_bits: bits,
        size: opts.size,
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: rtc as u32,
        backing,
    })
    .map_err(CreateError::Backing)?;
    let mut reftable = vec![0u8; (rtc * cs) as usize];
    for i in 0..rbc {
        let at = (i * 8) as usize;
        reftable[at..at + 8].copy_from_slice(&(rb_off + i * cs).to_be_bytes());
    }
    let mut blocks = vec![0u8; (rbc * cs) as usize];
    for c in 0..total {
        table::set_refcount(&mut blocks, 4, c as usize, 1);
    }
    file.set_len(0).map_err(CreateError::Io)?;
    file.write_at(&head, 0).map_err(CreateError::Io)?;
    file.write_at(&reftable, rt_off).map_err(CreateError::Io)?;
    file.write_at(&blocks, rb_off).map_err(CreateError::Io)?;
    file.set_len(total * cs).map_err(CreateError::Io)?;
    file.sync().map_err(CreateError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_options() {
        let f = tempfile::tempfile().unwrap();
        let mut o = CreateOptions::new(1 << 20);
        o.cluster_size = 1000;
        assert!(matches!(
            create(&f, &o),
            Err(CreateError::ClusterSize(1000))
        ));
        o.cluster_size = 4 << 20;
        assert!(matches!(create(&f, &o), Err(CreateError::ClusterSize(_))));
        let mut o = CreateOptions::new(1000);
        assert!(matches!(create(&f, &o), Err(CreateError::Size(1000))));
        o.size = 1 << 20;
        o.version = 4;
        assert!(matches!(create(&f, &o), Err(CreateError::Version(4))));
        let mut o = CreateOptions::new(1 << 20);
        o.cluster_size = 512;
        o.backing = Some(("x".repeat(1000), Format::Raw));
        assert!(matches!(create(&f, &o), Err(CreateError::Backing(_))));
    }
}
