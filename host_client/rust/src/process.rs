//! Starting one worker process: spawn it with three pipes (through a [`Spawner`]), drain its
//! stderr, read its hello.
//!
//! ```text
//! Spawner::spawn ──▶ child ──stdout──▶ first frame ──▶ Hello::into_ready ──▶ StartedWorker
//!                   └──stderr──▶ drain task ──▶ `tracing` (every line, target
//!                                               akidb_embed_client::worker) + tail (last lines)
//! no hello (exit, EOF, start_timeout) ─▶ SIGKILL + reap ─▶ error naming the exit status
//!                                                          and the stderr tail
//! hello ok: false / wrong protocol /
//!   another default model than expected_model ─▶ stop + reap ─▶ that error (not retryable)
//! ```

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

use crate::config::{WorkerConfig, STDERR_TAIL_LINES};
use crate::types::EmbeddingError;
use crate::wire::{self, Hello, ReadyHello};

/// How long a worker that failed to start gets to exit by itself before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for the last stderr lines of a worker that has exited.
const STDERR_FLUSH_GRACE: Duration = Duration::from_secs(1);
/// Lines of the stderr tail quoted in an error message.
const QUOTED_STDERR_LINES: usize = 5;
/// Exit code of a worker that found no usable model (protocol.md section 8).
const EXIT_MODEL_NOT_LOADED: i32 = 4;
/// The `tracing` target of the worker's stderr lines.
pub(crate) const WORKER_LOG_TARGET: &str = "akidb_embed_client::worker";

/// The last lines a worker wrote on its stderr.
#[derive(Clone, Default)]
pub(crate) struct StderrTail(Arc<Mutex<VecDeque<String>>>);

impl StderrTail {
    fn push(&self, line: &str) {
        let mut lines = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        if lines.len() == STDERR_TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line.to_owned());
    }

    /// `"; its stderr ends: a | b"`, or nothing when the worker wrote nothing.
    pub(crate) fn quoted(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        let skip = lines.len().saturating_sub(QUOTED_STDERR_LINES);
        let last: Vec<&str> = lines.iter().skip(skip).map(String::as_str).collect();
        if last.is_empty() {
            String::new()
        } else {
            format!("; its stderr ends: {}", last.join(" | "))
        }
    }
}

/// A worker that wrote a usable hello, with its pipes not yet handed to the I/O tasks.
pub(crate) struct StartedWorker {
    pub child: Child,
    pub stdin: ChildStdin,
    pub stdout: BufReader<ChildStdout>,
    pub hello: ReadyHello,
    pub stderr_tail: StderrTail,
    pub stderr_task: JoinHandle<()>,
    pub ready_at: Instant,
}

/// Why a worker did not start, and whether starting another one may help.
pub(crate) struct StartFailure {
    pub error: EmbeddingError,
    /// False when the worker itself said why it cannot run (failed hello, wrong protocol): a
    /// new worker would say the same.
    pub retryable: bool,
}

/// How a supervisor gets a worker process: the seam under supervision. The client runs the
/// configured command ([`WorkerCommand`]); the crate's tests put small fake workers here, real
/// programs that misbehave on cue, to drive restarts, backoff, the restart budget and the hang
/// watch without the model.
pub(crate) trait Spawner: Send + Sync + 'static {
    /// A new worker process for pool slot `slot`, with stdin, stdout and stderr piped and
    /// killed when its `Child` is dropped ([`spawn_piped`] does both).
    fn spawn(&self, config: &WorkerConfig, slot: usize) -> std::io::Result<Child>;

    /// The command line that [`spawn`](Self::spawn) runs, as messages show it.
    fn shown(&self, config: &WorkerConfig) -> String;
}

/// The worker `config` describes: [`WorkerConfig::argv`] with [`WorkerConfig::env`].
pub(crate) struct WorkerCommand;

impl Spawner for WorkerCommand {
    fn spawn(&self, config: &WorkerConfig, _slot: usize) -> std::io::Result<Child> {
        spawn_piped(config.argv(), config.env.iter().map(|(k, v)| (k, v)))
    }

    fn shown(&self, config: &WorkerConfig) -> String {
        config.argv().iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    }
}

/// Runs `argv` (never through a shell) with `envs` added to this process's environment, its
/// three standard streams piped, killed when its `Child` is dropped.
pub(crate) fn spawn_piped<K, V>(
    argv: Vec<OsString>,
    envs: impl IntoIterator<Item = (K, V)>,
) -> std::io::Result<Child>
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    Command::new(&argv[0])
        .args(&argv[1..])
        .envs(envs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
}

/// Spawns one worker through `spawner` and waits (at most `start_timeout`) for its hello.
pub(crate) async fn start_worker(
    config: &WorkerConfig,
    spawner: &dyn Spawner,
    slot: usize,
) -> Result<StartedWorker, StartFailure> {
    let shown = spawner.shown(config);
    let mut child = spawner.spawn(config, slot).map_err(|error| StartFailure {
        error: EmbeddingError::ServiceUnavailable(format!(
            "cannot run the worker `{shown}`: {error}"
        )),
        retryable: !matches!(
            error.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
        ),
    })?;
    let pid = child.id().unwrap_or_default();
    let (stdin, stdout, stderr) =
        match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
            (Some(stdin), Some(stdout), Some(stderr)) => (stdin, stdout, stderr),
            _ => unreachable!("all three pipes were requested"),
        };
    let stderr_tail = StderrTail::default();
    let stderr_task = tokio::spawn(drain_stderr(stderr, pid, stderr_tail.clone()));
    let mut stdout = BufReader::with_capacity(64 * 1024, stdout);

    let first_frame = tokio::time::timeout(
        config.start_timeout,
        wire::read_frame(&mut stdout, wire::DEFAULT_MAX_FRAME_BYTES),
    )
    .await;
    let what = match first_frame {
        Ok(Ok(Some(payload))) => Ok(payload),
        Ok(Ok(None)) => Err(("exited before its hello".to_owned(), EXIT_GRACE)),
        Ok(Err(error)) => Err((format!("broke its stream before its hello ({error})"), EXIT_GRACE)),
        Err(_) => {
            Err((format!("wrote no hello within {:?}", config.start_timeout), Duration::ZERO))
        }
    };
    let payload = match what {
        Ok(payload) => payload,
        Err((what, grace)) => {
            let status = exit_status_within(&mut child, grace).await;
            let _ = tokio::time::timeout(STDERR_FLUSH_GRACE, stderr_task).await;
            let message =
                format!("worker `{shown}` {what}{}{}", describe(status), stderr_tail.quoted());
            let error = match status.and_then(|s| s.code()) {
                Some(EXIT_MODEL_NOT_LOADED) => EmbeddingError::ModelNotFound(message),
                _ => EmbeddingError::ServiceUnavailable(message),
            };
            return Err(StartFailure { error, retryable: true });
        }
    };
    let hello = wire::decode_payload::<Hello>(&payload)
        .and_then(Hello::into_ready)
        .and_then(|hello| expect_model(config, hello));
    match hello {
        Ok(hello) => Ok(StartedWorker {
            child,
            stdin,
            stdout,
            hello,
            stderr_tail,
            stderr_task,
            ready_at: Instant::now(),
        }),
        Err(error) => {
            // The worker exits by itself after a failed hello; closing stdin tells it to also
            // when it is a worker this client refuses (another protocol version).
            drop(stdin);
            let status = exit_status_within(&mut child, EXIT_GRACE).await;
            let _ = tokio::time::timeout(STDERR_FLUSH_GRACE, stderr_task).await;
            let context = format!("worker `{shown}` could not start{}", describe(status));
            let quoted = stderr_tail.quoted();
            let error = error.map_message(|message| format!("{context}: {message}{quoted}"));
            Err(StartFailure { error, retryable: false })
        }
    }
}

/// The exit status of `child` if it exits by itself within `grace`, else after a SIGKILL.
pub(crate) async fn exit_status_within(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => stop(child).await,
    }
}

/// SIGKILLs `child` (if it still runs) and reaps it.
pub(crate) async fn stop(child: &mut Child) -> Option<ExitStatus> {
    let _ = child.start_kill();
    child.wait().await.ok()
}

/// `" (exit status: 4)"`, or nothing when the status is unknown.
pub(crate) fn describe(status: Option<ExitStatus>) -> String {
    status.map(|s| format!(" ({s})")).unwrap_or_default()
}

/// The hello, when its default model is the one `config` expects.
fn expect_model(config: &WorkerConfig, hello: ReadyHello) -> Result<ReadyHello, EmbeddingError> {
    match &config.expected_model {
        Some(expected) if *expected != hello.model.model => {
            Err(EmbeddingError::ModelNotFound(format!(
                "the default model is {:?}, expected {expected:?} (loaded: {})",
                hello.model.model,
                hello.model_ids()
            )))
        }
        _ => Ok(hello),
    }
}

/// One stderr line as a `tracing` event: the worker's own log lines
/// (`akidb-embed-worker[pid] LEVEL logger: message`) at their level, anything else it prints (a
/// traceback, a C library's output) as a warning.
fn log_worker_line(pid: u32, line: &str) {
    let level = line
        .strip_prefix("akidb-embed-worker[")
        .and_then(|rest| rest.split_once("] "))
        .and_then(|(_, rest)| rest.split_once(' '))
        .map(|(level, _)| level);
    match level {
        Some("DEBUG") => tracing::debug!(target: WORKER_LOG_TARGET, pid, "{line}"),
        Some("INFO") => tracing::info!(target: WORKER_LOG_TARGET, pid, "{line}"),
        Some("ERROR" | "CRITICAL") => tracing::error!(target: WORKER_LOG_TARGET, pid, "{line}"),
        _ => tracing::warn!(target: WORKER_LOG_TARGET, pid, "{line}"),
    }
}

/// Logs every stderr line and keeps the last ones, until the pipe closes: a full stderr pipe
/// would block the worker.
async fn drain_stderr(stderr: ChildStderr, pid: u32, tail: StderrTail) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                log_worker_line(pid, text);
                tail.push(text);
            }
        }
    }
}
