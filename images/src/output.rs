//! The one way every command writes its output file: `create`, `copy`, the ext2 and the
//! ISO 9660 builders all go through [`OutputFile`].
//!
//! Output files are never half-written in place: the content goes to a hidden temporary file
//! beside the target (`.NAME.XXXXXX.partial`), which is renamed over the target only when it
//! is complete. Without `force` the rename refuses to replace anything (`renameat2` with
//! `RENAME_NOREPLACE`), so two concurrent runs cannot overwrite each other either. With
//! `force` an existing regular file is replaced, unless another process holds a lock on it
//! (QEMU and `vloop-blk` lock the images they serve). A temporary file that is dropped
//! before [`OutputFile::commit`] is deleted.
//!
//! A process that ends itself on a signal cannot rely on that (destructors do not run on
//! `exit`): it gives its outputs an [`Unfinished`] registry, in which each temporary file is
//! listed while it is written, and removes them all ([`Unfinished::remove_all`]) before it
//! exits. The registry belongs to whoever creates it; outputs given none are listed nowhere,
//! so builds running side by side in one process share nothing.

use std::fs::{self, File, Permissions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use thiserror::Error;
use tracing::debug;

/// Errors from preparing or committing an output file.
#[derive(Debug, Error)]
pub enum OutputError {
    /// The target exists and `force` was not given.
    #[error("{0} already exists (use --force to replace it)")]
    Exists(PathBuf),
    /// The target exists but is not a regular file (a directory, a device...).
    #[error("{0} exists and is not a regular file: refusing to replace it (choose another path)")]
    NotAFile(PathBuf),
    /// Another process holds a lock on the target (QEMU or vloop-blk serving it).
    #[error(
        "{0} is in use: another process holds a lock on it (stop the VM or backend using it first)"
    )]
    InUse(PathBuf),
    /// The folder for the target does not exist.
    #[error("{0}: no such folder (create it first, or write the image somewhere else)")]
    NoDir(PathBuf),
    /// The folder for the target cannot be written.
    #[error("cannot create a file in {dir}")]
    Dir {
        /// The target's folder.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Moving the finished file into place failed.
    #[error("cannot move the finished file to {path}")]
    Persist {
        /// The target.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another I/O error on the target.
    #[error("{path}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Where a command writes, and what it may do there.
#[derive(Debug, Clone, Copy)]
pub struct Output<'a> {
    /// The file to write.
    pub path: &'a Path,
    /// Replace an existing regular file that nobody holds a lock on.
    pub force: bool,
    /// Lists the temporary file while it is written.
    pub unfinished: Option<&'a Unfinished>,
}

impl<'a> Output<'a> {
    /// `path`, which must not exist yet; listed nowhere.
    pub fn new(path: &'a Path) -> Self {
        Self {
            path,
            force: false,
            unfinished: None,
        }
    }

    /// `path`, replacing a regular file there; listed nowhere.
    pub fn replace(path: &'a Path) -> Self {
        Self {
            force: true,
            ..Self::new(path)
        }
    }
}

/// Temporary outputs that are not finished yet, for a process that removes them itself
/// before it exits on a signal. Clones share one list.
#[derive(Debug, Clone, Default)]
pub struct Unfinished(Arc<Mutex<Vec<PathBuf>>>);

impl Unfinished {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<PathBuf>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Deletes every temporary output listed here; returns how many it found.
    ///
    /// Meant for a signal handler that ends the process right after: the registry stays
    /// locked until the process exits, so no output listed here can be committed (or
    /// finish dropping) meanwhile. Call it last.
    pub fn remove_all(&self) -> usize {
        let mut list = self.lock();
        let n = list.len();
        for path in list.drain(..) {
            let _ = fs::remove_file(&path);
        }
        // Held until the process exits: a build that finishes meanwhile cannot rename its
        // output into place.
        std::mem::forget(list);
        n
    }
}

/// One path listed in an [`Unfinished`] registry; dropping it takes the path off the list
/// (deleting the file stays the job of its owner).
#[derive(Debug)]
struct Listed {
    registry: Unfinished,
    path: PathBuf,
}

impl Listed {
    fn unlist(&self, list: &mut Vec<PathBuf>) {
        if let Some(i) = list.iter().position(|p| *p == self.path) {
            list.swap_remove(i);
        }
    }

    /// Runs `finish` (the rename into place) with the registry locked, then takes the path
    /// off the list: an interruption either removes the temporary file before the rename or
    /// finds the output complete, never anything in between.
    fn commit<T>(self, finish: impl FnOnce() -> T) -> T {
        let mut list = self.registry.lock();
        let result = finish();
        self.unlist(&mut list);
        drop(list);
        std::mem::forget(self);
        result
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        let mut list = self.registry.lock();
        self.unlist(&mut list);
    }
}

/// An output file under construction: a temporary file beside the target, removed if it is
/// dropped before [`OutputFile::commit`].
#[derive(Debug)]
pub struct OutputFile {
    temp: tempfile::NamedTempFile,
    target: PathBuf,
    force: bool,
    listed: Option<Listed>,
}

impl OutputFile {
    /// Checks that `out.path` may be written (absent, or a regular file nobody has locked
    /// when `out.force` is set) and opens a temporary file beside it, listed in
    /// `out.unfinished` if given.
    pub fn create(out: &Output<'_>) -> Result<Self, OutputError> {
        let target = out.path;
        check_target(target, out.force)?;
        let dir = target_dir(target);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !dir.is_dir() {
            return Err(OutputError::NoDir(dir));
        }
        // The registry stays locked from before the file exists until it is listed (its name
        // is random, so it cannot be listed before): a signal's `remove_all` either runs
        // before the file exists or finds it listed.
        let registry = out.unfinished.map(|u| (u, u.lock()));
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".partial")
            .permissions(Permissions::from_mode(0o666))
            .tempfile_in(&dir)
            .map_err(|source| OutputError::Dir { dir, source })?;
        let listed = registry.map(|(u, mut list)| {
            list.push(temp.path().to_path_buf());
            Listed {
                registry: u.clone(),
                path: temp.path().to_path_buf(),
            }
        });
        debug!(temp = %temp.path().display(), "writing to a temporary file");
        Ok(OutputFile {
            temp,
            target: target.to_path_buf(),
            force: out.force,
            listed,
        })
    }

    /// The temporary file, open for reading and writing.
    pub fn file(&self) -> &File {
        self.temp.as_file()
    }

    /// Where the temporary file is.
    pub fn temp_path(&self) -> &Path {
        self.temp.path()
    }

    /// The target path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the finished file to the target, makes the rename durable, and returns the
    /// file, still open.
    pub fn commit(self) -> Result<File, OutputError> {
        let target = self.target;
        let temp = self.temp;
        if self.force {
            // Checked again just before replacing: the lock may be new.
            check_target(&target, true)?;
        }
        let persist = || {
            if self.force {
                temp.persist(&target)
            } else {
                temp.persist_noclobber(&target)
            }
        };
        let result = match self.listed {
            Some(listed) => listed.commit(persist),
            None => persist(),
        };
        let file = result.map_err(|e| {
            if e.error.kind() == io::ErrorKind::AlreadyExists {
                OutputError::Exists(target.clone())
            } else {
                OutputError::Persist {
                    path: target.clone(),
                    source: e.error,
                }
            }
        })?;
        if let Ok(d) = File::open(target_dir(&target)) {
            let _ = d.sync_all();
        }
        Ok(file)
    }
}

/// The folder `target` is written in.
fn target_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks that `target` is absent (in a folder that exists), or, with `force`, a regular
/// file nobody has locked.
pub fn check_target(target: &Path, force: bool) -> Result<(), OutputError> {
    match fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
                Err(OutputError::NoDir(dir.to_path_buf()))
            }
            _ => Ok(()),
        },
        Err(source) => Err(OutputError::Io {
            path: target.to_path_buf(),
            source,
        }),
        Ok(_) if !force => Err(OutputError::Exists(target.to_path_buf())),
        Ok(m) if !m.is_file() => Err(OutputError::NotAFile(target.to_path_buf())),
        Ok(_) => {
            if is_locked(target).map_err(|source| OutputError::Io {
                path: target.to_path_buf(),
                source,
            })? {
                Err(OutputError::InUse(target.to_path_buf()))
            } else {
                Ok(())
            }
        }
    }
}

/// True when another open file description holds a lock (OFD or POSIX record lock) on any
/// byte of `path`, as QEMU and `vloop-blk` do on the images they serve.
pub fn is_locked(path: &Path) -> io::Result<bool> {
    // O_NONBLOCK: a FIFO does not wait for a writer.
    let file = std::os::unix::fs::OpenOptionsExt::custom_flags(
        std::fs::OpenOptions::new().read(true),
        libc::O_NONBLOCK,
    )
    .open(path)?;
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl))
        .map_err(io::Error::from)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Opens `path` and takes an OFD write lock on all of it, as QEMU does on an image it
/// serves; the lock lasts as long as the returned file.
#[cfg(test)]
pub(crate) fn hold_lock(path: &Path) -> File {
    let holder = File::options().read(true).write(true).open(path).unwrap();
    // SAFETY: all-zero bytes are a valid `flock`.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    nix::fcntl::fcntl(holder.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)).unwrap();
    holder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfinished_output_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let out = OutputFile::create(&Output::new(&p)).unwrap();
        out.file().set_len(4096).unwrap();
        let temp = out.temp_path().to_path_buf();
        assert!(temp.exists());
        assert!(temp
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(".img."));
        drop(out);
        assert!(!temp.exists());
        assert!(!p.exists());
        // Another process created the target meanwhile: the commit refuses to replace it.
        let out = OutputFile::create(&Output::new(&p)).unwrap();
        fs::write(&p, b"theirs").unwrap();
        let err = out.commit().unwrap_err();
        assert!(matches!(err, OutputError::Exists(_)), "{err}");
        assert_eq!(fs::read(&p).unwrap(), b"theirs");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_temporary_file_is_listed_from_the_moment_it_exists() {
        // A signal's `remove_all` holds the registry's lock and removes what is listed: any
        // temporary file it can see in the directory must be listed by then.
        let d = tempfile::tempdir().unwrap();
        let registry = Unfinished::new();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checker = {
            let (registry, done, dir) = (registry.clone(), done.clone(), d.path().to_owned());
            std::thread::spawn(move || {
                let mut looks = 0u32;
                while !done.load(std::sync::atomic::Ordering::Relaxed) || looks == 0 {
                    let list = registry.lock();
                    for e in fs::read_dir(&dir).unwrap().filter_map(Result::ok) {
                        let path = e.path();
                        let temp = e.file_name().to_string_lossy().starts_with('.');
                        assert!(
                            !temp || list.contains(&path),
                            "{} not listed",
                            path.display()
                        );
                    }
                    drop(list);
                    looks += 1;
                }
                looks
            })
        };
        let p = d.path().join("img");
        for _ in 0..2000 {
            let out = OutputFile::create(&Output {
                unfinished: Some(&registry),
                ..Output::new(&p)
            })
            .unwrap();
            drop(out);
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(checker.join().unwrap() > 0);
        assert!(registry.lock().is_empty());
    }

    #[test]
    fn registries_list_only_their_own_outputs() {
        let d = tempfile::tempdir().unwrap();
        let (mine, theirs) = (Unfinished::new(), Unfinished::new());
        let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
        let out_a = OutputFile::create(&Output {
            unfinished: Some(&mine),
            ..Output::new(&a)
        })
        .unwrap();
        let out_b = OutputFile::create(&Output {
            unfinished: Some(&theirs),
            ..Output::new(&b)
        })
        .unwrap();
        let out_c = OutputFile::create(&Output::new(&c)).unwrap();
        let (temp_a, temp_b) = (out_a.temp_path().to_owned(), out_b.temp_path().to_owned());
        assert_eq!(*mine.lock(), std::slice::from_ref(&temp_a));
        // A committed output leaves its registry.
        out_b.commit().unwrap();
        assert!(theirs.lock().is_empty());
        assert!(b.exists());
        // Removing one registry's outputs leaves the others alone.
        let mine2 = mine.clone();
        std::mem::forget(out_a);
        assert_eq!(mine2.remove_all(), 1);
        assert!(!temp_a.exists());
        assert!(!temp_b.exists() && b.exists());
        assert!(out_c.temp_path().exists());
        out_c.commit().unwrap();
        assert!(c.exists());
    }

    #[test]
    fn locked_files_are_in_use() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        fs::write(&p, b"served").unwrap();
        assert!(!is_locked(&p).unwrap());
        let holder = hold_lock(&p);
        assert!(is_locked(&p).unwrap());
        let err = check_target(&p, true).unwrap_err();
        assert!(matches!(err, OutputError::InUse(_)), "{err}");
        drop(holder);
        assert!(!is_locked(&p).unwrap());
        check_target(&p, true).unwrap();
        assert!(matches!(
            check_target(&p, false),
            Err(OutputError::Exists(_))
        ));
        assert!(matches!(
            check_target(d.path(), true),
            Err(OutputError::NotAFile(_))
        ));
        assert!(matches!(
            check_target(&d.path().join("no/x"), false),
            Err(OutputError::NoDir(_))
        ));
    }
}
