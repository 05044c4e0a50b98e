//! International bank account numbers (ISO 13616).

use std::ops::Range;

use super::text::{is_glued, prev_char};

/// The longest IBAN the standard allows.
const MAX_LENGTH: usize = 34;

/// IBAN length by country code, for the countries of the SWIFT IBAN registry (release
/// 2024), sorted by code. Territories that use another country's format (French overseas
/// departments, the Åland Islands, ...) write that country's code.
const LENGTHS: [([u8; 2], u8); 89] = [
    (*b"AD", 24),
    (*b"AE", 23),
    (*b"AL", 28),
    (*b"AT", 20),
    (*b"AZ", 28),
    (*b"BA", 20),
    (*b"BE", 16),
    (*b"BG", 22),
    (*b"BH", 22),
    (*b"BI", 27),
    (*b"BR", 29),
    (*b"BY", 28),
    (*b"CH", 21),
    (*b"CR", 22),
    (*b"CY", 28),
    (*b"CZ", 24),
    (*b"DE", 22),
    (*b"DJ", 27),
    (*b"DK", 18),
    (*b"DO", 28),
    (*b"EE", 20),
    (*b"EG", 29),
    (*b"ES", 24),
    (*b"FI", 18),
    (*b"FK", 18),
    (*b"FO", 18),
    (*b"FR", 27),
    (*b"GB", 22),
    (*b"GE", 22),
    (*b"GI", 23),
    (*b"GL", 18),
    (*b"GR", 27),
    (*b"GT", 28),
    (*b"HN", 28),
    (*b"HR", 21),
    (*b"HU", 28),
    (*b"IE", 22),
    (*b"IL", 23),
    (*b"IQ", 23),
    (*b"IS", 26),
    (*b"IT", 27),
    (*b"JO", 30),
    (*b"KW", 30),
    (*b"KZ", 20),
    (*b"LB", 28),
    (*b"LC", 32),
    (*b"LI", 21),
    (*b"LT", 20),
    (*b"LU", 20),
    (*b"LV", 21),
    (*b"LY", 25),
    (*b"MC", 27),
    (*b"MD", 24),
    (*b"ME", 22),
    (*b"MK", 19),
    (*b"MN", 20),
    (*b"MR", 27),
    (*b"MT", 31),
    (*b"MU", 30),
    (*b"NI", 28),
    (*b"NL", 18),
    (*b"NO", 15),
    (*b"OM", 23),
    (*b"PK", 24),
    (*b"PL", 28),
    (*b"PS", 29),
    (*b"PT", 25),
    (*b"QA", 29),
    (*b"RO", 24),
    (*b"RS", 22),
    (*b"RU", 33),
    (*b"SA", 24),
    (*b"SC", 31),
    (*b"SD", 18),
    (*b"SE", 24),
    (*b"SI", 19),
    (*b"SK", 24),
    (*b"SM", 27),
    (*b"SO", 23),
    (*b"ST", 25),
    (*b"SV", 28),
    (*b"TL", 23),
    (*b"TN", 24),
    (*b"TR", 26),
    (*b"UA", 29),
    (*b"VA", 22),
    (*b"VG", 24),
    (*b"XK", 20),
    (*b"YE", 30),
];

/// The IBANs in a text, left to right, as byte ranges.
///
/// An IBAN is a country code of the registry, two check digits (02 to 98) and the account
/// part, as many characters in all as the country prescribes, written either without spaces
/// or in groups of four joined by single spaces (the last group shorter), and passing the
/// ISO 7064 mod 97-10 check. Letters may be upper or lower case: the length and checksum
/// already make a chance hit rare (below 1 in 97 for a word of the right shape), and a
/// lowercased IBAN still identifies an account. It must not be glued to a letter, digit or
/// underscore on either side.
#[derive(Debug, Clone)]
pub(super) struct Ibans<'t> {
    text: &'t str,
    pos: usize,
}

impl<'t> Ibans<'t> {
    /// The IBANs that start at or after byte `from` (a character boundary); the text before
    /// it is context only.
    pub(super) fn starting_at(text: &'t str, from: usize) -> Self {
        Ibans { text, pos: from }
    }
}

impl Iterator for Ibans<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        let bytes = self.text.as_bytes();
        while self.pos + 4 <= bytes.len() {
            let start = self.pos;
            if let Some(end) = iban_at(self.text, start) {
                self.pos = end;
                return Some(start..end);
            }
            self.pos += 1;
        }
        self.pos = bytes.len();
        None
    }
}

/// The end of the IBAN that starts at byte `start`, if one does.
fn iban_at(text: &str, start: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let head = bytes.get(start..start + 4)?;
    // Cheapest tests first: most positions of a text fail the first one.
    if !(head[0].is_ascii_alphabetic()
        && head[1].is_ascii_alphabetic()
        && head[2].is_ascii_digit()
        && head[3].is_ascii_digit())
    {
        return None;
    }
    let country = [head[0].to_ascii_uppercase(), head[1].to_ascii_uppercase()];
    let length = usize::from(country_length(country)?);
    let check = (head[2] - b'0') * 10 + (head[3] - b'0');
    if !(2..=98).contains(&check) || prev_char(text, start).is_some_and(is_glued) {
        return None;
    }
    let mut iban = [0u8; MAX_LENGTH];
    let end = read_compact(bytes, start, &mut iban[..length])
        .or_else(|| read_grouped(bytes, start, &mut iban[..length]))?;
    let glued_after = text[end..].chars().next().is_some_and(is_glued);
    (!glued_after && mod97_is_one(&iban[..length])).then_some(end)
}

fn country_length(country: [u8; 2]) -> Option<u8> {
    LENGTHS
        .binary_search_by_key(&country, |&(code, _)| code)
        .ok()
        .map(|i| LENGTHS[i].1)
}

/// Reads `iban.len()` letters and digits from `start` into `iban`, upper-cased.
fn read_compact(bytes: &[u8], start: usize, iban: &mut [u8]) -> Option<usize> {
    let end = start + iban.len();
    let source = bytes.get(start..end)?;
    if !source.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    for (to, from) in iban.iter_mut().zip(source) {
        *to = from.to_ascii_uppercase();
    }
    Some(end)
}

/// Reads `iban.len()` letters and digits from `start` into `iban`, upper-cased, where they
/// are written in groups of four joined by single spaces.
fn read_grouped(bytes: &[u8], start: usize, iban: &mut [u8]) -> Option<usize> {
    let mut pos = start;
    for (i, slot) in iban.iter_mut().enumerate() {
        if i > 0 && i % 4 == 0 {
            if bytes.get(pos) != Some(&b' ') {
                return None;
            }
            pos += 1;
        }
        let byte = *bytes.get(pos)?;
        if !byte.is_ascii_alphanumeric() {
            return None;
        }
        *slot = byte.to_ascii_uppercase();
        pos += 1;
    }
    Some(pos)
}

/// ISO 7064 mod 97-10 over an upper-case IBAN: the country code and check digits moved to
/// the end, letters read as 10 to 35, the whole taken as one number modulo 97.
fn mod97_is_one(iban: &[u8]) -> bool {
    let (head, account) = iban.split_at(4);
    let remainder = account.iter().chain(head).fold(0u32, |rem, &b| {
        if b.is_ascii_digit() {
            (rem * 10 + u32::from(b - b'0')) % 97
        } else {
            (rem * 100 + u32::from(b - b'A') + 10) % 97
        }
    });
    remainder == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: [&str; 16] = [
        "DE89 3704 0044 0532 0130 00",
        "GB82WEST12345698765432",
        "GB82 WEST 1234 5698 7654 32",
        "FR1420041010050500013M02606",
        "NL91ABNA0417164300",
        "CH9300762011623852957",
        "NO9386011117947",
        "NO93 8601 1117 947",
        "MT84MALT011000012345MTLCAST001S",
        "BE68539007547034",
        "ES9121000418450200051332",
        "IT60X0542811101000000123456",
        "AT611904300234573201",
        "PL61 1090 1014 0000 0712 1981 2874",
        "LC55HEMM000100010012001200023015",
        "RU0204452560040702810412345678901",
    ];

    fn ibans(text: &str) -> Vec<&str> {
        Ibans::starting_at(text, 0).map(|r| &text[r]).collect()
    }

    #[test]
    fn the_table_is_sorted_and_within_the_standard() {
        assert!(LENGTHS.windows(2).all(|pair| pair[0].0 < pair[1].0));
        assert!(
            LENGTHS
                .iter()
                .all(|&(_, len)| (15..=MAX_LENGTH).contains(&usize::from(len)))
        );
    }

    #[test]
    fn finds_valid_ibans_alone_and_in_prose() {
        for iban in VALID {
            assert_eq!(ibans(iban), [iban], "{iban}");
            let prose = format!("Pay to \"{iban}\" by Friday.");
            assert_eq!(ibans(&prose), [iban], "{prose}");
        }
    }

    #[test]
    fn accepts_lower_case() {
        assert_eq!(
            ibans("iban: de89370400440532013000"),
            ["de89370400440532013000"]
        );
        assert_eq!(
            ibans("gb82 west 1234 5698 7654 32."),
            ["gb82 west 1234 5698 7654 32"]
        );
    }

    #[test]
    fn counts_every_iban() {
        let text = "DE89370400440532013000, NL91ABNA0417164300 and NO9386011117947";
        assert_eq!(ibans(text).len(), 3);
    }

    #[test]
    fn rejects_a_changed_digit_or_swapped_neighbours() {
        for iban in VALID {
            let bytes = iban.as_bytes();
            for i in 2..bytes.len() {
                if !bytes[i].is_ascii_digit() {
                    continue;
                }
                let mut changed = bytes.to_vec();
                changed[i] = b'0' + (bytes[i] - b'0' + 1) % 10;
                let changed = String::from_utf8(changed).expect("ASCII");
                assert_eq!(ibans(&changed), Vec::<&str>::new(), "{changed}");
            }
        }
        assert_eq!(
            ibans("DE89370400440532013000".replace("05", "50").as_str()).len(),
            0
        );
    }

    #[test]
    fn rejects_wrong_lengths_layouts_and_neighbours() {
        for text in [
            "DE8937040044053201300",
            "DE893704004405320130000",
            "DE89 37040044 0532 0130 00",
            "DE89  3704 0044 0532 0130 00",
            "DE89-3704-0044-0532-0130-00",
            "XX89370400440532013000",
            "xDE89370400440532013000",
            "DE89370400440532013000_",
            "ÜDE89370400440532013000",
            "NO9386011117947a",
            "order AB12 and ZZ99",
        ] {
            assert_eq!(ibans(text), Vec::<&str>::new(), "{text}");
        }
    }

    #[test]
    fn rejects_check_digits_outside_the_standard_range() {
        // 98 and 01, 02 and 99 leave the same remainder; ISO 7064 only ever writes the
        // former of each pair.
        assert_eq!(ibans("DE98370400440532000034"), ["DE98370400440532000034"]);
        assert!(mod97_is_one(b"DE01370400440532000034"));
        assert_eq!(ibans("DE01370400440532000034"), Vec::<&str>::new());
        assert_eq!(ibans("DE02370400440532000016"), ["DE02370400440532000016"]);
        assert!(mod97_is_one(b"DE99370400440532000016"));
        assert_eq!(ibans("DE99370400440532000016"), Vec::<&str>::new());
    }
}
