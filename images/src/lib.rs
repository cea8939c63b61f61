//! vloop-images: create, build, copy and inspect disk images.
//!
//! Every builder is reproducible: the same tree and timestamp give the same bytes.

pub mod copy;
pub mod create;
pub mod ext2;
pub mod info;
pub mod iso;
pub mod size;
pub mod tree;

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
        let mut chain = String::new();
        let mut next = Some(e);
        while let Some(err) = next {
            chain.push_str(&err.to_string());
            chain.push_str(": ");
            next = err.source();
        }
        assert_eq!(chain.matches(CAUSE).count(), 1, "{chain}");
    }

    #[test]
    fn causes_are_not_repeated() {
        let path = || PathBuf::from("/x/img");
        use crate::copy::CopyError;
        use crate::create::CreateError;
        check(&CopyError::Open {
            path: path(),
            source: cause(),
        });
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
        check(&CopyError::from(CreateError::Io {
            path: path(),
            source: cause(),
        }));
        check(&CreateError::Dir {
            dir: path(),
            source: cause(),
        });
        check(&CreateError::Allocate {
            path: path(),
            size: Size(4096),
            source: cause(),
        });
        check(&CreateError::Persist {
            path: path(),
            source: cause(),
        });
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
    }
}
