//! A source folder read into memory, ready for an image builder.
//!
//! The ext2 and ISO 9660 builders never walk the host file system themselves: they get a
//! [`Tree`], whose order and metadata depend only on what the folder holds, never on the
//! order `readdir` returns entries in, on ctimes, or on the user running the build. That is
//! what makes the images reproducible.
//!
//! - Entries of every directory are sorted by the bytes of their names.
//! - Nodes are numbered in depth-first pre-order of that sorted walk; node 0 is the root.
//! - Hard links within the folder share one node (`nlink` counts the links inside the tree).
//! - Owners are squashed to 0 unless [`TreeOptions::keep_owners`] is set.
//! - Modification times are clamped to the build timestamp (reproducible-builds practice):
//!   see [`resolve_timestamp`].
//! - Sockets, FIFOs and device nodes are skipped with a warning.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::warn;

/// Index of a node in [`Tree::nodes`].
pub type NodeId = usize;

/// The root directory's id.
pub const ROOT: NodeId = 0;

/// Errors from reading a source folder.
#[derive(Debug, Error)]
pub enum TreeError {
    /// The source folder does not exist or is not a directory.
    #[error("{0}: not a directory (give an existing folder with --from)")]
    NotADirectory(PathBuf),
    /// A file or directory in the tree could not be read.
    #[error("cannot read {path}")]
    Read {
        /// What could not be read.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// SOURCE_DATE_EPOCH is set but is not a whole number of seconds.
    #[error("SOURCE_DATE_EPOCH={0:?} is not a number of seconds since 1970 (unset it or fix it)")]
    BadSourceDateEpoch(String),
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A regular file; its content is read from `source` when the image is written.
    File {
        /// Where the content is on the host.
        source: PathBuf,
        /// Its length in bytes, as seen when the tree was read.
        size: u64,
    },
    /// A directory: its entries, sorted by name bytes (no `.` or `..`).
    Dir {
        /// `(name, node)` pairs.
        entries: Vec<(Vec<u8>, NodeId)>,
    },
    /// A symbolic link and its target, as bytes.
    Symlink {
        /// The link's target.
        target: Vec<u8>,
    },
}

/// One inode's worth of metadata and content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// File, directory or symlink.
    pub kind: NodeKind,
    /// Permission bits, including setuid/setgid/sticky (`0o7777` at most).
    pub mode: u32,
    /// Owner (0 unless owners are kept).
    pub uid: u32,
    /// Group (0 unless owners are kept).
    pub gid: u32,
    /// Modification time in seconds since 1970, clamped to the build timestamp.
    pub mtime: i64,
    /// Number of links to this node inside the tree (directories: 2 + subdirectories).
    pub nlink: u32,
}

impl Node {
    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }
}

/// Options for reading a folder.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeOptions {
    /// Keep the files' owners and groups instead of squashing them to 0.
    pub keep_owners: bool,
    /// Build timestamp (see [`resolve_timestamp`]); `None`: the newest mtime in the tree.
    pub timestamp: Option<i64>,
}

/// A folder read into memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// All nodes; `nodes[ROOT]` is the root directory.
    pub nodes: Vec<Node>,
    /// The build timestamp: every mtime is at most this, and builders use it for the
    /// file system's own times (superblock, volume descriptor).
    pub timestamp: i64,
}

/// The build timestamp: `explicit` (from `--timestamp`) if given, else `SOURCE_DATE_EPOCH`
/// if set, else `None` (the tree's newest mtime is used).
pub fn resolve_timestamp(explicit: Option<i64>) -> Result<Option<i64>, TreeError> {
    if explicit.is_some() {
        return Ok(explicit);
    }
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| TreeError::BadSourceDateEpoch(s)),
        _ => Ok(None),
    }
}

/// Reads `dir` into a [`Tree`].
pub fn scan(dir: &Path, opts: &TreeOptions) -> Result<Tree, TreeError> {
    let meta = fs::symlink_metadata(dir).map_err(|source| TreeError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(TreeError::NotADirectory(dir.to_path_buf()));
    }
    let mut scanner = Scanner {
        nodes: Vec::new(),
        links: HashMap::new(),
        keep_owners: opts.keep_owners,
    };
    scanner.visit(dir, &meta)?;
    let mut nodes = scanner.nodes;
    let timestamp = opts
        .timestamp
        .unwrap_or_else(|| nodes.iter().map(|n| n.mtime).max().unwrap_or(0));
    for node in &mut nodes {
        node.mtime = node.mtime.min(timestamp);
    }
    Ok(Tree { nodes, timestamp })
}

struct Scanner {
    nodes: Vec<Node>,
    /// (device, inode) of multiply-linked files already in the tree.
    links: HashMap<(u64, u64), NodeId>,
    keep_owners: bool,
}

impl Scanner {
    fn push(&mut self, kind: NodeKind, meta: &fs::Metadata) -> NodeId {
        let (uid, gid) = if self.keep_owners {
            (meta.uid(), meta.gid())
        } else {
            (0, 0)
        };
        self.nodes.push(Node {
            kind,
            mode: meta.mode() & 0o7777,
            uid,
            gid,
            mtime: meta.mtime(),
            nlink: 1,
        });
        self.nodes.len() - 1
    }

    fn visit(&mut self, path: &Path, meta: &fs::Metadata) -> Result<NodeId, TreeError> {
        let read_err = |source| TreeError::Read {
            path: path.to_path_buf(),
            source,
        };
        let id = self.push(
            NodeKind::Dir {
                entries: Vec::new(),
            },
            meta,
        );
        let mut names: Vec<(Vec<u8>, PathBuf)> = fs::read_dir(path)
            .map_err(read_err)?
            .map(|e| {
                e.map(|e| (e.file_name().as_bytes().to_vec(), e.path()))
                    .map_err(read_err)
            })
            .collect::<Result<_, _>>()?;
        names.sort();
        let mut entries = Vec::with_capacity(names.len());
        let mut subdirs = 0;
        for (name, child) in names {
            let cmeta = fs::symlink_metadata(&child).map_err(|source| TreeError::Read {
                path: child.clone(),
                source,
            })?;
            let ft = cmeta.file_type();
            let cid = if ft.is_dir() {
                subdirs += 1;
                self.visit(&child, &cmeta)?
            } else if ft.is_symlink() {
                let target = fs::read_link(&child).map_err(|source| TreeError::Read {
                    path: child.clone(),
                    source,
                })?;
                let target = target.as_os_str().as_bytes().to_vec();
                self.push(NodeKind::Symlink { target }, &cmeta)
            } else if ft.is_file() {
                let key = (cmeta.dev(), cmeta.ino());
                match self.links.get(&key) {
                    Some(&existing) if cmeta.nlink() > 1 => {
                        self.nodes[existing].nlink += 1;
                        existing
                    }
                    _ => {
                        let fid = self.push(
                            NodeKind::File {
                                source: child.clone(),
                                size: cmeta.len(),
                            },
                            &cmeta,
                        );
                        if cmeta.nlink() > 1 {
                            self.links.insert(key, fid);
                        }
                        fid
                    }
                }
            } else {
                warn!(path = %child.display(), "skipping special file (socket, FIFO or device)");
                continue;
            };
            entries.push((name, cid));
        }
        let node = &mut self.nodes[id];
        node.nlink = 2 + subdirs;
        node.kind = NodeKind::Dir { entries };
        Ok(id)
    }
}

impl Tree {
    /// The root directory's node.
    pub fn root(&self) -> &Node {
        &self.nodes[ROOT]
    }

    /// Every entry below the root in depth-first pre-order, as `(path, node)` where the
    /// path is relative to the root, `/`-separated, without a leading `/`. A hard-linked
    /// file appears once per link.
    pub fn walk(&self) -> Vec<(Vec<u8>, NodeId)> {
        let mut out = Vec::new();
        self.walk_into(ROOT, &mut Vec::new(), &mut out);
        out
    }

    fn walk_into(&self, dir: NodeId, prefix: &mut Vec<u8>, out: &mut Vec<(Vec<u8>, NodeId)>) {
        let NodeKind::Dir { entries } = &self.nodes[dir].kind else {
            return;
        };
        for (name, id) in entries {
            let len = prefix.len();
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(name);
            out.push((prefix.clone(), *id));
            if self.nodes[*id].is_dir() {
                self.walk_into(*id, prefix, out);
            }
            prefix.truncate(len);
        }
    }

    /// Total bytes of regular-file content (each node counted once).
    pub fn file_bytes(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| match n.kind {
                NodeKind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }
}

/// A path in a [`Tree::walk`] as an `OsStr`, for messages and host-side lookups.
pub fn os_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    fn sample() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        fs::create_dir_all(p.join("b/deep/er")).unwrap();
        fs::write(p.join("b/deep/er/f"), b"hello").unwrap();
        fs::write(p.join("a"), b"").unwrap();
        fs::hard_link(p.join("a"), p.join("c-link")).unwrap();
        symlink("b/deep", p.join("s")).unwrap();
        fs::set_permissions(p.join("a"), fs::Permissions::from_mode(0o4751)).unwrap();
        d
    }

    #[test]
    fn walk_is_sorted_and_links_share_a_node() {
        let d = sample();
        let t = scan(d.path(), &TreeOptions::default()).unwrap();
        let paths: Vec<String> = t
            .walk()
            .iter()
            .map(|(p, _)| String::from_utf8(p.clone()).unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "a",
                "b",
                "b/deep",
                "b/deep/er",
                "b/deep/er/f",
                "c-link",
                "s"
            ]
        );
        let w = t.walk();
        assert_eq!(w[0].1, w[5].1, "hard links share a node");
        assert_eq!(t.nodes[w[0].1].nlink, 2);
        assert_eq!(t.nodes[w[0].1].mode, 0o4751);
        assert_eq!(t.root().nlink, 3, "root: 2 + one subdirectory");
        assert_eq!(
            t.nodes[w[6].1].kind,
            NodeKind::Symlink {
                target: b"b/deep".to_vec()
            }
        );
        assert_eq!(t.file_bytes(), 5);
        assert!(t.nodes.iter().all(|n| n.uid == 0 && n.gid == 0));
    }

    #[test]
    fn timestamp_clamps_mtimes() {
        let d = sample();
        let t = scan(
            d.path(),
            &TreeOptions {
                keep_owners: false,
                timestamp: Some(1000),
            },
        )
        .unwrap();
        assert_eq!(t.timestamp, 1000);
        assert!(t.nodes.iter().all(|n| n.mtime <= 1000));
        let t2 = scan(d.path(), &TreeOptions::default()).unwrap();
        assert_eq!(
            t2.timestamp,
            t2.nodes.iter().map(|n| n.mtime).max().unwrap()
        );
    }

    #[test]
    fn missing_folder_is_a_clear_error() {
        let err = scan(Path::new("/nonexistent/vloop"), &TreeOptions::default()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vloop"), "{err}");
    }
}
