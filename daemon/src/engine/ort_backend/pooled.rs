//! The runs that batch sequences whose caches live in the [`KvPool`]: every decode of a
//! step in one run, and the first prompt chunks of new sequences in as few runs as fit.
//!
//! A new sequence's first chunk starts at position 0 with nothing cached, so several of them
//! can go through the graph as one first prompt: one row each, shorter chunks padded on the
//! right and masked out, over a contiguous range of pool rows in which no row has anything
//! cached. A range's padded size (rows x longest chunk) stays within the prefill chunk, so
//! the logits of such a run are no larger than those of one sequence's chunk. Rows that
//! hold a cache end a range; a chunk left alone runs alone, as before.

use super::super::backend::{BackendError, LogitsBatch, StepInput};
use super::{OrtBackend, no_pool};

impl OrtBackend {
    /// One batched run for every pooled decode in `self.decode_plan`.
    pub(super) fn decode_pooled(
        &mut self,
        batch: &[StepInput<'_>],
        logits: &mut LogitsBatch,
    ) -> Result<(), BackendError> {
        if self.decode_plan.is_empty() {
            return Ok(());
        }
        let pool = self.pool.as_mut().ok_or_else(no_pool)?;
        let sequences = &self.sequences;
        self.session_runs += 1;
        let decoded = pool.decode(
            &mut self.session,
            self.decode_plan
                .iter()
                .map(|&(index, slot)| (slot, batch[index].tokens[0])),
            |sequence| sequences.get(&sequence).map_or(0, |state| state.len),
        )?;
        for &(index, slot) in &self.decode_plan {
            logits.row_mut(index).copy_from_slice(decoded.row(slot));
        }
        for &(index, _) in &self.decode_plan {
            if let Some(state) = self.sequences.get_mut(&batch[index].sequence) {
                state.len += 1;
            }
        }
        Ok(())
    }

    /// Runs the step's pooled first prompt chunks (`(index in batch, slot)`), batched over
    /// contiguous ranges of rows that hold nothing cached.
    pub(super) fn prefill_pooled(
        &mut self,
        batch: &[StepInput<'_>],
        logits: &mut LogitsBatch,
        chunks: &mut [(usize, usize)],
    ) -> Result<(), BackendError> {
        chunks.sort_unstable_by_key(|&(_, slot)| slot);
        let mut start = 0;
        while start < chunks.len() {
            let end = start + self.rows_together(batch, &chunks[start..]);
            let group = &chunks[start..end];
            if let [(index, _)] = group {
                self.step_one(batch[*index], logits.row_mut(*index))?;
            } else {
                self.prefill_group(batch, logits, group)?;
            }
            start = end;
        }
        Ok(())
    }

    /// How many of `chunks` (sorted by slot) from the first can run together: while the
    /// rows between them hold nothing cached and the padded run fits the prefill chunk.
    fn rows_together(&self, batch: &[StepInput<'_>], chunks: &[(usize, usize)]) -> usize {
        let Some(&(index, first)) = chunks.first() else {
            return 0;
        };
        let mut width = batch[index].tokens.len();
        let mut previous = first;
        for (taken, &(index, slot)) in chunks.iter().enumerate().skip(1) {
            let wider = width.max(batch[index].tokens.len());
            let rows = slot - first + 1;
            let empty_between = (previous + 1..slot).all(|row| self.row_is_empty(row));
            if rows * wider > self.prefill_chunk_tokens || !empty_between {
                return taken;
            }
            width = wider;
            previous = slot;
        }
        chunks.len()
    }

    /// Whether pool row `slot` is free or holds a sequence with nothing cached.
    fn row_is_empty(&self, slot: usize) -> bool {
        let occupant = self.pool.as_ref().and_then(|pool| pool.occupant(slot));
        occupant.is_none_or(|sequence| {
            self.sequences
                .get(&sequence)
                .is_none_or(|state| state.len == 0)
        })
    }

    /// One run for the first chunks of `group` (at least two, sorted by slot).
    fn prefill_group(
        &mut self,
        batch: &[StepInput<'_>],
        logits: &mut LogitsBatch,
        group: &[(usize, usize)],
    ) -> Result<(), BackendError> {
        let pool = self.pool.as_mut().ok_or_else(no_pool)?;
        let chunks: Vec<(usize, &[u32])> = group
            .iter()
            .map(|&(index, slot)| (slot, batch[index].tokens))
            .collect();
        self.session_runs += 1;
        let fed = pool.prefill_together(&mut self.session, &chunks)?;
        for &(index, slot) in group {
            logits.row_mut(index).copy_from_slice(fed.row(slot));
        }
        for &(index, _) in group {
            if let Some(state) = self.sequences.get_mut(&batch[index].sequence) {
                state.len = batch[index].tokens.len();
            }
        }
        Ok(())
    }
}
