//! The embedder on real ONNX Runtime: the tiny fixture encoder against the numpy reference,
//! every refusal, and all-MiniLM-L6-v2's sense of similarity.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use common::{load_embedder, max_abs_diff, model_dir, reference_embeddings, runtime};
use moat_core::ModelTask;
use moat_daemon::engine::embedder::{MAX_BATCH_INPUTS, MAX_INPUTS};
use moat_daemon::engine::{
    EmbedError, Embedder, Engine, EngineSettings, LoadError, ModelDirError, ModelDirectory,
    OrtBackend, StartError,
};

const FIXTURE: &str = "fixture-embedding";
const FIXTURE_SOURCE: &str = "fixture-bert-source";
const MINILM: &str = "all-minilm-l6-v2";

/// Float noise between ONNX Runtime's kernels and numpy is ~1e-6 on these models.
const REFERENCE_TOLERANCE: f32 = 1e-4;

fn strings(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|t| (*t).to_owned()).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// A text of `words` fixture-vocabulary words; with [CLS] and [SEP], `words + 2` tokens.
fn words(words: usize) -> String {
    vec!["cat"; words].join(" ")
}

/// A copy of the fixture model directory whose files a test may then doctor.
fn fixture_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for file in ["model.onnx", "tokenizer.json", "moat-model.json"] {
        std::fs::copy(model_dir(FIXTURE).join(file), dir.path().join(file)).expect("copy");
    }
    dir
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    edit(&mut value);
    std::fs::write(path, value.to_string()).expect("write");
}

fn load_from(dir: &Path) -> Result<Embedder, StartError> {
    Embedder::load_ort(&runtime(), dir, &common::cpu_options())
}

#[test]
fn fixture_matches_the_numpy_reference() {
    let embedder = load_embedder(FIXTURE);
    let texts = [
        "Hello world",
        "The cat sat on the mat and the dog sat by the door.",
        "A",
        "Élan, naïve café: 日本 42!",
        "how do i reset my password? what are the steps to change it?",
    ];
    let got = embedder.embed(&strings(&texts)).expect("embeds");
    let want = reference_embeddings(FIXTURE_SOURCE, &texts);
    let ids = embedder.tokenize(&strings(&texts)).expect("tokenizes");
    assert_eq!(ids, want.token_ids, "tokenizer differs from Python's");
    assert_eq!(got.prompt_tokens, ids.iter().map(Vec::len).sum::<usize>());
    assert_eq!(got.vectors.len(), texts.len());
    for (i, (g, w)) in got.vectors.iter().zip(&want.vectors).enumerate() {
        assert_eq!(g.len(), 32);
        let diff = max_abs_diff(g, w);
        assert!(diff < REFERENCE_TOLERANCE, "input {i}: max |diff| {diff}");
    }
}

#[test]
fn special_tokens_frame_every_input() {
    let embedder = load_embedder(FIXTURE);
    let ids = embedder.tokenize(&strings(&["cat"])).expect("tokenizes");
    // [CLS] = 2, [SEP] = 3 in the fixture vocabulary.
    assert_eq!(ids[0].first(), Some(&2));
    assert_eq!(ids[0].last(), Some(&3));
    assert_eq!(ids[0].len(), 3);
}

#[test]
fn padding_and_batching_do_not_change_a_vector() {
    let embedder = load_embedder(FIXTURE);
    let short = "the sea is calm";
    let alone = embedder.embed(&strings(&[short])).expect("embeds");
    let long = words(40);
    let batched = embedder
        .embed(&[long.clone(), short.to_owned()])
        .expect("embeds");
    let diff = max_abs_diff(&alone.vectors[0], &batched.vectors[1]);
    assert!(diff < 1e-5, "padding moved the vector by {diff}");

    // More inputs than one run takes, of many lengths: each vector is the one it gets alone,
    // in input order.
    let inputs: Vec<String> = (0..MAX_BATCH_INPUTS + 9)
        .map(|i| words(1 + (i * 7) % 50))
        .collect();
    let together = embedder.embed(&inputs).expect("embeds");
    assert_eq!(together.vectors.len(), inputs.len());
    for (i, input) in inputs.iter().enumerate().step_by(5) {
        let single = embedder.embed(std::slice::from_ref(input)).expect("embeds");
        let diff = max_abs_diff(&single.vectors[0], &together.vectors[i]);
        assert!(diff < 1e-5, "input {i} moved by {diff}");
    }
}

#[test]
fn vectors_are_unit_length_when_the_model_normalises() {
    let embedder = load_embedder(FIXTURE);
    assert_eq!(
        embedder.metadata().embedding.map(|e| e.normalize),
        Some(true)
    );
    let out = embedder
        .embed(&strings(&["one", "two words"]))
        .expect("embeds");
    for v in &out.vectors {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
}

#[test]
fn concurrent_callers_get_the_same_vectors_as_one_caller() {
    let embedder = Arc::new(load_embedder(FIXTURE));
    let inputs: Vec<String> = (0..6).map(|i| words(1 + 9 * i)).collect();
    let expected = embedder.embed(&inputs).expect("embeds");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let embedder = Arc::clone(&embedder);
            let inputs = inputs.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|_| embedder.embed(&inputs).expect("embeds"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for thread in threads {
        for out in thread.join().expect("no panic") {
            assert_eq!(out, expected);
        }
    }
}

#[test]
fn empty_and_too_many_inputs_are_refused() {
    let embedder = load_embedder(FIXTURE);
    assert_eq!(embedder.embed(&[]), Err(EmbedError::EmptyInput));
    assert_eq!(
        embedder.embed(&strings(&["fine", ""])),
        Err(EmbedError::EmptyInput)
    );
    let many = vec!["cat".to_owned(); MAX_INPUTS + 1];
    assert_eq!(
        embedder.embed(&many),
        Err(EmbedError::TooManyInputs {
            count: MAX_INPUTS + 1,
            max: MAX_INPUTS
        })
    );
    let most = vec!["cat".to_owned(); MAX_INPUTS];
    assert_eq!(
        embedder.embed(&most).expect("embeds").vectors.len(),
        MAX_INPUTS
    );
}

#[test]
fn long_inputs_are_refused_never_truncated() {
    let embedder = load_embedder(FIXTURE);
    let max = embedder.max_input_tokens();
    assert_eq!(max, 64);
    let fits = words(max - 2);
    let out = embedder.embed(&[fits]).expect("exactly the limit fits");
    assert_eq!(out.prompt_tokens, max);
    let over = words(max - 1);
    assert_eq!(
        embedder.embed(&["short".to_owned(), over]),
        Err(EmbedError::InputTooLong {
            index: 1,
            tokens: max + 1,
            max
        })
    );
}

#[test]
fn a_token_the_model_does_not_have_is_refused() {
    // A tokenizer with a gap in its ids: as many entries as the model has rows, but one id
    // past the last row. The graph's embedding lookup must never see it.
    let dir = fixture_copy();
    let vocab_size = load_embedder(FIXTURE).metadata().vocab_size;
    edit_json(&dir.path().join("tokenizer.json"), |t| {
        let vocab = t["model"]["vocab"].as_object_mut().expect("vocab");
        vocab.remove("penguins").expect("fixture word");
        vocab.insert("oddword".into(), vocab_size.into());
    });
    let embedder = load_from(dir.path()).expect("loads");
    assert_eq!(
        embedder.embed(&strings(&["cat", "an oddword"])),
        Err(EmbedError::TokenOutOfVocab {
            index: 1,
            id: vocab_size as u32,
            vocab_size
        })
    );
}

#[test]
fn tokenizer_and_runtime_failures_are_reported_not_panicked() {
    // A WordPiece vocabulary without its unknown token cannot encode an unknown character.
    let dir = fixture_copy();
    edit_json(&dir.path().join("tokenizer.json"), |t| {
        let vocab = t["model"]["vocab"].as_object_mut().expect("vocab");
        let id = vocab.remove("[UNK]").expect("unk");
        vocab.insert("[UNKNOWN]".into(), id);
        let added = t["added_tokens"].as_array_mut().expect("added tokens");
        added.retain(|token| token["content"] != "[UNK]");
    });
    let embedder = load_from(dir.path()).expect("loads");
    assert!(matches!(
        embedder.embed(&strings(&["日本"])),
        Err(EmbedError::Tokenize(_))
    ));

    // Metadata that promises more positions than the graph's position table holds: the
    // run fails inside ONNX Runtime, and the embedder stays usable.
    let dir = fixture_copy();
    edit_json(&dir.path().join("moat-model.json"), |m| {
        m["context_length"] = 100.into();
    });
    let embedder = load_from(dir.path()).expect("loads");
    assert!(matches!(
        embedder.embed(&[words(80)]),
        Err(EmbedError::Inference(_))
    ));
    assert!(embedder.embed(&strings(&["still works"])).is_ok());
}

#[test]
fn mismatched_directories_are_refused_at_load() {
    let dir = fixture_copy();
    edit_json(&dir.path().join("moat-model.json"), |m| {
        m["vocab_size"] = 1000.into();
    });
    assert!(matches!(
        load_from(dir.path()),
        Err(StartError::Model(
            ModelDirError::TokenizerVocabMismatch { .. }
        ))
    ));
    let dir = fixture_copy();
    edit_json(&dir.path().join("moat-model.json"), |m| {
        m["embedding_dim"] = 48.into();
    });
    assert!(matches!(
        load_from(dir.path()),
        Err(StartError::Load(LoadError::Model(
            ModelDirError::GraphMismatch {
                field: "embedding_dim",
                declared: 48,
                graph: 32,
                ..
            }
        )))
    ));
}

#[test]
fn models_are_refused_for_the_wrong_task() {
    let err = load_from(&model_dir("fixture-fused")).expect_err("a decoder");
    assert!(
        matches!(
            err,
            StartError::Model(ModelDirError::WrongTask {
                expected: ModelTask::Embedding,
                found: ModelTask::TextGeneration,
                ..
            })
        ),
        "{err}"
    );

    let err = Engine::load_ort(
        &runtime(),
        &model_dir(FIXTURE),
        &common::cpu_options(),
        EngineSettings::default(),
    )
    .expect_err("an encoder");
    assert!(
        matches!(
            err,
            StartError::Load(LoadError::Model(ModelDirError::WrongTask {
                expected: ModelTask::TextGeneration,
                found: ModelTask::Embedding,
                ..
            }))
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("a model for task `embedding`, but task `text-generation` is needed"),
        "{err}"
    );

    let model = ModelDirectory::open(&model_dir(FIXTURE)).expect("opens");
    assert!(matches!(
        OrtBackend::load(&runtime(), &model, &common::cpu_options()),
        Err(LoadError::Model(ModelDirError::WrongTask { .. }))
    ));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Whatever text arrives, the embedder answers with vectors or a typed refusal.
    #[test]
    fn arbitrary_text_never_panics(texts in proptest::collection::vec(".{0,120}", 0..4)) {
        let embedder = fixture_embedder();
        match embedder.embed(&texts) {
            Ok(out) => {
                proptest::prop_assert_eq!(out.vectors.len(), texts.len());
                proptest::prop_assert!(out.vectors.iter().flatten().all(|v| v.is_finite()));
            }
            Err(EmbedError::EmptyInput | EmbedError::InputTooLong { .. }) => {}
            Err(other) => proptest::prop_assert!(false, "unexpected error {other}"),
        }
    }
}

fn fixture_embedder() -> &'static Embedder {
    static EMBEDDER: std::sync::OnceLock<Embedder> = std::sync::OnceLock::new();
    EMBEDDER.get_or_init(|| load_embedder(FIXTURE))
}

#[test]
fn minilm_knows_paraphrases_from_unrelated_text() {
    let embedder = load_embedder(MINILM);
    assert_eq!(embedder.dimensions(), 384);
    assert_eq!(embedder.max_input_tokens(), 256);
    let texts = [
        "A man is playing a guitar.",
        "Someone is playing an instrument.",
        "How do I reset my password?",
        "What are the steps to change my password?",
        "The stock market fell sharply on Tuesday.",
        "Penguins live in the southern hemisphere.",
    ];
    let out = embedder.embed(&strings(&texts)).expect("embeds");
    for v in &out.vectors {
        assert_eq!(v.len(), 384);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    let v = &out.vectors;
    for (a, b) in [(0, 1), (2, 3)] {
        let cos = cosine(&v[a], &v[b]);
        assert!(cos > 0.6, "paraphrases {a}, {b}: cos {cos}");
    }
    for (a, b) in [(0, 4), (2, 5), (0, 3)] {
        let cos = cosine(&v[a], &v[b]);
        assert!(cos < 0.3, "unrelated {a}, {b}: cos {cos}");
    }
}

/// Prints call latencies for the record (`cargo test --test embedding -- --ignored
/// --nocapture`); timing asserts would only measure how busy the machine is.
#[test]
#[ignore = "prints figures, asserts nothing"]
fn minilm_latency_on_this_machine() {
    let embedder = load_embedder(MINILM);
    let one = strings(&["How do I reset my password?"]);
    let many: Vec<String> = (0..32)
        .map(|i| format!("Sentence number {i} talks about a different topic than the others."))
        .collect();
    for (label, inputs) in [("1 input", &one), ("32 inputs", &many)] {
        embedder.embed(inputs).expect("embeds");
        let runs = 5;
        let start = Instant::now();
        for _ in 0..runs {
            embedder.embed(inputs).expect("embeds");
        }
        eprintln!(
            "all-MiniLM-L6-v2, {label}: {:.1} ms per call ({:?})",
            start.elapsed().as_secs_f64() * 1e3 / f64::from(runs),
            embedder.device()
        );
    }
}
