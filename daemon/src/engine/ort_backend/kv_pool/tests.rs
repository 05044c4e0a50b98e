//! The pool from the attacker's side: a sequence that gets a slot another sequence used
//! finds nothing of it there, and a released slot keeps nothing of its sequence. Run on
//! the real backend with the fixture graphs (`bash scripts/setup.sh` provides them).

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{KvBuffers, KvPool};
use crate::engine::backend::{Backend, LogitsBatch, SequenceId, StepInput};
use crate::engine::ort_backend::OrtBackend;
use crate::engine::{DevicePreference, ModelDirectory, OrtRuntime, SessionOptions};

fn local(path: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../local")
        .join(path);
    assert!(
        path.exists(),
        "{} is missing: run `bash scripts/setup.sh` first",
        path.display()
    );
    path
}

fn backend(model: &str, max_batch: usize) -> OrtBackend {
    let library = crate::engine::runtime_library::locate(Some(&local("onnxruntime")), None)
        .expect("ONNX Runtime located");
    let runtime = OrtRuntime::load(library).expect("ONNX Runtime loads");
    let dir = ModelDirectory::open(&local(&format!("models/{model}"))).expect("fixture model");
    let options = SessionOptions {
        device: DevicePreference::Cpu,
        max_batch,
        ..SessionOptions::default()
    };
    OrtBackend::load(&runtime, &dir, &options).expect("loads")
}

/// One step: each `(sequence, tokens)` at once.
fn step(backend: &mut OrtBackend, inputs: &[(u64, &[u32])]) {
    let batch: Vec<StepInput<'_>> = inputs
        .iter()
        .map(|&(id, tokens)| StepInput {
            sequence: SequenceId(id),
            tokens,
        })
        .collect();
    backend
        .step(&batch, &mut LogitsBatch::default())
        .expect("step runs");
}

fn start(backend: &mut OrtBackend, id: u64) -> usize {
    backend.start_sequence(SequenceId(id), 64).expect("starts");
    backend.pooled_slot(SequenceId(id)).expect("pooled")
}

/// How many elements of `slot`'s `positions`, over every head of every buffer, are not
/// zero.
fn nonzero(pool: &KvPool, slot: usize, positions: Range<usize>) -> usize {
    let shape = [pool.kv_heads, pool.capacity, pool.head_dim];
    match &pool.buffers {
        KvBuffers::Float32(buffers) => count_nonzero(buffers, slot, &positions, shape),
        KvBuffers::Float16(buffers) => count_nonzero(buffers, slot, &positions, shape),
    }
}

fn count_nonzero<T: Copy + Default + PartialEq>(
    buffers: &[Vec<T>],
    slot: usize,
    positions: &Range<usize>,
    [kv_heads, capacity, head_dim]: [usize; 3],
) -> usize {
    let row_len = kv_heads * capacity * head_dim;
    buffers
        .iter()
        .flat_map(|buffer| buffer[slot * row_len..(slot + 1) * row_len].chunks(capacity * head_dim))
        .flat_map(|head| &head[positions.start * head_dim..positions.end * head_dim])
        .filter(|&&x| x != T::default())
        .count()
}

fn pool(backend: &OrtBackend) -> &KvPool {
    backend
        .pool
        .as_ref()
        .expect("a fused graph on the CPU has a pool")
}

const SECRET: [u32; 20] = [
    11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30,
];

fn a_reused_slot_holds_nothing_of_the_sequence_before_it(model: &str) {
    let mut backend = backend(model, 2);
    let slot = start(&mut backend, 1);
    step(&mut backend, &[(1, &SECRET)]);
    for token in [31, 32, 33] {
        step(&mut backend, &[(1, &[token])]);
    }
    let capacity = pool(&backend).capacity;
    // The secret sequence's keys and values are there while it runs.
    assert!(nonzero(pool(&backend), slot, 3..23) > 0);

    backend.finish_sequence(SequenceId(1));
    assert_eq!(
        nonzero(pool(&backend), slot, 0..capacity),
        0,
        "{model}: a released slot still holds its sequence's keys and values"
    );

    // The next sequence gets the same slot and finds only its own three positions.
    assert_eq!(start(&mut backend, 2), slot);
    step(&mut backend, &[(2, &[5, 6, 7])]);
    assert!(nonzero(pool(&backend), slot, 0..3) > 0);
    assert_eq!(
        nonzero(pool(&backend), slot, 3..capacity),
        0,
        "{model}: the rows beyond the new sequence's length hold the old sequence's"
    );
}

#[test]
fn a_reused_float32_slot_holds_nothing_of_the_sequence_before_it() {
    a_reused_slot_holds_nothing_of_the_sequence_before_it("fixture-fused");
}

#[test]
fn a_reused_float16_slot_holds_nothing_of_the_sequence_before_it() {
    a_reused_slot_holds_nothing_of_the_sequence_before_it("fixture-fused-float16");
}

#[test]
fn a_free_slot_a_batched_decode_ran_over_is_zero_when_it_is_taken() {
    let mut backend = backend("fixture-fused", 3);
    let slots: Vec<usize> = (0..3).map(|id| start(&mut backend, id)).collect();
    assert_eq!(slots, [0, 1, 2]);
    step(
        &mut backend,
        &[(0, &SECRET[..4]), (1, &SECRET[4..]), (2, &[7, 8])],
    );
    backend.finish_sequence(SequenceId(1));
    // Slot 1 is free between two decoding sequences: the batched run covers its row.
    step(&mut backend, &[(0, &[40]), (2, &[41])]);
    assert!(
        nonzero(pool(&backend), 1, 0..1) > 0,
        "the idle row was fed a placeholder"
    );
    assert_eq!(start(&mut backend, 3), 1);
    let capacity = pool(&backend).capacity;
    assert_eq!(nonzero(pool(&backend), 1, 0..capacity), 0);
}
