//! The prefix cache: a prompt that begins with blocks another request of the same scope
//! computed gets them copied, computes only the rest, and answers exactly as it does
//! without the cache; other scopes and other model versions never see them.

mod common;

use common::{cpu_options, load, model_dir, run, runtime};
use moat_daemon::engine::backend::{Backend, LogitsBatch, SequenceId, StepInput};
use moat_daemon::engine::prefix_cache::{BLOCK_TOKENS, PrefixSharing};
use moat_daemon::engine::sampler::argmax;
use moat_daemon::engine::{
    ChatMessage, Engine, EngineSettings, GenerationRequest, ModelDirectory, OrtBackend,
    PrefixFigures, Prompt, SessionOptions,
};

/// Prompt tokens fed per step, as the engine feeds a long prompt (smaller than its default,
/// so that the prompts here take several chunks, none of them a whole number of blocks).
const CHUNK: usize = 80;

fn backend(model: &str, cache_bytes: usize) -> OrtBackend {
    let dir = ModelDirectory::open(&model_dir(model)).expect("model");
    OrtBackend::load(
        &runtime(),
        &dir,
        &SessionOptions {
            max_batch: 4,
            prefix_cache_bytes: cache_bytes,
            ..cpu_options()
        },
    )
    .expect("loads")
}

/// Feeds `prompt` (in chunks of [`CHUNK`]) then `new_tokens` greedy tokens to a new sequence `id`,
/// sharing prefixes in `department`'s scope when given; returns the greedy tokens and the
/// logits after the prompt.
fn greedy(
    backend: &mut OrtBackend,
    id: u64,
    department: Option<&str>,
    prompt: &[u32],
    new_tokens: usize,
) -> (Vec<u32>, Vec<f32>) {
    let sequence = SequenceId(id);
    backend
        .start_sequence(sequence, prompt.len() + new_tokens + 1)
        .expect("starts");
    if let Some(department) = department {
        let scope = PrefixSharing::PerDepartment
            .scope(department)
            .expect("a scope");
        backend.share_prefixes(sequence, scope);
    }
    let mut logits = LogitsBatch::default();
    let mut feed = |backend: &mut OrtBackend, tokens: &[u32]| {
        backend
            .step(&[StepInput { sequence, tokens }], &mut logits)
            .expect("step runs");
        logits.row(0).to_vec()
    };
    let mut after_prompt = Vec::new();
    for chunk in prompt.chunks(CHUNK) {
        after_prompt = feed(backend, chunk);
    }
    let mut tokens = vec![argmax(&after_prompt)];
    while tokens.len() < new_tokens {
        let last = [tokens[tokens.len() - 1]];
        tokens.push(argmax(&feed(backend, &last)));
    }
    backend.finish_sequence(sequence);
    (tokens, after_prompt)
}

fn figures(backend: &OrtBackend) -> PrefixFigures {
    backend.prefix_stats().expect("a prefix cache").snapshot()
}

/// A prompt of `blocks` whole blocks from `seed`, then `tail`.
fn prompt(seed: u32, blocks: usize, tail: &[u32]) -> Vec<u32> {
    let mut tokens: Vec<u32> = (0..(blocks * BLOCK_TOKENS) as u32)
        .map(|t| 3 + (t * 7 + seed) % 200)
        .collect();
    tokens.extend_from_slice(tail);
    tokens
}

#[test]
fn a_shared_prefix_is_copied_and_answers_as_computed() {
    let mut cached = backend("fixture-fused", 64 << 20);
    let mut plain = backend("fixture-fused", 0);
    let first = prompt(1, 3, &[11, 12, 13, 14]);
    let second = prompt(1, 3, &[21, 22]);

    greedy(&mut cached, 1, Some("legal"), &first, 4);
    assert_eq!(figures(&cached).hits, 0);
    assert!(
        figures(&cached).bytes > 0,
        "the first prompt's blocks are kept"
    );
    let (tokens, logits) = greedy(&mut cached, 2, Some("legal"), &second, 8);
    assert_eq!(figures(&cached).hits, 3, "three blocks copied");

    let (expected_tokens, expected_logits) = greedy(&mut plain, 2, None, &second, 8);
    assert_eq!(
        tokens, expected_tokens,
        "greedy tokens with and without the cache"
    );
    let worst = logits
        .iter()
        .zip(&expected_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-4,
        "logits after a copied prefix differ by {worst}"
    );
}

#[test]
fn another_department_finds_nothing_and_the_last_position_is_always_computed() {
    let mut cached = backend("fixture-fused", 64 << 20);
    let shared = prompt(2, 2, &[]);
    greedy(&mut cached, 1, Some("legal"), &shared, 2);
    let before = figures(&cached);
    greedy(&mut cached, 2, Some("finance"), &shared, 2);
    let after = figures(&cached);
    assert_eq!(
        after.hits, before.hits,
        "another department's blocks are not found"
    );
    assert!(after.misses > before.misses);
    // The same department with the very same prompt: both blocks are found, but the last
    // position is computed, not copied, so that the step has its logits.
    let (tokens, _) = greedy(&mut cached, 3, Some("legal"), &shared, 4);
    assert_eq!(figures(&cached).hits, after.hits + 2, "both blocks found");
    let mut plain = backend("fixture-fused", 0);
    assert_eq!(tokens, greedy(&mut plain, 3, None, &shared, 4).0);
}

#[test]
fn the_cache_stays_within_its_size() {
    // Room for a few blocks only.
    let block = {
        let mut probe = backend("fixture-fused", 64 << 20);
        greedy(&mut probe, 1, Some("a"), &prompt(3, 1, &[1]), 1);
        figures(&probe).bytes as usize
    };
    let mut cached = backend("fixture-fused", 3 * block);
    for seed in 0..4 {
        greedy(
            &mut cached,
            seed.into(),
            Some("a"),
            &prompt(10 + seed, 2, &[1]),
            1,
        );
        assert!(figures(&cached).bytes as usize <= 3 * block);
    }
}

/// A department's system prompt, long enough for several blocks once rendered.
const SYSTEM: &str = "You are the assistant of the legal department. Answer in one sentence, \
    in plain English, without greetings. Never give advice on matters outside contract law; \
    say that you cannot help with them. Cite the clause you rely on by its number when the \
    question names a contract. Keep figures exactly as the question gives them. If the \
    question is ambiguous, say which reading you answer.";

fn ask(engine: &Engine, question: &str) -> Vec<u32> {
    let mut request = GenerationRequest::new(Prompt::Chat(vec![
        ChatMessage::new("system", SYSTEM),
        ChatMessage::new("user", question),
    ]));
    request.max_tokens = Some(24);
    request.department = "legal".into();
    run(engine, request).ids
}

#[test]
fn the_demo_model_answers_alike_with_and_without_the_cache() {
    let questions = [
        "May a party end the contract early?",
        "What is a force majeure clause?",
        "Who owns the work product?",
    ];
    let with = load("smollm2-135m-instruct-fast");
    let without = Engine::load_ort(
        &runtime(),
        &model_dir("smollm2-135m-instruct-fast"),
        &cpu_options(),
        EngineSettings {
            prefix_cache: PrefixSharing::Off,
            ..EngineSettings::default()
        },
    )
    .expect("loads");
    for question in questions {
        assert_eq!(ask(&with, question), ask(&without, question), "{question}");
    }
    let figures = with.prefix_cache();
    assert!(
        figures.hits >= 2 * 2,
        "the system prompt's blocks are copied for the later questions: {figures:?}"
    );
    assert_eq!(without.prefix_cache().hits, 0);
}

#[test]
fn a_long_prompt_fed_in_chunks_is_copied_across_them() {
    let mut cached = backend("fixture-fused", 64 << 20);
    let mut plain = backend("fixture-fused", 0);
    let first = prompt(4, 7, &[5, 6, 7]);
    let second = prompt(4, 7, &[8, 9]);
    greedy(&mut cached, 1, Some("legal"), &first, 2);
    let (tokens, _) = greedy(&mut cached, 2, Some("legal"), &second, 8);
    assert!(figures(&cached).hits >= 6, "{:?}", figures(&cached));
    assert_eq!(tokens, greedy(&mut plain, 2, None, &second, 8).0);
}
