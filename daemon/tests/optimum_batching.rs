//! Sequences of an optimum-contract graph decode together in one run a step, and every one
//! of them gets exactly the tokens (and, to float rounding, the logits) it gets running
//! alone: whatever their prompt lengths, whoever joins or leaves the group mid-way, whoever
//! sits a step out, and however long the group runs with the holes that leaves.
//!
//! The reference runs each sequence alone on a backend that never groups (`max_batch` 1:
//! each sequence feeds its own cache back, one run a step).

mod common;

use common::{cpu_options, model_dir, runtime};
use moat_daemon::engine::backend::{Backend, LogitsBatch, SequenceId, StepInput};
use moat_daemon::engine::sampler::argmax;
use moat_daemon::engine::{ModelDirectory, OrtBackend, SessionOptions};

const FIXTURE: &str = "fixture-optimum";
const CAPACITY: usize = 256;

fn backend(max_batch: usize) -> OrtBackend {
    let dir = ModelDirectory::open(&model_dir(FIXTURE)).expect("fixture model");
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

/// Batched logits equal solo ones to float rounding (kernels sum in a different order for
/// one row than for several, and over masked columns); a row that read another row's cache
/// or a wrong position would be off by whole units, and the greedy token must not move.
fn assert_close(batched: &[f32], solo: &[f32], what: &str) {
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
    let scale = solo.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    assert!(
        worst <= 1e-4 * scale,
        "{what}: batched logits differ from solo by {worst} (scale {scale})"
    );
}

/// One sequence of a scripted run: it starts at step `start`, feeds its prompt, then its
/// greedy tokens, at every step `takes_part` allows, until it has `new_tokens`.
#[derive(Clone)]
struct Script {
    id: u64,
    prompt: Vec<u32>,
    start: usize,
    new_tokens: usize,
    takes_part: fn(usize) -> bool,
}

fn always(_: usize) -> bool {
    true
}

fn script(id: u64, prompt: &[u32], start: usize, new_tokens: usize) -> Script {
    Script {
        id,
        prompt: prompt.to_vec(),
        start,
        new_tokens,
        takes_part: always,
    }
}

/// What one sequence produced: its greedy tokens and the logits each was taken from.
#[derive(Debug, Default)]
struct Produced {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

/// Runs the scripts together on `backend`; returns what each produced, in script order.
fn run(backend: &mut OrtBackend, scripts: &[Script]) -> Vec<Produced> {
    let mut produced: Vec<Produced> = scripts.iter().map(|_| Produced::default()).collect();
    let mut started = vec![false; scripts.len()];
    let mut done = vec![false; scripts.len()];
    let mut at = 0;
    while done.iter().any(|d| !d) {
        for (i, s) in scripts.iter().enumerate() {
            if s.start == at {
                backend
                    .start_sequence(SequenceId(s.id), CAPACITY)
                    .expect("starts");
                started[i] = true;
            }
        }
        let mut feeding: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, s) in scripts.iter().enumerate() {
            if !started[i] || done[i] || !(s.takes_part)(at) {
                continue;
            }
            let next = match produced[i].tokens.last() {
                None => s.prompt.clone(),
                Some(&token) => vec![token],
            };
            feeding.push((i, next));
        }
        let inputs: Vec<(u64, &[u32])> = feeding
            .iter()
            .map(|(i, tokens)| (scripts[*i].id, tokens.as_slice()))
            .collect();
        if !inputs.is_empty() {
            let rows = step(backend, &inputs);
            for ((i, _), row) in feeding.iter().zip(rows) {
                produced[*i].tokens.push(argmax(&row) as u32);
                produced[*i].logits.push(row);
                if produced[*i].tokens.len() == scripts[*i].new_tokens {
                    backend.finish_sequence(SequenceId(scripts[*i].id));
                    done[*i] = true;
                }
            }
        }
        at += 1;
        assert!(at < 10_000, "the script never ends");
    }
    produced
}

/// Runs each script alone, one after another, on a backend that never groups.
fn solo(scripts: &[Script]) -> Vec<Produced> {
    let mut alone = backend(1);
    scripts
        .iter()
        .map(|s| {
            let s = Script {
                start: 0,
                takes_part: always,
                ..s.clone()
            };
            run(&mut alone, &[s]).remove(0)
        })
        .collect()
}

/// Runs the scripts together and alone and asserts that every sequence got the same.
fn together_as_alone(backend: &mut OrtBackend, scripts: &[Script]) {
    let together = run(backend, scripts);
    let alone = solo(scripts);
    for ((s, t), a) in scripts.iter().zip(&together).zip(&alone) {
        assert_eq!(t.tokens, a.tokens, "sequence {}: different tokens", s.id);
        for (n, (bt, at)) in t.logits.iter().zip(&a.logits).enumerate() {
            assert_close(bt, at, &format!("sequence {}, token {n}", s.id));
        }
    }
}

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (seed * 37 + i * 11) % 350)
        .collect()
}

#[test]
fn sequences_of_different_prompt_lengths_decode_together_as_alone() {
    let scripts: Vec<Script> = [1, 3, 7, 20, 45]
        .iter()
        .enumerate()
        .map(|(i, &len)| script(i as u64, &prompt(len, i as u32), 0, 24))
        .collect();
    together_as_alone(&mut backend(8), &scripts);
}

#[test]
fn one_run_decodes_every_sequence_of_a_step() {
    let mut grouped = backend(16);
    let mut alone = backend(1);
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(2 + i, i as u32)).collect();
    for b in [&mut grouped, &mut alone] {
        for id in 0..8u64 {
            b.start_sequence(SequenceId(id), CAPACITY).expect("starts");
        }
        let prefill: Vec<(u64, &[u32])> =
            (0..8).map(|i| (i as u64, prompts[i].as_slice())).collect();
        step(b, &prefill);
    }
    let tokens: Vec<u32> = (0..8).map(|i| 100 + i).collect();
    let decodes: Vec<(u64, &[u32])> = (0..8)
        .map(|i| (i as u64, std::slice::from_ref(&tokens[i])))
        .collect();
    for _ in 0..3 {
        let before = (grouped.session_runs(), alone.session_runs());
        let together = step(&mut grouped, &decodes);
        let apart = step(&mut alone, &decodes);
        assert_eq!(
            grouped.session_runs() - before.0,
            1,
            "one run for 8 decodes"
        );
        assert_eq!(
            alone.session_runs() - before.1,
            8,
            "the reference runs each"
        );
        for i in 0..8 {
            assert_close(&together[i], &apart[i], &format!("sequence {i}"));
        }
    }
    // A prompt in the same step runs alone; the decodes still share one run.
    grouped
        .start_sequence(SequenceId(8), CAPACITY)
        .expect("starts");
    let long_prompt = prompt(9, 8);
    let mut mixed = decodes.clone();
    mixed.push((8, &long_prompt));
    let before = grouped.session_runs();
    step(&mut grouped, &mixed);
    assert_eq!(
        grouped.session_runs() - before,
        2,
        "a prompt run and a decode run"
    );
}

#[test]
fn sequences_joining_and_leaving_mid_way_keep_exact_tokens() {
    let scripts = vec![
        script(1, &prompt(5, 1), 0, 12),
        // Joins while 1 decodes; its prompt shares a step with 1's decode.
        script(2, &prompt(13, 2), 3, 20),
        script(3, &prompt(2, 3), 5, 6),
        // Several join and leave in the same steps.
        script(4, &prompt(30, 4), 11, 15),
        script(5, &prompt(1, 5), 11, 9),
        script(6, &prompt(8, 6), 20, 10),
    ];
    together_as_alone(&mut backend(8), &scripts);
}

#[test]
fn a_finished_sequences_rows_never_reach_another() {
    let shared = prompt(6, 7);
    let scripts = vec![
        script(1, &prompt(17, 1), 0, 8),
        script(2, &shared, 0, 30),
        // Starts after 1 finished, with 2's prompt: must match a fresh run, not 1's rows
        // nor 2's.
        script(3, &shared, 10, 12),
        // Reuses the id of the finished sequence 1.
        script(1, &prompt(4, 9), 12, 10),
    ];
    let mut grouped = backend(8);
    let together = run(&mut grouped, &scripts);
    let alone = solo(&scripts);
    for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(t.tokens, a.tokens, "script {i}: different tokens");
        for (n, (bt, at)) in t.logits.iter().zip(&a.logits).enumerate() {
            assert_close(bt, at, &format!("script {i}, token {n}"));
        }
    }
    // 3 started from 2's prompt: its first tokens are 2's first tokens.
    assert_eq!(together[2].tokens[..12], alone[1].tokens[..12]);
}

#[test]
fn many_steps_with_holes_still_equal_solo_runs() {
    // Three members take turns, so every row gets holes and the columns outrun the longest
    // member until the group compacts; one sits out a long stretch.
    let mut scripts = vec![
        script(1, &prompt(3, 1), 0, 70),
        script(2, &prompt(11, 2), 0, 70),
        script(3, &prompt(6, 3), 0, 70),
        script(4, &prompt(9, 4), 2, 60),
    ];
    scripts[0].takes_part = |at| at % 3 == 0;
    scripts[1].takes_part = |at| at % 3 == 1 || at < 4;
    scripts[2].takes_part = |at| at % 3 == 2 || at > 150;
    scripts[3].takes_part = |at| !(20..90).contains(&at);
    together_as_alone(&mut backend(8), &scripts);

    // A long member sits out one step in four: its holes keep the columns ahead of it
    // until they reach the fixture's context of 256, where the group compacts.
    let mut scripts = vec![
        script(1, &prompt(130, 1), 0, 110),
        script(2, &prompt(5, 2), 0, 150),
    ];
    scripts[0].takes_part = |at| at % 4 != 3;
    together_as_alone(&mut backend(8), &scripts);
}

#[test]
fn a_member_fed_several_tokens_leaves_and_rejoins_unchanged() {
    let mut grouped = backend(4);
    let mut alone = backend(1);
    let (a, b) = (prompt(4, 1), prompt(7, 2));
    let steps: [&[(u64, &[u32])]; 5] = [
        &[(1, &a), (2, &b)],
        &[(1, &[50]), (2, &[60])],
        // 2 takes several tokens (a constraint forcing them, say): it runs alone.
        &[(1, &[51]), (2, &[61, 62, 63])],
        &[(1, &[52]), (2, &[64])],
        &[(2, &[65]), (1, &[53])],
    ];
    for id in [1, 2] {
        grouped
            .start_sequence(SequenceId(id), CAPACITY)
            .expect("starts");
    }
    let together: Vec<Vec<Vec<f32>>> = steps.iter().map(|s| step(&mut grouped, s)).collect();
    for id in [1u64, 2] {
        alone
            .start_sequence(SequenceId(id), CAPACITY)
            .expect("starts");
        for (t, s) in steps.iter().enumerate() {
            for (i, &(sid, tokens)) in s.iter().enumerate() {
                if sid == id {
                    let row = step(&mut alone, &[(id, tokens)]).remove(0);
                    assert_close(&together[t][i], &row, &format!("sequence {id}, step {t}"));
                }
            }
        }
    }
}

#[test]
fn more_decodes_than_max_batch_run_beside_the_group() {
    let scripts: Vec<Script> = (0..5)
        .map(|i| script(i, &prompt(3 + i as usize, i as u32), 0, 10))
        .collect();
    let mut grouped = backend(3);
    together_as_alone(&mut grouped, &scripts);
}
