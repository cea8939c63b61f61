//! Which format an image is served in when `--format auto` decides.
//!
//! The format is never guessed from data a guest could have written (the CVE-2008-2004 class
//! of attacks, where a guest writes a qcow2 header into its raw disk so that a later open
//! reads a host file as the "backing file"). A file named `*.qcow2` must be qcow2; any other
//! file must not look like another format, or it is refused with a message asking for
//! `--format raw` or `--format qcow2`; and a guest may not write a first sector that would
//! make a raw image decided this way look like another format (the write fails with IOERR, as
//! QEMU does for probed raw images). Backing files whose format the naming image does not
//! record follow the same rule. An explicit `--format raw` serves any bytes as they are.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vloop_qcow2::Format;

/// Whether `path` is named like a qcow2 image.
fn named_qcow2(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("qcow2"))
}

/// The format `--format auto` serves a file named `path` whose first bytes are `first` in, or
/// why it refuses to decide (see the module docs).
pub fn decide_format(path: &Path, first: &[u8]) -> Result<Format, String> {
    let probed = vloop_qcow2::probe(first).map_err(|e| e.to_string());
    match (named_qcow2(path), probed) {
        (true, Ok(Format::Qcow2)) => Ok(Format::Qcow2),
        (true, Ok(Format::Raw)) => Err("named .qcow2 but holds no qcow2 header".into()),
        (false, Ok(Format::Raw)) => Ok(Format::Raw),
        (false, Ok(Format::Qcow2)) => {
            Err("holds a qcow2 header but is not named .qcow2 (a guest may have written it)".into())
        }
        (_, Err(e)) => Err(e),
    }
}

/// A block as O_DIRECT reads it: 4 KiB, in memory aligned to 4 KiB (any logical block size a
/// device may ask for, up to 4 KiB).
#[repr(C, align(4096))]
struct DirectBlock([u8; 4096]);

/// The first bytes of `file` that format probing looks at (fewer when the file is shorter).
/// The read takes a whole aligned block, so a descriptor opened with O_DIRECT can read it.
pub(super) fn read_first(file: &File) -> io::Result<Vec<u8>> {
    let mut block = Box::new(DirectBlock([0u8; 4096]));
    let first = &mut block.0;
    let mut got = 0;
    while got < vloop_qcow2::format::PROBE_BYTES {
        match file.read_at(&mut first[got..], got as u64) {
            Ok(0) => break,
            // Short only at the end of the file (and a second read there would be unaligned).
            Ok(n) if n < first.len() - got => {
                got += n;
                break;
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(first[..got.min(vloop_qcow2::format::PROBE_BYTES)].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_and_the_content_must_agree() {
        let qcow2 = [&b"QFI\xfb"[..], &3u32.to_be_bytes()].concat();
        let raw = vec![0u8; 512];
        let vmdk = b"KDMV and more".to_vec();
        let cases: [(&str, &[u8], Option<Format>); 7] = [
            ("disk.qcow2", &qcow2, Some(Format::Qcow2)),
            ("DISK.QCOW2", &qcow2, Some(Format::Qcow2)),
            ("disk.img", &raw, Some(Format::Raw)),
            ("disk", &[], Some(Format::Raw)),
            ("disk.qcow2", &raw, None),
            ("disk.img", &qcow2, None),
            ("disk.img", &vmdk, None),
        ];
        for (name, first, want) in cases {
            let got = decide_format(Path::new(name), first);
            assert_eq!(got.as_ref().ok(), want.as_ref(), "{name}: {got:?}");
        }
    }

    #[test]
    fn the_first_bytes_of_a_short_file_are_all_of_it() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, b"QFI").unwrap();
        assert_eq!(read_first(&f).unwrap(), b"QFI");
    }

    #[test]
    fn the_first_bytes_read_through_o_direct() {
        // On a disk file system (tmpfs may refuse O_DIRECT), where reads into memory not
        // aligned to the logical block size fail.
        use std::os::unix::fs::OpenOptionsExt;
        let target = concat!(env!("CARGO_MANIFEST_DIR"), "/../target");
        std::fs::create_dir_all(target).unwrap();
        let dir = tempfile::tempdir_in(target).unwrap();
        let path = dir.path().join("disk.img");
        let mut data = vec![0u8; 8192];
        data[..4].copy_from_slice(b"QFI\xfb");
        std::fs::write(&path, &data).unwrap();
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => {
                vloop_frontend::skip::skip(&format!(
                    "O_DIRECT is not supported under target/: {e}"
                ));
                return;
            }
        };
        let first = read_first(&f).unwrap();
        assert_eq!(first.len(), vloop_qcow2::format::PROBE_BYTES);
        assert_eq!(&first[..4], b"QFI\xfb");
    }
}
