//! The human form of an [`Info`]: a few aligned `key  value` lines.

use std::fmt::Write as _;

use super::content::Content;
use super::examine::Info;
use crate::report::shown;
use crate::size::Size;

/// The human form: a few aligned `key  value` lines.
pub fn describe(info: &Info) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(out, "{:<15}{v}", format!("{k}:"));
    };
    let bytes = |n: u64| format!("{} ({n} bytes)", Size(n).human());
    line("file", shown(&info.path.display().to_string()));
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
                    "{} (format {})",
                    shown(b),
                    shown(q.backing_format.as_deref().unwrap_or("not stored: probed"))
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
                        shown(&l.path.display().to_string()),
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
                    shown(&e.label)
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
            line("volume id", shown(&i.volume_id));
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
        let _ = writeln!(out, "note: {}", shown(n));
    }
    out
}
