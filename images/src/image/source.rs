//! A [`Disk`] read as an input [`Source`]: positioned reads, and the data regions of a qcow2
//! disk found through the chain's mapping, so that walks skip its holes (unallocated and
//! zero clusters, and the holes of the files under allocated clusters) without reading them.

use std::io;

use vloop_qcow2::{Chain, Extent};

use super::disk::{Disk, Inner};
use crate::input::{file_data_region, Source, CHUNK};

/// Where the mapping of a qcow2 disk looks for data: the first window, grown fourfold while
/// only holes are found, up to the largest.
const FIRST_WINDOW: u64 = 4 * CHUNK as u64;
const LARGEST_WINDOW: u64 = 1 << 30;

/// The part of extent `e` (at virtual byte `at`) with data in it, first found: virtual
/// `(start, end)`, or `None` when the extent reads as zeroes without any data read.
fn extent_data(e: &Extent, at: u64) -> io::Result<Option<(u64, u64)>> {
    Ok(match *e {
        Extent::Zero { .. } => None,
        Extent::Slow { len } => Some((at, at + len)),
        Extent::Data { fd, host, len, .. } => {
            file_data_region(fd, host, host + len)?.map(|(s, t)| (at + (s - host), at + (t - host)))
        }
    })
}

/// The data region of a chain's virtual disk containing or following `offset`.
fn chain_data_region(chain: &Chain, offset: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    let mut ext = Vec::new();
    let mut at = offset;
    let mut window = FIRST_WINDOW;
    let mut region: Option<(u64, u64)> = None;
    while at < len {
        let n = (len - at).min(window);
        if chain.map_read(at, n, &mut ext).is_err() {
            // Something in the window cannot be mapped (a corrupt entry): call it data, so
            // that the reads find the failing place and report it precisely.
            return Ok(Some((at, at + n)));
        }
        let mut pos = at;
        for e in &ext {
            let end = pos + e.len();
            let data = extent_data(e, pos)?;
            match (region, data) {
                (None, None) => {}
                (None, Some((s, t))) => {
                    if t < end {
                        return Ok(Some((s, t)));
                    }
                    region = Some((s, t));
                }
                // A region continues only with data from the extent's first byte on.
                (Some((s, _)), Some((ds, t))) if ds == pos => {
                    if t < end {
                        return Ok(Some((s, t)));
                    }
                    region = Some((s, t));
                }
                (Some(r), _) => return Ok(Some(r)),
            }
            pos = end;
        }
        if region.is_some() {
            // Data up to the window's end: the walk asks again from there.
            return Ok(region);
        }
        at += n;
        window = (window * 4).min(LARGEST_WINDOW);
    }
    Ok(region)
}

impl Source for Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match &self.inner {
            Inner::Raw(s) => s.read_at(buf, offset),
            Inner::Qcow2(c) => {
                let n = (self.size.saturating_sub(offset)).min(buf.len() as u64) as usize;
                if n == 0 {
                    return Ok(0);
                }
                c.read_at(&mut buf[..n], offset).map_err(io::Error::other)?;
                Ok(n)
            }
        }
    }

    fn data_region(&self, offset: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
        match &self.inner {
            Inner::Raw(s) => s.data_region(offset, len),
            Inner::Qcow2(c) => chain_data_region(c, offset, len.min(self.size)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::Path;

    use indicatif::ProgressBar;

    use super::*;
    use crate::image::testing::{create_new, qcow2_with, write_overlay};
    use crate::image::{open, Format, Probing};
    use crate::input::walk_data;

    #[derive(Debug)]
    struct Failed;
    impl crate::input::ReadFailure for Failed {
        fn read(_: &Path, _: u64, e: io::Error) -> Self {
            panic!("{e}")
        }
        fn short(_: &Path, o: u64, _: u64) -> Self {
            panic!("short at {o}")
        }
    }

    /// The data chunks a walk reads, and the bytes it yields.
    fn walk(d: &Disk) -> (Vec<(u64, u64)>, Vec<u8>) {
        let mut read = Vec::new();
        let mut all = Vec::new();
        walk_data::<Failed>(
            d,
            d.path(),
            d.size(),
            &ProgressBar::hidden(),
            |off, b, hole| {
                if !hole {
                    read.push((off, b.len() as u64));
                }
                all.extend_from_slice(b);
                Ok(true)
            },
        )
        .unwrap();
        (read, all)
    }

    #[test]
    fn qcow2_walk_reads_only_allocated_clusters() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img.qcow2");
        let size = 300u64 << 20;
        qcow2_with(
            &p,
            size,
            &[(5 << 20, b"five"), ((200 << 20) + 70_000, &[7u8; 100_000])],
        );
        let disk = open(&p, None, Probing::Guarded { option: "--f" }).unwrap();
        assert_eq!(
            (disk.format(), disk.probed(), disk.size()),
            (Format::Qcow2, true, size)
        );
        let (read, all) = walk(&disk);
        assert_eq!(all.len() as u64, size);
        assert_eq!(&all[5 << 20..(5 << 20) + 4], b"five");
        assert!(all[(200 << 20) + 70_000..(200 << 20) + 170_000]
            .iter()
            .all(|&b| b == 7));
        let n: u64 = read.iter().map(|r| r.1).sum();
        // One cluster, and the clusters holding the 100 000 bytes.
        assert!(n <= 4 * 65536, "{read:?}");
        assert!(
            read.iter().any(|r| r.0 <= 5 << 20 && r.0 + r.1 > 5 << 20),
            "{read:?}"
        );
    }

    #[test]
    fn sparse_raw_base_holes_are_not_read_through_an_overlay() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        crate::input::sparse_file(&base, 64 << 20, &[(40 << 20, b"base data")]);
        let top = d.path().join("top.qcow2");
        write_overlay(&create_new(&top), 64 << 20, "base.raw");
        let disk = open(&top, None, Probing::Guarded { option: "--f" }).unwrap();
        assert_eq!(disk.layers().unwrap().len(), 2);
        let (read, all) = walk(&disk);
        assert_eq!(&all[40 << 20..(40 << 20) + 9], b"base data");
        let n: u64 = read.iter().map(|r| r.1).sum();
        assert!(n <= 1 << 20, "{read:?}");
        assert!(disk.contains_file(&base).unwrap());
        assert!(!disk.contains_file(&d.path().join("nothing")).unwrap());
    }
}
