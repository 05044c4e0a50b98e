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
    /// Where the boundary the caller asked about ([`Window::upto`]) lies in `text`.
    pub(super) upto: usize,
}

/// The part of a text a round of replacements works on: matches must start at or after
/// `from` and before `upto` (the text around is context, copied as it is: what follows
/// `upto` may not be settled yet), and none may cross `upto`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Window {
    pub(super) from: usize,
    pub(super) upto: usize,
}

/// A match crossed [`Window::upto`]: the text up to there cannot be redacted on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Crossed;

/// One round of replacements in `text`, whose earlier tokens are `tokens`; `Ok(None)` when
/// no rule matches outside them.
///
/// Matches that overlap an earlier token are left alone: they come from a rule that matches
/// (part of) its own replacement, and replacing them again would only nest tokens.
pub(super) fn redact_pass<'r>(
    rules: impl Iterator<Item = &'r CompiledRule>,
    text: &str,
    tokens: &[Range<usize>],
    window: Window,
) -> Result<Option<Redacted>, Crossed> {
    let mut spans: Vec<(Range<usize>, &str)> = Vec::new();
    for rule in rules {
        let name = rule.name.as_str();
        let fresh = rule
            .detector
            .find_iter_from(text, window.from)
            .take_while(|span| span.start < window.upto)
            .filter(|span| !overlaps(tokens, span));
        spans.extend(fresh.map(|span| (span, name)));
    }
    if spans.is_empty() {
        return Ok(None);
    }
    if spans
        .iter()
        .any(|(span, _)| span.start < window.upto && window.upto < span.end)
    {
        return Err(Crossed);
    }
    // Stable: among spans that start together, the longest, then the earliest rule's.
    spans.sort_by_key(|(span, _)| (span.start, std::cmp::Reverse(span.end)));
    let mut out = Redacted {
        text: String::with_capacity(text.len() + 16 * spans.len()),
        tokens: Vec::with_capacity(tokens.len() + spans.len()),
        upto: window.upto,
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
        if end <= window.upto {
            // Spans never cross `upto`: this one lies wholly before it.
            out.upto = out.upto + (out.text.len() - start) - (end - span.start);
        }
        copied = end;
    }
    out.copy(text, copied..text.len(), &mut earlier);
    Ok(Some(out))
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
