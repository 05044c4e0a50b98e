//! Replacing matches with `[REDACTED:<detector name>]`.

use std::iter::Peekable;
use std::ops::Range;
use std::slice;

use super::CompiledRule;

/// A text with replacements made, and where its replacement tokens are.
#[derive(Debug, Default)]
pub(super) struct Redacted {
    pub(super) text: String,
    /// The tokens inserted so far, in order, as byte ranges of `text`.
    pub(super) tokens: Vec<Range<usize>>,
}

/// One round of replacements in `text`, whose earlier tokens are `tokens`; `None` when no
/// rule matches outside them.
///
/// Matches that overlap an earlier token are left alone: they come from a rule that matches
/// (part of) its own replacement, and replacing them again would only nest tokens.
pub(super) fn redact_pass<'r>(
    rules: impl Iterator<Item = &'r CompiledRule>,
    text: &str,
    tokens: &[Range<usize>],
) -> Option<Redacted> {
    let mut spans: Vec<(Range<usize>, &str)> = Vec::new();
    for rule in rules {
        let name = rule.name.as_str();
        let fresh = rule
            .detector
            .find_iter(text)
            .filter(|span| !overlaps(tokens, span));
        spans.extend(fresh.map(|span| (span, name)));
    }
    if spans.is_empty() {
        return None;
    }
    // Stable: among spans that start together, the longest, then the earliest rule's.
    spans.sort_by_key(|(span, _)| (span.start, std::cmp::Reverse(span.end)));
    let mut out = Redacted {
        text: String::with_capacity(text.len() + 16 * spans.len()),
        tokens: Vec::with_capacity(tokens.len() + spans.len()),
    };
    let mut earlier = tokens.iter().peekable();
    let mut copied = 0;
    let mut spans = spans.into_iter().peekable();
    while let Some((span, name)) = spans.next() {
        let mut end = span.end;
        while let Some((next, _)) = spans.next_if(|(next, _)| next.start < end) {
            end = end.max(next.end);
        }
        // Earlier tokens never overlap a span, so each lies within a copied stretch.
        out.copy(text, copied..span.start, &mut earlier);
        let start = out.text.len();
        out.text.push_str("[REDACTED:");
        out.text.push_str(name);
        out.text.push(']');
        out.tokens.push(start..out.text.len());
        copied = end;
    }
    out.copy(text, copied..text.len(), &mut earlier);
    Some(out)
}

impl Redacted {
    /// Appends `text[stretch]`, and moves the earlier tokens within it along.
    fn copy(
        &mut self,
        text: &str,
        stretch: Range<usize>,
        tokens: &mut Peekable<slice::Iter<'_, Range<usize>>>,
    ) {
        let offset = self.text.len();
        while let Some(token) = tokens.next_if(|token| token.end <= stretch.end) {
            let start = token.start - stretch.start + offset;
            self.tokens.push(start..start + token.len());
        }
        self.text.push_str(&text[stretch]);
    }
}

/// Whether `span` shares a byte with one of `tokens` (sorted, disjoint).
fn overlaps(tokens: &[Range<usize>], span: &Range<usize>) -> bool {
    let first_after = tokens.partition_point(|token| token.end <= span.start);
    tokens
        .get(first_after)
        .is_some_and(|token| token.start < span.end)
}
