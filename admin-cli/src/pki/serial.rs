//! Certificate serial numbers: random for every certificate, written as lowercase hex in the
//! revocation record.

use std::fmt;

use rand::RngCore as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length in bytes of the serials this CA draws; RFC 5280 allows at most 20.
const LEN: usize = 20;

/// A certificate serial number as the big-endian bytes of a positive integer, without leading
/// zero bytes, so that equal numbers compare equal however they were encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// Draws a fresh serial from the thread's CSPRNG: 158 random bits. The first byte is kept in
    /// 0x40..=0x7f, so the number is positive and always encodes in exactly 20 bytes.
    pub fn random() -> Self {
        let mut bytes = [0u8; LEN];
        rand::rng().fill_bytes(&mut bytes);
        bytes[0] = (bytes[0] & 0x3f) | 0x40;
        Self(bytes.to_vec())
    }

    /// Takes a serial as read from a certificate (DER INTEGER contents, possibly with a leading
    /// zero byte that keeps it positive).
    pub fn from_be_bytes(bytes: &[u8]) -> Self {
        let first = bytes
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(bytes.len().saturating_sub(1));
        Self(bytes[first..].to_vec())
    }

    /// Parses the hex form written by [`fmt::Display`]; `None` if it is not hex.
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.is_empty() || !hex.len().is_multiple_of(2) || !hex.is_ascii() {
            return None;
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        Some(Self::from_be_bytes(&bytes))
    }
}

impl From<&Serial> for rcgen::SerialNumber {
    fn from(serial: &Serial) -> Self {
        rcgen::SerialNumber::from_slice(&serial.0)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl Serialize for Serial {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Serial {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(deserializer)?;
        Self::from_hex(&hex)
            .ok_or_else(|| serde::de::Error::custom(format!("serial {hex:?} is not hex")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_serials_are_positive_twenty_bytes_and_distinct() {
        let a = Serial::random();
        let b = Serial::random();
        assert_ne!(a, b);
        for serial in [&a, &b] {
            assert_eq!(serial.0.len(), LEN);
            assert!((0x40..=0x7f).contains(&serial.0[0]));
        }
    }

    #[test]
    fn hex_round_trips_and_leading_zeros_do_not_matter() {
        let serial = Serial::random();
        assert_eq!(Serial::from_hex(&serial.to_string()), Some(serial));
        assert_eq!(Serial::from_be_bytes(&[0, 0x80, 1]).to_string(), "8001");
        assert_eq!(Serial::from_hex("008001"), Serial::from_hex("8001"));
        assert_eq!(Serial::from_be_bytes(&[0]).to_string(), "00");
        for bad in ["", "abc", "zz", "é1"] {
            assert_eq!(Serial::from_hex(bad), None, "{bad:?}");
        }
    }
}
