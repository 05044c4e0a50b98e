//! Scheduling edge cases of the engine thread, with a scripted backend standing in for the
//! model (inference itself is proven on the real ONNX Runtime in the other engine tests).

mod common;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use moat_daemon::engine::backend::{LogitsBatch, StepInput};
use moat_daemon::engine::{
    Backend, BackendError, BackendModel, DeviceKind, Engine, EngineError, EngineSettings,
    GenerationEvent, GenerationRequest, GenerationStream, ModelDirectory, Prompt, SequenceId,
};

const NORMAL: u8 = 0;
const FAIL: u8 = 1;
const PANIC: u8 = 2;
const WAIT: u8 = 3;

/// Always predicts the same token; what each step does is set by the test.
struct ScriptedBackend {
    model: BackendModel,
    mode: Arc<AtomicU8>,
    gate: Arc<Mutex<mpsc::Receiver<()>>>,
    /// Per step, the number of tokens of each input.
    batches: Arc<Mutex<Vec<Vec<usize>>>>,
    /// Every sequence stepped, in order.
    stepped: Arc<Mutex<Vec<SequenceId>>>,
}

impl Backend for ScriptedBackend {
    fn model(&self) -> &BackendModel {
        &self.model
    }

    fn start_sequence(&mut self, _: SequenceId, _: usize) -> Result<(), BackendError> {
        Ok(())
    }

    fn step(
        &mut self,
        batch: &[StepInput<'_>],
        logits: &mut LogitsBatch,
    ) -> Result<(), BackendError> {
        self.batches
            .lock()
            .expect("lock")
            .push(batch.iter().map(|i| i.tokens.len()).collect());
        self.stepped
            .lock()
            .expect("lock")
            .extend(batch.iter().map(|i| i.sequence));
        match self.mode.load(Ordering::SeqCst) {
            FAIL => {
                return Err(BackendError::Runtime {
                    during: "a scripted step",
                    message: "scripted failure".into(),
                });
            }
            PANIC => panic!("scripted panic"),
            WAIT => {
                let _ = self.gate.lock().expect("lock").recv();
            }
            _ => {}
        }
        logits.reset(batch.len(), self.model.vocab_size);
        for i in 0..batch.len() {
            let row = logits.row_mut(i);
            row.fill(0.0);
            row[70] = 1.0;
        }
        Ok(())
    }

    fn finish_sequence(&mut self, _: SequenceId) {}
}

struct Harness {
    engine: Engine,
    mode: Arc<AtomicU8>,
    open_gate: mpsc::Sender<()>,
    batches: Arc<Mutex<Vec<Vec<usize>>>>,
    stepped: Arc<Mutex<Vec<SequenceId>>>,
}

fn fixture() -> ModelDirectory {
    ModelDirectory::open(&common::model_dir("fixture-fused")).expect("fixture")
}

/// A scripted backend for the fixture's shape, with the handles that drive it.
fn scripted(model: &ModelDirectory) -> (ScriptedBackend, Arc<AtomicU8>, mpsc::Sender<()>) {
    let mode = Arc::new(AtomicU8::new(NORMAL));
    let (open_gate, gate) = mpsc::channel();
    let backend = ScriptedBackend {
        model: BackendModel {
            vocab_size: model.metadata.vocab_size,
            context_length: model.metadata.context_length,
            device: DeviceKind::Cpu,
        },
        mode: Arc::clone(&mode),
        gate: Arc::new(Mutex::new(gate)),
        batches: Arc::new(Mutex::new(Vec::new())),
        stepped: Arc::new(Mutex::new(Vec::new())),
    };
    (backend, mode, open_gate)
}

fn start(settings: EngineSettings) -> Harness {
    let model = fixture();
    let (backend, mode, open_gate) = scripted(&model);
    let (batches, stepped) = (Arc::clone(&backend.batches), Arc::clone(&backend.stepped));
    let engine = Engine::start(Box::new(backend), &model, settings).expect("starts");
    Harness {
        engine,
        mode,
        open_gate,
        batches,
        stepped,
    }
}

fn request(max_tokens: usize) -> GenerationRequest {
    let mut request = GenerationRequest::new(Prompt::Text("Hello".into()));
    request.max_tokens = Some(max_tokens);
    request.ignore_eos = true;
    request
}

/// Waits for a state the engine thread reaches on its own, with a generous deadline so a
/// regression fails instead of hanging.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::yield_now();
    }
}

fn last_event(stream: &mut moat_daemon::engine::GenerationStream) -> GenerationEvent {
    let mut last = None;
    while let Some(event) = stream.next_blocking() {
        last = Some(event);
    }
    last.expect("at least one event")
}

#[test]
fn a_full_queue_is_refused_as_overloaded() {
    let h = start(EngineSettings {
        queue_capacity: 1,
        max_batch: 1,
        ..EngineSettings::default()
    });
    h.mode.store(WAIT, Ordering::SeqCst);
    let mut running = h.engine.generate(request(2)).expect("accepted");
    // Wait until the engine thread holds the first request inside a step.
    wait_until("the first request to be admitted", || {
        h.engine.live_sequences() == 1
    });
    let mut queued = h.engine.generate(request(2)).expect("queued");
    assert_eq!(
        h.engine.generate(request(2)).map(|_| ()),
        Err(EngineError::Overloaded)
    );
    h.mode.store(NORMAL, Ordering::SeqCst);
    h.open_gate.send(()).expect("gate");
    assert!(matches!(
        last_event(&mut running),
        GenerationEvent::Finished { .. }
    ));
    assert!(matches!(
        last_event(&mut queued),
        GenerationEvent::Finished { .. }
    ));
}

#[test]
fn batches_never_exceed_max_batch() {
    let h = start(EngineSettings {
        max_batch: 2,
        ..EngineSettings::default()
    });
    // Steps wait for the gate, so all five requests are queued before the second step.
    h.mode.store(WAIT, Ordering::SeqCst);
    let mut streams: Vec<_> = (0..5)
        .map(|_| h.engine.generate(request(6)).expect("accepted"))
        .collect();
    for _ in 0..100 {
        h.open_gate.send(()).expect("gate");
    }
    for stream in &mut streams {
        assert!(matches!(
            last_event(stream),
            GenerationEvent::Finished { .. }
        ));
    }
    let batches = h.batches.lock().expect("lock");
    assert!(batches.iter().all(|b| b.len() <= 2), "{batches:?}");
    assert!(
        batches.iter().any(|b| b.len() == 2),
        "sequences were never stepped together: {batches:?}"
    );
}

#[test]
fn a_failed_step_fails_its_generations_and_health_recovers() {
    let h = start(EngineSettings::default());
    h.mode.store(FAIL, Ordering::SeqCst);
    let mut failing = h.engine.generate(request(4)).expect("accepted");
    match last_event(&mut failing) {
        GenerationEvent::Failed(EngineError::Inference(message)) => {
            assert!(message.contains("scripted failure"), "{message}")
        }
        other => panic!("expected an inference failure, got {other:?}"),
    }
    assert!(!h.engine.is_healthy());
    h.mode.store(NORMAL, Ordering::SeqCst);
    let mut ok = h.engine.generate(request(3)).expect("accepted");
    assert!(matches!(
        last_event(&mut ok),
        GenerationEvent::Finished { .. }
    ));
    assert!(h.engine.is_healthy());
}

#[test]
fn a_panicking_backend_fails_generations_instead_of_hanging_them() {
    let h = start(EngineSettings::default());
    h.mode.store(PANIC, Ordering::SeqCst);
    let mut stream = h.engine.generate(request(4)).expect("accepted");
    assert!(matches!(
        last_event(&mut stream),
        GenerationEvent::Failed(EngineError::Inference(_))
    ));
    assert!(!h.engine.is_healthy());
    // The thread is gone; new work is refused rather than queued forever.
    wait_until("the engine to refuse work", || {
        matches!(
            h.engine.generate(request(1)).map(|_| ()),
            Err(EngineError::ShutDown)
        )
    });
}

#[test]
fn a_panicking_worker_leaves_the_queue_to_its_siblings() {
    let model = fixture();
    let (doomed, doomed_mode, doomed_gate) = scripted(&model);
    let (healthy, healthy_mode, healthy_gate) = scripted(&model);
    let engine = Engine::start_workers(
        vec![Box::new(doomed), Box::new(healthy)],
        &model,
        EngineSettings {
            max_batch: 1,
            ..EngineSettings::default()
        },
    )
    .expect("starts");
    // Both workers hold one request each, stopped mid-step; the rest wait in the queue.
    doomed_mode.store(WAIT, Ordering::SeqCst);
    healthy_mode.store(WAIT, Ordering::SeqCst);
    let mut streams: Vec<_> = (0..12)
        .map(|_| engine.generate(request(3)).expect("accepted"))
        .collect();
    wait_until("both workers to hold a request", || {
        engine.live_sequences() == 2
    });
    // One worker panics at its next step, while ten requests wait.
    doomed_mode.store(PANIC, Ordering::SeqCst);
    doomed_gate.send(()).expect("gate");
    wait_until("the doomed worker to fail", || engine.live_sequences() == 1);
    healthy_mode.store(NORMAL, Ordering::SeqCst);
    healthy_gate.send(()).expect("gate");
    let (mut finished, mut failed) = (0, 0);
    for stream in &mut streams {
        match last_event(stream) {
            GenerationEvent::Finished { .. } => finished += 1,
            GenerationEvent::Failed(EngineError::Inference(_)) => failed += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // Only what the doomed worker held fails; the healthy one serves everything queued.
    assert_eq!((finished, failed), (11, 1));
    assert!(engine.is_healthy());
}

#[test]
fn a_long_prompt_is_fed_in_chunks_between_other_decodes() {
    let h = start(EngineSettings {
        prefill_chunk_tokens: 3,
        ..EngineSettings::default()
    });
    // Steps wait for the gate, so both requests are queued before the short one can run
    // far ahead; the gate then lets every step through.
    h.mode.store(WAIT, Ordering::SeqCst);
    let mut short = h.engine.generate(request(40)).expect("accepted");
    let long_prompt: Vec<u32> = (10..40).collect();
    let mut long = GenerationRequest::new(Prompt::TokenIds(long_prompt));
    long.max_tokens = Some(2);
    let mut long = h.engine.generate(long).expect("accepted");
    for _ in 0..200 {
        h.open_gate.send(()).expect("gate");
    }
    assert!(matches!(
        last_event(&mut long),
        GenerationEvent::Finished { usage, .. } if usage.prompt_tokens == 30
    ));
    assert!(matches!(
        last_event(&mut short),
        GenerationEvent::Finished { .. }
    ));
    let batches = h.batches.lock().expect("lock");
    assert!(batches.iter().flatten().all(|&n| n <= 3), "{batches:?}");
    // The long prompt took 10 steps, each shared with a decode step of the short one.
    let shared_steps = batches
        .iter()
        .filter(|b| b.len() == 2 && b.contains(&3) && b.contains(&1))
        .count();
    assert!(shared_steps >= 9, "{batches:?}");
}

fn from(department: &str, max_tokens: usize) -> GenerationRequest {
    let mut request = request(max_tokens);
    request.department = department.to_owned();
    request
}

/// An engine of one slot whose steps wait for the gate, with one of department a's
/// requests already holding that slot.
fn one_slot_held(queue_capacity: usize) -> (Harness, GenerationStream) {
    let h = start(EngineSettings {
        max_batch: 1,
        queue_capacity,
        ..EngineSettings::default()
    });
    h.mode.store(WAIT, Ordering::SeqCst);
    let running = h.engine.generate(from("a", 1)).expect("accepted");
    wait_until("the first request to run", || {
        h.engine.live_sequences() == 1
    });
    (h, running)
}

#[test]
fn a_department_flooding_the_queue_does_not_starve_another() {
    // One of a's requests holds the only slot while the rest line up behind it.
    let (h, running) = one_slot_held(32);
    let mut streams = vec![running];
    for _ in 0..10 {
        streams.push(h.engine.generate(from("a", 1)).expect("accepted"));
    }
    // Sequence ids follow submission: a's are 0 to 10, b's is 11.
    streams.push(h.engine.generate(from("b", 1)).expect("accepted"));
    h.mode.store(NORMAL, Ordering::SeqCst);
    h.open_gate.send(()).expect("gate");
    for mut stream in streams {
        let event = last_event(&mut stream);
        assert!(
            matches!(event, GenerationEvent::Finished { .. }),
            "{event:?}"
        );
    }
    let order: Vec<String> = h
        .stepped
        .lock()
        .expect("lock")
        .iter()
        .filter(|id| id.0 != u64::MAX) // the warm-up step at start
        .map(|id| format!("{id:?}"))
        .collect();
    let b = order
        .iter()
        .position(|id| id == "SequenceId(11)")
        .expect("b stepped");
    // The running request of a, then one more of a's at most, then b.
    assert!(b <= 2, "b was served after {b} of a's requests: {order:?}");
}

#[test]
fn a_department_may_hold_only_its_share_of_the_queue() {
    let (h, _running) = one_slot_held(4);
    // Half of the four places: two.
    let _waiting: Vec<_> = (0..2)
        .map(|_| h.engine.generate(from("a", 1)).expect("its share"))
        .collect();
    assert!(matches!(
        h.engine.generate(from("a", 1)),
        Err(EngineError::DepartmentOverloaded)
    ));
    let _others: Vec<_> = (0..2)
        .map(|_| h.engine.generate(from("b", 1)).expect("b's own share"))
        .collect();
    assert!(matches!(
        h.engine.generate(from("c", 1)),
        Err(EngineError::Overloaded)
    ));
    h.mode.store(NORMAL, Ordering::SeqCst);
    h.open_gate.send(()).expect("gate");
}

#[test]
fn prompt_chunks_wait_for_room_while_running_answers_keep_their_pace() {
    let h = start(EngineSettings {
        max_batch: 4,
        prefill_chunk_tokens: 4,
        // The least allowed: one chunk beside three decodes.
        max_batched_tokens: 8,
        ..EngineSettings::default()
    });
    h.mode.store(WAIT, Ordering::SeqCst);
    let long_prompt = |max_tokens| {
        let mut request = request(max_tokens);
        request.prompt = Prompt::Text("Hello ".repeat(12));
        request
    };
    let mut streams: Vec<_> = (0..4)
        .map(|_| h.engine.generate(long_prompt(6)).expect("accepted"))
        .collect();
    h.mode.store(NORMAL, Ordering::SeqCst);
    h.open_gate.send(()).expect("gate");
    for stream in &mut streams {
        assert!(matches!(
            last_event(stream),
            GenerationEvent::Finished { .. }
        ));
    }
    let batches = h.batches.lock().expect("lock").clone();
    for batch in &batches {
        let tokens: usize = batch.iter().sum();
        assert!(tokens <= 8, "a step fed {tokens} tokens: {batch:?}");
    }
    // Prompts were fed in chunks across steps, never all four at once.
    assert!(
        batches
            .iter()
            .all(|b| b.iter().filter(|&&n| n > 1).count() <= 2)
    );
}
