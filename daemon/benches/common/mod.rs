//! What the benchmarks share: the provisioned ONNX Runtime and models, on CPU with one
//! intra-op thread per processor, and what talking to moatd over mutual TLS takes.

// Each bench compiles this module on its own and uses a part of it.
#![allow(dead_code)]

pub mod peers;
pub mod sse;
pub mod tls;

use std::path::PathBuf;

use moat_daemon::engine::{
    DevicePreference, Engine, EngineSettings, OrtRuntime, SessionOptions, runtime_library,
};

/// The workspace's provisioned runtime and the session options every bench uses (CPU, one
/// intra-op thread per processor, unless the environment asks for the GPU).
pub struct CpuBench {
    pub root: PathBuf,
    pub threads: usize,
    /// The ONNX Runtime library the benches and their moatd load.
    pub library: PathBuf,
    pub runtime: std::sync::Arc<OrtRuntime>,
    pub options: SessionOptions,
}

/// Set in a bench re-executed by [`isolate`], saying how.
const ISOLATED: &str = "MOAT_BENCH_ISOLATED";

/// Runs the rest of the bench with ONNX Runtime's telemetry off and, where this machine
/// allows it (root, with `ip` from iproute2), in a network namespace of its own with only
/// loopback up: nothing a bench starts (moatd, the Python loops, onnxruntime-genai,
/// llama-server) can reach another machine. The bench is executed again inside; the outer
/// process only waits for it and exits with its status. Returns in the inner process.
pub fn isolate() {
    if std::env::var_os(ISOLATED).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let quiet = |command: &mut std::process::Command| {
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let netns = quiet(
        std::process::Command::new("unshare").args(["--net", "ip", "link", "set", "lo", "up"]),
    );
    let mut inner = if netns {
        eprintln!("bench: in a network namespace of its own (loopback only), telemetry off");
        let mut command = std::process::Command::new("unshare");
        command
            .args([
                "--net",
                "--",
                "sh",
                "-c",
                "ip link set lo up && exec \"$0\" \"$@\"",
            ])
            .arg(&exe);
        command
    } else {
        eprintln!(
            "bench: no network namespace on this machine (`unshare --net` needs root and `ip`); \
             telemetry off"
        );
        std::process::Command::new(&exe)
    };
    let status = inner
        .args(&args)
        .env(ISOLATED, if netns { "netns" } else { "telemetry" })
        .env("ORT_DISABLE_TELEMETRY", "1")
        .status();
    std::process::exit(match status {
        Ok(status) => status.code().unwrap_or(1),
        Err(e) => {
            eprintln!("bench: could not run itself again: {e}");
            1
        }
    });
}

impl CpuBench {
    pub fn load() -> Self {
        isolate();
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        // `MOAT_ONNXRUNTIME_LIB` picks another library (bench/gpu.sh: the onnxruntime-gpu
        // build); `MOAT_BENCH_DEVICE=cuda` runs on the GPU.
        let library = std::env::var_os("MOAT_ONNXRUNTIME_LIB")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("local/onnxruntime"));
        let located =
            runtime_library::locate(Some(&library), None).expect("run scripts/setup.sh first");
        let runtime = OrtRuntime::load(located).expect("ONNX Runtime");
        let device = match std::env::var("MOAT_BENCH_DEVICE").as_deref() {
            Ok("cuda") => DevicePreference::Cuda,
            _ => DevicePreference::Cpu,
        };
        let options = SessionOptions {
            device,
            intra_op_threads: Some(threads),
            ..SessionOptions::default()
        };
        Self {
            root,
            library,
            threads,
            runtime,
            options,
        }
    }

    /// An engine with default settings over a model directory.
    pub fn engine(&self, model_dir: &std::path::Path) -> Engine {
        self.engine_with(model_dir, EngineSettings::default())
    }

    /// An engine with `settings` over a model directory.
    pub fn engine_with(&self, model_dir: &std::path::Path, settings: EngineSettings) -> Engine {
        Engine::load_ort(&self.runtime, model_dir, &self.options, settings).expect("model loads")
    }

    /// The model named by `MOAT_BENCH_MODEL` (default: the demo model's fast graph) and
    /// its directory under local/models.
    pub fn model(&self) -> (String, PathBuf) {
        let model = std::env::var("MOAT_BENCH_MODEL")
            .unwrap_or_else(|_| "smollm2-135m-instruct-fast".to_owned());
        let dir = self.root.join("local/models").join(&model);
        (model, dir)
    }
}
