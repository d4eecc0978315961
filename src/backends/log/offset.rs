//! A record's position within a partition.
//!
//! Kafka and the embedded log number records 0, 1, 2, … in each partition.
//! Kinesis gives each record a sequence number within its shard: a decimal of
//! up to 129 digits (56 in practice), increasing but not dense. One ordered
//! type holds both, so the stages never squeeze a sequence number into 64
//! bits: an [`Offset`] is a non-negative integer of any size, kept as a `u64`
//! when it fits (every Kafka and embedded offset) and as its decimal digits
//! when it does not.
//!
//! What a position means is the same on every backend: reading "from `p`"
//! yields the records whose offset is `p` or more, in order, so the position
//! after a processed record is always its offset plus one ([`Offset::next`]),
//! whether or not a record will ever have that offset.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A position in a partition: a non-negative integer of any size.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Offset(Repr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    /// Every value up to `u64::MAX`.
    Small(u64),
    /// Larger values: decimal digits, no leading zero.
    Big(Arc<str>),
}

/// The text is not a non-negative decimal integer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an offset: write a non-negative decimal integer")]
pub struct ParseOffsetError(pub String);

impl Offset {
    /// The first position of every Kafka and embedded partition.
    pub const ZERO: Offset = Offset(Repr::Small(0));

    /// The offset `n`.
    pub const fn new(n: u64) -> Offset {
        Offset(Repr::Small(n))
    }

    /// The value, when it fits in 64 bits (always on Kafka and the embedded log).
    pub fn as_u64(&self) -> Option<u64> {
        match &self.0 {
            Repr::Small(n) => Some(*n),
            Repr::Big(_) => None,
        }
    }

    /// The position right after this one: where reading resumes once the
    /// record at this offset is processed.
    pub fn next(&self) -> Offset {
        match &self.0 {
            Repr::Small(n) => match n.checked_add(1) {
                Some(m) => Offset::new(m),
                None => Offset(Repr::Big(Arc::from("18446744073709551616"))),
            },
            Repr::Big(digits) => Offset(Repr::Big(Arc::from(add_one(digits)))),
        }
    }

    /// The position right before this one; None at zero.
    pub fn prev(&self) -> Option<Offset> {
        match &self.0 {
            Repr::Small(n) => n.checked_sub(1).map(Offset::new),
            Repr::Big(digits) => Some(Offset::from_digits(&sub_one(digits))),
        }
    }

    /// How many positions lie from `self` up to `end`: `end - self`, 0 when
    /// `end` is not after `self`, saturating at `u64::MAX`. On a dense log
    /// (Kafka, the embedded log) that is a count of records; between Kinesis
    /// sequence numbers it is not.
    pub fn until(&self, end: &Offset) -> u64 {
        if end <= self {
            return 0;
        }
        match (&self.0, &end.0) {
            (Repr::Small(a), Repr::Small(b)) => b - a,
            _ => difference(&end.to_string(), &self.to_string())
                .parse()
                .unwrap_or(u64::MAX),
        }
    }

    /// The offset whose decimal digits these are (no sign, no leading zero
    /// unless it is "0"); callers have checked them.
    fn from_digits(digits: &str) -> Offset {
        match digits.parse::<u64>() {
            Ok(n) => Offset::new(n),
            Err(_) => Offset(Repr::Big(Arc::from(digits))),
        }
    }
}

/// `big - small` of two decimals without leading zeros, `big >= small`,
/// without leading zeros.
fn difference(big: &str, small: &str) -> String {
    let (big, small) = (big.as_bytes(), small.as_bytes());
    let mut out = vec![b'0'; big.len()];
    let mut borrow = 0u8;
    for i in 0..big.len() {
        let a = big[big.len() - 1 - i] - b'0';
        let b = if i < small.len() {
            small[small.len() - 1 - i] - b'0'
        } else {
            0
        } + borrow;
        let (digit, next) = if a >= b { (a - b, 0) } else { (a + 10 - b, 1) };
        out[big.len() - 1 - i] = b'0' + digit;
        borrow = next;
    }
    let start = out.iter().position(|&d| d != b'0').unwrap_or(out.len() - 1);
    String::from_utf8(out[start..].to_vec()).expect("ASCII digits stay ASCII")
}

/// Decimal digits plus one.
fn add_one(digits: &str) -> String {
    let mut bytes = digits.as_bytes().to_vec();
    for b in bytes.iter_mut().rev() {
        if *b == b'9' {
            *b = b'0';
        } else {
            *b += 1;
            return String::from_utf8(bytes).expect("ASCII digits stay ASCII");
        }
    }
    let mut out = String::with_capacity(bytes.len() + 1);
    out.push('1');
    out.push_str(std::str::from_utf8(&bytes).expect("ASCII digits stay ASCII"));
    out
}

/// Decimal digits (above zero) minus one, without a leading zero.
fn sub_one(digits: &str) -> String {
    let mut bytes = digits.as_bytes().to_vec();
    for b in bytes.iter_mut().rev() {
        if *b == b'0' {
            *b = b'9';
        } else {
            *b -= 1;
            break;
        }
    }
    let start = bytes
        .iter()
        .position(|&b| b != b'0')
        .unwrap_or(bytes.len() - 1);
    String::from_utf8(bytes[start..].to_vec()).expect("ASCII digits stay ASCII")
}

impl From<u64> for Offset {
    fn from(n: u64) -> Offset {
        Offset::new(n)
    }
}

impl FromStr for Offset {
    type Err = ParseOffsetError;

    fn from_str(s: &str) -> Result<Offset, ParseOffsetError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseOffsetError(s.to_owned()));
        }
        let digits = s.trim_start_matches('0');
        Ok(Offset::from_digits(if digits.is_empty() {
            "0"
        } else {
            digits
        }))
    }
}

impl Ord for Offset {
    fn cmp(&self, other: &Offset) -> Ordering {
        match (&self.0, &other.0) {
            (Repr::Small(a), Repr::Small(b)) => a.cmp(b),
            // A big value is above u64::MAX, so above every small one.
            (Repr::Small(_), Repr::Big(_)) => Ordering::Less,
            (Repr::Big(_), Repr::Small(_)) => Ordering::Greater,
            // Without leading zeros, more digits is larger; equal lengths
            // compare as text.
            (Repr::Big(a), Repr::Big(b)) => a.len().cmp(&b.len()).then_with(|| a.cmp(b)),
        }
    }
}

impl PartialOrd for Offset {
    fn partial_cmp(&self, other: &Offset) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// An offset equals a number when it has that value: `m.offset == 3`.
impl PartialEq<u64> for Offset {
    fn eq(&self, other: &u64) -> bool {
        self.as_u64() == Some(*other)
    }
}

impl PartialOrd<u64> for Offset {
    fn partial_cmp(&self, other: &u64) -> Option<Ordering> {
        Some(match self.as_u64() {
            Some(n) => n.cmp(other),
            None => Ordering::Greater,
        })
    }
}

impl Default for Offset {
    fn default() -> Offset {
        Offset::ZERO
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Small(n) => fmt::Display::fmt(n, f),
            Repr::Big(digits) => f.pad(digits),
        }
    }
}

impl fmt::Debug for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A JSON number when it fits in 64 bits (as offsets always were), a string
/// of digits when it does not (JSON readers lose precision past 2^53 anyway).
impl Serialize for Offset {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Repr::Small(n) => s.serialize_u64(*n),
            Repr::Big(digits) => s.serialize_str(digits),
        }
    }
}

impl<'de> Deserialize<'de> for Offset {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Offset, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Offset;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer, or its decimal digits as a string")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Offset, E> {
                Ok(Offset::new(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Offset, E> {
                u64::try_from(n)
                    .map(Offset::new)
                    .map_err(|_| E::custom(format!("offset {n} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Offset, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn big(n: u128) -> Offset {
        n.to_string().parse().expect("digits")
    }

    /// Decimal digits of any length, no leading zero.
    fn digits() -> impl Strategy<Value = String> {
        "[1-9][0-9]{0,130}|0"
    }

    #[test]
    fn crosses_64_bits_and_back() {
        let max = Offset::new(u64::MAX);
        let above = max.next();
        assert_eq!(above.as_u64(), None);
        assert_eq!(above.to_string(), "18446744073709551616");
        assert!(above > max);
        assert_eq!(above.prev(), Some(max.clone()));
        assert_eq!(max.until(&above), 1);
        assert_eq!(Offset::ZERO.until(&above), u64::MAX);
        assert_eq!(Offset::ZERO.prev(), None);
        assert_eq!("0000".parse::<Offset>(), Ok(Offset::ZERO));
        assert_eq!("007".parse::<Offset>(), Ok(Offset::new(7)));
        for bad in ["", "-1", "1.5", " 1", "0x10", "1e3"] {
            assert!(bad.parse::<Offset>().is_err(), "{bad}");
        }
        // A real Kinesis sequence number (56 digits).
        let seq: Offset = "49590338271490256608559692538361571095921575989136588898"
            .parse()
            .expect("digits");
        assert_eq!(
            seq.next().to_string(),
            "49590338271490256608559692538361571095921575989136588899"
        );
        let later: Offset = "49590338271490256608559692538361571095921575989136589898"
            .parse()
            .expect("digits");
        assert_eq!((seq.until(&later), later.until(&seq)), (1000, 0));
        assert_eq!(
            "99999999999999999999"
                .parse::<Offset>()
                .expect("digits")
                .next()
                .to_string(),
            "100000000000000000000"
        );
    }

    #[test]
    fn json_is_a_number_when_it_fits_and_digits_when_not() -> anyhow::Result<()> {
        assert_eq!(serde_json::to_string(&Offset::new(42))?, "42");
        let seq = big(u128::MAX);
        let json = serde_json::to_string(&seq)?;
        assert_eq!(json, format!("\"{}\"", u128::MAX));
        assert_eq!(serde_json::from_str::<Offset>(&json)?, seq);
        assert_eq!(serde_json::from_str::<Offset>("42")?, Offset::new(42));
        assert_eq!(serde_json::from_str::<Offset>("\"42\"")?, Offset::new(42));
        assert!(serde_json::from_str::<Offset>("-1").is_err());
        assert!(serde_json::from_str::<Offset>("\"4x\"").is_err());
        Ok(())
    }

    proptest! {
        /// Order, next, prev and until agree with 128-bit arithmetic, across
        /// the boundary between the two representations.
        #[test]
        fn agrees_with_u128(
            a in prop_oneof![any::<u64>().prop_map(u128::from), any::<u128>(), (u64::MAX as u128 - 3)..(u64::MAX as u128 + 3)],
            b in prop_oneof![any::<u64>().prop_map(u128::from), any::<u128>(), (u64::MAX as u128 - 3)..(u64::MAX as u128 + 3)],
        ) {
            let (x, y) = (big(a), big(b));
            prop_assert_eq!(x.cmp(&y), a.cmp(&b));
            prop_assert_eq!(x == y, a == b);
            prop_assert_eq!(x.to_string(), a.to_string());
            prop_assert_eq!(x.as_u64(), u64::try_from(a).ok());
            if let Ok(n) = u64::try_from(b) {
                prop_assert_eq!(x == n, a == b);
                prop_assert_eq!(x.partial_cmp(&n), Some(a.cmp(&b)));
            }
            if a < u128::MAX {
                prop_assert_eq!(x.next(), big(a + 1));
            }
            prop_assert_eq!(x.prev(), a.checked_sub(1).map(big));
            // The distance, saturating at u64::MAX.
            let until = u64::try_from(b.saturating_sub(a)).unwrap_or(u64::MAX);
            prop_assert_eq!(x.until(&y), until);
            let json = serde_json::to_string(&x).expect("an offset serializes");
            prop_assert_eq!(serde_json::from_str::<Offset>(&json).expect("and reads back"), x);
        }

        /// Offsets longer than any machine integer: ordered as numbers, each
        /// below its next, prev undoing next, text surviving a round trip.
        #[test]
        fn long_decimals_keep_their_order(a in digits(), b in digits()) {
            let x: Offset = a.parse().expect("digits");
            let y: Offset = b.parse().expect("digits");
            prop_assert_eq!(x.to_string(), a.clone());
            let numeric = a.len().cmp(&b.len()).then_with(|| a.cmp(&b));
            prop_assert_eq!(x.cmp(&y), numeric);
            prop_assert!(x < x.next());
            prop_assert_eq!(x.next().prev(), Some(x.clone()));
            prop_assert_eq!(x.until(&x.next()), 1);
            prop_assert_eq!(x.next().until(&x), 0);
            prop_assert_eq!(x.until(&x), 0);
            if let Some(p) = x.prev() {
                prop_assert!(p < x);
                prop_assert_eq!(p.next(), x.clone());
            }
        }
    }
}
