//! The runs that batch sequences whose caches live in the [`KvPool`]: every decode of a
//! step in one run, and the first prompt chunks of new sequences in as few runs as fit.
//!
//! A new sequence's first chunk starts at position 0 with nothing cached, so several of them
//! can go through the graph as one first prompt: one row each, shorter chunks padded on the
//! right and masked out, over a contiguous range of pool rows in which no row has anything
//! cached. A range's padded size (rows x longest chunk) stays within the prefill chunk, so
//! the logits of such a run are no larger than those of one sequence's chunk. Rows that
//! hold a cache end a range; a chunk left alone runs alone, as before.
//!
//! A pooled sequence that shares prefixes (`Backend::share_prefixes`) looks its prompt up
//! in the prefix cache block by block before each chunk runs: blocks found are copied into
//! its slot and only the rest is computed (always at least the chunk's last token, whose
//! logits the step returns). After the step, every whole block of prompt it computed is
//! copied into the cache for the next sequence of its scope.

use super::super::backend::{BackendError, LogitsBatch, StepInput};
use super::super::prefix_cache::BLOCK_TOKENS;
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
                // The last token: a prompt whose rest was restored from the prefix cache
                // may leave just one.
                .map(|&(index, slot)| (slot, batch[index].tokens[batch[index].tokens.len() - 1])),
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

    /// Copies the cached blocks that `input`'s prompt chunk continues into the sequence's
    /// slot and returns how many of its tokens they cover; leaves at least one to compute
    /// (a chunk that ends on a cached block computes just its last position). A block the
    /// previous chunk began is completed from the cache too.
    pub(super) fn restore_prefix(&mut self, input: &StepInput<'_>, slot: usize) -> usize {
        let (Some(cache), Some(pool)) = (self.prefix_cache.as_mut(), self.pool.as_mut()) else {
            return 0;
        };
        let Some(state) = self.sequences.get_mut(&input.sequence) else {
            return 0;
        };
        let Some(chain) = state.prefix.as_mut() else {
            return 0;
        };
        if chain.positions + chain.pending.len() != state.len {
            return 0;
        }
        let mut restored = 0;
        loop {
            // Positions of the current block already in the slot, and tokens to finish it.
            let have = chain.pending.len();
            let need = BLOCK_TOKENS - have;
            if restored + need > input.tokens.len() {
                break;
            }
            let tokens = &input.tokens[restored..restored + need];
            let key = chain.key.next_of(&chain.pending, tokens);
            let Some(block) = cache.get(&key) else {
                break;
            };
            // The chunk's last position is computed, for the step's logits.
            let last = restored + need == input.tokens.len();
            let copied = if last { BLOCK_TOKENS - 1 } else { BLOCK_TOKENS };
            let part = (BLOCK_TOKENS, have..copied.max(have));
            if !pool.write_block(slot, chain.positions, part, block) {
                break;
            }
            state.len += copied.max(have) - have;
            if last {
                // The block's tokens wait in the chain until its last position is in.
                chain.pending.extend_from_slice(&tokens[..need - 1]);
                restored += need - 1;
                break;
            }
            chain.key = key;
            chain.positions += BLOCK_TOKENS;
            chain.pending.clear();
            restored += need;
        }
        restored
    }

    /// After a step: copies every whole block of prompt the step computed for a sequence
    /// that shares prefixes into the cache. A sequence fed one token (decoding, or its
    /// prompt's last token) stops sharing: only prompts are shared.
    pub(super) fn remember_prefixes(&mut self, batch: &[StepInput<'_>]) {
        let (Some(cache), Some(pool)) = (self.prefix_cache.as_mut(), self.pool.as_mut()) else {
            return;
        };
        for input in batch {
            let Some(state) = self.sequences.get_mut(&input.sequence) else {
                continue;
            };
            let (Some(chain), super::KvCache::Pooled { slot }) = (&mut state.prefix, &state.cache)
            else {
                continue;
            };
            if input.tokens.len() == 1 {
                state.prefix = None;
                continue;
            }
            let computed = state
                .len
                .saturating_sub(chain.positions + chain.pending.len());
            let Some(fed) = input.tokens.len().checked_sub(computed) else {
                state.prefix = None;
                continue;
            };
            chain.pending.extend_from_slice(&input.tokens[fed..]);
            while chain.pending.len() >= BLOCK_TOKENS {
                let key = chain.key.next(&chain.pending[..BLOCK_TOKENS]);
                if !cache.contains(&key)
                    && let Some(block) = pool.read_block(*slot, chain.positions, BLOCK_TOKENS)
                {
                    let bytes = block.bytes();
                    cache.insert(key, block, bytes);
                }
                chain.key = key;
                chain.positions += BLOCK_TOKENS;
                chain.pending.drain(..BLOCK_TOKENS);
            }
        }
    }
}
