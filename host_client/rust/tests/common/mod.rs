//! What the tests that spawn workers share: where the checkout, its Python and its provisioned
//! model are, a hang guard, and checks on vectors, errors and processes. Included by
//! `tests/worker.rs`, by the crate's supervision unit tests (`src/supervision_tests.rs`) and by
//! the adapter's `akidb/tests/provider.rs` (by path), so each uses only its part.
//!
//! The worker's interpreter is `$AKIDB_EMBED_PYTHON`, else the checkout's `.venv/bin/python`;
//! the model is the checkout's `models/all-MiniLM-L6-v2` (`make models`). Either missing is a
//! set-up error: the tests fail, they do not skip.
#![allow(dead_code)]

use std::fmt::Display;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A hang guard for a loaded 2-core machine, not a timing expectation.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(240);
/// How alike two vectors of the same text must be (cosine).
pub const MIN_COSINE: f64 = 0.99999;

/// The words that start each error variant's `Display` (this crate's `EmbeddingError` and
/// AkiDB's alike), for [`expect_error`].
pub const MODEL_NOT_FOUND: &str = "Model not found";
pub const INVALID_INPUT: &str = "Invalid input";
pub const SERVICE_UNAVAILABLE: &str = "Service unavailable";

/// The akidb-embed checkout: the nearest folder above the crate that holds `protocol.md`.
pub fn checkout() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.ancestors().find(|dir| dir.join("protocol.md").exists());
    root.expect("the crate lies in the akidb-embed checkout").to_path_buf()
}

pub fn python() -> PathBuf {
    let python = std::env::var_os("AKIDB_EMBED_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| checkout().join(".venv/bin/python"));
    assert!(
        python.exists(),
        "no Python for the worker at {} (set AKIDB_EMBED_PYTHON or run `make venv`)",
        python.display()
    );
    python
}

pub fn model_dir() -> PathBuf {
    let dir = checkout().join("models/all-MiniLM-L6-v2");
    assert!(
        dir.join("akidb-embed.json").exists(),
        "no provisioned model in {} (run `make models`)",
        dir.display()
    );
    dir
}

/// The provisioned model's id, from its metadata.
pub fn model_id() -> String {
    let text = std::fs::read_to_string(model_dir().join("akidb-embed.json")).unwrap();
    let metadata: serde_json::Value = serde_json::from_str(&text).unwrap();
    metadata["model"].as_str().unwrap().to_owned()
}

/// `test`, failed if it does not finish within `TEST_TIMEOUT`.
pub async fn within<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, test).await.expect("the test finished in time")
}

/// Runs `test` on a thread of its own and fails if it does not end within `TEST_TIMEOUT`
/// (for tests that build and drop runtimes themselves).
pub fn on_a_thread_within(test: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        test();
        let _ = done.send(());
    });
    match finished.recv_timeout(TEST_TIMEOUT) {
        Ok(()) => thread.join().unwrap(),
        // the thread panicked: join gives its panic
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => thread.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("the test hung"),
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The message of `result`'s error, which must be of the variant whose `Display` starts with
/// `kind` ([`SERVICE_UNAVAILABLE`], ...) and hold every one of `parts`.
pub fn expect_error<T, E: Display>(result: Result<T, E>, kind: &str, parts: &[&str]) -> String {
    let shown = match result {
        Ok(_) => panic!("expected {kind}, got a success"),
        Err(error) => error.to_string(),
    };
    let message = shown
        .strip_prefix(kind)
        .and_then(|rest| rest.strip_prefix(": "))
        .unwrap_or_else(|| panic!("expected {kind}, got {shown}"));
    for part in parts {
        assert!(message.contains(part), "{part:?} not in: {shown}");
    }
    message.to_owned()
}

/// Sends signal `name` (`KILL`, `STOP`) to process `pid`; after `STOP`, returns once every
/// thread of it is stopped (the kernel stops each thread on its way back to user space, not at
/// the `kill`).
pub fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid}");
    if name == "STOP" {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !all_threads_stopped(pid) {
            assert!(std::time::Instant::now() < deadline, "{pid} did not stop");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Whether every thread of `pid` is in state T (stopped), from /proc/PID/task/*/stat.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return true };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).map_or(true, |stat| {
            // the state follows the command name, which is in parentheses and may hold spaces
            stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        })
    })
}

pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether process `pid` is gone or a zombie within a few seconds (it may still be tearing
/// down its memory when a SIGKILL has just been sent).
pub fn dies_soon(pid: u32) -> bool {
    (0..200).any(|_| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let dead = stat.is_empty() || stat.contains(") Z ");
        if !dead {
            std::thread::sleep(Duration::from_millis(50));
        }
        dead
    })
}
