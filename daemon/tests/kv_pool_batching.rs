//! Batched decoding over the KV pool gives every sequence exactly the logits it gets when
//! it runs alone with a cache of its own, whatever else shares the run: sequences of
//! different lengths, idle rows between them, a slot reused after its sequence finished,
//! and prompt chunks in the same step.

mod common;

use common::{cpu_options, model_dir, runtime};
use moat_daemon::engine::backend::{Backend, LogitsBatch, SequenceId, StepInput};
use moat_daemon::engine::sampler::argmax;
use moat_daemon::engine::{KvPlacement, ModelDirectory, OrtBackend, SessionOptions};

const FIXTURE: &str = "fixture-fused";

fn backend(max_batch: usize) -> OrtBackend {
    backend_of(FIXTURE, max_batch)
}

fn backend_of(model: &str, max_batch: usize) -> OrtBackend {
    let dir = ModelDirectory::open(&model_dir(model)).expect("fixture model");
    OrtBackend::load(
        &runtime(),
        &dir,
        &SessionOptions {
            max_batch,
            ..cpu_options()
        },
    )
    .expect("loads")
}

/// Runs one step and returns each input's logits row.
fn step(backend: &mut OrtBackend, inputs: &[(u64, &[u32])]) -> Vec<Vec<f32>> {
    let batch: Vec<StepInput<'_>> = inputs
        .iter()
        .map(|&(id, tokens)| StepInput {
            sequence: SequenceId(id),
            tokens,
        })
        .collect();
    let mut logits = LogitsBatch::default();
    backend.step(&batch, &mut logits).expect("step runs");
    (0..logits.rows()).map(|i| logits.row(i).to_vec()).collect()
}

fn assert_close(batched: &[f32], solo: &[f32], what: &str) {
    assert_close_to(batched, solo, 1e-4, what);
}

/// `tolerance` is relative to the logits' scale: float32 rounding leaves about 1e-5 of it
/// between one row and several, float16 about 2e-3 after a few steps.
fn assert_close_to(batched: &[f32], solo: &[f32], tolerance: f32, what: &str) {
    assert_eq!(batched.len(), solo.len());
    assert_eq!(
        argmax(batched),
        argmax(solo),
        "{what}: a different greedy token"
    );
    let worst = batched
        .iter()
        .zip(solo)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // Kernels sum in a different order for one row than for several, so the logits agree
    // to float rounding, not bit for bit; a row that read another row's cache or a wrong
    // position would be off by whole units.
    let scale = solo.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    assert!(
        worst <= tolerance * scale,
        "{what}: batched logits differ from solo by {worst} (scale {scale})"
    );
}

/// The solo reference: a backend without a pool, one sequence at a time.
struct Solo {
    backend: OrtBackend,
}

impl Solo {
    fn new() -> Self {
        Self::of(FIXTURE)
    }

    fn of(model: &str) -> Self {
        Self {
            backend: backend_of(model, 0),
        }
    }

    /// Logits after feeding `steps` in order to a fresh sequence.
    fn logits(&mut self, id: u64, steps: &[&[u32]]) -> Vec<Vec<f32>> {
        let sequence = SequenceId(id);
        self.backend.start_sequence(sequence, 64).expect("starts");
        let rows = steps
            .iter()
            .map(|&tokens| step(&mut self.backend, &[(id, tokens)]).remove(0))
            .collect();
        self.backend.finish_sequence(sequence);
        rows
    }
}

#[test]
fn sequences_of_different_lengths_decode_together_as_they_do_alone() {
    different_lengths_together_and_alone(FIXTURE, 1e-4);
}

#[test]
fn float16_caches_decode_together_as_they_do_alone() {
    different_lengths_together_and_alone("fixture-fused-float16", 1e-2);
}

fn different_lengths_together_and_alone(model: &str, tolerance: f32) {
    let prompts: [&[u32]; 3] = [&[5, 6, 7], &[9, 3, 4, 8, 1, 2, 11], &[40; 12]];
    // One token per sequence per step.
    let decodes: [[u32; 3]; 4] = [[12, 21, 31], [13, 22, 32], [14, 23, 33], [15, 24, 34]];
    let mut pooled = backend_of(model, 4);
    for id in 0..3 {
        pooled.start_sequence(SequenceId(id), 64).expect("starts");
    }
    let prefill: Vec<(u64, &[u32])> = (0..3).map(|i| (i as u64, prompts[i])).collect();
    let mut batched = vec![step(&mut pooled, &prefill)];
    for tokens in &decodes {
        let inputs: Vec<(u64, &[u32])> = tokens
            .iter()
            .enumerate()
            .map(|(i, token)| (i as u64, std::slice::from_ref(token)))
            .collect();
        batched.push(step(&mut pooled, &inputs));
    }

    let mut solo = Solo::of(model);
    for i in 0..3 {
        let mut steps: Vec<&[u32]> = vec![prompts[i]];
        steps.extend(
            decodes
                .iter()
                .map(|tokens| std::slice::from_ref(&tokens[i])),
        );
        let alone = solo.logits(100 + i as u64, &steps);
        for (t, row) in alone.iter().enumerate() {
            let what = format!("{model}, sequence {i}, step {t}");
            assert_close_to(&batched[t][i], row, tolerance, &what);
        }
    }
}

#[test]
fn idle_rows_reused_slots_and_prompt_chunks_leave_every_sequence_unchanged() {
    let mut pooled = backend(4);
    let mut solo = Solo::new();
    let (a, b, c, d) = (1u64, 2u64, 3u64, 4u64);
    for id in [a, b, c] {
        pooled.start_sequence(SequenceId(id), 64).expect("starts");
    }
    // Slots 0, 1, 2 hold a, b, c.
    step(&mut pooled, &[(a, &[5, 6]), (b, &[7, 8, 9]), (c, &[10])]);
    // b sits out: its row is idle between a and c.
    let ac = step(&mut pooled, &[(a, &[11]), (c, &[12])]);
    let b1 = step(&mut pooled, &[(b, &[13])]);
    // b finishes; d takes its slot and starts its prompt in the same step as a and c
    // decode, so row 1 is a prompt in flight while rows 0 and 2 decode.
    pooled.finish_sequence(SequenceId(b));
    pooled.start_sequence(SequenceId(d), 64).expect("starts");
    let mixed = step(
        &mut pooled,
        &[(a, &[14]), (d, &[15, 16, 17, 18]), (c, &[19])],
    );
    let d1 = step(&mut pooled, &[(c, &[20]), (d, &[21])]);

    let a_solo = solo.logits(10, &[&[5, 6], &[11], &[14]]);
    let b_solo = solo.logits(11, &[&[7, 8, 9], &[13]]);
    let c_solo = solo.logits(12, &[&[10], &[12], &[19], &[20]]);
    let d_solo = solo.logits(13, &[&[15, 16, 17, 18], &[21]]);
    assert_close(&ac[0], &a_solo[1], "a beside an idle row");
    assert_close(&ac[1], &c_solo[1], "c beside an idle row");
    assert_close(&b1[0], &b_solo[1], "b after sitting out");
    assert_close(&mixed[0], &a_solo[2], "a beside a prompt chunk");
    assert_close(&mixed[1], &d_solo[0], "d's prompt in a reused slot");
    assert_close(&mixed[2], &c_solo[2], "c beside a prompt chunk");
    assert_close(&d1[0], &c_solo[3], "c after the chunk");
    assert_close(&d1[1], &d_solo[1], "d decoding in a reused slot");
}

#[test]
fn more_sequences_than_slots_fall_back_to_caches_of_their_own() {
    let mut pooled = backend(2);
    let mut solo = Solo::new();
    for id in 0..4u64 {
        pooled.start_sequence(SequenceId(id), 64).expect("starts");
    }
    let prompts: [&[u32]; 4] = [&[1, 2], &[3, 4, 5], &[6], &[7, 8, 9, 10]];
    let prefill: Vec<(u64, &[u32])> = (0..4).map(|i| (i as u64, prompts[i])).collect();
    step(&mut pooled, &prefill);
    let next: [u32; 4] = [11, 12, 13, 14];
    let inputs: Vec<(u64, &[u32])> = (0..4)
        .map(|i| (i as u64, std::slice::from_ref(&next[i])))
        .collect();
    let decoded = step(&mut pooled, &inputs);
    for i in 0..4 {
        let alone = solo.logits(50 + i as u64, &[prompts[i], &[next[i]]]);
        assert_close(&decoded[i], &alone[1], &format!("sequence {i}"));
    }
}

#[test]
fn a_sequence_twice_in_one_step_is_refused() {
    let mut pooled = backend(2);
    pooled.start_sequence(SequenceId(1), 16).expect("starts");
    step(&mut pooled, &[(1, &[1, 2])]);
    let batch = [
        StepInput {
            sequence: SequenceId(1),
            tokens: &[3],
        },
        StepInput {
            sequence: SequenceId(1),
            tokens: &[4],
        },
    ];
    let error = pooled
        .step(&batch, &mut LogitsBatch::default())
        .expect_err("refused");
    assert!(error.to_string().contains("twice"), "{error}");
}

#[test]
fn new_prompts_share_one_run_and_a_cached_row_splits_them() {
    let mut pooled = backend(4);
    let mut solo = Solo::new();
    let (a, b, c, d, e) = (1u64, 2u64, 3u64, 4u64, 5u64);
    for id in [a, b, c] {
        pooled.start_sequence(SequenceId(id), 64).expect("starts");
    }
    let prompts: [&[u32]; 5] = [
        &[5, 6],
        &[7, 8, 9, 10, 11],
        &[12, 13, 14],
        &[15; 6],
        &[16, 17],
    ];
    // Slots 0, 1, 2: three new prompts, one run.
    let runs = pooled.session_runs();
    let first = step(
        &mut pooled,
        &[(a, prompts[0]), (b, prompts[1]), (c, prompts[2])],
    );
    assert_eq!(
        pooled.session_runs() - runs,
        1,
        "three new prompts, one run"
    );
    // b finishes; d takes slot 1 and e slot 3, with c (cached) between them: two runs.
    pooled.finish_sequence(SequenceId(b));
    for id in [d, e] {
        pooled.start_sequence(SequenceId(id), 64).expect("starts");
    }
    let runs = pooled.session_runs();
    let second = step(&mut pooled, &[(d, prompts[3]), (e, prompts[4])]);
    assert_eq!(pooled.session_runs() - runs, 2, "a cached row between them");
    let decoded = step(
        &mut pooled,
        &[(a, &[20]), (c, &[21]), (d, &[22]), (e, &[23])],
    );

    let a_solo = solo.logits(10, &[prompts[0], &[20]]);
    let b_solo = solo.logits(11, &[prompts[1]]);
    let c_solo = solo.logits(12, &[prompts[2], &[21]]);
    let d_solo = solo.logits(13, &[prompts[3], &[22]]);
    let e_solo = solo.logits(14, &[prompts[4], &[23]]);
    assert_close(&first[0], &a_solo[0], "a's prompt beside longer ones");
    assert_close(&first[1], &b_solo[0], "b's prompt, the longest");
    assert_close(&first[2], &c_solo[0], "c's prompt");
    assert_close(&second[0], &d_solo[0], "d's prompt in a reused slot");
    assert_close(&second[1], &e_solo[0], "e's prompt beyond a cached row");
    for (row, alone, what) in [
        (0, &a_solo[1], "a"),
        (1, &c_solo[1], "c"),
        (2, &d_solo[1], "d"),
        (3, &e_solo[1], "e"),
    ] {
        assert_close(
            &decoded[row],
            alone,
            &format!("{what} decoding after its prompt"),
        );
    }
}

/// Greedy tokens of each prompt, `new_tokens` each, stepping all of them together on
/// `backend` (each step feeds every sequence its next input).
fn greedy_together(
    backend: &mut OrtBackend,
    prompts: &[Vec<u32>],
    new_tokens: usize,
) -> Vec<Vec<u32>> {
    for (id, prompt) in prompts.iter().enumerate() {
        backend
            .start_sequence(SequenceId(id as u64), prompt.len() + new_tokens)
            .expect("starts");
    }
    let mut next: Vec<Vec<u32>> = prompts.to_vec();
    let mut out = vec![Vec::new(); prompts.len()];
    for _ in 0..new_tokens {
        let inputs: Vec<(u64, &[u32])> = next
            .iter()
            .enumerate()
            .map(|(id, tokens)| (id as u64, tokens.as_slice()))
            .collect();
        let rows = step(backend, &inputs);
        for (id, row) in rows.iter().enumerate() {
            let token = argmax(row);
            out[id].push(token);
            next[id] = vec![token];
        }
    }
    for id in 0..prompts.len() {
        backend.finish_sequence(SequenceId(id as u64));
    }
    out
}

#[test]
fn sixteen_new_requests_on_the_demo_model_answer_as_they_do_alone() {
    // Sixteen prompts of different lengths (5 to 50 tokens) that arrive together.
    let prompts: Vec<Vec<u32>> = (0..16u32)
        .map(|i| {
            (0..5 + 3 * i)
                .map(|t| 200 + (t * 37 + i * 11) % 3000)
                .collect()
        })
        .collect();
    for model in ["smollm2-135m-instruct-fast", "smollm2-135m-instruct-exact"] {
        let mut pooled = backend_of(model, 16);
        let runs = pooled.session_runs();
        let together = greedy_together(&mut pooled, &prompts, 12);
        // 12 steps: the prompts in a few padded runs, then one run a decode step.
        let prompt_runs = pooled.session_runs() - runs - 11;
        assert!(
            prompt_runs < 8,
            "{model}: 16 prompts took {prompt_runs} runs"
        );
        let mut alone = backend_of(model, 0);
        for (i, prompt) in prompts.iter().enumerate() {
            let own = greedy_together(&mut alone, std::slice::from_ref(prompt), 12);
            assert_eq!(
                together[i],
                own[0],
                "{model}: prompt {i} of {} tokens",
                prompt.len()
            );
        }
    }
}

/// The device is a parameter of the pool: with its memory from the execution provider's
/// allocator (the placement CUDA uses, here the CPU provider's), reached only through
/// ONNX Runtime's copies, sixteen requests batched on the demo model answer as they do in
/// host memory.
#[test]
fn sixteen_requests_answer_the_same_from_the_providers_memory() {
    let prompts: Vec<Vec<u32>> = (0..16u32)
        .map(|i| {
            (0..4 + 2 * i)
                .map(|t| 300 + (t * 53 + i * 7) % 2500)
                .collect()
        })
        .collect();
    let model = "smollm2-135m-instruct-fast";
    let dir = ModelDirectory::open(&model_dir(model)).expect("demo model");
    let mut answers = Vec::new();
    for placement in [KvPlacement::Host, KvPlacement::ProviderAllocator] {
        let options = SessionOptions {
            max_batch: 16,
            kv_placement: Some(placement),
            // Provider memory is committed whole: slots of the positions these requests need.
            kv_slot_tokens: Some(64),
            ..cpu_options()
        };
        let mut backend = OrtBackend::load(&runtime(), &dir, &options).expect("loads");
        let runs = backend.session_runs();
        answers.push(greedy_together(&mut backend, &prompts, 10));
        // Batched as ever: a few prompt runs, then one run a decode step.
        assert!(
            backend.session_runs() - runs < 9 + 8,
            "{placement:?}: not batched"
        );
    }
    assert_eq!(answers[0], answers[1]);
}
