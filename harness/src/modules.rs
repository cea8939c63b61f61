//! The kernel modules a guest needs: found in a modules tree (`lib/modules/<version>`) with
//! their dependencies (from `modules.dep`, else each module's `depends=`), in load order,
//! built-in ones skipped, compressed ones (`.ko.xz/.zst/.gz`) decompressed on the host.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::file_error::{at, FileError};

/// Modules the guest loads (when they are not built into the kernel); `virtio_console` only
/// for `exec`'s data port.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "isofs",
    "cdrom",
    "virtio_console",
];

/// Errors of module resolution.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// A module the guest needs is neither a module file nor built in.
    #[error("kernel module {0} not found under {1} (and not built in)")]
    MissingModule(String, PathBuf),
    /// A module file could not be read or decompressed.
    #[error("reading kernel module {0}: {1}")]
    BadModule(PathBuf, String),
    /// A module file could not be read.
    #[error(transparent)]
    Io(#[from] FileError),
}

/// A module file to put into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    /// Module name (underscores), e.g. `virtio_blk`.
    pub name: String,
    /// The file in the modules tree (maybe compressed).
    pub path: PathBuf,
}

/// Module name from a file name: `virtio-blk.ko.zst` -> `virtio_blk`.
pub fn module_name(file_name: &str) -> Option<String> {
    let stem = ["ko", "ko.xz", "ko.zst", "ko.gz"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(&format!(".{ext}")))?;
    Some(stem.replace('-', "_"))
}

/// Every module file under `dir`, by module name (the first found wins).
pub fn walk_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk_modules(&p, out);
        } else if let Some(n) = module_name(&e.file_name().to_string_lossy()) {
            out.entry(n).or_insert(p);
        }
    }
}

/// Reads a module file, decompressing `.xz`, `.zst` and `.gz`.
pub fn read_module(path: &Path) -> Result<Vec<u8>, ModuleError> {
    let raw = fs::read(path).map_err(at("reading", path))?;
    let bad = |e: String| ModuleError::BadModule(path.to_path_buf(), e);
    let name = path.to_string_lossy();
    if name.ends_with(".zst") {
        let mut out = Vec::new();
        ruzstd::decoding::StreamingDecoder::new(&raw[..])
            .map_err(|e| bad(e.to_string()))?
            .read_to_end(&mut out)
            .map_err(|e| bad(e.to_string()))?;
        Ok(out)
    } else if name.ends_with(".xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut &raw[..], &mut out).map_err(|e| bad(e.to_string()))?;
        Ok(out)
    } else if name.ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| bad(e.to_string()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// The `depends=` list in a module's `.modinfo` strings.
pub fn modinfo_depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    module
        .windows(KEY.len())
        .position(|w| w == KEY)
        .map(|i| {
            let rest = &module[i + KEY.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

/// Parses `modules.dep` into name -> dependency names.
pub fn parse_modules_dep(text: &str) -> HashMap<String, Vec<String>> {
    let name_of = |p: &str| module_name(p.rsplit('/').next().unwrap_or(p));
    text.lines()
        .filter_map(|l| {
            let (m, deps) = l.split_once(':')?;
            Some((
                name_of(m.trim())?,
                deps.split_whitespace().filter_map(name_of).collect(),
            ))
        })
        .collect()
}

/// Names of built-in modules from `modules.builtin`.
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| module_name(l.trim().rsplit('/').next().unwrap_or("")))
        .collect()
}

/// The module files needed for `wanted`, dependencies first; built-in modules are skipped.
pub fn resolve_modules(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<ModuleFile>, ModuleError> {
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin"))
        .map(|t| parse_builtin(&t))
        .unwrap_or_default();
    let dep_file = fs::read_to_string(modules_dir.join("modules.dep"))
        .ok()
        .map(|t| parse_modules_dep(&t));
    let mut files = BTreeMap::new();
    walk_modules(&modules_dir.join("kernel"), &mut files);
    walk_modules(&modules_dir.join("updates"), &mut files);
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for w in wanted {
        visit(
            w,
            modules_dir,
            &builtin,
            dep_file.as_ref(),
            &files,
            &mut seen,
            &mut order,
        )?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    dir: &Path,
    builtin: &BTreeSet<String>,
    deps: Option<&HashMap<String, Vec<String>>>,
    files: &BTreeMap<String, PathBuf>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<ModuleFile>,
) -> Result<(), ModuleError> {
    let name = name.replace('-', "_");
    if !seen.insert(name.clone()) {
        return Ok(());
    }
    let Some(path) = files.get(&name) else {
        if builtin.contains(&name) {
            return Ok(());
        }
        return Err(ModuleError::MissingModule(name, dir.to_path_buf()));
    };
    let ds = match deps.and_then(|d| d.get(&name)) {
        Some(d) => d.clone(),
        None => modinfo_depends(&read_module(path)?),
    };
    for d in ds {
        visit(&d, dir, builtin, deps, files, seen, order)?;
    }
    order.push(ModuleFile {
        name,
        path: path.clone(),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_module(deps: &str) -> Vec<u8> {
        let mut v = b"\x7fELF junk\0license=GPL\0".to_vec();
        v.extend_from_slice(format!("depends={deps}\0vermagic=6.1\0").as_bytes());
        v
    }

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let k = t.path().join("kernel/drivers/virtio");
        fs::create_dir_all(&k).unwrap();
        fs::write(
            k.join("virtio_pci.ko"),
            fake_module("virtio_ring,virtio_pci_modern_dev,virtio"),
        )
        .unwrap();
        fs::write(k.join("virtio.ko"), fake_module("virtio_ring")).unwrap();
        fs::write(k.join("virtio_ring.ko"), fake_module("")).unwrap();
        fs::write(k.join("virtio_pci_modern_dev.ko"), fake_module("")).unwrap();
        let b = t.path().join("kernel/drivers/block");
        fs::create_dir_all(&b).unwrap();
        fs::write(b.join("virtio_blk.ko"), fake_module("virtio,virtio_ring")).unwrap();
        let c = t.path().join("kernel/drivers/char");
        fs::create_dir_all(&c).unwrap();
        fs::write(
            c.join("virtio_console.ko"),
            fake_module("virtio,virtio_ring"),
        )
        .unwrap();
        fs::write(
            t.path().join("modules.builtin"),
            "kernel/fs/isofs/isofs.ko\nkernel/drivers/cdrom/cdrom.ko\n",
        )
        .unwrap();
        t
    }

    #[test]
    fn resolves_dependencies_first_and_skips_builtins() {
        let t = tree();
        let order: Vec<String> = resolve_modules(t.path(), GUEST_MODULES)
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio",
                "virtio_pci",
                "virtio_blk",
                "virtio_console"
            ]
        );
    }

    #[test]
    fn modules_dep_overrides_modinfo() {
        let t = tree();
        fs::write(
            t.path().join("modules.dep"),
            "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko\nkernel/drivers/virtio/virtio_ring.ko:\n",
        )
        .unwrap();
        let order: Vec<String> = resolve_modules(t.path(), &["virtio_blk"])
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(order, ["virtio_ring", "virtio_blk"]);
    }

    #[test]
    fn missing_module_is_an_error() {
        let t = tree();
        let e = resolve_modules(t.path(), &["nope"]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn names_and_metadata() {
        assert_eq!(
            module_name("virtio-blk.ko.zst").as_deref(),
            Some("virtio_blk")
        );
        assert_eq!(module_name("isofs.ko").as_deref(), Some("isofs"));
        assert_eq!(module_name("README"), None);
        assert_eq!(modinfo_depends(&fake_module("a,b-c")), ["a", "b_c"]);
        assert!(modinfo_depends(&fake_module("")).is_empty());
    }

    #[test]
    fn decompresses_gzip_modules() {
        use std::io::Write;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("m.ko.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&fake_module("x")).unwrap();
        fs::write(&p, enc.finish().unwrap()).unwrap();
        assert_eq!(read_module(&p).unwrap(), fake_module("x"));
    }
}
