//! An engine thread: owns a backend, admits sequences, steps them together.
//!
//! Inference never runs on an async worker: dedicated OS threads (`engine.workers`, one
//! backend each) take admissions from the engine's one fair queue (departments in turn) and
//! answer each generation through its own event channel. Between steps a thread admits new
//! sequences into its free slots and drops the ones whose client went away, waiting or
//! running, so its batch is always the set of its live sequences.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use std::sync::Mutex;

use crossbeam_channel::Receiver;
use tokio::sync::mpsc::UnboundedSender;

use super::backend::{Backend, LogitsBatch, StepInput};
use super::fair_queue::FairQueue;
use super::sequence::{Advance, AdvanceError, Sequence};
use super::tokenizer::TextTokenizer;
use super::{EngineError, GenerationEvent};

/// A sequence handed to the worker, with the channel its events go to.
#[derive(Debug)]
pub(crate) struct Admission {
    pub sequence: Sequence,
    pub events: UnboundedSender<GenerationEvent>,
}

struct Live {
    sequence: Sequence,
    events: UnboundedSender<GenerationEvent>,
}

/// Where admissions wait: the fair queue, and the channel whose token wakes an idle thread
/// (and whose disconnection says the engine is gone).
pub(crate) struct Waiting {
    pub queue: Arc<Mutex<FairQueue<Admission>>>,
    pub woken: Receiver<()>,
    /// Engine threads still serving this queue.
    pub serving: Arc<AtomicUsize>,
}

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, FairQueue<Admission>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How much one step may take on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepLimits {
    /// Sequences held at once.
    pub max_batch: usize,
    /// Tokens fed in one step at most (0: no limit); decode tokens go first, prompt chunks
    /// fill what is left, and a step always feeds at least one sequence.
    pub max_batched_tokens: usize,
}

/// What the engine thread reports about itself to the engine's handles.
#[derive(Debug, Default)]
pub(crate) struct WorkerHealth {
    /// The last step failed (cleared by the next good step).
    pub failing: AtomicBool,
    /// Sequences currently held by the backend.
    pub live: AtomicUsize,
    /// Times round the loop: the watchdog's proof that a busy thread is not stuck.
    pub rounds: AtomicU64,
}

/// The engine thread's state between steps.
struct Worker {
    backend: Box<dyn Backend>,
    tokenizer: Arc<TextTokenizer>,
    waiting: Waiting,
    limits: StepLimits,
    health: Arc<WorkerHealth>,
    live: Vec<Live>,
    logits: LogitsBatch,
    disconnected: bool,
}

/// Runs until every engine handle is gone and the last sequence has finished.
pub(crate) fn run(
    backend: Box<dyn Backend>,
    tokenizer: Arc<TextTokenizer>,
    waiting: Waiting,
    limits: StepLimits,
    health: Arc<WorkerHealth>,
) {
    let mut worker = Worker {
        backend,
        tokenizer,
        waiting,
        limits,
        health,
        live: Vec::new(),
        logits: LogitsBatch::default(),
        disconnected: false,
    };
    loop {
        // A panic (a bug, or one inside the runtime binding) must not leave clients waiting
        // forever: fail every generation, live or queued, report it, and stop this thread,
        // since the backend's state can no longer be trusted.
        let outcome = catch_unwind(AssertUnwindSafe(|| worker.iteration()));
        worker.health.rounds.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => {
                tracing::error!("an engine thread panicked; failing its generations");
                worker.fail_everything();
                return;
            }
        }
    }
}

impl Worker {
    /// Admits what fits, drops what was cancelled, steps the rest. False when the thread
    /// should end.
    fn iteration(&mut self) -> bool {
        if self.live.is_empty() && self.waiting.lock().is_empty() {
            if self.disconnected {
                return false;
            }
            if self.waiting.woken.recv().is_err() {
                // The engine is gone; finish what may still be queued.
                self.disconnected = true;
                return !self.waiting.lock().is_empty();
            }
        }
        // A busy thread leaves the wake-up tokens alone: they are for idle siblings.
        // Clients that left while waiting give their places back; free slots are filled
        // department by department.
        let admitted: Vec<Admission> = {
            let mut queue = self.waiting.lock();
            queue.retain(|a| !a.events.is_closed());
            let free = self.limits.max_batch.saturating_sub(self.live.len());
            std::iter::from_fn(|| queue.pop()).take(free).collect()
        };
        for admission in admitted {
            admit(self.backend.as_mut(), admission, &mut self.live);
        }
        // A client that hung up frees its slot before the next step costs anything.
        let backend = &mut self.backend;
        self.live.retain(|l| {
            let keep = !l.events.is_closed();
            if !keep {
                backend.finish_sequence(l.sequence.id);
            }
            keep
        });
        self.health.live.store(self.live.len(), Ordering::Relaxed);
        if !self.live.is_empty() {
            step(
                self.backend.as_mut(),
                &self.tokenizer,
                &mut self.live,
                &mut self.logits,
                &self.health,
                self.limits.max_batched_tokens,
            );
            self.health.live.store(self.live.len(), Ordering::Relaxed);
        }
        true
    }

    fn fail_everything(&mut self) {
        self.health.failing.store(true, Ordering::Relaxed);
        self.health.live.store(0, Ordering::Relaxed);
        let failed = || {
            GenerationEvent::Failed(EngineError::Inference(
                "the engine stopped after an internal error".to_owned(),
            ))
        };
        for l in self.live.drain(..) {
            let _ = l.events.send(failed());
        }
        // Waiting requests are the other threads' to serve, unless this was the last one.
        if self.waiting.serving.fetch_sub(1, Ordering::AcqRel) == 1 {
            for queued in self.waiting.lock().drain() {
                let _ = queued.events.send(failed());
            }
        }
    }
}

fn admit(backend: &mut dyn Backend, admission: Admission, live: &mut Vec<Live>) {
    let Admission { sequence, events } = admission;
    if events.is_closed() {
        // The client left while the request waited in the queue.
        return;
    }
    match backend.start_sequence(sequence.id, sequence.capacity()) {
        Ok(()) => {
            if let Some(scope) = sequence.prefix_scope {
                backend.share_prefixes(sequence.id, scope);
            }
            live.push(Live { sequence, events });
        }
        Err(e) => {
            let _ = events.send(GenerationEvent::Failed(EngineError::Inference(
                e.to_string(),
            )));
        }
    }
}

/// Which live sequences the next step feeds, within `max_batched_tokens`: every decode
/// (one token each) first, so running answers keep their pace, then prompt chunks in
/// arrival order while they fit; never none.
fn choose(live: &[Live], max_batched_tokens: usize) -> Vec<bool> {
    if max_batched_tokens == 0 {
        return vec![true; live.len()];
    }
    let sizes: Vec<usize> = live.iter().map(|l| l.sequence.next_input().len()).collect();
    let mut chosen: Vec<bool> = sizes.iter().map(|&n| n <= 1).collect();
    let mut budget = max_batched_tokens.saturating_sub(chosen.iter().filter(|&&c| c).count());
    for (i, &n) in sizes.iter().enumerate() {
        if !chosen[i] && (n <= budget || !chosen.contains(&true)) {
            chosen[i] = true;
            budget = budget.saturating_sub(n);
        }
    }
    chosen
}

/// One step for the live sequences [`choose`] picks. Health is updated before any event
/// goes out, so a client that reads an event sees the health that goes with it.
fn step(
    backend: &mut dyn Backend,
    tokenizer: &TextTokenizer,
    live: &mut Vec<Live>,
    logits: &mut LogitsBatch,
    health: &WorkerHealth,
    max_batched_tokens: usize,
) {
    let chosen = choose(live, max_batched_tokens);
    let batch: Vec<StepInput<'_>> = live
        .iter()
        .zip(&chosen)
        .filter(|(_, chosen)| **chosen)
        .map(|(l, _)| StepInput {
            sequence: l.sequence.id,
            tokens: l.sequence.next_input(),
        })
        .collect();
    let result = backend.step(&batch, logits);
    drop(batch);
    if let Err(e) = result {
        tracing::error!(error = %e, "inference step failed; failing its sequences");
        health.failing.store(true, Ordering::Relaxed);
        health.live.store(0, Ordering::Relaxed);
        for l in live.drain(..) {
            backend.finish_sequence(l.sequence.id);
            let _ = l
                .events
                .send(GenerationEvent::Failed(EngineError::Inference(
                    e.to_string(),
                )));
        }
        return;
    }
    health.failing.store(false, Ordering::Relaxed);
    let mut row = 0;
    let mut chosen = chosen.into_iter();
    live.retain_mut(|l| {
        if !chosen.next().unwrap_or(false) {
            return true; // waits for a later step
        }
        let logits = logits.row(row);
        row += 1;
        deliver(l, logits, tokenizer, backend, health)
    });
}

/// Turns one sequence's logits into its next event; false when the sequence is done (or
/// its client gone) and has been released.
fn deliver(
    l: &mut Live,
    row: &[f32],
    tokenizer: &TextTokenizer,
    backend: &mut dyn Backend,
    health: &WorkerHealth,
) -> bool {
    if !l.sequence.record_step() {
        // A prompt chunk that is not the last: nothing to sample yet.
        return true;
    }
    let (event, done) = match l.sequence.advance(row, tokenizer) {
        Ok(Advance::Token { id, text }) => (GenerationEvent::Token { id, text }, false),
        Ok(Advance::Finished { id, text, reason }) => {
            // The last token goes out first, then the summary.
            let _ = l.events.send(GenerationEvent::Token { id, text });
            let usage = l.sequence.usage();
            (GenerationEvent::Finished { reason, usage }, true)
        }
        Err(AdvanceError::Tokenize(e)) => (
            GenerationEvent::Failed(EngineError::Tokenize(e.to_string())),
            true,
        ),
        Err(AdvanceError::Constraint(e)) => (GenerationEvent::Failed(e.into()), true),
    };
    if done {
        // Released before the final event goes out, so whoever reads it sees the slot
        // already free.
        backend.finish_sequence(l.sequence.id);
        health.live.fetch_sub(1, Ordering::Relaxed);
        let _ = l.events.send(event);
        return false;
    }
    if l.events.send(event).is_err() {
        backend.finish_sequence(l.sequence.id);
        health.live.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    true
}
