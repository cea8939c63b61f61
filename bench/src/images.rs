//! The images the comparisons serve: the raw benchmark image (every 4 KiB block non-zero; the
//! host and the guest comparison both serve it), its fully allocated qcow2 copy (`qemu-img
//! convert -O qcow2`, made next to it and reused while it is newer), and the empty images of
//! the allocating rows, made fresh for every run: a qcow2 overlay over the raw image
//! (`qemu-img create -f qcow2 -F raw -b RAW`) or a sparse raw file.
//!
//! The I/O (files, `qemu-img`) is here; what `qemu-img info` and `qemu-img check` print is
//! read by the pure [`parse_info`] and [`parse_check`].

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Instant;

use crate::text::chain;

/// Errors of preparing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file could not be created, written, read or inspected.
    #[error("cannot prepare the benchmark image {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// qemu-img could not be run.
    #[error("cannot run {program}: install qemu-utils (Debian) or pass --qemu-img-bin")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// qemu-img ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// qemu-img's JSON output is not what it prints.
    #[error("cannot read what `{command}` printed")]
    Output {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The qcow2 copy is not the fully allocated image of the raw image's size.
    #[error("{path} is not a fully allocated qcow2 image of {size} bytes: {why}")]
    NotAllocated {
        /// The qcow2 image.
        path: PathBuf,
        /// The raw image's size.
        size: u64,
        /// What is wrong.
        why: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates (or reuses) an image of `size` bytes whose every 4 KiB block holds non-zero data;
/// returns whether it was written (false: an image of that size was reused).
pub fn prepare_image(path: &Path, size: u64, fresh: bool) -> Result<bool, ImageError> {
    let err = io_err(path);
    if !fresh {
        if let Ok(m) = std::fs::metadata(path) {
            if m.len() == size {
                eprintln!(
                    "using existing image {} ({} MiB)",
                    path.display(),
                    size >> 20
                );
                return Ok(false);
            }
        }
    }
    eprintln!("creating image {} ({} MiB)", path.display(), size >> 20);
    let mut f = File::create(path).map_err(err)?;
    let chunk_len = 1u64 << 20;
    let mut chunk = vec![0u8; chunk_len as usize];
    let mut off = 0;
    while off < size {
        let n = chunk_len.min(size - off) as usize;
        for (i, block) in chunk[..n].chunks_mut(4096).enumerate() {
            let tag = (off / 4096 + i as u64) | 1 << 63;
            for w in block.chunks_mut(8) {
                w.copy_from_slice(&tag.to_le_bytes()[..w.len()]);
            }
        }
        f.write_all(&chunk[..n]).map_err(io_err(path))?;
        off += n as u64;
    }
    f.sync_all().map_err(io_err(path))?;
    Ok(true)
}

/// Reads the whole file once so that it is in the page cache.
pub fn warm_page_cache(path: &Path) -> Result<(), ImageError> {
    use std::io::Read;
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).map_err(io_err(path))? > 0 {}
    Ok(())
}

/// Writes back the dirty pages of each of `paths` that opens, so that a run starts with none
/// left over from the one before and writeback throttling hits the run that caused it.
pub fn sync<'a>(paths: impl IntoIterator<Item = &'a Path>) {
    for p in paths {
        if let Ok(f) = File::open(p) {
            let _ = f.sync_all();
        }
    }
}

/// Where the qcow2 copy of the raw image `raw` lives: beside it, its name with `.qcow2` added.
pub fn qcow2_path(raw: &Path) -> PathBuf {
    let mut name = raw.file_name().unwrap_or_default().to_os_string();
    name.push(".qcow2");
    raw.with_file_name(name)
}

/// What `qemu-img info --output=json` says of an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Info {
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes (qcow2).
    #[serde(default)]
    pub cluster_size: Option<u64>,
    /// Bytes the file takes on disk.
    #[serde(default)]
    pub actual_size: Option<u64>,
}

/// What `qemu-img check --output=json` says of a qcow2 image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Check {
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Of those, the allocated ones (qemu-img leaves the field out when there are none).
    #[serde(default)]
    pub allocated_clusters: u64,
    /// Corruptions found.
    #[serde(default)]
    pub corruptions: u64,
    /// Leaked clusters.
    #[serde(default)]
    pub leaks: u64,
    /// Errors of the check itself.
    #[serde(default)]
    pub check_errors: u64,
}

/// Reads `qemu-img info --output=json`.
pub fn parse_info(json: &str) -> Result<Info, serde_json::Error> {
    serde_json::from_str(json)
}

/// Reads `qemu-img check --output=json`.
pub fn parse_check(json: &str) -> Result<Check, serde_json::Error> {
    serde_json::from_str(json)
}

/// Why `check` and `info` do not describe a fully allocated, clean qcow2 image of `size`
/// bytes (None: they do).
pub fn not_fully_allocated(info: &Info, check: &Check, size: u64) -> Option<String> {
    if info.virtual_size != size {
        return Some(format!("its virtual size is {} bytes", info.virtual_size));
    }
    if check.corruptions > 0 || check.check_errors > 0 {
        return Some(format!(
            "qemu-img check finds {} corruptions and {} errors",
            check.corruptions, check.check_errors
        ));
    }
    if check.total_clusters == 0 || check.allocated_clusters != check.total_clusters {
        return Some(format!(
            "{} of its {} clusters are allocated",
            check.allocated_clusters, check.total_clusters
        ));
    }
    None
}

/// The prepared qcow2 copy of the raw image.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Qcow2Image {
    /// Its path.
    pub path: PathBuf,
    /// Whether an existing copy was reused.
    pub reused: bool,
    /// Seconds `qemu-img convert` took (None when reused).
    pub convert_secs: Option<f64>,
    /// What `qemu-img info` says of it.
    pub info: Info,
    /// What `qemu-img check` says of it.
    pub check: Check,
}

/// `qemu-img` at a path, run to completion.
#[derive(Debug, Clone)]
pub struct QemuImg(pub PathBuf);

impl QemuImg {
    /// Runs `qemu-img args`; returns its stdout when it exits with one of `ok` statuses.
    fn run(&self, args: &[&std::ffi::OsStr], ok: &[i32]) -> Result<String, ImageError> {
        let command = std::iter::once(self.0.as_os_str())
            .chain(args.iter().copied())
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let out = Command::new(&self.0)
            .args(args)
            .output()
            .map_err(|source| ImageError::Spawn {
                program: self.0.clone(),
                source,
            })?;
        if !out.status.code().is_some_and(|c| ok.contains(&c)) {
            return Err(ImageError::Failed {
                command,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn json<T>(
        &self,
        args: &[&std::ffi::OsStr],
        ok: &[i32],
        parse: fn(&str) -> Result<T, serde_json::Error>,
    ) -> Result<T, ImageError> {
        let text = self.run(args, ok)?;
        parse(&text).map_err(|source| ImageError::Output {
            command: format!("qemu-img {}", args[0].to_string_lossy()),
            source,
        })
    }

    /// `qemu-img info` of the qcow2 image `path`.
    pub fn info(&self, path: &Path) -> Result<Info, ImageError> {
        let args = ["info", "-f", "qcow2", "--output=json"].map(std::ffi::OsStr::new);
        self.json(&[&args[..], &[path.as_os_str()]].concat(), &[0], parse_info)
    }

    /// `qemu-img check` of the qcow2 image `path` (leaked clusters, status 3, are no failure).
    pub fn check(&self, path: &Path) -> Result<Check, ImageError> {
        let args = ["check", "-f", "qcow2", "--output=json"].map(std::ffi::OsStr::new);
        self.json(
            &[&args[..], &[path.as_os_str()]].concat(),
            &[0, 3],
            parse_check,
        )
    }

    /// Creates `overlay`, an empty qcow2 image whose backing file is the raw image `raw`.
    pub fn create_overlay(&self, raw: &Path, overlay: &Path) -> Result<(), ImageError> {
        let raw = std::fs::canonicalize(raw).map_err(io_err(raw))?;
        let args = ["create", "-q", "-f", "qcow2", "-F", "raw", "-b"].map(std::ffi::OsStr::new);
        self.run(
            &[&args[..], &[raw.as_os_str(), overlay.as_os_str()]].concat(),
            &[0],
        )?;
        Ok(())
    }

    /// Whether `qcow2` is a copy of the raw image `raw` (of `size` bytes) to reuse: newer than
    /// it, fully allocated, clean. Returns what qemu-img says of it, or why it is not.
    fn reusable(&self, raw: &Path, qcow2: &Path, size: u64) -> Result<(Info, Check), String> {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified());
        let (Ok(r), Ok(q)) = (mtime(raw), mtime(qcow2)) else {
            return Err("it does not exist".into());
        };
        if q <= r {
            return Err("the raw image is newer".into());
        }
        let info = self.info(qcow2).map_err(|e| chain(&e))?;
        let check = self.check(qcow2).map_err(|e| chain(&e))?;
        match not_fully_allocated(&info, &check, size) {
            Some(why) => Err(why),
            None => Ok((info, check)),
        }
    }

    /// Makes (or reuses) the fully allocated qcow2 copy of the raw image `raw` of `size`
    /// bytes, at [`qcow2_path`]; `fresh` converts again in any case. The raw image's content
    /// is non-zero everywhere, so every cluster of the copy is allocated; this is checked.
    pub fn prepare_qcow2(
        &self,
        raw: &Path,
        size: u64,
        fresh: bool,
    ) -> Result<Qcow2Image, ImageError> {
        let path = qcow2_path(raw);
        if !fresh {
            match self.reusable(raw, &path, size) {
                Ok((info, check)) => {
                    eprintln!("using existing qcow2 copy {}", path.display());
                    return Ok(Qcow2Image {
                        path,
                        reused: true,
                        convert_secs: None,
                        info,
                        check,
                    });
                }
                Err(why) => eprintln!("converting to qcow2 {} ({why})", path.display()),
            }
        }
        // Convert to a temporary name and rename, so an interrupted conversion never leaves
        // a newer, partial copy to be reused.
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".part");
        let tmp = path.with_file_name(tmp_name);
        let t0 = Instant::now();
        let args = ["convert", "-f", "raw", "-O", "qcow2"].map(std::ffi::OsStr::new);
        let converted = self.run(
            &[&args[..], &[raw.as_os_str(), tmp.as_os_str()]].concat(),
            &[0],
        );
        if let Err(e) = converted {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        let convert_secs = Some(t0.elapsed().as_secs_f64());
        let info = self.info(&path)?;
        let check = self.check(&path)?;
        if let Some(why) = not_fully_allocated(&info, &check, size) {
            return Err(ImageError::NotAllocated { path, size, why });
        }
        Ok(Qcow2Image {
            path,
            reused: false,
            convert_secs,
            info,
            check,
        })
    }
}

/// Creates `path`, a sparse file of `size` bytes (no block allocated).
pub fn create_sparse(path: &Path, size: u64) -> Result<(), ImageError> {
    let f = File::create(path).map_err(io_err(path))?;
    f.set_len(size).map_err(io_err(path))
}

/// A file made for one run, removed when dropped.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// Takes charge of `path` (it need not exist yet).
    pub fn new(path: PathBuf) -> Self {
        let _ = std::fs::remove_file(&path);
        Self(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_blocks_are_tagged_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.img");
        assert!(prepare_image(&p, 3 << 20, false).unwrap());
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 3 << 20);
        let tag = |b: usize| u64::from_le_bytes(data[b * 4096..b * 4096 + 8].try_into().unwrap());
        assert_eq!(tag(0), 1 << 63);
        assert_eq!(tag(700), 700 | 1 << 63);
        assert!(!data.chunks(4096).any(|c| c.iter().all(|&b| b == 0)));
        // Same size: reused, not rewritten.
        std::fs::write(&p, vec![7u8; 3 << 20]).unwrap();
        assert!(!prepare_image(&p, 3 << 20, false).unwrap());
        assert_eq!(std::fs::read(&p).unwrap()[0], 7);
        assert!(prepare_image(&p, 3 << 20, true).unwrap());
        assert_eq!(std::fs::read(&p).unwrap()[7], 0x80);
    }

    #[test]
    fn the_qcow2_copy_lives_beside_the_raw_image() {
        assert_eq!(
            qcow2_path(Path::new("/var/tmp/vloop-bench.img")),
            Path::new("/var/tmp/vloop-bench.img.qcow2")
        );
        assert_eq!(qcow2_path(Path::new("img")), Path::new("img.qcow2"));
    }

    #[test]
    fn qemu_img_output_is_read() {
        // As qemu-img 7.2 prints them.
        let info = parse_info(
            r#"{"virtual-size": 4194304, "filename": "r.qcow2", "cluster-size": 65536,
                "format": "qcow2", "actual-size": 4460544, "dirty-flag": false,
                "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}"#,
        )
        .unwrap();
        assert_eq!(
            info,
            Info {
                virtual_size: 4 << 20,
                cluster_size: Some(65536),
                actual_size: Some(4460544),
            }
        );
        let full = parse_check(
            r#"{"image-end-offset": 4521984, "total-clusters": 64, "check-errors": 0,
                "allocated-clusters": 64, "filename": "r.qcow2", "format": "qcow2"}"#,
        )
        .unwrap();
        assert_eq!(not_fully_allocated(&info, &full, 4 << 20), None);
        // An empty overlay: qemu-img leaves allocated-clusters out.
        let empty = parse_check(
            r#"{"image-end-offset": 262144, "total-clusters": 64, "check-errors": 0,
                "filename": "o.qcow2", "format": "qcow2"}"#,
        )
        .unwrap();
        assert_eq!(empty.allocated_clusters, 0);
        assert_eq!(
            not_fully_allocated(&info, &empty, 4 << 20).as_deref(),
            Some("0 of its 64 clusters are allocated")
        );
        let corrupt = Check {
            corruptions: 2,
            ..full
        };
        assert!(not_fully_allocated(&info, &corrupt, 4 << 20)
            .unwrap()
            .contains("2 corruptions"));
        // Leaks alone do not matter; another size does.
        let leaky = Check { leaks: 5, ..full };
        assert_eq!(not_fully_allocated(&info, &leaky, 4 << 20), None);
        assert!(not_fully_allocated(&info, &full, 8 << 20)
            .unwrap()
            .contains("virtual size is 4194304"));
        assert!(parse_check("qemu-img: Could not open").is_err());
        assert!(parse_info(r#"{"filename": "x"}"#).is_err());
    }

    #[test]
    fn scratch_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.raw");
        std::fs::write(&p, b"old").unwrap();
        {
            let s = Scratch::new(p.clone());
            assert!(!p.exists(), "a leftover is removed first");
            create_sparse(s.path(), 1 << 30).unwrap();
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!(m.len(), 1 << 30);
            use std::os::unix::fs::MetadataExt;
            assert!(m.blocks() < 64, "{} blocks", m.blocks());
        }
        assert!(!p.exists());
    }

    /// qemu-img, or None (with a visible message) when it is not installed.
    fn qemu_img() -> Option<QemuImg> {
        if vloop_frontend::backend::on_path("qemu-img") {
            Some(QemuImg("qemu-img".into()))
        } else {
            vloop_frontend::skip::skip("qemu-img is not installed (apt-get install qemu-utils)");
            None
        }
    }

    #[test]
    fn the_qcow2_copy_is_fully_allocated_and_reused_while_newer() {
        let Some(q) = qemu_img() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("b.img");
        prepare_image(&raw, 4 << 20, false).unwrap();
        let first = q.prepare_qcow2(&raw, 4 << 20, false).unwrap();
        assert!(!first.reused && first.convert_secs.is_some());
        assert_eq!(first.path, dir.path().join("b.img.qcow2"));
        assert_eq!(first.check.allocated_clusters, 64);
        assert_eq!(first.info.cluster_size, Some(65536));
        assert!(!dir.path().join("b.img.qcow2.part").exists());
        let again = q.prepare_qcow2(&raw, 4 << 20, false).unwrap();
        assert!(again.reused, "{again:?}");
        // The raw image changed after the copy was made: converted again.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        File::options()
            .write(true)
            .open(&raw)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(!q.prepare_qcow2(&raw, 4 << 20, false).unwrap().reused);
        assert!(!q.prepare_qcow2(&raw, 4 << 20, true).unwrap().reused);
        // A qcow2 copy with holes is never reused, nor accepted when it comes out so.
        let holes = dir.path().join("h.img");
        create_sparse(&holes, 4 << 20).unwrap();
        match q.prepare_qcow2(&holes, 4 << 20, false) {
            Err(ImageError::NotAllocated { why, .. }) => {
                assert!(why.contains("0 of its 64"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // An empty overlay over the raw image.
        let o = dir.path().join("o.qcow2");
        q.create_overlay(&raw, &o).unwrap();
        assert_eq!(q.info(&o).unwrap().virtual_size, 4 << 20);
        assert_eq!(q.check(&o).unwrap().allocated_clusters, 0);
        let e = q
            .create_overlay(&dir.path().join("absent"), &o)
            .unwrap_err();
        assert!(matches!(e, ImageError::Io { .. }), "{e:?}");
        let e = QemuImg(dir.path().join("no-qemu-img"))
            .info(&o)
            .unwrap_err();
        assert!(e.to_string().contains("install qemu-utils"), "{e}");
    }
}
