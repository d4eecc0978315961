//! Where a record goes in the archive: Hive-style partitions by UTC date and
//! source, one part per flushed (log partition, date, source) group, named by
//! the log offset of the group's first record.

use std::fmt::Write;

use crate::backends::log::Offset;
use crate::backends::objects::{validate_key, ObjectError};

/// Hive's name for a partition whose value is missing; an empty source tag goes here.
pub const EMPTY_SOURCE: &str = "__HIVE_DEFAULT_PARTITION__";

/// Where range claims live, before the archive's prefix.
pub const CLAIMS: &str = "_sift/archive-ranges";

/// Digits of the offset in a part name: every `u64` fits, so names sort by
/// offset. Kinesis sequence numbers are longer (56 digits in practice, up to
/// 129) and all of one length within a stream, so they sort too.
const OFFSET_DIGITS: usize = 20;

/// The most digits a Kinesis sequence number may have.
const MAX_OFFSET_DIGITS: usize = 129;

/// The UTC calendar date (`YYYY-MM-DD`) of a moment in ms since the Unix epoch.
/// Pure arithmetic on the record's own timestamp, so a record's date never
/// depends on when it is archived. Years beyond 9999 print in full.
pub fn utc_date(ms: i64) -> String {
    // Howard Hinnant's civil_from_days, on days since 1970-01-01.
    let days = ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// A source tag made safe as one key segment: ASCII letters, digits, `-`,
/// `_` and `.` stay; every other byte of its UTF-8 becomes `%XX` (upper-case
/// hex, as Hive escapes partition values), `%` included, so the mapping is
/// reversible and two tags never share a segment. An empty tag becomes
/// [`EMPTY_SOURCE`].
pub fn source_segment(tag: &str) -> String {
    if tag.is_empty() {
        return EMPTY_SOURCE.to_string();
    }
    let mut out = String::with_capacity(tag.len());
    for b in tag.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The (date, source segment) a record is archived under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    /// `YYYY-MM-DD`, UTC, of the envelope's `fetched_at_ms`.
    pub dt: String,
    /// [`source_segment`] of the envelope's source tag.
    pub source: String,
}

impl GroupKey {
    /// The group of an envelope.
    pub fn of(fetched_at_ms: i64, source: &str) -> Self {
        GroupKey {
            dt: utc_date(fetched_at_ms),
            source: source_segment(source),
        }
    }
}

/// Builds part keys under one prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The prefix with a trailing `/`, or empty.
    prefix: String,
}

impl Layout {
    /// A layout under `prefix` (surrounding `/` ignored; empty = the store's
    /// root). Fails when the prefix cannot start a key.
    pub fn new(prefix: &str) -> Result<Self, ObjectError> {
        let trimmed = prefix.trim_matches('/');
        let layout = Layout {
            prefix: if trimmed.is_empty() {
                String::new()
            } else {
                format!("{trimmed}/")
            },
        };
        validate_key(&layout.part_key(
            &GroupKey {
                dt: "2000-01-01".into(),
                source: "s".into(),
            },
            0,
            &Offset::ZERO,
        ))?;
        validate_key(&layout.claim_key(0, &Offset::ZERO))?;
        Ok(layout)
    }

    /// The prefix every part key starts with (`raw/`, or empty).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `PREFIX/dt=YYYY-MM-DD/source=TAG/part-<partition>-<offset, 20 digits>.jsonl.zst`
    /// (an offset of more digits, a Kinesis sequence number, is written whole).
    pub fn part_key(&self, group: &GroupKey, partition: u32, first_offset: &Offset) -> String {
        format!(
            "{}dt={}/source={}/part-{partition}-{first_offset:0>width$}.jsonl.zst",
            self.prefix,
            group.dt,
            group.source,
            width = OFFSET_DIGITS
        )
    }

    /// The prefix under which flushed ranges are claimed ([`Layout::claim_key`]):
    /// outside the archive's own prefix, so the table Spark, Athena or Trino
    /// reads holds parts only.
    pub fn claims_prefix(&self) -> String {
        format!("{CLAIMS}/{}", self.prefix)
    }

    /// `_sift/archive-ranges/PREFIX/part-<partition>-<offset, 20 digits>.json`: the
    /// claim of the range of log `partition` whose first record is at `first`
    /// (see "Why neither a crash nor a rebalance loses or duplicates a record"
    /// in [`crate::archive`]).
    pub fn claim_key(&self, partition: u32, first: &Offset) -> String {
        format!(
            "{}part-{partition}-{first:0>width$}.json",
            self.claims_prefix(),
            width = OFFSET_DIGITS
        )
    }

    /// Whether every part of this group can be stored: the longest key it can
    /// produce is a valid key (a source tag of hundreds of characters is not).
    pub fn fits(&self, group: &GroupKey) -> bool {
        let longest: Offset = "9"
            .repeat(MAX_OFFSET_DIGITS)
            .parse()
            .expect("digits are an offset");
        validate_key(&self.part_key(group, u32::MAX, &longest)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(-1), "1969-12-31");
        assert_eq!(utc_date(86_400_000 - 1), "1970-01-01");
        // 2024-02-29T23:59:59.999Z and the next millisecond.
        assert_eq!(utc_date(1_709_251_199_999), "2024-02-29");
        assert_eq!(utc_date(1_709_251_200_000), "2024-03-01");
        assert_eq!(utc_date(951_782_400_000), "2000-02-29");
        assert_eq!(utc_date(4_102_444_800_000), "2100-01-01");
        assert_eq!(utc_date(253_402_300_799_999), "9999-12-31");
        // Absurd timestamps still give a date, not a panic.
        let _ = utc_date(i64::MAX);
        let _ = utc_date(i64::MIN);
    }

    #[test]
    fn dates_agree_with_day_by_day_counting() {
        let mut days = 0i64;
        for year in 1970..2101i64 {
            let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
            let lengths = [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            for (m, len) in lengths.iter().enumerate() {
                for d in 1..=*len {
                    let want = format!("{year:04}-{:02}-{d:02}", m + 1);
                    assert_eq!(utc_date(days * 86_400_000 + 43_200_000), want);
                    days += 1;
                }
            }
        }
    }

    #[test]
    fn source_tags_are_escaped_reversibly() {
        assert_eq!(
            source_segment("debian-packages_v2.1"),
            "debian-packages_v2.1"
        );
        assert_eq!(source_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(source_segment("50%=x"), "50%25%3Dx");
        assert_eq!(source_segment("zürich"), "z%C3%BCrich");
        assert_eq!(source_segment(".."), "..");
        assert_eq!(source_segment(""), EMPTY_SOURCE);
        assert_ne!(source_segment("a/b"), source_segment("a%2Fb"));
    }

    #[test]
    fn part_keys() -> Result<(), ObjectError> {
        let g = GroupKey::of(1_709_251_200_000, "news feed");
        let l = Layout::new("/raw/")?;
        assert_eq!(
            l.part_key(&g, 3, &Offset::new(42)),
            "raw/dt=2024-03-01/source=news%20feed/part-3-00000000000000000042.jsonl.zst"
        );
        assert!(l.fits(&g));
        assert!(!l.fits(&GroupKey::of(0, &"x".repeat(1000))));
        assert_eq!(
            Layout::new("")?.part_key(&g, 0, &Offset::new(u64::MAX)),
            "dt=2024-03-01/source=news%20feed/part-0-18446744073709551615.jsonl.zst"
        );
        let sequence: Offset = "49590338271490256608559692538361571095921575989136588898"
            .parse()
            .expect("digits");
        assert_eq!(
            l.part_key(&g, 1, &sequence),
            "raw/dt=2024-03-01/source=news%20feed/\
             part-1-49590338271490256608559692538361571095921575989136588898.jsonl.zst"
        );
        assert_eq!(
            l.claim_key(3, &Offset::new(42)),
            "_sift/archive-ranges/raw/part-3-00000000000000000042.json"
        );
        assert!(Layout::new("a/../b").is_err());
        assert!(Layout::new(".sift-tmp").is_err());
        Ok(())
    }
}
