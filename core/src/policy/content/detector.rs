//! The compiled detectors behind content rules and the matches they report, and how far a
//! growing text (a streamed answer) is decided for each.

use std::ops::Range;

use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input};

use super::card::CardNumbers;
use super::email::EmailAddresses;
use super::iban::Ibans;

/// A compiled detector.
#[derive(Debug, Clone)]
pub(super) enum Detector {
    CardNumber,
    Iban,
    Email,
    /// Secret markings, compiled into one alternation.
    SecretMarking(RegexDetector),
    /// A rule's own pattern.
    Pattern(RegexDetector),
}

/// A pattern, and the same pattern as a lazy DFA anchored where it starts, which tells
/// whether a match could still begin at a place as the text grows.
#[derive(Debug, Clone)]
pub(super) struct RegexDetector {
    regex: Regex,
    /// `None` where no DFA could be built: every place is then undecided until the text
    /// ends.
    growth: Option<DFA>,
}

/// Per-text scratch space for [`Detector::undecided_from`] (the lazy DFA's states).
#[derive(Debug, Default)]
pub(super) struct GrowthCache(Option<Cache>);

/// The matches of one detector in one text; see [`Detector::find_iter`].
#[derive(Debug)]
pub(super) enum Matches<'d, 't> {
    CardNumber(CardNumbers<'t>),
    Iban(Ibans<'t>),
    Email(EmailAddresses<'t>),
    Regex(regex_automata::meta::FindMatches<'d, 't>),
}

/// The longest IBAN written in groups (34 characters and 8 spaces), and the character after
/// it that decides whether it is glued to a word.
const IBAN_DECIDED_AFTER: usize = 34 + 8 + 1;
/// The longest address (local part, `@`, domain), and the character after it.
const EMAIL_DECIDED_AFTER: usize = 64 + 1 + 253 + 1;

impl RegexDetector {
    /// Builds `pattern` (already checked by the `regex` crate with the same size limit).
    pub(super) fn new(pattern: &str, size_limit: usize) -> Option<Self> {
        let regex = Regex::builder()
            .configure(
                Regex::config()
                    .nfa_size_limit(Some(size_limit))
                    .onepass_size_limit(Some(size_limit))
                    .dfa_size_limit(Some(size_limit)),
            )
            .build(pattern)
            .ok()?;
        let growth = DFA::builder()
            .configure(DFA::config().unicode_word_boundary(true))
            .thompson(regex_automata::nfa::thompson::Config::new().nfa_size_limit(Some(size_limit)))
            .build(pattern)
            .ok();
        Some(Self { regex, growth })
    }

    /// Whether the pattern matches the empty text (it would fire everywhere).
    pub(super) fn matches_empty_text(&self) -> bool {
        self.regex.is_match("")
    }

    /// The earliest place at or after `from` where an anchored match could still be under
    /// way at the end of `text`: the DFA started there has not died. A DFA that gives up
    /// (a Unicode word boundary next to a non-ASCII byte, a full cache) counts as undecided.
    fn undecided_from(&self, text: &str, from: usize, cache: &mut GrowthCache) -> Option<usize> {
        let Some(dfa) = &self.growth else {
            return (from < text.len()).then_some(from);
        };
        let cache = cache.0.get_or_insert_with(|| dfa.create_cache());
        let bytes = text.as_bytes();
        (from..text.len())
            .filter(|&start| text.is_char_boundary(start))
            .find(|&start| {
                let input = Input::new(text)
                    .range(start..text.len())
                    .anchored(Anchored::Yes);
                let Ok(mut state) = dfa.start_state_forward(cache, &input) else {
                    return true;
                };
                for &byte in &bytes[start..] {
                    match dfa.next_state(cache, state, byte) {
                        Ok(next) if next.is_dead() => return false,
                        Ok(next) if next.is_quit() => return true,
                        Ok(next) => state = next,
                        Err(_) => return true,
                    }
                }
                true
            })
    }
}

impl Detector {
    /// The byte ranges of the detector's matches in `text`: left to right, not overlapping,
    /// none empty, each starting and ending on a character boundary.
    pub(super) fn find_iter<'d, 't>(&'d self, text: &'t str) -> Matches<'d, 't> {
        self.find_iter_from(text, 0)
    }

    /// As [`Detector::find_iter`], for the matches that start at or after byte `from` (a
    /// character boundary): what comes before it is read only as context (a letter before
    /// a number, the character a word boundary looks at).
    pub(super) fn find_iter_from<'d, 't>(&'d self, text: &'t str, from: usize) -> Matches<'d, 't> {
        match self {
            Detector::CardNumber => Matches::CardNumber(CardNumbers::starting_at(text, from)),
            Detector::Iban => Matches::Iban(Ibans::starting_at(text, from)),
            Detector::Email => Matches::Email(EmailAddresses::starting_at(text, from)),
            Detector::SecretMarking(regex) | Detector::Pattern(regex) => {
                Matches::Regex(regex.regex.find_iter(Input::new(text).range(from..)))
            }
        }
    }

    /// The earliest character boundary at or after `from` where a match could begin that
    /// more text might still make, unmake or lengthen; `None` when every match starting at
    /// or after `from` is settled by `text` as it is. A streamed answer is released only up
    /// to there.
    ///
    /// The built-in detectors match runs of a known alphabet and look at most one character
    /// past a match (two for a card number's decimal point), so what is undecided is the
    /// trailing run of their alphabet (widened by the characters that could make a card
    /// number a fraction), bounded by their longest match where they have one. Patterns and
    /// markings ask their DFA.
    pub(super) fn undecided_from(
        &self,
        text: &str,
        from: usize,
        cache: &mut GrowthCache,
    ) -> Option<usize> {
        let trailing = |part_of: fn(char) -> bool, longest: Option<usize>| {
            let run: usize = text[from..]
                .chars()
                .rev()
                .take_while(|&c| part_of(c))
                .map(char::len_utf8)
                .sum();
            let mut start = text.len() - run;
            if let Some(longest) = longest {
                start = start.max(text.len().saturating_sub(longest));
                while !text.is_char_boundary(start) {
                    start += 1;
                }
            }
            (start < text.len()).then_some(start)
        };
        match self {
            // How long a run of digit groups goes on decides whether it is a card number at
            // all (more than 19 digits is none), so the whole run waits.
            Detector::CardNumber => trailing(|c| c.is_ascii_digit() || " -.,".contains(c), None),
            Detector::Iban => trailing(
                |c| c.is_ascii_alphanumeric() || c == ' ',
                Some(IBAN_DECIDED_AFTER),
            ),
            Detector::Email => trailing(
                |c| c.is_ascii_alphanumeric() || "._%+-@".contains(c),
                Some(EMAIL_DECIDED_AFTER),
            ),
            Detector::SecretMarking(regex) | Detector::Pattern(regex) => {
                regex.undecided_from(text, from, cache)
            }
        }
    }
}

impl Iterator for Matches<'_, '_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        match self {
            Matches::CardNumber(matches) => matches.next(),
            Matches::Iban(matches) => matches.next(),
            Matches::Email(matches) => matches.next(),
            // A pattern that can match nothing at all would fire everywhere; only real
            // text counts.
            Matches::Regex(matches) => matches.find(|m| !m.is_empty()).map(|m| m.range()),
        }
    }
}
