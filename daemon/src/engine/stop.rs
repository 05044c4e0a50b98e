//! Stop strings, which may span several tokens.
//!
//! Text is held back while it could still be the start of a stop string, so a client never
//! sees part of a stop string that is completed by the next token. Generation ends at the
//! stop string completed first (ending earliest in the text; of those ending at the same
//! place, the longest), however the text arrives in pieces.

/// Watches generated text for stop strings.
#[derive(Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What the matcher releases after new text arrives.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that can be shown; more may follow.
    Continue(String),
    /// A stop string matched: this text precedes it, and generation ends.
    Stopped(String),
}

impl StopMatcher {
    /// `stops` must not contain empty strings (the request validation refuses them).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
        }
    }

    /// Adds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(text.to_owned());
        }
        // With stops: `pending` is at most the longest stop string, because everything but
        // a possible stop prefix is released below, so each search is short.
        // Search only where a match could begin: a stop string completed by `text` starts
        // at most (longest stop - 1) bytes before it.
        let search_from = self.pending.len().saturating_sub(self.longest_stop() - 1);
        self.pending.push_str(text);
        let search_from = floor_char_boundary(&self.pending, search_from);
        // The stop completed first wins, as it would have token by token: of two that end
        // in this text, the one ending earlier; of two ending together, the longer.
        let first_match = self
            .stops
            .iter()
            .filter_map(|stop| {
                let at = self.pending[search_from..].find(stop.as_str())?;
                Some((at + stop.len(), at))
            })
            .min()
            .map(|(_, at)| at);
        if let Some(at) = first_match {
            let mut released = std::mem::take(&mut self.pending);
            released.truncate(search_from + at);
            return StopOutcome::Stopped(released);
        }
        let hold = self.held_suffix_len();
        let keep_from = self.pending.len() - hold;
        let held = self.pending.split_off(keep_from);
        StopOutcome::Continue(std::mem::replace(&mut self.pending, held))
    }

    /// Text held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    fn longest_stop(&self) -> usize {
        self.stops.iter().map(String::len).max().unwrap_or(1)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            let max = (stop.len() - 1).min(self.pending.len());
            for len in (best + 1..=max).rev() {
                let start = self.pending.len() - len;
                if self.pending.is_char_boundary(start)
                    && stop.is_char_boundary(len)
                    && self.pending[start..] == stop[..len]
                {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            match m.push(piece) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_spanning_tokens_is_found_and_never_shown() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc E"), StopOutcome::Continue("abc ".into()));
        assert_eq!(m.push("N"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("D tail"), StopOutcome::Stopped(String::new()));
        assert_eq!(run(&["END"], &["x", "EN", "Dy"]), ("x".into(), true));
    }

    #[test]
    fn false_start_is_released() {
        assert_eq!(run(&["END"], &["E", "N", "x"]), ("ENx".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        assert_eq!(run(&["日本"], &["é日", "本x"]), ("é".into(), true));
        assert_eq!(run(&["日本"], &["é日", "x"]), ("é日x".into(), false));
    }

    #[test]
    fn a_stop_completed_first_wins_over_a_longer_one_that_began_earlier() {
        // "日" is complete before "b日éb" could be: generation ends there, cut as it may be.
        let stops = ["b日éb", "日"];
        let whole = run(&stops, &[" éé a b日éb"]);
        assert_eq!(whole, (" éé a b".into(), true));
        assert_eq!(run(&stops, &[" éé a b日é", "b"]), whole);
        // Completed by the same character, the longer one wins.
        assert_eq!(run(&["b日", "日"], &["ab日"]), ("a".into(), true));
    }

    #[test]
    fn without_stops_everything_passes() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    proptest::proptest! {
        /// However the text is cut into pieces, the matcher releases exactly the text before
        /// the stop string completed first (or all of it), as a search over the whole text
        /// would.
        #[test]
        fn pieces_never_change_the_answer(
            text in "[ab日é ]{0,40}",
            stops in proptest::collection::vec("[ab日é]{1,4}", 0..3),
            cuts in proptest::collection::vec(0usize..60, 0..8),
        ) {
            let first = stops
                .iter()
                .filter_map(|s| text.find(s.as_str()).map(|at| (at + s.len(), at)))
                .min()
                .map(|(_, at)| at);
            let expected = match first {
                Some(at) => (text[..at].to_owned(), true),
                None => (text.clone(), false),
            };
            let mut bounds: Vec<usize> = cuts
                .into_iter()
                .map(|c| c.min(text.len()))
                .filter(|&c| text.is_char_boundary(c))
                .collect();
            bounds.push(0);
            bounds.push(text.len());
            bounds.sort_unstable();
            bounds.dedup();
            let pieces: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();
            let stop_refs: Vec<&str> = stops.iter().map(String::as_str).collect();
            proptest::prop_assert_eq!(run(&stop_refs, &pieces), expected);
        }
    }
}
