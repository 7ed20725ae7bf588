//! Client ids: the one name a user is known by, validated once at the edge.
//!
//! An id is 1 to 32 characters of `A-Z a-z 0-9 . _ -`, other than `.` and
//! `..`: a daemon keeps its history in a directory named after its id, and
//! those two name directories already. It is stored inline
//! (33 bytes, `Copy`) because the server keeps a million of them and a heap
//! allocation per id would cost more than the id itself.

use std::fmt;
use std::str::FromStr;

/// The longest id, in bytes (all allowed characters are ASCII).
pub const MAX_ID_LEN: usize = 32;

/// A validated client id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId {
    len: u8,
    // Bytes past `len` are always zero, so the derived Eq and Hash agree with
    // comparing the strings.
    bytes: [u8; MAX_ID_LEN],
}

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id is empty")]
    Empty,
    #[error("id is {0} bytes long; at most {MAX_ID_LEN} are allowed")]
    TooLong(usize),
    #[error("id contains {0:?}; only A-Z a-z 0-9 . _ - are allowed")]
    BadChar(char),
    #[error("id {0:?} is not allowed: . and .. name directories; choose another id")]
    Reserved(&'static str),
}

impl ClientId {
    /// Validates `bytes` as an id.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdError> {
        if bytes.is_empty() {
            return Err(IdError::Empty);
        }
        if bytes.len() > MAX_ID_LEN {
            return Err(IdError::TooLong(bytes.len()));
        }
        if let Some(&b) = bytes.iter().find(|&&b| !is_id_byte(b)) {
            // Report the character a person typed, not a raw byte, when the
            // input is valid UTF-8.
            let shown = std::str::from_utf8(bytes)
                .ok()
                .and_then(|s| s.chars().find(|c| !c.is_ascii() || !is_id_byte(*c as u8)))
                .unwrap_or(b as char);
            return Err(IdError::BadChar(shown));
        }
        match bytes {
            b"." => return Err(IdError::Reserved(".")),
            b".." => return Err(IdError::Reserved("..")),
            _ => {}
        }
        let mut id = ClientId {
            len: bytes.len() as u8,
            bytes: [0; MAX_ID_LEN],
        };
        id.bytes[..bytes.len()].copy_from_slice(bytes);
        Ok(id)
    }

    /// The id's bytes, zeros after its end, and its length: for a copy of
    /// a fixed size.
    pub(crate) fn padded(&self) -> (&[u8; MAX_ID_LEN], usize) {
        (&self.bytes, usize::from(self.len))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Every stored byte passed `is_id_byte`, which admits ASCII only.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

impl FromStr for ClientId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        ClientId::from_bytes(s.as_bytes())
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl serde::Serialize for ClientId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for ClientId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ClientId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a client id")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ClientId, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_allowed_character() {
        let s = "AZaz09._-";
        assert_eq!(s.parse::<ClientId>().map(|i| i.to_string()), Ok(s.into()));
        let longest = "x".repeat(MAX_ID_LEN);
        assert_eq!(
            longest.parse::<ClientId>().map(|i| i.to_string()),
            Ok(longest)
        );
    }

    #[test]
    fn rejects_bad_ids_with_the_reason() {
        assert_eq!("".parse::<ClientId>(), Err(IdError::Empty));
        assert_eq!(
            "x".repeat(33).parse::<ClientId>(),
            Err(IdError::TooLong(33))
        );
        assert_eq!("a b".parse::<ClientId>(), Err(IdError::BadChar(' ')));
        // They would put a daemon's history in its parent directory.
        assert_eq!(".".parse::<ClientId>(), Err(IdError::Reserved(".")));
        assert_eq!("..".parse::<ClientId>(), Err(IdError::Reserved("..")));
        assert!("...".parse::<ClientId>().is_ok());
        assert!(".alice".parse::<ClientId>().is_ok());
        assert_eq!("héllo".parse::<ClientId>(), Err(IdError::BadChar('é')));
        assert_eq!(
            ClientId::from_bytes(b"a\xffb"),
            Err(IdError::BadChar('\u{ff}'))
        );
        assert_eq!("a:b".parse::<ClientId>(), Err(IdError::BadChar(':')));
    }

    #[test]
    fn equal_strings_are_equal_ids() {
        let a: ClientId = "alice".parse().unwrap();
        let b = ClientId::from_bytes(b"alice").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, "alicE".parse().unwrap());
        assert!(std::mem::size_of::<ClientId>() <= 33);
    }

    #[test]
    fn serde_round_trip_validates() {
        let a: ClientId = "bob.1".parse().unwrap();
        let bytes = postcard::to_stdvec(&a).unwrap();
        assert_eq!(postcard::from_bytes::<ClientId>(&bytes).unwrap(), a);
        let bad = postcard::to_stdvec("no spaces").unwrap();
        assert!(postcard::from_bytes::<ClientId>(&bad).is_err());
    }
}
