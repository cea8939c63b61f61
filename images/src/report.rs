//! What `vloop-image` prints when a command succeeds: each command's summary as the lines a
//! user reads (pure: a summary in, text out).
//!
//! The binary parses its arguments, calls the library and prints these lines; every figure
//! comes from the command's summary ([`CreateSummary`], [`Built`], [`CopySummary`],
//! [`ConvertSummary`]).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::convert::{self, ConvertSummary};
use crate::copy::{self, CopySummary};
use crate::create::CreateSummary;
use crate::ext2::Ext2Summary;
use crate::folder::Built;
use crate::image::Format;
use crate::iso::IsoSummary;
use crate::size::Size;

/// Images up to this size get their SHA-256 printed without `--sha256`.
pub const AUTO_SHA256_MAX: u64 = 4 << 30;

/// `s` with its control characters (`\n`, `\u{0}`), the invisible format characters that
/// reorder or hide text (`\u{202e}`, `\u{200b}`), the line separators and backslashes
/// escaped: names and labels come from an image or a user, and one that holds a newline must not
/// start a line of its own that reads as another field, nor one that holds `\n` look like it.
pub(crate) fn shown(s: &str) -> String {
    s.chars()
        .map(|c| {
            let hidden = matches!(c,
                '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}'
                    | '\u{feff}');
            if c.is_control() || hidden || c == '\\' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A note that a size was rounded up to whole sectors.
fn rounded_note(out: &mut String, asked: u64, size: u64) {
    let _ = writeln!(
        out,
        "note: {asked} bytes rounded up to {size} bytes, a whole number of 512-byte sectors"
    );
}

/// `create`: the image made, its backing file, and notes on its size. `preallocate` is the
/// option given for a raw image; `elapsed` the time the command took.
pub fn created(file: &Path, s: &CreateSummary, preallocate: bool, elapsed: Duration) -> String {
    let mut out = String::new();
    if let Some(asked) = s.rounded_from {
        rounded_note(&mut out, asked.bytes(), s.size.bytes());
    }
    let kind = match (s.format, s.cluster_size) {
        (Format::Qcow2, Some(cs)) => format!("qcow2, {} clusters", Size(cs)),
        _ if preallocate => "raw, preallocated".to_string(),
        _ => "raw, sparse".to_string(),
    };
    let _ = writeln!(
        out,
        "created {}: {kind}, {} ({} bytes), {} allocated, in {:.2} s",
        file.display(),
        s.size.human(),
        s.size.bytes(),
        Size(s.allocated).human(),
        elapsed.as_secs_f64()
    );
    if let Some(b) = &s.backing {
        let resolved = if b.path == b.name {
            String::new()
        } else {
            format!(", found at {}", shown(&b.path.to_string_lossy()))
        };
        let _ = writeln!(
            out,
            "backing file: {} ({}{}, {}{resolved})",
            shown(&b.name.to_string_lossy()),
            b.format,
            if b.format_probed { " as probed" } else { "" },
            Size(b.size).human()
        );
        if s.size_from_backing {
            let _ = writeln!(out, "note: the size is the backing file's");
        }
    }
    out
}

/// The first line of a folder build: the image written, its format, its size, then
/// `details`.
fn wrote(out: &mut String, file: &Path, format: &str, size: u64, details: &str) {
    let _ = writeln!(
        out,
        "wrote {}: {format}, {} ({size} bytes), {details}",
        file.display(),
        Size(size).human()
    );
}

/// The last lines of a folder build: time taken, and the SHA-256 in `sha256sum` format, or
/// why it was not computed.
fn build_end(out: &mut String, file: &Path, build_time: Duration, sha256: Option<&str>) {
    let _ = writeln!(out, "built in {:.2} s", build_time.as_secs_f64());
    let _ = match sha256 {
        Some(sha) => writeln!(out, "sha256: {sha}  {}", file.display()),
        None => writeln!(
            out,
            "note: SHA-256 not computed for an image over {} (pass --sha256, or run sha256sum)",
            Size(AUTO_SHA256_MAX).human()
        ),
    };
}

/// `ext2`: the image written, its geometry, time and hash; `asked` is the size given (none:
/// `auto`).
pub fn ext2_built(file: &Path, asked: Option<Size>, b: &Built<Ext2Summary>) -> String {
    let mut out = String::new();
    let s = &b.image;
    if let Some(asked) = asked {
        if asked.bytes() != s.size {
            rounded_note(&mut out, asked.bytes(), s.size);
        }
    }
    wrote(
        &mut out,
        file,
        "ext2",
        s.size,
        &format!(
            "block size {}, {} blocks ({} free), {} inodes ({} free)",
            s.block_size, s.blocks, s.free_blocks, s.inodes, s.free_inodes
        ),
    );
    build_end(&mut out, file, b.build_time, b.sha256.as_deref());
    out
}

/// `iso`: the image written, what it holds, what was adjusted, time and hash.
pub fn iso_built(file: &Path, b: &Built<IsoSummary>) -> String {
    let mut out = String::new();
    let s = &b.image;
    wrote(
        &mut out,
        file,
        "ISO 9660",
        s.size,
        &format!("{} files, {} directories", s.files, s.directories),
    );
    if s.adjusted > 0 {
        let _ = writeln!(
            out,
            "note: {} names or places adjusted to ISO 9660 and Joliet limits (Joliet names \
             cut to 64 characters, directories deeper than 8 levels relocated); Rock Ridge \
             keeps the originals; -v lists them",
            s.adjusted
        );
    }
    build_end(&mut out, file, b.build_time, b.sha256.as_deref());
    out
}

/// The closing lines of a copy or a conversion: the read-back, then the hash.
fn hashed_end(out: &mut String, dst: &Path, verified: Option<&str>, sha256: &str) {
    if let Some(what) = verified {
        let _ = writeln!(
            out,
            "verified: source and {what} read back with the same SHA-256"
        );
    }
    let _ = writeln!(out, "sha256: {sha256}  {}", dst.display());
}

/// `copy`: what was copied, whether it was verified, and the hash.
pub fn copied(src: &Path, dst: &Path, s: &CopySummary) -> String {
    let mut out = format!(
        "{} -> {}: {}\n",
        src.display(),
        dst.display(),
        copy::describe(s)
    );
    hashed_end(&mut out, dst, s.verified.then_some("copy"), &s.sha256);
    out
}

/// `convert`: the formats and the chain flattened, what was converted, the rounding of the
/// virtual size, the allocation, whether it was verified, and the hash.
pub fn converted(src: &Path, dst: &Path, s: &ConvertSummary) -> String {
    let layers = match s.source_layers {
        1 => String::new(),
        n => format!(", a chain of {n} files flattened"),
    };
    let clusters = match s.cluster_size {
        Some(cs) => format!(", {} clusters", Size(cs)),
        None => String::new(),
    };
    let mut out = format!(
        "{} ({}{layers}) -> {} ({}{clusters}): {}\n",
        src.display(),
        s.source_format,
        dst.display(),
        s.format,
        convert::describe(s)
    );
    if let Some(to) = s.rounded_to {
        let _ = writeln!(
            out,
            "note: the virtual size is rounded up to {to} bytes, a whole number of 512-byte \
             sectors (the added bytes read as zeroes; the SHA-256 covers the source's {} bytes)",
            s.bytes
        );
    }
    let _ = writeln!(out, "allocated: {}", Size(s.allocated).human());
    hashed_end(&mut out, dst, s.verified.then_some("output"), &s.sha256);
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::create::BackingSummary;

    #[test]
    fn control_characters_from_the_image_are_escaped() {
        assert_eq!(shown("base.qcow2"), "base.qcow2");
        assert_eq!(shown("a\nformat:   raw"), "a\\nformat:   raw");
        assert_eq!(shown("nul\0end\t"), "nul\\u{0}end\\t");
        assert_eq!(shown("é ü"), "é ü");
        assert_eq!(shown("back\\slash"), "back\\\\slash");
        assert_eq!(shown("gpj.\u{202e}exe"), "gpj.\\u{202e}exe");
        assert_eq!(shown("a\u{2028}b\u{200b}"), "a\\u{2028}b\\u{200b}");
    }

    #[test]
    fn created_says_the_kind_the_rounding_and_the_backing_file() {
        let mut s = CreateSummary {
            path: PathBuf::from("disk.img"),
            format: Format::Raw,
            size: Size(1000448),
            rounded_from: Some(Size(1000001)),
            size_from_backing: false,
            cluster_size: None,
            backing: None,
            allocated: 0,
        };
        let text = created(Path::new("disk.img"), &s, false, Duration::from_millis(10));
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "note: 1000001 bytes rounded up to 1000448 bytes, a whole number of 512-byte \
                 sectors",
                "created disk.img: raw, sparse, 977 KiB (1000448 bytes), 0 B allocated, in 0.01 s",
            ]
        );
        s.format = Format::Qcow2;
        s.cluster_size = Some(65536);
        s.rounded_from = None;
        s.size_from_backing = true;
        s.backing = Some(BackingSummary {
            name: PathBuf::from("base.qcow2"),
            path: PathBuf::from("vms/base.qcow2"),
            format: Format::Qcow2,
            format_probed: true,
            size: 1 << 30,
        });
        let text = created(Path::new("vm.qcow2"), &s, false, Duration::ZERO);
        assert!(text.contains("vm.qcow2: qcow2, 64 KiB clusters"), "{text}");
        assert!(
            text.contains(
                "backing file: base.qcow2 (qcow2 as probed, 1 GiB, found at vms/base.qcow2)"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("note: the size is the backing file's\n"),
            "{text}"
        );
        // The name is stored and printed as given; one that holds a newline stays on its line.
        if let Some(b) = &mut s.backing {
            b.name = PathBuf::from("base\nformat: raw");
        }
        let text = created(Path::new("vm.qcow2"), &s, false, Duration::ZERO);
        assert!(
            text.contains("backing file: base\\nformat: raw (qcow2"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn folder_builds_say_what_was_rounded_and_hashed() {
        let b = Built {
            path: PathBuf::from("fs.img"),
            image: Ext2Summary {
                size: 8 << 20,
                block_size: 4096,
                blocks: 2048,
                free_blocks: 2000,
                inodes: 512,
                free_inodes: 500,
                uuid: [0; 16],
            },
            timestamp: 0,
            sha256: None,
            build_time: Duration::from_millis(1500),
        };
        let text = ext2_built(Path::new("fs.img"), Some(Size((8 << 20) - 100)), &b);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("note: 8388508 bytes rounded up to 8388608"));
        assert_eq!(
            lines[1],
            "wrote fs.img: ext2, 8 MiB (8388608 bytes), block size 4096, 2048 blocks (2000 \
             free), 512 inodes (500 free)"
        );
        assert_eq!(lines[2], "built in 1.50 s");
        assert!(lines[3].starts_with("note: SHA-256 not computed for an image over 4 GiB"));
        let iso = Built {
            path: PathBuf::from("cd.iso"),
            image: IsoSummary {
                size: 1 << 20,
                files: 3,
                directories: 2,
                adjusted: 0,
            },
            timestamp: 0,
            sha256: Some("ab".repeat(32)),
            build_time: Duration::ZERO,
        };
        let text = iso_built(Path::new("cd.iso"), &iso);
        assert!(text.contains("ISO 9660, 1 MiB (1048576 bytes), 3 files, 2 directories"));
        assert!(!text.contains("adjusted"), "{text}");
        assert!(text.ends_with(&format!("sha256: {}  cd.iso\n", "ab".repeat(32))));
    }

    #[test]
    fn converted_names_the_chain_the_rounding_and_the_check() {
        let s = ConvertSummary {
            src: PathBuf::from("top.qcow2"),
            dst: PathBuf::from("flat.qcow2"),
            source_format: Format::Qcow2,
            source_layers: 3,
            format: Format::Qcow2,
            cluster_size: Some(65536),
            bytes: 1000,
            rounded_to: Some(1024),
            data_bytes: 1000,
            holes_bytes: 0,
            sha256: "cd".repeat(32),
            verified: true,
            allocated: 4096,
            elapsed: Duration::ZERO,
        };
        let text = converted(Path::new("top.qcow2"), Path::new("flat.qcow2"), &s);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with(
                "top.qcow2 (qcow2, a chain of 3 files flattened) -> flat.qcow2 (qcow2, 64 KiB \
                 clusters): converted"
            ),
            "{text}"
        );
        assert!(lines[1].starts_with("note: the virtual size is rounded up to 1024 bytes"));
        assert_eq!(lines[2], "allocated: 4 KiB");
        assert_eq!(
            lines[3],
            "verified: source and output read back with the same SHA-256"
        );
        assert_eq!(lines[4], format!("sha256: {}  flat.qcow2", "cd".repeat(32)));
    }
}
