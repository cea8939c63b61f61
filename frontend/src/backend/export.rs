//! What one backend serves: an image, the format it is served in, the vhost-user socket, the
//! number of queues and the modes (read-only, O_DIRECT, a null device). The bottom of
//! [`backend`](super): every command line is built from an [`Export`]; it imports nothing from
//! its siblings.

use std::path::PathBuf;

/// The format an export's image is served in, as the backend is told it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ImageFormat {
    /// Nothing said: vloop-blk decides with its `--format auto` rule (a file not named
    /// `*.qcow2` that does not look like another format is served as raw); qemu-storage-daemon
    /// exports the file node itself, the bytes as they are.
    #[default]
    Auto,
    /// The bytes of the file as they are: vloop-blk `--format raw`; qemu-storage-daemon
    /// exports the file node itself.
    Raw,
    /// A qcow2 image with its backing chain: vloop-blk `--format qcow2`; qemu-storage-daemon
    /// exports a `driver=qcow2` node over the file node (discards freeing clusters, as
    /// vloop-blk's do), which opens the backing chain the image header names.
    Qcow2 {
        /// Size in bytes of qemu-storage-daemon's qcow2 metadata cache (`cache-size=`; `None`:
        /// QEMU's default, which holds every L2 table of an image of up to 256 GiB with 64 KiB
        /// clusters). vloop-blk sizes its metadata cache itself and is given nothing.
        cache_size: Option<u64>,
    },
}

impl ImageFormat {
    /// Name in tables and JSON: `auto`, `raw` or `qcow2`.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Auto => "auto",
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 { .. } => "qcow2",
        }
    }
}

/// One image exported over one vhost-user-blk socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Image file (or block device).
    pub image: PathBuf,
    /// The format the image is served in.
    pub format: ImageFormat,
    /// Socket path to listen on (removed first if it exists).
    pub socket: PathBuf,
    /// Number of virtqueues.
    pub queues: u16,
    /// Export read-only.
    pub read_only: bool,
    /// Open the image with O_DIRECT (qemu-storage-daemon: `cache.direct=on`).
    pub direct: bool,
    /// Serve a null device of this many bytes (give the image's size): every request
    /// completes without touching the image, so a run measures the vhost-user hop alone.
    /// vloop-blk: `--io-engine null` (it still opens and locks the image and takes its size
    /// from it); qemu-storage-daemon: `--blockdev driver=null-co,size=N,read-zeroes=off` (the
    /// image is not opened).
    pub null: Option<u64>,
}

impl Export {
    /// A read-write, one-queue, buffered export of `image` on `socket`, in the format the
    /// program decides by itself ([`ImageFormat::Auto`]).
    pub fn new(image: impl Into<PathBuf>, socket: impl Into<PathBuf>) -> Export {
        Export {
            image: image.into(),
            format: ImageFormat::Auto,
            socket: socket.into(),
            queues: 1,
            read_only: false,
            direct: false,
            null: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_export_is_read_write_one_queue_buffered_and_auto() {
        let e = Export::new("/tmp/a.img", "/tmp/s.sock");
        assert_eq!(e.image, PathBuf::from("/tmp/a.img"));
        assert_eq!(e.socket, PathBuf::from("/tmp/s.sock"));
        assert_eq!(e.format, ImageFormat::Auto);
        assert_eq!(
            (e.queues, e.read_only, e.direct, e.null),
            (1, false, false, None)
        );
        let names = [
            ImageFormat::Auto,
            ImageFormat::Raw,
            ImageFormat::Qcow2 { cache_size: None },
        ]
        .map(ImageFormat::name);
        assert_eq!(names, ["auto", "raw", "qcow2"]);
    }
}
