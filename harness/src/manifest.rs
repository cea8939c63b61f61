//! Manifests: what a disk must hold, generated trees, and the host-side checks (comparing a
//! manifest with what a Rust ext2 reader finds in an image, raw or read through its qcow2
//! chain, `e2fsck -fn`).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use ext4_view::{Ext4, Ext4Read};
use vloop_guest::{content, content_sha256, Entry, FileSpec};
use vloop_qcow2::Chain;

use crate::images::{self, ImageError};

/// Errors of the host-side checks.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The Rust ext2 reader could not read the image.
    #[error("ext4-view cannot read {image}: {detail}")]
    Ext4View {
        /// The image.
        image: String,
        /// What it said.
        detail: String,
    },
    /// A qcow2 image could not be opened with its backing chain.
    #[error(transparent)]
    Qcow2(#[from] ImageError),
    /// `e2fsck` is not installed.
    #[error("e2fsck is not installed (package e2fsprogs)")]
    NoE2fsck,
    /// `e2fsck` could not be run.
    #[error("cannot run e2fsck")]
    E2fsckSpawn(#[source] std::io::Error),
    /// `e2fsck -fn` found problems or failed.
    #[error("{0}")]
    E2fsck(String),
    /// A QEMU image tool is not installed.
    #[error("{0} is not installed (package qemu-utils)")]
    NoQemuUtils(&'static str),
    /// A QEMU image tool could not be run.
    #[error("cannot run {0}")]
    QemuUtilsSpawn(&'static str, #[source] std::io::Error),
    /// `qemu-img check` found corruption or could not check the image.
    #[error("{0}")]
    QemuImgCheck(String),
    /// `qemu-img convert` failed.
    #[error("{0}")]
    QemuImgConvert(String),
    /// A writer could open an image that must be locked against writers.
    #[error("{0}")]
    NotLocked(String),
}

/// What was found at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A regular file.
    File {
        /// Length.
        size: u64,
        /// SHA-256, lower-case hex.
        sha256: String,
    },
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink {
        /// Its target.
        target: String,
    },
    /// Anything else (device, fifo, socket).
    Other,
}

/// Manifest entries for files the guest writes from specs.
pub fn file_entries(files: &[FileSpec]) -> Vec<Entry> {
    files
        .iter()
        .map(|f| Entry::File {
            path: f.path.clone(),
            size: f.size,
            sha256: content_sha256(f.seed, f.size),
        })
        .collect()
}

/// Differences between `expected` and `found`; with `exact`, entries not in the manifest
/// (nor parents of manifest entries, nor under a top-level name in `ignore`) are problems too.
pub fn compare(
    expected: &[Entry],
    found: &BTreeMap<String, Found>,
    exact: bool,
    ignore: &[&str],
) -> Vec<String> {
    let mut problems = Vec::new();
    for e in expected {
        let got = found.get(e.path());
        let ok = match (e, got) {
            (_, None) => {
                problems.push(format!("{}: missing", e.path()));
                continue;
            }
            (Entry::File { size, sha256, .. }, Some(Found::File { size: s, sha256: h })) => {
                if s != size {
                    problems.push(format!("{}: size {s}, expected {size}", e.path()));
                } else if h != sha256 {
                    problems.push(format!(
                        "{}: content differs (SHA-256 {h}, expected {sha256})",
                        e.path()
                    ));
                }
                true
            }
            (Entry::Dir { .. }, Some(Found::Dir)) => true,
            (Entry::Symlink { target, .. }, Some(Found::Symlink { target: t })) => {
                if t != target {
                    problems.push(format!("{}: link to {t}, expected {target}", e.path()));
                }
                true
            }
            _ => false,
        };
        if !ok {
            problems.push(format!("{}: found {:?}, expected {e:?}", e.path(), got));
        }
    }
    if exact {
        let mut allowed = std::collections::BTreeSet::new();
        for e in expected {
            let mut p = e.path();
            allowed.insert(p);
            while let Some((parent, _)) = p.rsplit_once('/') {
                allowed.insert(parent);
                p = parent;
            }
        }
        for f in found.keys() {
            let top = f.split('/').next().unwrap_or("");
            if !allowed.contains(f.as_str()) && !ignore.contains(&top) {
                problems.push(format!("{f}: not in the manifest"));
            }
        }
    }
    problems
}

/// Joins up to `n` problems into one line.
pub fn summarise(problems: &[String], n: usize) -> String {
    let mut s = problems
        .iter()
        .take(n)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > n {
        s.push_str(&format!("; and {} more", problems.len() - n));
    }
    s
}

/// Reads every entry of an ext2/3/4 image with the ext4-view crate (no kernel involved).
pub fn scan_ext2(image: &Path) -> Result<BTreeMap<String, Found>, ManifestError> {
    scan_ext2_fs(Ext4::load_from_path(image)).map_err(|detail| ManifestError::Ext4View {
        image: image.display().to_string(),
        detail,
    })
}

/// Reads every entry of the ext2/3/4 file system a qcow2 image holds with its backing chain:
/// vloop-qcow2 maps every read through the chain, ext4-view reads the file system.
pub fn scan_ext2_qcow2(image: &Path) -> Result<BTreeMap<String, Found>, ManifestError> {
    let chain = images::open_qcow2(image)?;
    scan_ext2_fs(Ext4::load(Box::new(ChainRead(chain)))).map_err(|detail| ManifestError::Ext4View {
        image: format!("{} (through its qcow2 chain)", image.display()),
        detail,
    })
}

/// A qcow2 chain as ext4-view's byte source.
struct ChainRead(Chain);

impl Ext4Read for ChainRead {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.read_at(dst, start_byte).map_err(Into::into)
    }
}

fn scan_ext2_fs(fs: Result<Ext4, ext4_view::Ext4Error>) -> Result<BTreeMap<String, Found>, String> {
    let fs = fs.map_err(|e| format!("open: {e}"))?;
    let mut out = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let abs = format!("/{rel}");
        let rd = fs
            .read_dir(abs.as_str())
            .map_err(|e| format!("ext4-view read_dir {abs}: {e}"))?;
        for ent in rd {
            let ent = ent.map_err(|e| format!("ext4-view read_dir {abs}: {e}"))?;
            let name = ent
                .file_name()
                .as_str()
                .map_err(|e| format!("non-UTF-8 name in {abs}: {e}"))?
                .to_string();
            if name == "." || name == ".." {
                continue;
            }
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ft = ent
                .file_type()
                .map_err(|e| format!("ext4-view stat /{path}: {e}"))?;
            let p = format!("/{path}");
            let found = if ft.is_dir() {
                stack.push(path.clone());
                Found::Dir
            } else if ft.is_symlink() {
                let t = fs
                    .read_link(p.as_str())
                    .map_err(|e| format!("ext4-view readlink {p}: {e}"))?;
                Found::Symlink {
                    target: t.to_str().map_err(|e| format!("{p}: {e}"))?.to_string(),
                }
            } else if ft.is_regular_file() {
                let data = fs
                    .read(p.as_str())
                    .map_err(|e| format!("ext4-view read {p}: {e}"))?;
                Found::File {
                    size: data.len() as u64,
                    sha256: vloop_guest::sha256_hex(&data),
                }
            } else {
                Found::Other
            };
            out.insert(path, found);
        }
    }
    Ok(out)
}

/// Runs `e2fsck -fn` on an image: Ok with its summary line when clean.
pub fn e2fsck(image: &Path) -> Result<String, ManifestError> {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ManifestError::NoE2fsck,
            _ => ManifestError::E2fsckSpawn(e),
        })?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        let summary = String::from_utf8_lossy(&out.stdout);
        Ok(summary.lines().last().unwrap_or("").trim().to_string())
    } else {
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("e2fsck 1."))
            .collect();
        let own: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("e2fsck: "))
            .take(2)
            .collect();
        if !own.is_empty() {
            return Err(ManifestError::E2fsck(format!(
                "e2fsck -fn failed ({}): {}",
                out.status,
                own.join(" | ")
            )));
        }
        Err(ManifestError::E2fsck(format!(
            "e2fsck -fn found problems ({}): {}",
            out.status,
            lines[lines.len().saturating_sub(4)..].join(" | ")
        )))
    }
}

/// Runs a QEMU image tool (`qemu-img`, `qemu-io`) with `args`.
fn qemu_utils(tool: &'static str, args: &[&std::ffi::OsStr]) -> Result<Output, ManifestError> {
    Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ManifestError::NoQemuUtils(tool),
            _ => ManifestError::QemuUtilsSpawn(tool, e),
        })
}

/// The last non-empty lines of a tool's stdout and stderr, on one line.
fn last_lines(out: &Output, n: usize) -> String {
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// `qemu-img check` of a qcow2 image: Ok with what it found when the image has no
/// corruption (exit 0, or 3: leaked clusters only, which a crash may leave and QEMU allows).
pub fn qemu_img_check(image: &Path) -> Result<String, ManifestError> {
    let out = qemu_utils(
        "qemu-img",
        &[
            "check".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "--output=json".as_ref(),
            image.as_os_str(),
        ],
    )?;
    let report: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    let field = |k: &str| {
        report
            .as_ref()
            .and_then(|r| r.get(k))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    let (leaks, corruptions, errors) =
        (field("leaks"), field("corruptions"), field("check-errors"));
    match out.status.code() {
        Some(0) => Ok(format!(
            "no errors, image end {} KiB",
            field("image-end-offset") / 1024
        )),
        Some(3) => Ok(format!("{leaks} leaked clusters, no corruption")),
        _ => Err(ManifestError::QemuImgCheck(format!(
            "qemu-img check {} ({}): {corruptions} corruptions, {leaks} leaks, {errors} check errors: {}",
            image.display(),
            out.status,
            last_lines(&out, 3)
        ))),
    }
}

/// The disk a qcow2 image and its backing chain make, written to `raw` by `qemu-img convert`
/// (QEMU's reader, independent of vloop's).
pub fn qemu_img_flatten(image: &Path, raw: &Path) -> Result<(), ManifestError> {
    let out = qemu_utils(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            image.as_os_str(),
            raw.as_os_str(),
        ],
    )?;
    if !out.status.success() {
        return Err(ManifestError::QemuImgConvert(format!(
            "qemu-img convert {} ({}): {}",
            image.display(),
            out.status,
            last_lines(&out, 2)
        )));
    }
    Ok(())
}

/// Checks that a writer cannot open the raw image `image` while others use it: `qemu-io`
/// opens it read-write (it only reads a sector, so nothing changes if it gets in) and must
/// be refused a lock. Ok with qemu-io's refusal.
pub fn writer_refused(image: &Path) -> Result<String, ManifestError> {
    let out = qemu_utils(
        "qemu-io",
        &[
            "-f".as_ref(),
            "raw".as_ref(),
            "-c".as_ref(),
            "read 0 512".as_ref(),
            image.as_os_str(),
        ],
    )?;
    // "can't open device ...: Failed to get "write" lock | Is another process using the image?"
    let said = last_lines(&out, 2);
    if !out.status.success() && said.contains("lock") {
        return Ok(format!("qemu-io could not open it read-write: {said}"));
    }
    Err(ManifestError::NotLocked(format!(
        "qemu-io opened {} read-write ({}): {said}",
        image.display(),
        out.status
    )))
}

/// A sample tree for images built on the host: edge-case sizes, a multi-MiB file, long
/// names, a deep directory chain, a wide directory, spaces, and symlinks. Returns the files
/// (content from seeds) and the directory/symlink entries.
pub fn sample_tree(big: u64) -> (Vec<FileSpec>, Vec<Entry>) {
    let f = |path: &str, size: u64, seed: u64| FileSpec {
        path: path.to_string(),
        size,
        seed,
    };
    let long = format!("{}.txt", "long-name-".repeat(15));
    let deep = (1..=10)
        .map(|i| format!("d{i}"))
        .collect::<Vec<_>>()
        .join("/");
    let mut files = vec![
        f("empty", 0, 1),
        f("one.bin", 1, 2),
        f("b4095.bin", 4095, 3),
        f("b4096.bin", 4096, 4),
        f("b4097.bin", 4097, 5),
        f("big.bin", big, 6),
        f(&long, 333, 7),
        f(&format!("deep/{deep}/leaf.dat"), 5000, 8),
        f("dir with spaces/file name.txt", 42, 9),
    ];
    for i in 0..40 {
        files.push(f(&format!("wide/f{i:03}"), 100 + i, 100 + i));
    }
    let entries = vec![
        Entry::Dir {
            path: "emptydir".into(),
        },
        Entry::Symlink {
            path: "link-to-big".into(),
            target: "big.bin".into(),
        },
        Entry::Symlink {
            path: "deep/d1/up".into(),
            target: "../../one.bin".into(),
        },
    ];
    (files, entries)
}

/// Writes a tree (files and dirs/symlinks) into `dir` on the host.
pub fn write_tree(dir: &Path, files: &[FileSpec], entries: &[Entry]) -> std::io::Result<()> {
    for f in files {
        let p = dir.join(&f.path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&p, content(f.seed, f.size))?;
    }
    for e in entries {
        let p = dir.join(e.path());
        match e {
            Entry::Dir { .. } => fs::create_dir_all(&p)?,
            Entry::Symlink { target, .. } => {
                if let Some(parent) = p.parent() {
                    fs::create_dir_all(parent)?;
                }
                std::os::unix::fs::symlink(target, &p)?;
            }
            Entry::File { .. } => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found_from(entries: &[Entry]) -> BTreeMap<String, Found> {
        entries
            .iter()
            .map(|e| {
                let f = match e {
                    Entry::File { size, sha256, .. } => Found::File {
                        size: *size,
                        sha256: sha256.clone(),
                    },
                    Entry::Dir { .. } => Found::Dir,
                    Entry::Symlink { target, .. } => Found::Symlink {
                        target: target.clone(),
                    },
                };
                (e.path().to_string(), f)
            })
            .collect()
    }

    #[test]
    fn identical_trees_compare_clean() {
        let (files, mut entries) = sample_tree(10_000);
        entries.extend(file_entries(&files));
        let mut found = found_from(&entries);
        found.insert("deep".into(), Found::Dir);
        found.insert("lost+found".into(), Found::Dir);
        found.insert("lost+found/x".into(), Found::Other);
        assert!(compare(&entries, &found, true, &["lost+found"]).is_empty());
        assert!(!compare(&entries, &found, true, &[]).is_empty());
    }

    #[test]
    fn finds_every_kind_of_difference() {
        let files = vec![FileSpec {
            path: "a/b".into(),
            size: 10,
            seed: 1,
        }];
        let mut entries = file_entries(&files);
        entries.push(Entry::Symlink {
            path: "l".into(),
            target: "a/b".into(),
        });
        let good = found_from(&entries);

        let mut wrong_content = good.clone();
        wrong_content.insert(
            "a/b".into(),
            Found::File {
                size: 10,
                sha256: "00".into(),
            },
        );
        assert!(summarise(&compare(&entries, &wrong_content, false, &[]), 3)
            .contains("content differs"));

        let mut short = good.clone();
        short.insert(
            "a/b".into(),
            Found::File {
                size: 9,
                sha256: "00".into(),
            },
        );
        assert!(compare(&entries, &short, false, &[])[0].contains("size 9"));

        let mut missing = good.clone();
        missing.remove("l");
        assert!(compare(&entries, &missing, false, &[])[0].contains("missing"));

        let mut relinked = good.clone();
        relinked.insert("l".into(), Found::Symlink { target: "x".into() });
        assert!(compare(&entries, &relinked, false, &[])[0].contains("link to x"));

        let mut extra = good.clone();
        extra.insert(
            "stray".into(),
            Found::File {
                size: 0,
                sha256: String::new(),
            },
        );
        assert!(compare(&entries, &extra, false, &[]).is_empty());
        assert!(compare(&entries, &extra, true, &[])[0].contains("stray: not in the manifest"));

        let mut kind = good;
        kind.insert("l".into(), Found::Dir);
        assert_eq!(compare(&entries, &kind, false, &[]).len(), 1);
    }

    #[test]
    fn scans_an_ext2_image_through_a_qcow2_overlay() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let (files, mut entries) = sample_tree(70_000);
        write_tree(&src, &files, &entries).unwrap();
        entries.extend(file_entries(&files));
        let im = crate::images::Images::default();
        let base = t.path().join("base.img");
        im.ext2(&base, &src, 8 << 20).unwrap();
        let ov = t.path().join("ov.qcow2");
        im.overlay(&ov, "base.img", 8 << 20).unwrap();
        let direct = scan_ext2(&base).unwrap();
        let through = scan_ext2_qcow2(&ov).unwrap();
        assert_eq!(through, direct);
        assert_eq!(
            compare(&entries, &through, true, &["lost+found"]),
            Vec::<String>::new()
        );
        // The raw base is not a qcow2 image: the error says which file and why.
        let e = scan_ext2_qcow2(&base).unwrap_err();
        assert!(matches!(e, ManifestError::Qcow2(_)), "{e:?}");
    }

    #[test]
    fn scans_an_image_made_by_mke2fs_when_present() {
        if Command::new("mke2fs").arg("-V").output().is_err() {
            vloop_frontend::skip::skip("mke2fs not installed (e2fsprogs)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let (files, mut entries) = sample_tree(70_000);
        write_tree(&src, &files, &entries).unwrap();
        let img = t.path().join("a.img");
        let st = Command::new("mke2fs")
            .args(["-q", "-t", "ext2", "-F", "-d"])
            .arg(&src)
            .arg(&img)
            .arg("8M")
            .status()
            .unwrap();
        assert!(st.success());
        entries.extend(file_entries(&files));
        let found = scan_ext2(&img).unwrap();
        assert_eq!(
            compare(&entries, &found, true, &["lost+found"]),
            Vec::<String>::new()
        );
        e2fsck(&img).unwrap();
    }
}
