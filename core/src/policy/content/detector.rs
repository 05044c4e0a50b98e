//! The compiled detectors behind content rules and the matches they report.

use std::ops::Range;

use regex::Regex;

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
    SecretMarking(Regex),
    /// A rule's own pattern.
    Pattern(Regex),
}

/// The matches of one detector in one text; see [`Detector::find_iter`].
#[derive(Debug)]
pub(super) enum Matches<'d, 't> {
    CardNumber(CardNumbers<'t>),
    Iban(Ibans<'t>),
    Email(EmailAddresses<'t>),
    Regex(regex::Matches<'d, 't>),
}

impl Detector {
    /// The byte ranges of the detector's matches in `text`: left to right, not overlapping,
    /// none empty, each starting and ending on a character boundary.
    pub(super) fn find_iter<'d, 't>(&'d self, text: &'t str) -> Matches<'d, 't> {
        match self {
            Detector::CardNumber => Matches::CardNumber(CardNumbers::new(text)),
            Detector::Iban => Matches::Iban(Ibans::new(text)),
            Detector::Email => Matches::Email(EmailAddresses::new(text)),
            Detector::SecretMarking(regex) | Detector::Pattern(regex) => {
                Matches::Regex(regex.find_iter(text))
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
