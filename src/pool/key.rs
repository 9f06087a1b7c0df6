//! `SessionKey`: what names a session.

use std::fmt;
use std::sync::Arc;

/// The name of a session: a string or an integer.
///
/// Built with `From` from `&str`, `String` and integers of any width.
/// Integers compare by value whatever their type: `5u8` and `5i64` name the
/// same session; the string `"5"` names another.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionKey(Repr);

/// Each integer has one form, so the derived comparisons compare values.
/// No `i128` inline: its 16-byte alignment would make every key (one in
/// each open session's record) 32 bytes instead of 24.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    /// Every integer that fits an `i64`.
    Int(i64),
    /// The others (rare).
    Wide(Box<Wide>),
    Str(Arc<str>),
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Wide {
    Int(i128),
    /// Only for `u128` values above `i128::MAX`.
    BigUint(u128),
}

impl Repr {
    fn int(n: i128) -> Repr {
        match i64::try_from(n) {
            Ok(n) => Repr::Int(n),
            Err(_) => Repr::Wide(Box::new(Wide::Int(n))),
        }
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Str(s) => write!(f, "{s:?}"),
            _ => fmt::Display::fmt(self, f),
        }
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Int(n) => write!(f, "{n}"),
            Repr::Wide(w) => match **w {
                Wide::Int(n) => write!(f, "{n}"),
                Wide::BigUint(n) => write!(f, "{n}"),
            },
            Repr::Str(s) => f.write_str(s),
        }
    }
}

impl From<&str> for SessionKey {
    fn from(s: &str) -> Self {
        SessionKey(Repr::Str(s.into()))
    }
}

impl From<String> for SessionKey {
    fn from(s: String) -> Self {
        SessionKey(Repr::Str(s.into()))
    }
}

impl From<&String> for SessionKey {
    fn from(s: &String) -> Self {
        SessionKey(Repr::Str(s.as_str().into()))
    }
}

impl From<Arc<str>> for SessionKey {
    fn from(s: Arc<str>) -> Self {
        SessionKey(Repr::Str(s))
    }
}

impl From<&SessionKey> for SessionKey {
    fn from(k: &SessionKey) -> Self {
        k.clone()
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for SessionKey {
            fn from(n: $t) -> Self {
                SessionKey(Repr::int(i128::from(n)))
            }
        }
    )*};
}
from_int!(i8, i16, i32, i64, i128, u8, u16, u32, u64);

impl From<isize> for SessionKey {
    fn from(n: isize) -> Self {
        SessionKey(Repr::int(n as i128))
    }
}

impl From<usize> for SessionKey {
    fn from(n: usize) -> Self {
        SessionKey(Repr::int(n as i128))
    }
}

impl From<u128> for SessionKey {
    fn from(n: u128) -> Self {
        match i128::try_from(n) {
            Ok(n) => SessionKey(Repr::int(n)),
            Err(_) => SessionKey(Repr::Wide(Box::new(Wide::BigUint(n)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_compare_by_value_across_widths() {
        assert_eq!(SessionKey::from(5u8), SessionKey::from(5i64));
        assert_eq!(SessionKey::from(7usize), SessionKey::from(7u128));
        assert_ne!(SessionKey::from(5u8), SessionKey::from("5"));
        assert_ne!(SessionKey::from(u128::MAX), SessionKey::from(-1i128));
        assert_eq!(SessionKey::from("a"), SessionKey::from(String::from("a")));
        // Beyond i64, from either side.
        let big = i64::MAX as u128 + 1;
        assert_eq!(SessionKey::from(big), SessionKey::from(big as i128));
        assert_eq!(SessionKey::from(big).to_string(), big.to_string());
        assert_eq!(
            SessionKey::from(i128::MIN).to_string(),
            i128::MIN.to_string()
        );
        assert_eq!(
            SessionKey::from(u128::MAX).to_string(),
            u128::MAX.to_string()
        );
        assert_eq!(std::mem::size_of::<SessionKey>(), 24);
    }
}
