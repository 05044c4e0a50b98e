//! E-mail addresses.

use std::ops::Range;

/// The most characters the local part (before `@`) may have (RFC 5321).
const MAX_LOCAL: usize = 64;
/// The most characters a domain may have (RFC 1035).
const MAX_DOMAIN: usize = 253;
/// The most characters one label of a domain may have (RFC 1035).
const MAX_LABEL: usize = 63;

/// The e-mail addresses in a text, left to right, as byte ranges.
///
/// A pragmatic reading of `local@domain.tld`, in ASCII:
/// - the local part is the longest run of letters, digits and `. _ % + -` right before the
///   `@`, leading dots dropped; it must not be empty, longer than 64 or end with a dot;
/// - the domain is two or more labels (letters, digits and inner hyphens, at most 63 each)
///   joined by dots, the last label (the top-level domain) two or more letters; where the
///   labels go on past one that fails, the address ends at the last one that qualifies.
///
/// So `user@localhost` (a machine, not a mailbox anyone can write to), `a@b`, `@handle`,
/// `user@10.0.0.1` and `name@example.c` are not addresses. Internationalised addresses are
/// only matched as far as their ASCII part goes.
#[derive(Debug, Clone)]
pub(super) struct EmailAddresses<'t> {
    text: &'t str,
    /// Where the search for the next `@` goes on.
    pos: usize,
    /// The end of the last address found: the next one's local part starts no earlier.
    floor: usize,
}

impl<'t> EmailAddresses<'t> {
    /// The addresses that start at or after byte `from` (a character boundary): a local
    /// part is never read back past it.
    pub(super) fn starting_at(text: &'t str, from: usize) -> Self {
        EmailAddresses {
            text,
            pos: from,
            floor: from,
        }
    }
}

impl Iterator for EmailAddresses<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        let bytes = self.text.as_bytes();
        while let Some(offset) = bytes[self.pos..].iter().position(|&b| b == b'@') {
            let at = self.pos + offset;
            self.pos = at + 1;
            if let Some(address) = address_around(bytes, self.floor, at) {
                self.pos = address.end;
                self.floor = address.end;
                return Some(address);
            }
        }
        self.pos = bytes.len();
        None
    }
}

fn address_around(bytes: &[u8], floor: usize, at: usize) -> Option<Range<usize>> {
    let mut start = at;
    while start > floor && is_local_byte(bytes[start - 1]) {
        start -= 1;
    }
    while start < at && bytes[start] == b'.' {
        start += 1;
    }
    if start == at || at - start > MAX_LOCAL || bytes[at - 1] == b'.' {
        return None;
    }
    let end = domain_end(bytes, at + 1)?;
    Some(start..end)
}

fn is_local_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}

/// The end of the longest domain starting at `from` whose last label is a top-level domain.
fn domain_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut end = None;
    let mut labels = 0;
    let mut pos = from;
    loop {
        let run = bytes[pos..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'-')
            .count();
        // A hyphen may sit inside a label, not at its end: one there ends the domain.
        let label_end = pos
            + bytes[pos..pos + run]
                .iter()
                .rposition(|b| *b != b'-')
                .map_or(0, |i| i + 1);
        let label = &bytes[pos..label_end];
        if !is_label(label) || label_end - from > MAX_DOMAIN {
            return end;
        }
        labels += 1;
        if labels >= 2 && label.len() >= 2 && label.iter().all(u8::is_ascii_alphabetic) {
            end = Some(label_end);
        }
        if label_end < pos + run || bytes.get(label_end) != Some(&b'.') {
            return end;
        }
        pos = label_end + 1;
    }
}

fn is_label(label: &[u8]) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL
        && label.first() != Some(&b'-')
        && label.last() != Some(&b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(text: &str) -> Vec<&str> {
        EmailAddresses::starting_at(text, 0)
            .map(|r| &text[r])
            .collect()
    }

    #[test]
    fn finds_addresses_in_common_shapes() {
        for address in [
            "jane.doe@example.com",
            "j.doe+invoices@mail.example.co.uk",
            "first_last%dept@sub-domain.example.org",
            "x1@a.io",
            "ADMIN@EXAMPLE.MUSEUM",
            "o-brien@xn--bcher-kva.example",
        ] {
            assert_eq!(addresses(address), [address], "{address}");
            let prose = format!("Write to <{address}>. Or ({address}), thanks.");
            assert_eq!(addresses(&prose), [address, address], "{prose}");
        }
    }

    #[test]
    fn trims_what_ends_a_sentence_or_starts_a_dotted_run() {
        assert_eq!(addresses("mail ...jane@example.com."), ["jane@example.com"]);
        assert_eq!(addresses("at jane@example.com-"), ["jane@example.com"]);
        assert_eq!(addresses("jane@example.com.4111"), ["jane@example.com"]);
        assert_eq!(addresses("ja\"ne@example.com"), ["ne@example.com"]);
    }

    #[test]
    fn counts_each_address_once() {
        let text = "a.b@c.de, a.b@c.de;x@y.org a@b@c.com";
        assert_eq!(
            addresses(text),
            ["a.b@c.de", "a.b@c.de", "x@y.org", "b@c.com"]
        );
        assert_eq!(addresses("a@b.com%c@d.com"), ["a@b.com", "%c@d.com"]);
    }

    #[test]
    fn ignores_strings_that_are_not_addresses() {
        for text in [
            "user@localhost",
            "a@b",
            "@handle and @team.lead",
            "user@10.0.0.1",
            "name@example.c",
            "name@example.c0m",
            "jane.@example.com",
            "jane@-example.com",
            "jane@example-.com",
            "jane@.example.com",
            "jane@example..com",
            "@",
            "x@",
            "...@example.com",
            "email me at: (at) example (dot) com",
        ] {
            assert_eq!(addresses(text), Vec::<&str>::new(), "{text}");
        }
    }

    #[test]
    fn bounds_the_parts() {
        let local = "a".repeat(MAX_LOCAL);
        assert_eq!(addresses(&format!("{local}@example.com")).len(), 1);
        assert!(addresses(&format!("a{local}@example.com")).is_empty());
        let label = "b".repeat(MAX_LABEL);
        assert_eq!(addresses(&format!("a@{label}.com")).len(), 1);
        assert!(addresses(&format!("a@b{label}.com")).is_empty());
    }
}
