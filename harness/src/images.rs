//! The harness's image factory: the project's `vloop-image` program (found beside the
//! harness) when it is there, else standard tools (a sparse file, `mke2fs -d`, `xorriso`,
//! a plain copy), so scenarios can run while the image builders are being replaced.
//! Every result names the tool that made the image.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Makes images.
#[derive(Debug, Clone)]
pub struct Images {
    /// `vloop-image`, when found and working.
    pub vloop_image: Option<PathBuf>,
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            err.trim().lines().last().unwrap_or("")
        ));
    }
    Ok(())
}

fn must_exist(p: &Path, what: &str) -> Result<(), String> {
    if p.is_file() {
        Ok(())
    } else {
        Err(format!(
            "{what} reported success but {} does not exist",
            p.display()
        ))
    }
}

impl Images {
    /// Looks for `vloop-image` beside the running program (or `explicit`); it is used only
    /// if `--version` names it.
    pub fn find(explicit: Option<&Path>) -> Self {
        let cand = explicit.map(Path::to_path_buf).or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let mut d = exe.parent()?;
            if d.file_name().is_some_and(|n| n == "deps") {
                d = d.parent()?;
            }
            Some(d.join("vloop-image"))
        });
        let works = |p: &PathBuf| {
            Command::new(p).arg("--version").output().is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("vloop-image")
            })
        };
        Self {
            vloop_image: cand.filter(works),
        }
    }

    /// Which tool family is in use.
    pub fn tool(&self) -> &'static str {
        if self.vloop_image.is_some() {
            "vloop-image"
        } else {
            "fallback tools"
        }
    }

    /// A blank sparse image of `size` bytes.
    pub fn create(&self, path: &Path, size: u64) -> Result<String, String> {
        if let Some(vi) = &self.vloop_image {
            run(
                Command::new(vi)
                    .arg("create")
                    .arg(path)
                    .arg("--size")
                    .arg(size.to_string())
                    .arg("--force"),
                "vloop-image create",
            )?;
            must_exist(path, "vloop-image create")?;
            return Ok("vloop-image create".into());
        }
        let f =
            std::fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
        f.set_len(size)
            .map_err(|e| format!("truncate {}: {e}", path.display()))?;
        Ok("truncate".into())
    }

    /// An ext2 image holding `from`.
    pub fn ext2(&self, path: &Path, from: &Path, size: u64) -> Result<String, String> {
        if let Some(vi) = &self.vloop_image {
            run(
                Command::new(vi)
                    .arg("ext2")
                    .arg(path)
                    .arg("--from")
                    .arg(from)
                    .arg("--size")
                    .arg(size.to_string()),
                "vloop-image ext2",
            )?;
            must_exist(path, "vloop-image ext2")?;
            return Ok("vloop-image ext2".into());
        }
        run(
            Command::new("mke2fs")
                .args(["-q", "-t", "ext2", "-F", "-E", "root_owner=0:0", "-d"])
                .arg(from)
                .arg(path)
                .arg(format!("{}k", size / 1024)),
            "mke2fs -d (install e2fsprogs)",
        )?;
        Ok("mke2fs -d".into())
    }

    /// An ISO 9660 image (Rock Ridge + Joliet) holding `from`.
    pub fn iso(&self, path: &Path, from: &Path) -> Result<String, String> {
        if let Some(vi) = &self.vloop_image {
            run(
                Command::new(vi)
                    .arg("iso")
                    .arg(path)
                    .arg("--from")
                    .arg(from),
                "vloop-image iso",
            )?;
            must_exist(path, "vloop-image iso")?;
            return Ok("vloop-image iso".into());
        }
        run(
            Command::new("xorriso")
                .args([
                    "-as",
                    "mkisofs",
                    "-quiet",
                    "-R",
                    "-J",
                    "-joliet-long",
                    "-V",
                    "VLOOP",
                    "-o",
                ])
                .arg(path)
                .arg(from),
            "xorriso (install xorriso)",
        )?;
        Ok("xorriso".into())
    }

    /// A copy of an image (the CD-ROM path: `cp /dev/cdrom cdrom-image`).
    pub fn copy(&self, src: &Path, dst: &Path) -> Result<String, String> {
        if let Some(vi) = &self.vloop_image {
            run(
                Command::new(vi).arg("copy").arg(src).arg(dst),
                "vloop-image copy",
            )?;
            must_exist(dst, "vloop-image copy")?;
            return Ok("vloop-image copy".into());
        }
        std::fs::copy(src, dst)
            .map_err(|e| format!("copy {} to {}: {e}", src.display(), dst.display()))?;
        Ok("std::fs::copy".into())
    }
}
