//! Sizes as users type them: `10M`, `10MiB`, `1.5G`, `20480s`, `4096`.
//!
//! The convention is qemu-img's: the suffixes `K`, `M`, `G`, `T` (any case, with or without
//! `iB`) are powers of 1024. `KB`, `MB`, `GB`, `TB` are the decimal SI units (powers of 1000),
//! as in coreutils. `s` counts 512-byte sectors (`20480s` is what `dd count=20480` makes),
//! `B` or no suffix counts bytes. A fraction is accepted when it comes to a whole number of
//! bytes (`1.5G` yes, `1.3K` no). Whitespace between the number and the unit is allowed.
//!
//! This is the one size grammar of the workspace: every command-line option that takes a
//! size parses it with [`parse`] (into a [`Size`]) or [`parse_bytes`] (into bytes), so
//! `4k`, `1M` and `20480s` mean the same in every vloop program.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

/// Bytes in a sector, the unit of the `s` suffix and of virtio block addresses.
pub const SECTOR: u64 = 512;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Errors from parsing a size.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SizeError {
    /// The text is not a number followed by a known unit.
    #[error(
        "'{0}' is not a size: use a number with an optional K, M, G, T suffix \
         (powers of 1024) or s for 512-byte sectors, e.g. 10M or 20480s"
    )]
    Syntax(String),
    /// The number has a fraction that does not come to a whole number of bytes.
    #[error("'{0}' is not a whole number of bytes: drop the fraction or use a smaller unit")]
    Fraction(String),
    /// The size is larger than 2^64 - 1 bytes.
    #[error("'{0}' is too large: the largest size is 16 EiB - 1 byte")]
    TooLarge(String),
}

/// A size in bytes.
///
/// [`Display`](fmt::Display) writes the largest binary unit that divides the size exactly
/// (`10 MiB`, `1536 MiB`, `1000 B`), so what it prints parses back to the same size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
#[serde(transparent)]
pub struct Size(pub u64);

impl Size {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// True when the size is a whole number of 512-byte sectors.
    pub fn is_sector_aligned(self) -> bool {
        self.0.is_multiple_of(SECTOR)
    }

    /// The size rounded up to a whole number of sectors (saturating at the largest one).
    pub fn round_up_to_sector(self) -> Size {
        match self.0.checked_next_multiple_of(SECTOR) {
            Some(v) => Size(v),
            None => Size(u64::MAX - u64::MAX % SECTOR),
        }
    }

    /// An approximate, short form for humans: `1.5 GiB`, `10 MiB`, `512 B`.
    pub fn human(self) -> String {
        let units = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
        for (unit, name) in units {
            if self.0 >= unit {
                let v = self.0 as f64 / unit as f64;
                return if self.0.is_multiple_of(unit) {
                    format!("{} {name}", self.0 / unit)
                } else {
                    format!("{v:.1} {name}")
                };
            }
        }
        format!("{} B", self.0)
    }
}

/// A transfer for humans: `{verb} 10 MiB (10485760 bytes, 8 MiB in holes) in 0.10 s,
/// 100 MiB/s` (no rate when no time passed).
pub fn transfer(verb: &str, bytes: u64, holes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        format!(", {}/s", Size((bytes as f64 / secs) as u64).human())
    } else {
        String::new()
    };
    format!(
        "{verb} {} ({bytes} bytes, {} in holes) in {secs:.2} s{rate}",
        Size(bytes).human(),
        Size(holes).human(),
    )
}

impl From<u64> for Size {
    fn from(v: u64) -> Self {
        Size(v)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
        for (unit, name) in units {
            if self.0 != 0 && self.0.is_multiple_of(unit) {
                return write!(f, "{} {name}", self.0 / unit);
            }
        }
        write!(f, "{} B", self.0)
    }
}

impl FromStr for Size {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

/// Parses a size as described in the [module docs](self).
pub fn parse(text: &str) -> Result<Size, SizeError> {
    let syntax = || SizeError::Syntax(text.to_string());
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim_start();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "s" => SECTOR,
        "k" | "kib" => KIB,
        "m" | "mib" => MIB,
        "g" | "gib" => GIB,
        "t" | "tib" => TIB,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(syntax()),
    };
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || number.ends_with('.')
    {
        return Err(syntax());
    }
    let too_large = || SizeError::TooLarge(text.to_string());
    // Exact arithmetic: (int * 10^f + frac) * multiplier / 10^f must be a whole number.
    let frac = frac.trim_end_matches('0');
    if frac.len() > 30 {
        return Err(SizeError::Fraction(text.to_string()));
    }
    let scale = 10u128.pow(frac.len() as u32);
    let int_v: u128 = if int.is_empty() {
        0
    } else {
        int.trim_start_matches('0').parse::<u128>().or_else(|_| {
            if int.trim_start_matches('0').is_empty() {
                Ok(0)
            } else {
                Err(too_large())
            }
        })?
    };
    let frac_v: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| syntax())?
    };
    let scaled = int_v
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac_v))
        .and_then(|v| v.checked_mul(u128::from(multiplier)))
        .ok_or_else(too_large)?;
    if scaled % scale != 0 {
        return Err(SizeError::Fraction(text.to_string()));
    }
    u64::try_from(scaled / scale)
        .map(Size)
        .map_err(|_| too_large())
}

/// Parses a size as described in the [module docs](self), in bytes.
///
/// Its signature fits clap's `value_parser`: `#[arg(value_parser = parse_bytes)]`.
pub fn parse_bytes(text: &str) -> Result<u64, SizeError> {
    parse(text).map(Size::bytes)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn transfers_read_with_a_rate_when_time_passed() {
        assert_eq!(
            transfer("copied", 10 << 20, 8 << 20, Duration::from_millis(100)),
            "copied 10 MiB (10485760 bytes, 8 MiB in holes) in 0.10 s, 100 MiB/s"
        );
        assert_eq!(
            transfer("converted", 1000, 0, Duration::ZERO),
            "converted 1000 B (1000 bytes, 0 B in holes) in 0.00 s"
        );
    }

    #[test]
    fn units_users_type() {
        let cases = [
            ("0", 0),
            ("4096", 4096),
            ("512B", 512),
            ("512K", 512 * KIB),
            ("512k", 512 * KIB),
            ("10M", 10 * MIB),
            ("10MiB", 10 * MIB),
            ("10 MiB", 10 * MIB),
            ("10mib", 10 * MIB),
            ("1G", GIB),
            ("1GiB", GIB),
            ("2T", 2 * TIB),
            ("20480s", 20480 * 512),
            ("1.5G", 3 * GIB / 2),
            ("0.5K", 512),
            (".5K", 512),
            ("1.50M", 3 * MIB / 2),
            ("10MB", 10_000_000),
            ("1KB", 1000),
            ("1GB", 1_000_000_000),
            ("  7M  ", 7 * MIB),
            ("007", 7),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text), Ok(Size(want)), "{text}");
        }
    }

    #[test]
    fn bad_sizes_say_why() {
        for bad in [
            "", "10Q", "M", "-1M", "1.2.3M", "1e6", "10 M B", "1.", "0x10",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(matches!(err, SizeError::Syntax(_)), "{bad}: {err:?}");
        }
        assert_eq!(
            parse("10Q").unwrap_err().to_string(),
            "'10Q' is not a size: use a number with an optional K, M, G, T suffix \
             (powers of 1024) or s for 512-byte sectors, e.g. 10M or 20480s"
        );
        assert!(matches!(parse("1.3K"), Err(SizeError::Fraction(_))));
        assert!(matches!(parse("0.1"), Err(SizeError::Fraction(_))));
        assert!(matches!(parse("16777216T"), Err(SizeError::TooLarge(_))));
        assert!(matches!(
            parse("99999999999999999999999999999999999999999"),
            Err(SizeError::TooLarge(_))
        ));
        assert_eq!(parse("18446744073709551615"), Ok(Size(u64::MAX)));
        assert!(matches!(
            parse("18446744073709551616"),
            Err(SizeError::TooLarge(_))
        ));
    }

    #[test]
    fn bytes_for_other_crates() {
        assert_eq!(parse_bytes("4k"), Ok(4096));
        assert_eq!(parse_bytes("1M"), Ok(1 << 20));
        assert_eq!(parse_bytes(" 2G "), Ok(2 << 30));
        assert_eq!(parse_bytes("512"), Ok(512));
        for bad in ["4x", "k", ""] {
            assert!(
                matches!(parse_bytes(bad), Err(SizeError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_bytes("99999999999T"),
            Err(SizeError::TooLarge(_))
        ));
    }

    #[test]
    fn display_is_exact() {
        assert_eq!(Size(10 * MIB).to_string(), "10 MiB");
        assert_eq!(Size(3 * GIB / 2).to_string(), "1536 MiB");
        assert_eq!(Size(1000).to_string(), "1000 B");
        assert_eq!(Size(0).to_string(), "0 B");
        assert_eq!(Size(3 * GIB / 2).human(), "1.5 GiB");
        assert_eq!(Size(512).human(), "512 B");
    }

    #[test]
    fn sector_rounding() {
        assert!(Size(1024).is_sector_aligned());
        assert!(!Size(1000).is_sector_aligned());
        assert_eq!(Size(1000).round_up_to_sector(), Size(1024));
        assert_eq!(Size(0).round_up_to_sector(), Size(0));
        assert_eq!(Size(u64::MAX).round_up_to_sector().0 % SECTOR, 0);
    }

    proptest! {
        #[test]
        fn display_round_trips(v in any::<u64>()) {
            prop_assert_eq!(parse(&Size(v).to_string()), Ok(Size(v)));
        }

        #[test]
        fn units_multiply(n in 0u64..1_000_000, unit in 0usize..6) {
            let (suffix, mult) = [("", 1), ("s", 512), ("K", KIB), ("M", MIB), ("G", GIB), ("T", TIB)][unit];
            prop_assert_eq!(parse(&format!("{n}{suffix}")), Ok(Size(n * mult)));
        }

        #[test]
        fn never_panics(s in "\\PC{0,24}") {
            let _ = parse(&s);
        }
    }
}
