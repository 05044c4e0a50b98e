//! What the audit trail costs, measured in one run on this machine:
//!
//! - durable appends per second with 2 auditor recipients, many writers at once (group
//!   commit: one flush and fsync for every record waiting), against the same work done one
//!   record at a time (encrypt, chain, write, flush, fsync), the naive peer
//!   (goal: >= 5,000/s on 2 cores);
//! - the latency the audit adds to a request at 100 requests/s: its admission record and
//!   its final record, each durable before the request may go on, p50 and p99
//!   (goal: p50 < 1 ms).
//!
//! Real age encryption, real sled, real fsync, in a temporary directory on the disk that
//! holds the target directory (set `MOAT_BENCH_AUDIT_DIR` to measure another disk).
//!
//! `cargo bench -p moat-daemon --bench audit`

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use moat_core::audit::layout::NodeInfo;
use moat_core::audit::{AuditRecord, Finding, RecordKind, RetainedText, Retention};
use moat_daemon::audit::store::{Sealed, Store};
use moat_daemon::audit::{AuditLog, AuditSettings, encrypt};
use moat_store::time::now_unix_ms;

const GROUP_WRITERS: usize = 64;
const GROUP_RECORDS: usize = 20_000;
const SERIAL_RECORDS: usize = 2_000;
const PACED_REQUESTS: usize = 1_000;
const REQUESTS_PER_SECOND: u64 = 100;

fn record(n: usize, kind: RecordKind) -> AuditRecord {
    AuditRecord {
        kind,
        unix_ms: now_unix_ms(),
        node_id: "bench-node".into(),
        request_id: format!("{n:032x}"),
        department: "finance".into(),
        subject: "analyst-7".into(),
        source_address: "10.20.30.40".into(),
        model: "smollm2@1.0.0".into(),
        action: "chat".into(),
        decision: "allow".into(),
        reason: "allow".into(),
        classification: "internal".into(),
        findings: vec![Finding {
            detector: "email".into(),
            count: 1,
        }],
        prompt_tokens: 412,
        completion_tokens: 96,
        latency_ms: 830,
        status: 200,
        prompt: RetainedText::keep(
            Retention::Sha256,
            "Summarise the attached quarterly report for the board.",
        ),
        answer: RetainedText::keep(Retention::Sha256, "Revenue rose 4%; costs fell."),
        detail: None,
    }
}

fn settings(dir: &std::path::Path, key: &SigningKey) -> AuditSettings {
    AuditSettings {
        store_directory: dir.join("audit"),
        node: NodeInfo {
            node_id: "bench-node".into(),
            public_key: key.verifying_key().to_bytes(),
        },
        checkpoint_every_records: 1000,
        checkpoint_every: Duration::from_secs(60),
        retention: None,
        write_timeout: Duration::from_secs(10),
    }
}

fn temp_dir() -> tempfile::TempDir {
    match std::env::var_os("MOAT_BENCH_AUDIT_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).expect("temp dir"),
        None => tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir"),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    common::isolate();
    let recipients = vec![
        age::x25519::Identity::generate().to_public(),
        age::x25519::Identity::generate().to_public(),
    ];
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("audit trail, 2 recipients, {cores} cores");

    // The naive peer: each record encrypted, chained, written, flushed and fsynced alone.
    let dir = temp_dir();
    let serial = {
        let settings = settings(dir.path(), &key);
        let mut store = Store::open(&settings.store_directory, &settings.node).expect("store");
        let started = Instant::now();
        for n in 0..SERIAL_RECORDS {
            let record = record(n, RecordKind::Request);
            let ciphertext = encrypt(&recipients, &record.to_bytes()).expect("encrypt");
            store
                .append(vec![Sealed {
                    unix_ms: record.unix_ms,
                    ciphertext,
                }])
                .expect("durable");
        }
        SERIAL_RECORDS as f64 / started.elapsed().as_secs_f64()
    };
    drop(dir);

    // moatd's log: writers on the blocking pool, group commit.
    let dir = temp_dir();
    let grouped = {
        let log = AuditLog::start(settings(dir.path(), &key), recipients.clone(), key.clone())
            .expect("log");
        let per_writer = GROUP_RECORDS / GROUP_WRITERS;
        let started = Instant::now();
        let writers: Vec<_> = (0..GROUP_WRITERS)
            .map(|w| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for n in 0..per_writer {
                        log.append_blocking(record(w * per_writer + n, RecordKind::Request))
                            .expect("durable");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer");
        }
        let rate = (per_writer * GROUP_WRITERS) as f64 / started.elapsed().as_secs_f64();
        log.close().expect("close");
        rate
    };
    drop(dir);

    // The latency a request pays at 100 requests/s: admission, then final record.
    let dir = temp_dir();
    let mut added = {
        let log = AuditLog::start(settings(dir.path(), &key), recipients.clone(), key.clone())
            .expect("log");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let latencies = runtime.block_on(async {
            let mut latencies = Vec::with_capacity(PACED_REQUESTS);
            let mut tick =
                tokio::time::interval(Duration::from_micros(1_000_000 / REQUESTS_PER_SECOND));
            for n in 0..PACED_REQUESTS {
                tick.tick().await;
                let started = Instant::now();
                log.append(record(n, RecordKind::Admission))
                    .await
                    .expect("admission");
                log.append(record(n, RecordKind::Request))
                    .await
                    .expect("final");
                latencies.push(started.elapsed());
            }
            latencies
        });
        drop(runtime);
        log.close().expect("close");
        latencies
    };
    drop(dir);
    added.sort_unstable();

    println!(
        "durable appends/s, one at a time (peer):  {serial:>8.0}\n\
         durable appends/s, group commit (moatd): {grouped:>8.0}   {:.2}x the peer   goal >= 5000/s: {}",
        grouped / serial,
        if grouped >= 5000.0 { "met" } else { "NOT met" }
    );
    println!(
        "added per request at {REQUESTS_PER_SECOND} req/s (admission + final record): p50 {:.3} ms, p99 {:.3} ms   goal p50 < 1 ms: {}",
        percentile(&added, 0.5).as_secs_f64() * 1e3,
        percentile(&added, 0.99).as_secs_f64() * 1e3,
        if percentile(&added, 0.5) < Duration::from_millis(1) {
            "met"
        } else {
            "NOT met"
        }
    );
}
