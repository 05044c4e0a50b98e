//! Character tests the detectors share.

/// Whether `c` glued to a match makes it part of a longer word: a letter or digit of any
/// script, or an underscore.
pub(super) fn is_glued(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The character that ends right before byte `at`, which must be a character boundary.
pub(super) fn prev_char(text: &str, at: usize) -> Option<char> {
    text[..at].chars().next_back()
}
