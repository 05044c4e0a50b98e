//! Text encodings of binary fields in exports and stored values: hashes, keys and
//! signatures as lower-case hex, record bodies as standard base64.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Exactly `N` bytes from hexadecimal (either case), or `None`.
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut bytes = [0u8; N];
    for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(bytes)
}

/// A node's ed25519 signing key as moatd keeps it: 64 hex digits (what moatd writes, with
/// surrounding white space allowed) or the 32 raw bytes (a systemd credential may hold
/// either); `None` for anything else.
pub fn decode_signing_key(bytes: &[u8]) -> Option<ed25519_dalek::SigningKey> {
    let seed: [u8; 32] = match bytes.len() {
        32 => bytes.try_into().ok()?,
        _ => unhex(std::str::from_utf8(bytes).ok()?.trim())?,
    };
    Some(ed25519_dalek::SigningKey::from_bytes(&seed))
}

/// Serde for fixed-size byte arrays as hex strings.
pub mod hex_array {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::hex(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        deserializer: D,
    ) -> Result<[u8; N], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        super::unhex(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("expected {} hex digits", N * 2)))
    }
}

/// Serde for byte strings as standard base64.
pub mod base64_bytes {
    use super::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("not base64: {e}")))
    }
}

/// Standard base64 of `bytes`.
pub fn base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_wrong_lengths_and_digits() {
        let bytes = [0x00, 0x7f, 0xab, 0xff];
        assert_eq!(hex(&bytes), "007fabff");
        assert_eq!(unhex::<4>("007FABff"), Some(bytes));
        assert_eq!(unhex::<4>("007fab"), None);
        assert_eq!(unhex::<4>("007fabfg"), None);
        assert_eq!(unhex::<2>("éé"), None);
    }

    #[test]
    fn signing_keys_are_read_as_hex_or_raw_bytes() {
        let seed = [0x5a; 32];
        let hex_file = format!("{}\n", hex(&seed));
        let from_hex = decode_signing_key(hex_file.as_bytes()).expect("hex");
        assert_eq!(from_hex.to_bytes(), seed);
        assert_eq!(decode_signing_key(&seed).expect("raw").to_bytes(), seed);
        assert!(decode_signing_key(b"not a key").is_none());
        assert!(decode_signing_key(&[0; 31]).is_none());
    }
}
