//! Runs a bundle's evaluation set (`eval.jsonl`, see `moat_core::bundle::eval`) on a loaded
//! version, on the node: `moatctl model eval`, and the gate of `moatctl model promote`.
//!
//! Every item is answered greedily, as golden prompts are (so a score is the model's, not
//! the sampler's), under the bundle's response schema if it has one (so answers are
//! scored as they would be served), four at a time through the engine's batch.

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use moat_core::admin::{EvalFailure, Evaluated, LatencyMs, PromotionEvaluation};
use moat_core::bundle::BundleManifest;
use moat_core::bundle::eval::{EvalItem, Scoring};
use serde_json::Value;

use moat_core::bundle::eval::{EVAL_FILE, MAX_EVAL_BYTES, parse};

use super::serving::LoadedModel;
use super::serving::ServedModel;
use super::{Models, RolloutError, golden, parse_label};

/// Items answered at once: enough to fill a batch on small models, few enough that the
/// latency figures are not mostly queueing.
const CONCURRENCY: usize = 4;
/// Failed items shown in a report, so the admin sees what went wrong without a wall of text.
const SHOWN_FAILURES: usize = 5;

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalRunError {
    #[error("evaluation sets are for text-generation models")]
    NotGenerator,
    #[error("item {index}: its schema is not a valid JSON Schema: {reason}")]
    Schema { index: usize, reason: String },
    #[error("item {index} ({prompt:?}) could not be answered: {reason}")]
    Generation {
        index: usize,
        prompt: String,
        reason: String,
    },
}

/// What one version scored on an evaluation set.
#[derive(Debug, Clone)]
pub struct EvalScore {
    pub items: usize,
    pub correct: usize,
    /// (well-formed, out of) over the items with a pattern or schema.
    pub format: (usize, usize),
    pub output_tokens: usize,
    /// Seconds per item, sorted.
    pub latencies: Vec<f64>,
    /// (item index, prompt, answer) of the first failures.
    pub failures: Vec<(usize, String, String)>,
}

impl EvalScore {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.items.max(1) as f64
    }

    fn percentile(&self, p: f64) -> f64 {
        let last = self.latencies.len().saturating_sub(1);
        self.latencies
            .get(((last as f64) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    }

    /// The score as the admin protocol reports it.
    pub fn report(&self) -> moat_core::admin::EvalScore {
        let (well_formed, of) = self.format;
        let items = self.items.max(1) as f64;
        moat_core::admin::EvalScore {
            items: self.items,
            correct: self.correct,
            accuracy: self.accuracy(),
            format_validity: (of > 0).then(|| well_formed as f64 / of as f64),
            format_checked_items: of,
            mean_output_tokens: self.output_tokens as f64 / items,
            latency_ms: LatencyMs {
                mean: 1000.0 * self.latencies.iter().sum::<f64>() / items,
                p50: 1000.0 * self.percentile(0.5),
                p95: 1000.0 * self.percentile(0.95),
            },
            failures: self
                .failures
                .iter()
                .map(|(index, prompt, answer)| EvalFailure {
                    item: index + 1,
                    prompt: prompt.clone(),
                    answer: answer.clone(),
                })
                .collect(),
        }
    }
}

/// A scoring rule ready to apply: schemas compiled once.
enum Scorer<'a> {
    Text(&'a Scoring),
    Schema {
        validator: jsonschema::Validator,
        expect: Option<&'a Value>,
    },
}

impl Scorer<'_> {
    /// (correct, well-formed) for one answer.
    fn score(&self, answer: &str) -> (bool, bool) {
        let trimmed = answer.trim();
        match self {
            Scorer::Text(Scoring::Exact(text)) => (trimmed == text, true),
            Scorer::Text(Scoring::Contains(text)) => (trimmed.contains(text.as_str()), true),
            Scorer::Text(Scoring::Pattern(pattern)) => {
                let matched = pattern.is_match(trimmed);
                (matched, matched)
            }
            Scorer::Text(Scoring::Schema { .. }) => (false, false),
            Scorer::Schema { validator, expect } => {
                let Ok(value) = serde_json::from_str::<Value>(trimmed) else {
                    return (false, false);
                };
                let valid = validator.is_valid(&value);
                (valid && expect.is_none_or(|e| *e == value), valid)
            }
        }
    }
}

fn scorers(items: &[EvalItem]) -> Result<Vec<Scorer<'_>>, EvalRunError> {
    items
        .iter()
        .enumerate()
        .map(|(index, item)| match &item.scoring {
            Scoring::Schema { schema, expect } => jsonschema::validator_for(schema)
                .map(|validator| Scorer::Schema {
                    validator,
                    expect: expect.as_ref(),
                })
                .map_err(|e| EvalRunError::Schema {
                    index: index + 1,
                    reason: e.to_string(),
                }),
            other => Ok(Scorer::Text(other)),
        })
        .collect()
}

/// Answers and scores every item on `model`.
pub async fn run(
    items: &[EvalItem],
    manifest: &BundleManifest,
    model: &ServedModel,
) -> Result<EvalScore, EvalRunError> {
    let ServedModel::Generator(engine) = model else {
        return Err(EvalRunError::NotGenerator);
    };
    let scorers = scorers(items)?;
    let answers: Vec<_> = futures_util::stream::iter(items.iter().enumerate())
        .map(|(index, item)| {
            let engine = Arc::clone(engine);
            async move {
                let started = Instant::now();
                let answered =
                    golden::generate(&engine, manifest, &item.prompt, item.max_tokens).await;
                (index, answered, started.elapsed().as_secs_f64())
            }
        })
        .buffered(CONCURRENCY)
        .collect()
        .await;
    let mut score = EvalScore {
        items: items.len(),
        correct: 0,
        format: (0, 0),
        output_tokens: 0,
        latencies: Vec::with_capacity(items.len()),
        failures: Vec::new(),
    };
    for (index, answered, seconds) in answers {
        let (answer, tokens) = answered.map_err(|reason| EvalRunError::Generation {
            index: index + 1,
            prompt: items[index].prompt.clone(),
            reason,
        })?;
        let (correct, well_formed) = scorers[index].score(&answer);
        score.correct += usize::from(correct);
        if items[index].scoring.checks_format() {
            score.format.0 += usize::from(well_formed);
            score.format.1 += 1;
        }
        score.output_tokens += tokens;
        score.latencies.push(seconds);
        if !correct && score.failures.len() < SHOWN_FAILURES {
            score
                .failures
                .push((index, items[index].prompt.clone(), answer));
        }
    }
    score.latencies.sort_by(f64::total_cmp);
    Ok(score)
}

impl Models {
    /// A stored version's manifest and evaluation set (`None` when its bundle has none).
    fn eval_set(
        &self,
        name: &str,
        version: &semver::Version,
    ) -> Result<(BundleManifest, Option<Vec<EvalItem>>), RolloutError> {
        let store = &self.store;
        let (manifest, bytes) = store.read_listed(name, version, EVAL_FILE, MAX_EVAL_BYTES)?;
        let items = bytes
            .map(|bytes| parse(&bytes))
            .transpose()
            .map_err(|source| RolloutError::BadEvalSet {
                label: format!("{name}@{version}"),
                source,
            })?;
        Ok((manifest, items))
    }

    /// `moatctl model eval NAME@VERSION`: the version's evaluation set, answered by it.
    pub(super) async fn evaluate(&self, label: &str) -> Result<Evaluated, RolloutError> {
        let (name, version) = parse_label(label)?;
        if self.is_unsigned(&name) {
            return Err(RolloutError::Unsigned(name));
        }
        if !self
            .entry(&name)?
            .versions
            .contains_key(&version.to_string())
        {
            return Err(RolloutError::UnknownVersion {
                name,
                label: label.to_owned(),
            });
        }
        let (manifest, items) = self.eval_set(&name, &version)?;
        let items = items.ok_or_else(|| RolloutError::NoEvalSet(label.to_owned()))?;
        // Loaded already (active, canary, standby) or loaded now, through its golden prompts.
        let model = self.prepare(&name, &version.to_string()).await?;
        let score = run(&items, &manifest, &model.served)
            .await
            .map_err(|source| RolloutError::Eval {
                label: label.to_owned(),
                source,
            })?;
        Ok(Evaluated {
            model: label.to_owned(),
            evaluation: score.report(),
        })
    }

    /// Promotion's gate: with an evaluation set in the canary's bundle, the canary and the
    /// active version both answer it (each with its own bundle's terms); the canary may not
    /// score lower unless `force`. Returns the two scores (`None` without a set).
    pub(super) async fn eval_gate(
        &self,
        name: &str,
        canary_version: &str,
        canary: &LoadedModel,
        active: &LoadedModel,
        force: bool,
    ) -> Result<Option<PromotionEvaluation>, RolloutError> {
        let canary_label = format!("{name}@{canary_version}");
        let version = semver::Version::parse(canary_version)
            .map_err(|_| RolloutError::BadLabel(canary_label.clone()))?;
        let (canary_manifest, Some(items)) = self.eval_set(name, &version)? else {
            return Ok(None);
        };
        let active_label = active.label();
        let active_manifest = match &active.version {
            Some(v) => {
                self.store
                    .read_listed(name, v, EVAL_FILE, MAX_EVAL_BYTES)?
                    .0
            }
            None => return Err(RolloutError::Unsigned(name.to_owned())),
        };
        let scored = |label: &str, source| RolloutError::Eval {
            label: label.to_owned(),
            source,
        };
        let canary_score = run(&items, &canary_manifest, &canary.served)
            .await
            .map_err(|e| scored(&canary_label, e))?;
        let active_score = run(&items, &active_manifest, &active.served)
            .await
            .map_err(|e| scored(&active_label, e))?;
        if canary_score.accuracy() < active_score.accuracy() && !force {
            return Err(RolloutError::EvalRegression {
                canary: canary_label,
                active: active_label,
                canary_accuracy: canary_score.accuracy(),
                active_accuracy: active_score.accuracy(),
            });
        }
        Ok(Some(PromotionEvaluation {
            canary: canary_score.report(),
            active: active_score.report(),
            forced: force && canary_score.accuracy() < active_score.accuracy(),
            active_version: active_label,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::bundle::eval::parse;

    fn scored(line: &str, answer: &str) -> (bool, bool) {
        let items = parse(line.as_bytes()).expect("parses");
        let scorers = scorers(&items).expect("compiles");
        scorers[0].score(answer)
    }

    #[test]
    fn each_rule_scores_as_documented() {
        let exact = r#"{"prompt": "p", "expect": "Paris."}"#;
        assert_eq!(scored(exact, "  Paris.\n"), (true, true));
        assert_eq!(scored(exact, "Paris"), (false, true));
        let contains = r#"{"prompt": "p", "expect": "Paris", "rule": "contains"}"#;
        assert_eq!(scored(contains, "It is Paris."), (true, true));
        let pattern = r#"{"prompt": "p", "pattern": "[0-9]+ EUR"}"#;
        assert_eq!(scored(pattern, "12 EUR"), (true, true));
        assert_eq!(scored(pattern, "twelve EUR"), (false, false));
        let schema = r#"{"prompt": "p", "schema": {"type": "object", "required": ["total"]}, "expect_json": {"total": 12}}"#;
        assert_eq!(scored(schema, r#"{"total": 12}"#), (true, true));
        assert_eq!(scored(schema, r#"{"total": 13}"#), (false, true));
        assert_eq!(scored(schema, r#"{"sum": 12}"#), (false, false));
        assert_eq!(scored(schema, "total: 12"), (false, false));
    }

    #[test]
    fn an_invalid_schema_is_named_by_item() {
        let items = parse(b"{\"prompt\": \"p\", \"schema\": {\"type\": \"no-such-type\"}}")
            .expect("parses");
        assert!(matches!(
            scorers(&items),
            Err(EvalRunError::Schema { index: 1, .. })
        ));
    }
}
