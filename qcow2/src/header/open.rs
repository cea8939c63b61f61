//! Whether an image may be opened, read-only or read-write, given its feature bits and
//! extensions.

use super::error::HeaderError;
use super::layout::{
    AUTOCLEAR_BITMAPS, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
};
use super::parse::Header;

impl Header {
    /// Whether the image may be opened (`writable`: read-write), given its feature bits and
    /// extensions. Unknown autoclear bits are not an obstacle: a read-write open clears them
    /// ([`Header::autoclear_after_open`]).
    pub fn check_open(&self, writable: bool) -> Result<(), HeaderError> {
        if self.crypt_method != 0 || self.has_crypto {
            return Err(HeaderError::Encrypted(self.crypt_method));
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        let unknown = self.incompatible & !known;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            return Err(HeaderError::UnknownIncompatible {
                bit,
                name: self.feature_name(0, bit),
            });
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(HeaderError::Corrupt);
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(HeaderError::ExternalDataFile);
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(HeaderError::ExtendedL2);
        }
        if writable {
            if self.incompatible & INCOMPAT_DIRTY != 0 {
                return Err(HeaderError::Dirty);
            }
            if self.autoclear & AUTOCLEAR_BITMAPS != 0 {
                return Err(HeaderError::Bitmaps);
            }
            if self.nb_snapshots > 0 {
                return Err(HeaderError::Snapshots(self.nb_snapshots));
            }
        }
        Ok(())
    }

    /// The autoclear bits a read-write open leaves set: none, since this writer keeps none of
    /// the structures they vouch for (QEMU clears the bits it does not support the same way).
    pub fn autoclear_after_open(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::encode::sample;

    #[test]
    fn feature_bits_decide_the_open_mode() {
        let with = |incompat: u64, autoclear: u64| {
            let mut b = sample(3, None);
            b[72..80].copy_from_slice(&incompat.to_be_bytes());
            b[88..96].copy_from_slice(&autoclear.to_be_bytes());
            Header::parse(&b).unwrap()
        };
        assert_eq!(
            with(INCOMPAT_DIRTY, 0).check_open(true),
            Err(HeaderError::Dirty)
        );
        assert_eq!(with(INCOMPAT_DIRTY, 0).check_open(false), Ok(()));
        assert_eq!(
            with(INCOMPAT_CORRUPT, 0).check_open(false),
            Err(HeaderError::Corrupt)
        );
        assert_eq!(
            with(INCOMPAT_DATA_FILE, 0).check_open(false),
            Err(HeaderError::ExternalDataFile)
        );
        assert_eq!(
            with(INCOMPAT_EXTL2, 0).check_open(false),
            Err(HeaderError::ExtendedL2)
        );
        assert_eq!(
            with(1 << 9, 0).check_open(false),
            Err(HeaderError::UnknownIncompatible { bit: 9, name: None })
        );
        assert_eq!(
            with(0, AUTOCLEAR_BITMAPS).check_open(true),
            Err(HeaderError::Bitmaps)
        );
        assert_eq!(with(0, AUTOCLEAR_BITMAPS).check_open(false), Ok(()));
        assert_eq!(with(0, 1 << 40).check_open(true), Ok(()));
        let mut enc = sample(3, None);
        enc[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(
            Header::parse(&enc).unwrap().check_open(false),
            Err(HeaderError::Encrypted(2))
        );
    }

    #[test]
    fn unknown_bit_is_named_from_the_feature_table() {
        let mut b = sample(3, None);
        // Rename the table's entry for incompatible bit 4 to a bit 7 feature.
        let entry = b
            .windows(19)
            .position(|w| w == b"extended L2 entries")
            .unwrap()
            - 2;
        b[entry + 1] = 7;
        b[72..80].copy_from_slice(&(1u64 << 7).to_be_bytes());
        let h = Header::parse(&b).unwrap();
        let err = h.check_open(false).unwrap_err();
        assert_eq!(
            err,
            HeaderError::UnknownIncompatible {
                bit: 7,
                name: Some("extended L2 entries".into())
            }
        );
        assert!(err.to_string().contains("bit 7 (extended L2 entries)"));
    }
}
