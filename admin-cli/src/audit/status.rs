//! The exit statuses of what verification finds (see `exit_codes!`), and what each kind of
//! damage means, in words.

use moat_core::audit::Damage;
use moat_core::audit::export::ContinuityError;

/// The export's signed header and end do not verify.
pub const BAD_FRAME: u8 = 18;

/// The exit status of a kind of damage.
pub fn damage_code(damage: Damage) -> u8 {
    match damage {
        Damage::Unreadable => 10,
        Damage::Gap => 11,
        Damage::OutOfOrder => 12,
        Damage::BrokenLink => 13,
        Damage::BadSignature => 14,
        Damage::CheckpointMismatch => 15,
        Damage::Truncated => 16,
        Damage::ForeignCheckpoint => 17,
    }
}

/// The exit status of an export that does not extend the held head.
pub fn continuity_code(error: &ContinuityError) -> u8 {
    match error {
        ContinuityError::Older { .. } => 19,
        ContinuityError::Forked { .. } => 20,
        ContinuityError::NotCovered { .. } | ContinuityError::OtherNode { .. } => 21,
    }
}

/// The name of a break in continuity, as `exit_codes!` lists it.
pub fn continuity_name(error: &ContinuityError) -> &'static str {
    match error {
        ContinuityError::Older { .. } => "older",
        ContinuityError::Forked { .. } => "forked",
        ContinuityError::NotCovered { .. } | ContinuityError::OtherNode { .. } => "not_continuous",
    }
}

/// What a kind of damage means for the records, in a sentence.
pub fn meaning(damage: Damage) -> &'static str {
    match damage {
        Damage::Unreadable => {
            "the line is not a record, checkpoint or end line of an export, or follows the end line"
        }
        Damage::Gap => "this record is missing",
        Damage::OutOfOrder => "this record repeats or comes after a later one",
        Damage::BrokenLink => {
            "this record does not chain to the one before it: it or its predecessor was \
             altered, or it comes from another node's chain"
        }
        Damage::BadSignature => "the checkpoint at this record is not signed by the node key",
        Damage::CheckpointMismatch => {
            "the checkpoint at this record names a chain head the records do not reach: records \
             up to it were rewritten"
        }
        Damage::Truncated => {
            "records from here on are missing: the export was cut short (its end line is \
             missing, or does not match what is left)"
        }
        Damage::ForeignCheckpoint => "the checkpoint at this record belongs to another node",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::audit::ChainPoint;

    #[test]
    fn every_kind_of_damage_has_its_own_exit_status() {
        let kinds = [
            Damage::Unreadable,
            Damage::Gap,
            Damage::OutOfOrder,
            Damage::BrokenLink,
            Damage::BadSignature,
            Damage::CheckpointMismatch,
            Damage::Truncated,
            Damage::ForeignCheckpoint,
        ];
        let codes: std::collections::BTreeSet<u8> = kinds.iter().map(|d| damage_code(*d)).collect();
        assert_eq!(codes.len(), kinds.len());
        for kind in kinds {
            let line = format!("{:>4}  {}:", damage_code(kind), kind.as_str());
            assert!(exit_codes!().contains(&line), "{line} is documented");
        }
    }

    #[test]
    fn a_bad_frame_and_each_break_in_continuity_have_their_own_documented_status() {
        let point = ChainPoint {
            sequence: 1,
            hash: [0; 32],
        };
        let breaks = [
            ContinuityError::Older {
                held: point,
                head: point,
            },
            ContinuityError::Forked {
                sequence: 1,
                held: [0; 32],
                found: [1; 32],
            },
            ContinuityError::NotCovered {
                sequence: 1,
                first: 2,
            },
        ];
        let mut cases = vec![(BAD_FRAME, "bad_frame")];
        cases.extend(
            breaks
                .iter()
                .map(|b| (continuity_code(b), continuity_name(b))),
        );
        let taken: Vec<u8> = (10..=17).collect();
        let codes: std::collections::BTreeSet<u8> = cases.iter().map(|(c, _)| *c).collect();
        assert_eq!(codes.len(), cases.len());
        for (code, name) in cases {
            assert!(!taken.contains(&code), "{name} has a status of its own");
            let line = format!("{code:>4}  {name}:");
            assert!(exit_codes!().contains(&line), "{line} is documented");
        }
    }
}
