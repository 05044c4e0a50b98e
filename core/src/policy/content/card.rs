//! Payment card numbers (primary account numbers): 13 to 19 digits that pass the Luhn check.

use std::ops::Range;

use super::text::{is_glued, prev_char};

const MIN_DIGITS: usize = 13;
const MAX_DIGITS: usize = 19;

/// The card numbers in a text, left to right, as byte ranges.
///
/// A candidate is a maximal run of ASCII digit groups joined by one kind of separator: a
/// single space or a single hyphen. Where the kind changes, one run ends and the next begins
/// with the group between them. A run is a card number when:
/// - it holds 13 to 19 digits, the first of them 2 to 6 (the major industry identifiers of
///   Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay and Maestro);
/// - written in groups, its first group has four digits and every other group three to six,
///   which covers 4-4-4-4, 4-6-5 (Amex), 4-6-4 (Diners), 4-4-4-4-3 and 4-3-3-3;
/// - it is not glued to a letter, digit or underscore, is not preceded by `+` (a phone
///   number), and is not next to a decimal point or comma that has a digit on its other
///   side (a fraction, or a number with separators);
/// - its digits pass the Luhn check.
///
/// A run of more than 19 digits is not a card number, nor is any part of it.
#[derive(Debug, Clone)]
pub(super) struct CardNumbers<'t> {
    text: &'t str,
    pos: usize,
}

/// A run of digit groups as [`CardNumbers`] describes it.
#[derive(Debug)]
struct DigitRun {
    start: usize,
    end: usize,
    digits: usize,
    groups: usize,
    first_group: usize,
    /// Whether every group after the first has three to six digits.
    later_groups_fit: bool,
    /// Where the search goes on when this run is not a card number.
    resume: usize,
}

impl<'t> CardNumbers<'t> {
    /// The card numbers that start at or after byte `from` (a character boundary); the text
    /// before it is context only.
    pub(super) fn starting_at(text: &'t str, from: usize) -> Self {
        CardNumbers { text, pos: from }
    }
}

impl Iterator for CardNumbers<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        while let Some(run) = next_run(self.text.as_bytes(), self.pos) {
            if is_card_number(self.text, &run) {
                self.pos = run.end;
                return Some(run.start..run.end);
            }
            self.pos = run.resume;
        }
        self.pos = self.text.len();
        None
    }
}

/// The first run of digit groups at or after `from`.
fn next_run(bytes: &[u8], from: usize) -> Option<DigitRun> {
    let start = from + bytes.get(from..)?.iter().position(u8::is_ascii_digit)?;
    let mut end = digits_end(bytes, start);
    let mut run = DigitRun {
        start,
        end,
        digits: end - start,
        groups: 1,
        first_group: end - start,
        later_groups_fit: true,
        resume: end,
    };
    let mut separator = None;
    let mut last_group_start = start;
    while let (Some(&sep), Some(next)) = (bytes.get(end), bytes.get(end + 1)) {
        if !matches!(sep, b' ' | b'-') || !next.is_ascii_digit() {
            break;
        }
        if separator.is_some_and(|kind| kind != sep) {
            // The group before the change of separator may start the next run.
            run.resume = last_group_start;
            return Some(run);
        }
        separator = Some(sep);
        last_group_start = end + 1;
        end = digits_end(bytes, last_group_start);
        let group = end - last_group_start;
        run.digits += group;
        run.groups += 1;
        run.later_groups_fit &= (3..=6).contains(&group);
        run.end = end;
        run.resume = end;
    }
    Some(run)
}

fn digits_end(bytes: &[u8], from: usize) -> usize {
    from + bytes[from..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count()
}

fn is_card_number(text: &str, run: &DigitRun) -> bool {
    let bytes = text.as_bytes();
    (MIN_DIGITS..=MAX_DIGITS).contains(&run.digits)
        && (b'2'..=b'6').contains(&bytes[run.start])
        && (run.groups == 1 || (run.first_group == 4 && run.later_groups_fit))
        && stands_alone(text, run.start, run.end)
        && passes_luhn(&bytes[run.start..run.end])
}

fn stands_alone(text: &str, start: usize, end: usize) -> bool {
    let bytes = text.as_bytes();
    let before = prev_char(text, start);
    let after = text[end..].chars().next();
    let fraction_before =
        start >= 2 && matches!(bytes[start - 1], b'.' | b',') && bytes[start - 2].is_ascii_digit();
    let fraction_after = matches!(bytes.get(end), Some(b'.' | b','))
        && bytes.get(end + 1).is_some_and(u8::is_ascii_digit);
    !before.is_some_and(|c| is_glued(c) || c == '+')
        && !after.is_some_and(is_glued)
        && !fraction_before
        && !fraction_after
}

/// The Luhn (mod 10) check over the digits of `run`, separators skipped.
fn passes_luhn(run: &[u8]) -> bool {
    let sum: u32 = run
        .iter()
        .rev()
        .filter(|b| b.is_ascii_digit())
        .enumerate()
        .map(|(i, b)| {
            let digit = u32::from(b - b'0');
            match (i % 2, digit * 2) {
                (0, _) => digit,
                (_, doubled) if doubled > 9 => doubled - 9,
                (_, doubled) => doubled,
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cards(text: &str) -> Vec<&str> {
        CardNumbers::starting_at(text, 0)
            .map(|r| &text[r])
            .collect()
    }

    #[test]
    fn finds_test_numbers_of_the_major_schemes_in_every_layout() {
        for number in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "4012888888881881",
            "4222222222222",
            "5555555555554444",
            "5105 1051 0510 5100",
            "2223003122003222",
            "378282246310005",
            "3782 822463 10005",
            "3714-496353-98431",
            "6011111111111117",
            "3530111333300000",
            "3056 930902 5904",
            "6200000000000005",
            "6759649826438453",
        ] {
            assert_eq!(cards(number), [number], "{number}");
            let prose = format!("Charge it to ({number}), please.");
            assert_eq!(cards(&prose), [number], "{prose}");
        }
    }

    #[test]
    fn counts_every_number() {
        let text = "first 4111111111111111, then 5555 5555 5555 4444; last 378282246310005.";
        assert_eq!(
            cards(text),
            ["4111111111111111", "5555 5555 5555 4444", "378282246310005"]
        );
    }

    #[test]
    fn a_change_of_separator_ends_a_run() {
        assert_eq!(
            cards("4111-1111-1111-1111 5555-5555-5555-4444"),
            ["4111-1111-1111-1111", "5555-5555-5555-4444"]
        );
        assert_eq!(cards("ref 12-4111 1111 1111 1111"), ["4111 1111 1111 1111"]);
    }

    #[test]
    fn ignores_numbers_that_only_look_like_cards() {
        for text in [
            "4111111111111112",
            "4111 1111 1111 1112",
            "0000000000000000",
            "9111111111111113",
            "1234567812345670",
            "order 20240115000123",
            "call +49 30 1234567890 or +4111111111111111",
            "(555) 123-4567, 555-123-4567 555-987-6543",
            "2024-01-15 2024-01-16, 2024-01-15T10:30:00Z, 15.01.2024",
            "123e4567-e89b-12d3-a456-426614174000",
            "pi is 3.4111111111111111 and 4111111111111111,5",
            "41111111111111111111",
            "4111111111111111 1",
            "41 11 11 11 11 11 11 11",
            "411 111 111 111 111 1",
            "4111  1111  1111  1111",
            "4111 1111-1111 1111",
            "x4111111111111111 4111111111111111_ é4111111111111111",
            "sha 3e4111111111111111a9",
            "1 234 567 890 123 456",
        ] {
            assert_eq!(cards(text), Vec::<&str>::new(), "{text}");
        }
    }

    #[test]
    fn luhn_matches_known_values() {
        assert!(passes_luhn(b"79927398713"));
        assert!(!passes_luhn(b"79927398710"));
        assert!(passes_luhn(b"4111-1111-1111-1111"));
        assert!(passes_luhn(b"0"));
    }
}
