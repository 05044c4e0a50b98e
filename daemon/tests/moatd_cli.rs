//! `moatd` as an admin runs it: the real binary, its exit codes and its messages.

mod common;

use std::process::Command;

fn moatd() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_moatd"));
    command
        .env_remove("MOAT_ONNXRUNTIME_LIB")
        .env("MOAT_LOG", "warn");
    command
}

/// `moatd generate` on the fixture model with a one-word prompt, plus `extra` arguments.
fn generate_on_fixture(extra: &[&str]) -> Command {
    let mut command = moatd();
    command
        .args(["generate", "--model"])
        .arg(common::model_dir("fixture-fused"))
        .args(["--prompt", "Hi"])
        .args(extra);
    command
}

#[test]
fn generate_answers_with_the_demo_model() {
    let output = moatd()
        .args(["generate", "--model"])
        .arg(common::model_dir("smollm2-135m-instruct-exact"))
        .args([
            "--chat",
            "What is the capital of France?",
            "--onnxruntime-library",
        ])
        .arg(common::repo_root().join("local/onnxruntime"))
        .output()
        .expect("moatd runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "The capital of France is Paris."
    );
}

#[test]
fn a_missing_onnx_runtime_library_says_how_to_fix_it() {
    let output = generate_on_fixture(&[])
        .env("MOAT_ONNXRUNTIME_LIB", "/nonexistent/libonnxruntime.so")
        .output()
        .expect("moatd runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/libonnxruntime.so"),
        "{stderr}"
    );
    assert!(stderr.contains("MOAT_ONNXRUNTIME_LIB"), "{stderr}");
    assert!(stderr.contains("provision-onnxruntime.sh"), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{stderr}"
    );
}

#[test]
fn a_file_that_is_not_onnx_runtime_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"not a shared library").expect("write");
    let output = generate_on_fixture(&["--onnxruntime-library"])
        .arg(&fake)
        .output()
        .expect("moatd runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("could not be loaded as ONNX Runtime"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn cuda_without_a_gpu_fails_clearly_and_auto_falls_back() {
    let run = |device: &str| {
        generate_on_fixture(&["--max-tokens", "2", "--device", device])
            .arg("--onnxruntime-library")
            .arg(common::repo_root().join("local/onnxruntime"))
            .env("MOAT_LOG", "warn")
            .output()
            .expect("moatd runs")
    };
    // The pinned library is the CPU build, so CUDA can never be usable with it.
    let cuda = run("cuda");
    let stderr = String::from_utf8_lossy(&cuda.stderr);
    assert_eq!(cuda.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("CUDA is not usable"), "{stderr}");
    let auto = run("auto");
    let stderr = String::from_utf8_lossy(&auto.stderr);
    assert!(auto.status.success(), "{stderr}");
    assert!(stderr.contains("running on CPU"), "{stderr}");
}

#[test]
fn a_bad_config_reports_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("moat.toml");
    std::fs::write(&config, "[engine]\nintra_op_threads = 0\nmax_batch = 0\n").expect("write");
    let output = moatd()
        .arg("--config")
        .arg(&config)
        .args(["generate", "--model", "x", "--prompt", "Hi"])
        .output()
        .expect("moatd runs");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("intra_op_threads") && stderr.contains("max_batch"),
        "{stderr}"
    );

    let output = moatd()
        .args([
            "generate",
            "--model",
            "x",
            "--prompt",
            "Hi",
            "--threads",
            "0",
        ])
        .output()
        .expect("moatd runs");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("command-line options") && stderr.contains("intra_op_threads"),
        "{stderr}"
    );
}
