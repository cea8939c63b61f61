//! `vloop-image info`: what an image file (or block device) is and what it holds.
//!
//! First the format: the first sector is probed ([`crate::image::probe_file`]; inspecting
//! trusts the content, and says so when a qcow2 image is not named `*.qcow2` or a `*.qcow2`
//! file is not qcow2). A qcow2 image is described from its header and its backing chain,
//! opened read-only ([`crate::image::open`]): version, cluster size, compression type,
//! allocated clusters, the backing file as stored and every layer of the chain. When the
//! chain cannot be opened (a missing backing file), the image alone is described and a note
//! says why.
//!
//! Then the content of the virtual disk (for qcow2: what the guest sees, read through the
//! chain), recognised in this order:
//! - ext2/3/4: the superblock at byte 1024 (magic `0xEF53` at offset 56). ext3 is ext2 with
//!   a journal (`has_journal`); ext4 has any of `extents`, `64bit`, `flex_bg`.
//! - ISO 9660: `CD001` in the volume descriptor at byte 32768, described by
//!   [`crate::iso::probe`] (reading the image zero-filled past its end, so that a truncated
//!   image is still described).
//! - A GUID partition table (protective MBR entry `0xEE`, `EFI PART` at LBA 1) or an MBR
//!   partition table (`0x55AA` at byte 510, sane entries).
//! - All zero: every byte is zero (holes, and unallocated qcow2 clusters, are skipped
//!   without reading, so a sparse image is checked in no time).
//! - Anything else is unknown.
//!
//! The structures are decoded by `decode` (pure: bytes in, description out); this module
//! reads the bytes they need.

mod decode;

use std::fmt::Write as _;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde::Serialize;
use thiserror::Error;
use vloop_qcow2::header::{Header, COMPAT_LAZY_REFCOUNTS};
use vloop_qcow2::table::{Geometry, TableError};

pub use self::decode::{
    count_l2, gpt_table, parse_ext, parse_gpt, parse_mbr, ClusterCounts, ExtInfo, GptInfo,
    GptPartition, MbrInfo, MbrPartition,
};
use crate::image::{self, has_qcow2_name, Disk, Format, ImageError, Probed, Probing};
use crate::input::{
    allocated_bytes, is_zero, open_source, read_full_at, walk_data, InputError, ReadFailure,
    Source, KIND_FILE,
};
use crate::iso::IsoInfo;
use crate::size::Size;

/// Errors from examining an image.
#[derive(Debug, Error)]
pub enum InfoError {
    /// The file cannot be opened, or is not a file or block device.
    #[error(transparent)]
    Open(#[from] InputError),
    /// The image cannot be opened as a disk (an invalid qcow2 image).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The qcow2 header cannot be parsed.
    #[error("{}: invalid qcow2 header", path.display())]
    Header {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: vloop_qcow2::HeaderError,
    },
    /// A qcow2 table entry is invalid.
    #[error("{}: invalid qcow2 table entry", path.display())]
    Table {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: TableError,
    },
    /// A qcow2 table lies past the end of the file.
    #[error("{}: {what} at byte {offset} lies past the end of the file; the image is corrupt", path.display())]
    PastEnd {
        /// The image.
        path: PathBuf,
        /// Which table.
        what: &'static str,
        /// Where it starts.
        offset: u64,
    },
    /// Reading the image failed.
    #[error("read error in {path} at byte {offset}")]
    Read {
        /// The image.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A block device ended before its announced size.
    #[error("{path} ended at byte {offset}, before its size of {size} bytes")]
    Short {
        /// The image.
        path: PathBuf,
        /// Where it ended.
        offset: u64,
        /// The size it announced.
        size: u64,
    },
}

impl ReadFailure for InfoError {
    fn read(path: &Path, offset: u64, source: io::Error) -> Self {
        InfoError::Read {
            path: path.to_path_buf(),
            offset,
            source,
        }
    }

    fn short(path: &Path, offset: u64, size: u64) -> Self {
        InfoError::Short {
            path: path.to_path_buf(),
            offset,
            size,
        }
    }
}

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

/// What an image holds. Serialised with a `"type"` field naming the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Content {
    /// An ext2, ext3 or ext4 file system.
    Ext(ExtInfo),
    /// An ISO 9660 file system.
    Iso9660(IsoInfo),
    /// A GUID partition table.
    Gpt(GptInfo),
    /// An MBR partition table.
    Mbr(MbrInfo),
    /// Every byte is zero.
    Zero,
    /// Nothing recognised.
    Unknown,
}

/// The error and its causes on one line, `: `-separated.
fn error_line(e: &(dyn std::error::Error + 'static)) -> String {
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
            qcow2 = Some(describe_qcow2(&disk, source.file(), path)?);
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
        detect(&Reader {
            source: &disk,
            path,
            size: disk.size(),
        })?
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

/// Reads the L1 table and every L2 table of the qcow2 image `file` and counts the host
/// clusters they reference.
fn count_clusters(
    file: &std::fs::File,
    path: &Path,
    h: &Header,
) -> Result<ClusterCounts, InfoError> {
    let geo = Geometry::of(h);
    let cs = geo.cluster_size();
    let table_err = |source| InfoError::Table {
        path: path.to_path_buf(),
        source,
    };
    let read = |len: u64, at: u64, what: &'static str| {
        let mut buf = vec![0u8; len as usize];
        let n = file
            .read_at(&mut buf, at)
            .map_err(|e| InfoError::read(path, at, e))?;
        if n < buf.len() {
            return Err(InfoError::PastEnd {
                path: path.to_path_buf(),
                what,
                offset: at,
            });
        }
        Ok(buf)
    };
    // The header's L1 size is at most 32 MiB of entries (checked when it was parsed).
    let l1 = read(u64::from(h.l1_size) * 8, h.l1_table_offset, "the L1 table")?;
    let mut counts = ClusterCounts::default();
    for (i, raw) in l1.chunks_exact(8).enumerate() {
        let raw = u64::from_be_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ]);
        let at = geo.l1_offset(i as u64, raw).map_err(table_err)?;
        if at == 0 {
            continue;
        }
        let table = read(cs, at, "an L2 table")?;
        count_l2(&table, &geo, &mut counts).map_err(table_err)?;
    }
    Ok(counts)
}

/// The qcow2 part of [`Info`]: the header of `file` and the chain of `disk`.
fn describe_qcow2(disk: &Disk, file: &std::fs::File, path: &Path) -> Result<Qcow2Info, InfoError> {
    let read = |buf: &mut [u8]| {
        let n = file
            .read_at(buf, 0)
            .map_err(|e| InfoError::read(path, 0, e))?;
        Ok::<_, InfoError>(n)
    };
    let header_err = |source| InfoError::Header {
        path: path.to_path_buf(),
        source,
    };
    let mut first = [0u8; 24];
    let n = read(&mut first)?;
    let bits = Header::peek_cluster_bits(&first[..n]).map_err(header_err)?;
    let mut cluster = vec![0u8; 1 << bits];
    let n = read(&mut cluster)?;
    let h = Header::parse(&cluster[..n]).map_err(header_err)?;
    let counts = count_clusters(file, path, &h)?;
    let cs = h.cluster_size();
    Ok(Qcow2Info {
        version: h.version,
        cluster_size: cs,
        compression: match h.compression {
            vloop_qcow2::Compression::Deflate => "zlib",
            vloop_qcow2::Compression::Zstd => "zstd",
        }
        .to_string(),
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
    })
}

struct Reader<'a> {
    source: &'a dyn Source,
    path: &'a Path,
    size: u64,
}

impl Reader<'_> {
    /// Reads `len` bytes at `offset`, zero-filled past the end.
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, InfoError> {
        let mut buf = vec![0u8; len];
        if offset >= self.size {
            return Ok(buf);
        }
        let want = (self.size - offset).min(len as u64) as usize;
        read_full_at(self.source, &mut buf[..want], offset)
            .map_err(|(at, e)| InfoError::read(self.path, at, e))?;
        Ok(buf)
    }
}

/// The image as an endless stream, zero-filled past its end, for readers that expect
/// `Read + Seek`; the first read error is kept with its offset.
struct ZeroFilled<'a> {
    reader: &'a Reader<'a>,
    pos: u64,
    failed: Option<InfoError>,
}

impl Read for ZeroFilled<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.reader.read(self.pos, buf.len()) {
            Ok(bytes) => {
                buf.copy_from_slice(&bytes);
                self.pos = self.pos.saturating_add(buf.len() as u64);
                Ok(buf.len())
            }
            Err(e) => {
                let msg = e.to_string();
                self.failed.get_or_insert(e);
                Err(io::Error::other(msg))
            }
        }
    }
}

impl Seek for ZeroFilled<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.reader.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

fn detect(r: &Reader<'_>) -> Result<Content, InfoError> {
    let sb = r.read(1024, 1024)?;
    if let Some(ext) = parse_ext(&sb) {
        return Ok(Content::Ext(ext));
    }
    let vd = r.read(32768, 2048)?;
    if &vd[1..6] == b"CD001" {
        return Ok(Content::Iso9660(iso_info(r)?));
    }
    let lba0 = r.read(0, 512)?;
    let lba1 = r.read(512, 512)?;
    if let Some(mbr) = parse_mbr(&lba0) {
        if mbr.partitions.iter().any(|p| p.type_id == "0xee") && &lba1[..8] == b"EFI PART" {
            let (at, len) = gpt_table(&lba1);
            let table = r.read(at, len)?;
            return Ok(Content::Gpt(parse_gpt(&lba1, &table)));
        }
        return Ok(Content::Mbr(mbr));
    }
    if all_zero(r)? {
        return Ok(Content::Zero);
    }
    Ok(Content::Unknown)
}

/// The ISO 9660 reader's description of the volume; an empty one when its descriptors name
/// no primary volume.
fn iso_info(r: &Reader<'_>) -> Result<IsoInfo, InfoError> {
    let mut view = ZeroFilled {
        reader: r,
        pos: 0,
        failed: None,
    };
    match crate::iso::probe(&mut view) {
        Ok(Some(info)) => Ok(info),
        Ok(None) => Ok(IsoInfo {
            volume_id: String::new(),
            volume_size: 0,
            rock_ridge: false,
            joliet: false,
        }),
        Err(e) => Err(view
            .failed
            .unwrap_or_else(|| InfoError::read(r.path, 32768, e))),
    }
}

fn all_zero(r: &Reader<'_>) -> Result<bool, InfoError> {
    let mut zero = true;
    walk_data(
        r.source,
        r.path,
        r.size,
        &ProgressBar::hidden(),
        |_, c, hole| {
            if !hole && !is_zero(c) {
                zero = false;
            }
            Ok::<_, InfoError>(zero)
        },
    )?;
    Ok(zero)
}

/// The human form: a few aligned `key  value` lines.
pub fn describe(info: &Info) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(out, "{:<15}{v}", format!("{k}:"));
    };
    let bytes = |n: u64| format!("{} ({n} bytes)", Size(n).human());
    line("file", info.path.display().to_string());
    match &info.qcow2 {
        None => {
            line("format", "raw".to_string());
            line("size", bytes(info.size));
        }
        Some(q) => {
            line(
                "format",
                format!(
                    "qcow2 version {} (compat {})",
                    q.version,
                    if q.version >= 3 { "1.1" } else { "0.10" }
                ),
            );
            line("virtual size", bytes(info.size));
            line("file size", bytes(info.file_size));
        }
    }
    if let Some(a) = info.allocated {
        line("allocated", bytes(a));
    }
    if let Some(q) = &info.qcow2 {
        line("cluster size", bytes(q.cluster_size));
        let mut detail = Vec::new();
        if q.compressed_clusters > 0 {
            detail.push(format!("{} compressed", q.compressed_clusters));
        }
        if q.zero_preallocated_clusters > 0 {
            detail.push(format!(
                "{} preallocated zero clusters",
                q.zero_preallocated_clusters
            ));
        }
        line(
            "clusters",
            format!(
                "{} of {} allocated ({}){}",
                q.allocated_clusters,
                q.virtual_clusters,
                Size(q.allocated_bytes).human(),
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(", {}", detail.join(", "))
                }
            ),
        );
        line("compression", q.compression.clone());
        line(
            "refcounts",
            format!(
                "{} bits{}",
                q.refcount_bits,
                if q.lazy_refcounts { ", lazy" } else { "" }
            ),
        );
        match &q.backing_file {
            None => line("backing file", "(none)".to_string()),
            Some(b) => line(
                "backing file",
                format!(
                    "{b} (format {})",
                    q.backing_format.as_deref().unwrap_or("not stored: probed")
                ),
            ),
        }
        if q.chain.len() > 1 {
            line("backing chain", format!("{} files", q.chain.len()));
            for (i, l) in q.chain.iter().enumerate() {
                line(
                    &format!("  {i}"),
                    format!(
                        "{} ({}, {})",
                        l.path.display(),
                        l.format,
                        Size(l.virtual_size).human()
                    ),
                );
            }
        }
    }
    match &info.content {
        Content::Ext(e) => {
            line("holds", format!("{} file system", e.version));
            line(
                "label",
                if e.label.is_empty() {
                    "(none)".to_string()
                } else {
                    e.label.clone()
                },
            );
            line("uuid", e.uuid.clone());
            line("block size", e.block_size.to_string());
            line(
                "blocks",
                format!(
                    "{} ({} used, {} free)",
                    e.blocks,
                    e.blocks.saturating_sub(e.free_blocks),
                    e.free_blocks
                ),
            );
            line(
                "inodes",
                format!(
                    "{} ({} used, {} free)",
                    e.inodes,
                    e.inodes.saturating_sub(e.free_inodes),
                    e.free_inodes
                ),
            );
            if !e.features.is_empty() {
                line("features", e.features.join(" "));
            }
        }
        Content::Iso9660(i) => {
            line("holds", "ISO 9660 file system".to_string());
            line("volume id", i.volume_id.clone());
            line(
                "volume size",
                format!("{} ({} bytes)", Size(i.volume_size).human(), i.volume_size),
            );
            let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
            line("rock ridge", yes(i.rock_ridge));
            line("joliet", yes(i.joliet));
        }
        Content::Gpt(g) => {
            line("holds", "GPT partition table".to_string());
            line("disk guid", g.disk_guid.clone());
            line(
                "partitions",
                format!("{} of {} entries used", g.partitions.len(), g.entries),
            );
            for p in &g.partitions {
                line(
                    &format!("  {}", p.number),
                    format!(
                        "sectors {}..={} type {} {:?}",
                        p.first_lba, p.last_lba, p.type_guid, p.name
                    ),
                );
            }
        }
        Content::Mbr(m) => {
            line("holds", "MBR partition table".to_string());
            line("partitions", m.partitions.len().to_string());
            for p in &m.partitions {
                line(
                    &format!("  {}", p.number),
                    format!(
                        "start {} sectors {} type {} ({}){}",
                        p.start_sector,
                        p.sectors,
                        p.type_id,
                        p.type_name,
                        if p.bootable { " bootable" } else { "" }
                    ),
                );
            }
        }
        Content::Zero => line("holds", "nothing: every byte is zero".to_string()),
        Content::Unknown => line("holds", "unknown content".to_string()),
    }
    for n in &info.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}
