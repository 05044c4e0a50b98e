//! The real demo model, SmolLM2-135M-Instruct, end to end through ONNX Runtime.
//!
//! The `exact` graph keeps the GGUF's Q4_1 weights exactly and computes in fp32, so its
//! greedy tokens must equal the numpy reference over the dequantised GGUF, which shares no
//! code with the converter's fused graph.

mod common;

use common::{load, reference_greedy, run};
use moat_daemon::engine::{ChatMessage, FinishReason, GenerationRequest, Prompt};

const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn chat(user: &str) -> Prompt {
    Prompt::Chat(vec![ChatMessage::new("user", user)])
}

fn greedy(prompt: Prompt, max_tokens: usize) -> GenerationRequest {
    let mut request = GenerationRequest::new(prompt);
    request.max_tokens = Some(max_tokens);
    request
}

#[test]
fn exact_graph_matches_the_reference_token_for_token() {
    let engine = load("smollm2-135m-instruct-exact");
    let prompts = [
        chat("What is the capital of France?"),
        Prompt::Text("Once upon a time, there was a little".into()),
        chat("List three colours of the rainbow."),
    ];
    for prompt in prompts {
        let ids = engine.tokenize_prompt(&prompt).expect("tokenizes");
        let mut request = greedy(Prompt::TokenIds(ids.clone()), 32);
        request.ignore_eos = true;
        let ours = run(&engine, request);
        let reference = reference_greedy(GGUF, &ids, 32);
        assert_eq!(ours.ids, reference, "prompt {prompt:?}");
    }
}

#[test]
fn exact_graph_gives_the_known_answers() {
    let engine = load("smollm2-135m-instruct-exact");
    let cases = [
        (
            chat("What is the capital of France?"),
            "The capital of France is Paris.",
        ),
        // The known haiku answer was produced without any system block, which the
        // template would otherwise insert; render that prompt by hand.
        (
            Prompt::Text(
                "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"
                    .into(),
            ),
            "The sea is a mirror that reflects the soul.",
        ),
    ];
    for (prompt, expected) in cases {
        let outcome = run(&engine, greedy(prompt.clone(), 40));
        assert_eq!(outcome.text(), expected, "prompt {prompt:?}");
        assert_eq!(outcome.reason, FinishReason::Stop);
    }
    let story = run(
        &engine,
        greedy(
            Prompt::Text("Once upon a time, there was a little".into()),
            40,
        ),
    );
    assert!(
        story.text().starts_with(
            " girl named Emma who loved to play in the sun. She would often go to the beach"
        ),
        "{:?}",
        story.text()
    );
}

#[test]
fn fast_graph_answers_sensibly() {
    // int8 activations are lossy, as llama.cpp's are: the France answer is a near-tie that
    // they flip (llama.cpp flips it the same way), so the fast graph is checked on answers
    // with a clear margin, for substance.
    let engine = load("smollm2-135m-instruct-fast");
    let sum = run(&engine, greedy(chat("What is 2 plus 2?"), 40));
    assert!(sum.text().contains('4'), "{:?}", sum.text());
    assert_eq!(sum.reason, FinishReason::Stop);
    let story = run(
        &engine,
        greedy(
            Prompt::Text("Once upon a time, there was a little".into()),
            16,
        ),
    );
    assert!(
        story
            .text()
            .starts_with(" girl named Emma who loved to play"),
        "{:?}",
        story.text()
    );
}
