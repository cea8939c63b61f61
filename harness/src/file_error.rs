//! An I/O error on one file, with what was being done to it: the one shape every module's
//! error enum wraps for failed reads, writes and folder creations.

use std::path::{Path, PathBuf};

/// Doing `what` to `path` failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}", path.display())]
pub struct FileError {
    /// What was done (`reading`, `creating a folder in`...).
    pub what: &'static str,
    /// The file or folder.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// A `map_err` argument that turns an `io::Error` from doing `what` to `path` into a
/// [`FileError`] (which `?` turns into any error enum that wraps one).
pub fn at(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
    let path = path.to_path_buf();
    move |source| FileError { what, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_action_and_the_path_and_keeps_the_cause() {
        let e = at("reading", Path::new("/x/y"))(std::io::Error::other("gone"));
        assert_eq!(e.to_string(), "reading /x/y");
        assert_eq!(
            std::error::Error::source(&e).map(|c| c.to_string()),
            Some("gone".into())
        );
    }
}
