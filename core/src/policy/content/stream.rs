//! Answer rules on an answer that is sent as it is generated.
//!
//! Text leaves only once every rule that changes what the client sees (`redact` and `deny`
//! rules on answers) has settled it: a match that more text could still make, unmake or
//! lengthen holds back everything from where it would begin
//! ([`Detector::undecided_from`](super::detector::Detector::undecided_from)). What is
//! released is what the check of the whole answer would send for that part, so no prefix
//! of a match the whole answer holds ever leaves unmasked, and a denied answer sends
//! nothing of its match. Each new piece costs a scan of the part not yet released, never
//! of the whole answer.

use super::detector::GrowthCache;
use super::redact::{Crossed, Window};
use super::{ContentAction, ContentRules, Direction, Purpose};

/// A `deny` rule fired on the answer: nothing more of it may be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the answer tripped the content rule {detector}")]
pub struct Withheld {
    /// The rule's name (`card_number`, a pattern's name, ...).
    pub detector: String,
}

/// One streamed answer going through the answer rules ([`ContentRules::answer_stream`]).
#[derive(Debug)]
pub struct AnswerStream {
    rules: ContentRules,
    /// The rules that apply to answers and change what is sent, by index, with their
    /// scratch space.
    acting: Vec<(usize, GrowthCache)>,
    answer: String,
    /// Bytes of `answer` already settled and released.
    released: usize,
    withheld: Option<Withheld>,
}

impl ContentRules {
    /// A stream for one answer under these rules.
    pub fn answer_stream(&self) -> AnswerStream {
        let acting = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| {
                rule.applies_to.covers(Direction::Answer)
                    && matches!(rule.action, ContentAction::Redact | ContentAction::Deny)
            })
            .map(|(index, _)| (index, GrowthCache::default()))
            .collect();
        AnswerStream {
            rules: self.clone(),
            acting,
            answer: String::new(),
            released: 0,
            withheld: None,
        }
    }
}

impl AnswerStream {
    /// Adds generated text; returns what may be sent now (often nothing, while a possible
    /// match is pending), or the refusal once a `deny` rule has fired.
    pub fn push(&mut self, piece: &str) -> Result<String, Withheld> {
        if let Some(withheld) = &self.withheld {
            return Err(withheld.clone());
        }
        self.answer.push_str(piece);
        if self.acting.is_empty() {
            self.released = self.answer.len();
            return Ok(piece.to_owned());
        }
        let (settled, replaceable) = self.settled_upto();
        self.release(settled, &replaceable)
    }

    /// The answer is complete: everything not yet sent, or the refusal.
    pub fn finish(&mut self) -> Result<String, Withheld> {
        if let Some(withheld) = &self.withheld {
            return Err(withheld.clone());
        }
        self.release(self.answer.len(), &[])
    }

    /// The whole answer as generated so far, unmasked (for the audit record).
    pub fn answer(&self) -> &str {
        &self.answer
    }

    /// How far the answer is settled: before the first place a pending match could begin,
    /// and never inside a match; and the places at or after that where the text may still
    /// be replaced.
    fn settled_upto(&mut self) -> (usize, Vec<usize>) {
        let mut replaceable = Vec::new();
        for (index, cache) in &mut self.acting {
            let detector = &self.rules.rules[*index].detector;
            if let Some(start) = detector.undecided_from(&self.answer, self.released, cache) {
                replaceable.push(start);
            }
        }
        let mut upto = replaceable
            .iter()
            .copied()
            .min()
            .unwrap_or(self.answer.len());
        // Pull back before any match that reaches past `upto` (matches of different rules
        // may overlap, so until nothing moves).
        loop {
            let mut moved = false;
            for (index, _) in &self.acting {
                let detector = &self.rules.rules[*index].detector;
                for span in detector.find_iter_from(&self.answer, self.released) {
                    if span.start >= upto {
                        break;
                    }
                    if span.end > upto {
                        upto = span.start;
                        moved = true;
                    }
                }
            }
            if !moved {
                break;
            }
        }

        // Where the text after `upto` may still be replaced: the undecided places, and the
        // matches that start there.
        for (index, _) in &self.acting {
            let detector = &self.rules.rules[*index].detector;
            replaceable.extend(
                detector
                    .find_iter_from(&self.answer, upto)
                    .map(|span| span.start),
            );
        }
        replaceable.sort_unstable();
        replaceable.dedup();
        (upto, replaceable)
    }

    /// Checks and sends `answer[released..upto]`; at the `replaceable` places the answer
    /// may still be replaced.
    fn release(&mut self, upto: usize, replaceable: &[usize]) -> Result<String, Withheld> {
        for (index, _) in &self.acting {
            let rule = &self.rules.rules[*index];
            if rule.action != ContentAction::Deny {
                continue;
            }
            let fired = rule
                .detector
                .find_iter_from(&self.answer, self.released)
                .take_while(|span| span.start < upto)
                .any(|span| span.end <= upto);
            if fired {
                let withheld = Withheld {
                    detector: rule.name.clone(),
                };
                self.withheld = Some(withheld.clone());
                return Err(withheld);
            }
        }
        if upto == self.released {
            return Ok(String::new());
        }
        let Some(piece) = self.masked(&self.answer, upto) else {
            return Ok(String::new());
        };
        // Replacing a match that is not settled yet can change what comes before it (a
        // domain that reads as one, a card number no longer glued to a word, once what
        // follows is masked): the part is released only if it is masked the same whether
        // the text goes on as it does or ends at any place where it could be replaced.
        let unsettled = replaceable.iter().any(|&at| {
            at < self.answer.len() && self.masked(&self.answer[..at], upto).as_ref() != Some(&piece)
        });
        if unsettled {
            return Ok(String::new());
        }
        self.released = upto;
        Ok(piece)
    }

    /// `text[released..upto]` as the client may see it, given what `text` holds after it;
    /// `None` when a replacement brings a match to light across `upto`.
    fn masked(&self, text: &str, upto: usize) -> Option<String> {
        let window = Window {
            from: self.released,
            upto,
        };
        match self
            .rules
            .redact_window(text, Direction::Answer, Purpose::Inference, window)
        {
            Ok(None) => Some(text[self.released..upto].to_owned()),
            Ok(Some(redacted)) => Some(redacted.text[self.released..redacted.upto].to_owned()),
            Err(Crossed) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::{ContentRuleConfig, Direction};
    use super::*;

    /// A rule of `detector` on answers.
    fn rule(detector: &str, action: ContentAction) -> ContentRuleConfig {
        ContentRuleConfig {
            applies_to: Direction::Answer,
            ..super::super::tests::rule(detector, action)
        }
    }

    /// Rules of every kind: built-ins that mask, markings (mixed case, spread over any
    /// whitespace) and patterns that deny, a pattern whose end depends on what follows.
    fn rules() -> ContentRules {
        ContentRules::compile(&[
            rule("card_number", ContentAction::Redact),
            rule("iban", ContentAction::Redact),
            rule("email", ContentAction::Redact),
            ContentRuleConfig {
                markings: Some(vec!["Eyes Only".to_owned(), "TOP SECRET".to_owned()]),
                ..rule("secret_marking", ContentAction::Deny)
            },
            ContentRuleConfig {
                name: Some("falcon".to_owned()),
                pattern: Some(r"(?i)\bproject\s+falcon\b".to_owned()),
                ..rule("regex", ContentAction::Deny)
            },
            ContentRuleConfig {
                name: Some("ticket".to_owned()),
                pattern: Some(r"TCK-\d+\B".to_owned()),
                ..rule("regex", ContentAction::Redact)
            },
        ])
        .expect("rules compile")
    }

    /// Sends `answer` in `pieces`; returns what was sent and whether it was withheld.
    fn stream(rules: &ContentRules, pieces: &[&str]) -> (String, Option<Withheld>) {
        let mut stream = rules.answer_stream();
        let mut sent = String::new();
        for piece in pieces {
            match stream.push(piece) {
                Ok(out) => sent.push_str(&out),
                Err(withheld) => return (sent, Some(withheld)),
            }
        }
        match stream.finish() {
            Ok(out) => {
                sent.push_str(&out);
                (sent, None)
            }
            Err(withheld) => (sent, Some(withheld)),
        }
    }

    /// The whole answer's matches of the rules that deny.
    fn denied_spans(rules: &ContentRules, answer: &str) -> Vec<std::ops::Range<usize>> {
        rules
            .rules
            .iter()
            .filter(|rule| rule.action == ContentAction::Deny)
            .flat_map(|rule| rule.detector.find_iter(answer).collect::<Vec<_>>())
            .collect()
    }

    fn split(answer: &str, cuts: &[usize]) -> Vec<String> {
        let mut points: Vec<usize> = cuts
            .iter()
            .map(|&cut| cut % (answer.len() + 1))
            .filter(|&at| answer.is_char_boundary(at))
            .collect();
        points.extend([0, answer.len()]);
        points.sort_unstable();
        points.dedup();
        points
            .windows(2)
            .map(|w| answer[w[0]..w[1]].to_owned())
            .collect()
    }

    #[test]
    fn a_withheld_answer_sends_no_part_of_its_match() {
        let rules = rules();
        for pieces in [
            &["The file is TOP", " ", "\n SECRET and more"][..],
            &["see pro", "ject\t\t", "FALCON", " now"],
            &["marked eyes only, or Eyes", "   Only"],
        ] {
            let (sent, withheld) = stream(&rules, pieces);
            let answer = pieces.concat();
            if answer.contains("eyes only,") && !answer.contains("Eyes   Only") {
                continue;
            }
            assert!(withheld.is_some(), "{pieces:?} was not withheld");
            for word in ["TOP", "pro", "Eyes"] {
                if let Some(at) = answer.rfind(word) {
                    assert!(
                        sent.len() <= at,
                        "{sent:?} sent part of a match of {answer:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn lower_case_ibans_and_grouped_cards_are_masked_whatever_the_split() {
        let rules = rules();
        let answer = "pay de89 3704 0044 0532 0130 00 or card 4111-1111-1111-1111, thanks";
        let whole = rules.redact(answer, Direction::Answer, Purpose::Inference);
        for cut in 1..answer.len() {
            let (sent, withheld) = stream(&rules, &[&answer[..cut], &answer[cut..]]);
            assert_eq!(withheld, None);
            assert_eq!(sent, whole, "split at {cut}");
        }
    }

    #[test]
    fn a_match_decided_by_what_follows_waits_for_it() {
        // `TCK-42\B` matches in "TCK-421" (ending before the last digit) but not in
        // "TCK-42 ": the "TCK-4" must not leave before the next character is known.
        let rules = rules();
        for answer in ["ref TCK-421 done", "ref TCK-42 done"] {
            let whole = rules.redact(answer, Direction::Answer, Purpose::Inference);
            let mut stream = rules.answer_stream();
            let sent = stream.push("ref TCK-42").expect("not denied");
            assert!(!sent.contains("TCK"), "{sent:?}");
            let rest = stream
                .push(&answer["ref TCK-42".len()..])
                .expect("not denied");
            let end = stream.finish().expect("not denied");
            assert_eq!(format!("{sent}{rest}{end}"), whole);
        }
    }

    #[test]
    fn without_acting_rules_text_passes_straight_through() {
        let rules = ContentRules::compile(&[rule("email", ContentAction::RedactInAudit)])
            .expect("compiles");
        let mut stream = rules.answer_stream();
        assert_eq!(
            stream.push("mail a@b.example").expect("sent"),
            "mail a@b.example"
        );
        assert_eq!(stream.answer(), "mail a@b.example");
    }

    /// Pieces of answers: prose, whitespace, and things the rules look for, in forms a
    /// naive hold-back misses (lower case, mixed case, spread over lines).
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("the ".to_owned()),
            Just("Project ".to_owned()),
            Just("falcon".to_owned()),
            Just("FALCON".to_owned()),
            Just("Eyes".to_owned()),
            Just("Only".to_owned()),
            Just("TOP".to_owned()),
            Just("SECRET".to_owned()),
            Just("TCK-".to_owned()),
            Just("DE89 3704 0044 0532 0130 00".to_owned()),
            Just("de89370400440532013000".to_owned()),
            Just("4111 1111 1111 1111".to_owned()),
            Just("5500-0000-0000-0004".to_owned()),
            Just("jane.doe@example.com".to_owned()),
            Just("a@b.co".to_owned()),
            "[0-9]{1,4}",
            "[a-zA-Z]{1,6}",
            "[ \t\n]{1,3}",
            "[.,;:@/-]",
            Just("é".to_owned()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// For any answer and any split into pieces: what is sent is exactly what the check
        /// of the whole answer sends (so no part of a masked match leaves unmasked), and an
        /// answer whose whole text a deny rule refuses is withheld before any part of the
        /// match is sent.
        #[test]
        fn the_stream_never_sends_a_prefix_of_a_match(
            fragments in proptest::collection::vec(fragment(), 1..24),
            cuts in proptest::collection::vec(any::<usize>(), 0..24),
        ) {
            let rules = rules();
            let answer = fragments.concat();
            let pieces = split(&answer, &cuts);
            let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let (sent, withheld) = stream(&rules, &pieces);
            let denied = denied_spans(&rules, &answer);
            if let Some(first) = denied.iter().map(|span| span.start).min() {
                prop_assert!(withheld.is_some(), "{answer:?} was sent whole: {sent:?}");
                let whole = rules.redact(&answer[..first], Direction::Answer, Purpose::Inference);
                prop_assert!(
                    whole.starts_with(sent.as_str()),
                    "sent {sent:?}, more than the part of {answer:?} before its match"
                );
            } else {
                prop_assert_eq!(withheld, None);
                let whole = rules.redact(&answer, Direction::Answer, Purpose::Inference);
                prop_assert_eq!(sent, whole.into_owned(), "answer {:?} in {:?}", answer, pieces);
            }
        }
    }
}
