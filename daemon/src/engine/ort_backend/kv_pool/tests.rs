//! The pool from the attacker's side: a sequence that gets a slot another sequence used
//! finds nothing of it there, and a released slot keeps nothing of its sequence. And the
//! device as a parameter: the provider-allocator placement (the path CUDA takes) gives
//! the same answers as host memory. Run on the real backend with the fixture graphs
//! (`bash scripts/setup.sh` provides them), in both placements.

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{KvBlock, KvPlacement, KvPool};
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

fn backend_in(model: &str, max_batch: usize, placement: KvPlacement) -> OrtBackend {
    backend_with(
        model,
        SessionOptions {
            max_batch,
            kv_placement: Some(placement),
            ..SessionOptions::default()
        },
    )
}

fn backend_with(model: &str, options: SessionOptions) -> OrtBackend {
    let library = crate::engine::runtime_library::locate(Some(&local("onnxruntime")), None)
        .expect("ONNX Runtime located");
    let runtime = OrtRuntime::load(library).expect("ONNX Runtime loads");
    let dir = ModelDirectory::open(&local(&format!("models/{model}"))).expect("fixture model");
    let options = SessionOptions {
        device: DevicePreference::Cpu,
        ..options
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
/// zero (read through the pool, wherever its memory is).
fn nonzero(pool: &mut KvPool, slot: usize, positions: Range<usize>) -> usize {
    match pool
        .read_block(slot, positions.start, positions.len())
        .expect("positions within the slot")
    {
        KvBlock::Float32(values) => values.iter().filter(|&&x| x != 0.0).count(),
        KvBlock::Float16(values) => values.iter().filter(|&&x| x != 0).count(),
    }
}

fn pool(backend: &mut OrtBackend) -> &mut KvPool {
    backend
        .pool
        .as_mut()
        .expect("a fused graph on the CPU has a pool")
}

const SECRET: [u32; 20] = [
    11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30,
];

fn a_reused_slot_holds_nothing_of_the_sequence_before_it(model: &str, placement: KvPlacement) {
    let mut backend = backend_in(model, 2, placement);
    let slot = start(&mut backend, 1);
    step(&mut backend, &[(1, &SECRET)]);
    for token in [31, 32, 33] {
        step(&mut backend, &[(1, &[token])]);
    }
    let capacity = pool(&mut backend).capacity;
    // The secret sequence's keys and values are there while it runs.
    assert!(nonzero(pool(&mut backend), slot, 3..23) > 0);

    backend.finish_sequence(SequenceId(1));
    assert_eq!(
        nonzero(pool(&mut backend), slot, 0..capacity),
        0,
        "{model}: a released slot still holds its sequence's keys and values"
    );

    // The next sequence gets the same slot and finds only its own three positions.
    assert_eq!(start(&mut backend, 2), slot);
    step(&mut backend, &[(2, &[5, 6, 7])]);
    assert!(nonzero(pool(&mut backend), slot, 0..3) > 0);
    assert_eq!(
        nonzero(pool(&mut backend), slot, 3..capacity),
        0,
        "{model}: the rows beyond the new sequence's length hold the old sequence's"
    );
}

#[test]
fn a_reused_float32_slot_holds_nothing_of_the_sequence_before_it() {
    for placement in [KvPlacement::Host, KvPlacement::ProviderAllocator] {
        a_reused_slot_holds_nothing_of_the_sequence_before_it("fixture-fused", placement);
    }
}

#[test]
fn a_reused_float16_slot_holds_nothing_of_the_sequence_before_it() {
    for placement in [KvPlacement::Host, KvPlacement::ProviderAllocator] {
        a_reused_slot_holds_nothing_of_the_sequence_before_it("fixture-fused-float16", placement);
    }
}

#[test]
fn a_free_slot_a_batched_decode_ran_over_is_zero_when_it_is_taken() {
    for placement in [KvPlacement::Host, KvPlacement::ProviderAllocator] {
        a_free_slot_a_batched_decode_ran_over_is_zero_when_it_is_taken_in(placement);
    }
}

fn a_free_slot_a_batched_decode_ran_over_is_zero_when_it_is_taken_in(placement: KvPlacement) {
    let mut backend = backend_in("fixture-fused", 3, placement);
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
        nonzero(pool(&mut backend), 1, 0..1) > 0,
        "the idle row was fed a placeholder"
    );
    assert_eq!(start(&mut backend, 3), 1);
    let capacity = pool(&mut backend).capacity;
    assert_eq!(nonzero(pool(&mut backend), 1, 0..capacity), 0);
}

/// Greedy tokens of `prompts`, fed together (first chunks in one run, decodes batched),
/// then `steps` decode steps each, in `placement`; and the logits of the last step.
fn greedy_together(
    model: &str,
    placement: KvPlacement,
    prompts: &[&[u32]],
    steps: usize,
) -> (Vec<Vec<u32>>, Vec<f32>) {
    let mut backend = backend_in(model, prompts.len(), placement);
    let ids: Vec<u64> = (0..prompts.len() as u64).collect();
    for &id in &ids {
        backend.start_sequence(SequenceId(id), 64).expect("starts");
    }
    let mut logits = LogitsBatch::default();
    let mut feed: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let mut out = vec![Vec::new(); prompts.len()];
    for _ in 0..=steps {
        let batch: Vec<StepInput<'_>> = ids
            .iter()
            .zip(&feed)
            .map(|(&id, tokens)| StepInput {
                sequence: SequenceId(id),
                tokens,
            })
            .collect();
        backend.step(&batch, &mut logits).expect("step runs");
        for (row, tokens) in feed.iter_mut().enumerate() {
            let next = argmax(logits.row(row));
            out[row].push(next);
            *tokens = vec![next];
        }
    }
    let last = (0..prompts.len())
        .flat_map(|row| logits.row(row).to_vec())
        .collect();
    (out, last)
}

fn argmax(row: &[f32]) -> u32 {
    let best = row
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    u32::try_from(best).expect("vocabulary index fits u32")
}

#[test]
fn the_provider_allocator_path_answers_as_host_memory_does() {
    let prompts: [&[u32]; 3] = [&SECRET[..5], &SECRET, &[7, 8, 9]];
    for model in ["fixture-fused", "fixture-fused-float16"] {
        let (host, host_logits) = greedy_together(model, KvPlacement::Host, &prompts, 8);
        let (provider, provider_logits) =
            greedy_together(model, KvPlacement::ProviderAllocator, &prompts, 8);
        assert_eq!(host, provider, "{model}: greedy tokens differ by placement");
        let widest = host_logits
            .iter()
            .zip(&provider_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(widest < 1e-4, "{model}: logits differ by {widest}");
    }
}

#[test]
fn a_block_copied_out_of_provider_memory_goes_back_where_it_was() {
    let mut backend = backend_in("fixture-fused", 2, KvPlacement::ProviderAllocator);
    let slot = start(&mut backend, 1);
    step(&mut backend, &[(1, &SECRET)]);
    let other = start(&mut backend, 2);
    let pool = backend.pool.as_mut().expect("pool");
    let block = pool.read_block(slot, 4, 8).expect("in range");
    assert!(nonzero(pool, slot, 4..12) > 0);
    // Positions 2..6 of the block, written to the same positions of the other slot.
    assert!(pool.write_block(other, 4, (8, 2..6), &block));
    assert_eq!(nonzero(pool, other, 4..6), 0, "before the part: untouched");
    assert_eq!(nonzero(pool, other, 10..12), 0, "after the part: untouched");
    let copied = pool.read_block(other, 6, 4).expect("in range");
    let original = pool.read_block(slot, 6, 4).expect("in range");
    match (copied, original) {
        (KvBlock::Float32(a), KvBlock::Float32(b)) => assert_eq!(a, b),
        _ => panic!("float32 blocks expected"),
    }
    // A block of another size is refused, and writes nothing.
    let short = pool.read_block(slot, 0, 4).expect("in range");
    assert!(!pool.write_block(other, 20, (8, 0..8), &short));
    assert_eq!(nonzero(pool, other, 20..28), 0);
}

/// Whether the memory mapping holding `address` is marked not to use transparent huge
/// pages (`nh` in its `VmFlags`).
fn no_huge_pages_at(address: usize) -> bool {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((start, end)) = range.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            inside = (start..end).contains(&address);
        } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
            return flags.split_whitespace().any(|flag| flag == "nh");
        }
    }
    false
}

/// On a host whose transparent huge pages are `always`, the first position written in each
/// head's run would make 2 MiB resident: the pool's host memory asks for small pages.
#[test]
fn the_host_pool_asks_for_small_pages() {
    // A kernel built without transparent huge pages has none to refuse (and no flag to
    // show); the pool must still load and run there, which the other tests show.
    if !Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
        // Under CI every check must run (tests/no_quiet_skips.py says the same for pytest).
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "this kernel has no transparent huge pages, and CI=true runs every check"
        );
        eprintln!("this kernel has no transparent huge pages: nothing to check");
        return;
    }
    for model in ["fixture-fused", "smollm2-135m-instruct-fast"] {
        let mut backend = backend_in(model, 2, KvPlacement::Host);
        let pool = pool(&mut backend);
        for pair in [0, pool.memory.pairs() - 1] {
            let at = pool.memory.address(pair, 0).expect("a buffer") as usize;
            assert!(
                no_huge_pages_at(at),
                "{model}: buffer {pair} may use huge pages"
            );
        }
    }
}

/// Greedy tokens of `SECRET` and `steps` decodes, for one sequence of `capacity` positions.
fn greedy_alone(backend: &mut OrtBackend, id: u64, capacity: usize, steps: usize) -> Vec<u32> {
    backend
        .start_sequence(SequenceId(id), capacity)
        .expect("starts");
    let mut logits = LogitsBatch::default();
    let mut feed = SECRET.to_vec();
    let mut out = Vec::new();
    for _ in 0..=steps {
        let input = [StepInput {
            sequence: SequenceId(id),
            tokens: &feed,
        }];
        backend.step(&input, &mut logits).expect("step runs");
        let next = argmax(logits.row(0));
        out.push(next);
        feed = vec![next];
    }
    backend.finish_sequence(SequenceId(id));
    out
}

/// `kv_slot_tokens` bounds the pool's slots: a sequence that needs more runs alone with a
/// cache of its own, and answers as it does from a slot of the whole context.
#[test]
fn a_sequence_longer_than_a_slot_runs_alone_and_answers_the_same() {
    let mut small = backend_with(
        "fixture-fused",
        SessionOptions {
            max_batch: 2,
            kv_slot_tokens: Some(24),
            ..SessionOptions::default()
        },
    );
    assert_eq!(pool(&mut small).capacity, 24);
    small
        .start_sequence(SequenceId(1), 24)
        .expect("fits a slot");
    assert!(small.pooled_slot(SequenceId(1)).is_some());
    small.start_sequence(SequenceId(2), 40).expect("starts");
    assert!(
        small.pooled_slot(SequenceId(2)).is_none(),
        "a sequence longer than a slot was given one"
    );
    small.finish_sequence(SequenceId(1));
    small.finish_sequence(SequenceId(2));

    let alone = greedy_alone(&mut small, 3, 40, 12);
    let mut whole = backend_in("fixture-fused", 2, KvPlacement::Host);
    let pooled = greedy_alone(&mut whole, 3, 40, 12);
    assert_eq!(alone, pooled);
}
