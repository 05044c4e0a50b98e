//! The optimum contract's steps. A sequence runs its prompt alone: each run's present
//! outputs, `concat(past, new)` made by the graph, are moved (not copied) into the next
//! run's past inputs. A one-token step decodes in the backend's decode group
//! (`decode_group`), one run for every decoding sequence of the step.

use ort::session::SessionInputValue;
use ort::value::{DynValue, Tensor};

use super::decode_group::Joining;
use super::{KvCache, OrtBackend, SequenceState, copy_last_row, output, runtime_error};
use crate::engine::backend::{BackendError, LogitsBatch, SequenceId, StepInput};

impl OrtBackend {
    /// An empty cache of the sequence's own.
    pub(super) fn new_moved_cache(&self) -> Result<KvCache, ort::Error> {
        let m = &self.metadata;
        let past = (0..self.past_names.len())
            .map(|_| {
                Tensor::<f32>::from_array(([1usize, m.num_kv_heads, 0, m.head_dim], Vec::new()))
                    .map(Tensor::into_dyn)
            })
            .collect::<Result<_, _>>()?;
        Ok(KvCache::Moved { past })
    }

    /// Runs tokens of one sequence alone over its own cache, which becomes the run's presents.
    pub(super) fn run_moved(
        &mut self,
        past: &mut Vec<DynValue>,
        ids: Tensor<i64>,
        mask: Tensor<i64>,
        positions: std::ops::Range<usize>,
        row: &mut [f32],
    ) -> Result<(), BackendError> {
        let count = positions.len();
        let positions = Tensor::from_array((
            [1usize, count],
            positions.map(|p| p as i64).collect::<Vec<_>>(),
        ))
        .map_err(runtime_error("building position_ids"))?;
        let mut inputs: Vec<(&str, SessionInputValue<'_>)> = Vec::with_capacity(3 + past.len());
        inputs.push(("input_ids", ids.into()));
        inputs.push(("attention_mask", mask.into()));
        inputs.push(("position_ids", positions.into()));
        for (name, value) in self.past_names.iter().zip(past.iter()) {
            inputs.push((name.as_str(), value.view().into()));
        }
        self.session_runs += 1;
        let mut outputs = self
            .session
            .run(inputs)
            .map_err(runtime_error("the forward pass"))?;
        copy_last_row(output(&outputs, "logits")?, row)?;
        let mut present = Vec::with_capacity(self.present_names.len());
        for name in &self.present_names {
            present.push(outputs.remove(name).ok_or(BackendError::Runtime {
                during: "reading the present KV cache",
                message: format!("output {name} is missing"),
            })?);
        }
        // Replaced only after a successful run, so a failed step keeps the old cache.
        *past = present;
        Ok(())
    }

    /// Whether a one-token step of `sequence` decodes in the group, `joining` others having
    /// joined it in this step so far; plans it if so.
    pub(super) fn plan_grouped(
        &mut self,
        index: usize,
        input: &StepInput<'_>,
        joining: &mut usize,
    ) -> bool {
        let grouped = match self.sequences.get(&input.sequence).map(|s| &s.cache) {
            Some(KvCache::Grouped) => true,
            Some(KvCache::Moved { .. }) if self.group.has_room(*joining) => {
                *joining += 1;
                true
            }
            _ => false,
        };
        if grouped {
            self.group_plan
                .push((index, input.sequence, input.tokens[0]));
        }
        grouped
    }

    /// One run for every decode in `self.group_plan`, after the sequences that joined the
    /// group this step have moved their caches into it.
    pub(super) fn decode_grouped(&mut self, logits: &mut LogitsBatch) -> Result<(), BackendError> {
        if self.group_plan.is_empty() {
            return Ok(());
        }
        let sequences = &self.sequences;
        let joining: Vec<Joining<'_>> = self
            .group_plan
            .iter()
            .filter_map(|&(_, sequence, _)| match sequences.get(&sequence)? {
                SequenceState {
                    len,
                    cache: KvCache::Moved { past },
                    ..
                } => Some(Joining {
                    sequence,
                    positions: *len,
                    past,
                }),
                _ => None,
            })
            .collect();
        self.group.admit(&joining)?;
        drop(joining);
        for &(_, sequence, _) in &self.group_plan {
            if let Some(state) = self.sequences.get_mut(&sequence) {
                // The group holds the joiners' caches now; their own copies go.
                state.cache = KvCache::Grouped;
            }
        }
        self.session_runs += 1;
        let names = (self.past_names.as_slice(), self.present_names.as_slice());
        self.group
            .decode(&mut self.session, names, &self.group_plan, logits)?;
        for &(_, sequence, _) in &self.group_plan {
            if let Some(state) = self.sequences.get_mut(&sequence) {
                state.len += 1;
            }
        }
        Ok(())
    }

    /// Takes a decoding sequence out of the group, with its cache, to run several tokens
    /// alone (a prompt chunk, or tokens a constraint forces); it rejoins at its next decode.
    pub(super) fn ungroup(&mut self, sequence: SequenceId) -> Result<(), BackendError> {
        if let Some(state) = self.sequences.get_mut(&sequence)
            && matches!(state.cache, KvCache::Grouped)
        {
            let past = self.group.detach(sequence)?;
            state.cache = KvCache::Moved { past };
        }
        Ok(())
    }
}
