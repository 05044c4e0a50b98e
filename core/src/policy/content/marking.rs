//! Secret markings: classification banners and caveats written into a text.

/// The markings a `secret_marking` rule looks for when it lists none: the classification
/// banners and dissemination caveats of US and NATO practice. Plain words such as
/// "secret" or "confidential" are left out on purpose: prose uses them all the time, and
/// banners write the level in capitals followed by `//` caveats.
pub const DEFAULT_MARKINGS: [&str; 9] = [
    "TOP SECRET",
    "COSMIC TOP SECRET",
    "NATO SECRET",
    "NATO CONFIDENTIAL",
    "SECRET//",
    "CONFIDENTIAL//",
    "TS//SCI",
    "NOFORN",
    "ORCON",
];

/// The pattern that finds any of `markings`.
///
/// Markings match case-sensitively and as whole words: a marking that starts (ends) with a
/// letter, digit or underscore needs a non-word character or the edge of the text before
/// (after) it, so `TOP SECRET` does not fire on `TOP SECRETARY`. The word boundary is the
/// ASCII one, which keeps the search on the fast engine for any text. Whitespace inside a
/// marking matches any run of whitespace (`TOP  SECRET`, a line break). Longer markings come
/// first, so where two start at the same place the longer one counts, once.
pub(super) fn marking_pattern<S: AsRef<str>>(markings: &[S]) -> String {
    let mut sorted: Vec<&str> = markings.iter().map(|m| m.as_ref().trim()).collect();
    sorted.sort_by_key(|m| std::cmp::Reverse(m.len()));
    let alternatives: Vec<String> = sorted
        .iter()
        .map(|marking| {
            let words: Vec<String> = marking.split_whitespace().map(regex::escape).collect();
            let before = if marking.starts_with(is_word_char) {
                r"(?-u:\b)"
            } else {
                ""
            };
            let after = if marking.ends_with(is_word_char) {
                r"(?-u:\b)"
            } else {
                ""
            };
            format!("{before}{}{after}", words.join(r"\s+"))
        })
        .collect();
    alternatives.join("|")
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

#[cfg(test)]
mod tests {
    use regex::Regex;

    use super::*;

    fn markings(list: &[&str], text: &str) -> Vec<String> {
        let regex = Regex::new(&marking_pattern(list)).expect("markings compile");
        regex
            .find_iter(text)
            .map(|m| m.as_str().to_owned())
            .collect()
    }

    #[test]
    fn finds_default_markings_as_whole_words() {
        let text = "TOP SECRET//NOFORN\nbody\nCOSMIC TOP SECRET and SECRET//REL TO USA, ORCON.";
        assert_eq!(
            markings(&DEFAULT_MARKINGS, text),
            [
                "TOP SECRET",
                "NOFORN",
                "COSMIC TOP SECRET",
                "SECRET//",
                "ORCON"
            ]
        );
    }

    #[test]
    fn ignores_other_cases_longer_words_and_plain_prose() {
        let text = "The TOP SECRETARY met NOFORNS at ORCONS; top secret; Top Secret; \
                    a secret and confidential memo; SECRET without caveat; XNOFORN";
        assert_eq!(markings(&DEFAULT_MARKINGS, text), Vec::<String>::new());
    }

    #[test]
    fn spreads_over_any_whitespace_and_treats_metacharacters_literally() {
        assert_eq!(
            markings(&["TOP SECRET"], "TOP \n\tSECRET"),
            ["TOP \n\tSECRET"]
        );
        assert_eq!(markings(&["A.B (X)"], "AxB (X) A.B (X)"), ["A.B (X)"]);
        assert_eq!(markings(&["//SI"], "TS//SI-G"), ["//SI"]);
    }

    #[test]
    fn the_longer_of_two_markings_at_one_place_counts_once() {
        assert_eq!(
            markings(&["SECRET", "SECRET//NOFORN"], "SECRET//NOFORN"),
            ["SECRET//NOFORN"]
        );
    }
}
