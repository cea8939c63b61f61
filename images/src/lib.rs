//! vloop-images: create, build, copy and inspect disk images.
//!
//! Every builder is reproducible: the same tree and timestamp give the same bytes. Every
//! output goes through one path ([`output`]): a temporary file beside the target, renamed
//! into place when complete, never over an existing file unless asked.
//!
//! The modules, bottom up; each imports only from those above it in this list:
//! - [`size`]: sizes as users type them (`10M`, `20480s`), the workspace's one size grammar;
//! - [`tree`]: a source folder read into memory, sorted and clamped for reproducible builds;
//! - [`input`]: reading image files, block devices and source files, holes skipped;
//! - [`verify`]: hashing walks, and outputs and their sources read back and compared;
//! - [`image`]: images as virtual disks: raw, or qcow2 through its backing chain, and format
//!   probing with its guard;
//! - [`output`]: writing an output file safely, and the registry of unfinished ones;
//! - [`create`]: blank raw and qcow2 images (qcow2 optionally over a backing file);
//! - [`copy`]: a device or image copied to an image file, and SHA-256 of images;
//! - [`convert`]: an image's virtual disk written as raw or qcow2 (chains flattened);
//! - [`ext2`]: the ext2 builder (plan, writing pass, on-disk layout);
//! - [`iso`]: the ISO 9660 builder and a reader of ISO 9660 images;
//! - [`info`]: what an image holds;
//! - [`folder`]: an ext2 or ISO 9660 image of a folder, the whole command as one call;
//! - [`report`]: the lines `vloop-image` prints for each command's summary.

pub mod convert;
pub mod copy;
pub mod create;
pub mod ext2;
pub mod folder;
pub mod image;
pub mod info;
pub mod input;
pub mod iso;
pub mod output;
pub mod report;
pub mod size;
pub mod tree;
pub mod verify;

#[cfg(test)]
mod error_display_tests {
    //! Every error that carries a cause in `#[source]` leaves it out of its own message, so
    //! that `{:#}` (message, then each cause) says everything exactly once.

    use std::io;
    use std::path::PathBuf;

    use crate::size::Size;

    const CAUSE: &str = "a very particular cause";

    fn cause() -> io::Error {
        io::Error::other(CAUSE)
    }

    fn check(e: &(dyn std::error::Error + 'static)) {
        let text = e.to_string();
        assert!(!text.contains(CAUSE), "message repeats its cause: {text}");
        let chain = crate::info::error_line(e);
        assert_eq!(chain.matches(CAUSE).count(), 1, "{chain}");
    }

    #[test]
    fn causes_are_not_repeated() {
        let path = || PathBuf::from("/x/img");
        use crate::copy::CopyError;
        use crate::create::CreateError;
        use crate::folder::FolderError;
        use crate::input::InputError;
        use crate::output::OutputError;
        check(&CopyError::Read {
            path: path(),
            offset: 512,
            source: cause(),
        });
        check(&CopyError::Write {
            path: path(),
            offset: 512,
            source: cause(),
        });
        check(&CopyError::from(OutputError::Io {
            path: path(),
            source: cause(),
        }));
        check(&CopyError::from(InputError::Open {
            path: path(),
            source: cause(),
        }));
        check(&OutputError::Dir {
            dir: path(),
            source: cause(),
        });
        check(&CreateError::from(OutputError::Persist {
            path: path(),
            source: cause(),
        }));
        check(&CreateError::Allocate {
            path: path(),
            size: Size(4096),
            source: cause(),
        });
        check(&crate::info::InfoError::from(InputError::Open {
            path: path(),
            source: cause(),
        }));
        check(&FolderError::Hash(CopyError::Read {
            path: path(),
            offset: 512,
            source: cause(),
        }));
        check(&FolderError::from(crate::ext2::Ext2Error::from(
            OutputError::Io {
                path: path(),
                source: cause(),
            },
        )));
        check(&crate::ext2::Ext2Error::Io {
            path: path(),
            op: "write",
            source: cause(),
        });
        check(&crate::info::InfoError::Read {
            path: path(),
            offset: 0,
            source: cause(),
        });
        check(&crate::iso::IsoError::Io {
            path: path(),
            source: cause(),
        });
        check(&crate::iso::IsoError::Write(
            hadris_fs::PathError::from(hadris_fs::Error::device(cause(), "writing failed"))
                .with_path("/a"),
        ));
        check(&crate::tree::TreeError::Read {
            path: path(),
            source: cause(),
        });
        use crate::image::ImageError;
        let chain_err = || {
            ImageError::from(vloop_qcow2::Error::Io {
                what: "reading data",
                path: path(),
                offset: 0,
                source: cause(),
            })
        };
        check(&chain_err());
        check(&ImageError::ProbeRead {
            path: path(),
            source: cause(),
        });
        check(&CreateError::Backing {
            name: path(),
            resolved: path(),
            source: chain_err(),
        });
        check(&CreateError::Qcow2 {
            path: path(),
            source: vloop_qcow2::CreateError::Io(cause()),
        });
        use crate::convert::ConvertError;
        check(&ConvertError::from(chain_err()));
        check(&ConvertError::Read {
            path: path(),
            offset: 0,
            source: cause(),
        });
        check(&ConvertError::Qcow2 {
            path: path(),
            source: vloop_qcow2::Error::OpenBacking {
                path: path(),
                by: path(),
                source: cause(),
            },
        });
        check(&ConvertError::ReadBack {
            path: path(),
            source: chain_err(),
        });
        check(&crate::info::InfoError::from(chain_err()));
    }
}
