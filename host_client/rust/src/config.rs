//! How a [`WorkerClient`](crate::WorkerClient) spawns and supervises its pool of workers, with
//! every default defined once (the same values as the Python host client's).
//!
//! Every setting applies to each worker of the pool alike (`workers` of them, each started
//! with the same command line, so each holds every model and runs `lanes` ONNX Runtime runs at
//! once over sessions of `threads` intra-op threads; unset, each worker sizes both for its
//! share of the machine's cores, told by `--pool-workers`);
//! the budgets are per wire request (`max_attempts`) and per worker (`restart_limit`), the
//! backpressure (`max_in_flight_texts`) over the whole pool.
//!
//! Timeouts, precisely:
//!
//! * `start_timeout`: how long a freshly spawned worker may take to write its hello.
//! * `request_timeout`: how long a worker holding requests may go without answering any of
//!   them. A request's clock starts when it is written to a worker and restarts whenever that
//!   worker delivers a reply, so a worker busy with a deep queue is not taken for a hung one,
//!   while a hung, stopped or deadlocked worker is killed (SIGKILL) and replaced. `ping`
//!   replies do not count (the worker's reader answers them even when its model is stuck).
//!   Batches are cut into wire requests of a few of the worker's batches each, so that a busy
//!   worker answers something well within this time.
//! * `max_attempts`: how many workers one wire request may be sent to. A worker death or hang
//!   costs every request that worker held one attempt; the request is sent again to the next
//!   worker while attempts remain, else its call fails with `ServiceUnavailable`.
//! * `close_timeout`: how long [`WorkerClient::close`](crate::WorkerClient::close) (and dropping
//!   the last handle) lets the worker finish what it holds before killing it.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::types::{EmbeddingError, EmbeddingResult};

pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_RESTART_LIMIT: u32 = 5;
pub const DEFAULT_STABLE_START_TIME: Duration = Duration::from_secs(10);
/// Enough to keep the worker's batcher full while keeping the frames held for re-sending small.
pub const DEFAULT_MAX_IN_FLIGHT_TEXTS: usize = 2048;
/// `workers` by default ([`auto_workers`]): one worker per this many usable logical CPUs, the
/// same rule as the Python client's `workers="auto"` (`akidb_embed/cores.py`): a worker's lanes
/// fill its cores, and more workers only help once its Python steps are the ceiling.
pub const CPUS_PER_WORKER: usize = 32;
/// The Python module that is the worker (`python -m akidb_embed.worker`).
pub const WORKER_MODULE: &str = "akidb_embed.worker";
/// The interpreter used when none is configured.
pub const DEFAULT_PYTHON: &str = "python3";

/// The environment variables [`WorkerConfig::from_env`] reads: the worker's own
/// (`AKIDB_EMBED_<OPTION>`, protocol.md section 7) and the interpreter to run it with.
pub mod env {
    /// The Python interpreter whose environment has akidb-embed installed.
    pub const PYTHON: &str = "AKIDB_EMBED_PYTHON";
    /// One model directory, or several separated by `:` (`;` on Windows); the first is the
    /// default model.
    pub const MODEL_DIR: &str = "AKIDB_EMBED_MODEL_DIR";
    pub const PROVIDER: &str = "AKIDB_EMBED_PROVIDER";
    pub const THREADS: &str = "AKIDB_EMBED_THREADS";
    pub const LANES: &str = "AKIDB_EMBED_LANES";
    /// How many workers the client runs, or `auto` (the client's own variable: the worker
    /// ignores it).
    pub const WORKERS: &str = "AKIDB_EMBED_WORKERS";
}

const RESTART_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Lines of the worker's stderr kept to explain a failed start or a death.
pub(crate) const STDERR_TAIL_LINES: usize = 20;

/// Workers of a pool for the logical CPUs this process may use:
/// `ceil(cpus / CPUS_PER_WORKER)`, at least one (the default of [`WorkerConfig::workers`]).
pub fn auto_workers() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.div_ceil(CPUS_PER_WORKER).max(1)
}

/// How to start the workers and how to supervise them.
#[derive(Clone)]
pub struct WorkerConfig {
    /// Worker processes in the pool, each with every model of `model_dirs`, `lanes` runs at
    /// once and `threads` intra-op threads; a request goes to the one with the fewest
    /// estimated tokens outstanding. Default: [`auto_workers`].
    pub workers: usize,
    /// Program and leading arguments of the worker, e.g.
    /// `["/srv/akidb/.venv/bin/python", "-m", "akidb_embed.worker"]` (what
    /// [`from_python`](Self::from_python) makes) or `["akidb-embed-worker"]`. Never run
    /// through a shell.
    pub command: Vec<OsString>,
    /// One `--model-dir` each, in order: the first is the default model (the one a request
    /// with an empty `model` gets). Empty: the worker's default (`$AKIDB_EMBED_MODEL_DIR`).
    pub model_dirs: Vec<PathBuf>,
    /// The id the default model must have. Checked against every worker's hello: a worker
    /// serving another model is stopped and the start fails with `ModelNotFound` naming both.
    pub expected_model: Option<String>,
    /// `--provider` (auto, cpu, cuda, coreml); `None`: the worker's default (auto).
    pub provider: Option<String>,
    /// `--threads` (ONNX Runtime intra-op threads of each model's session, shared by the
    /// lanes); `None`: the worker's default, sized for its share of the cores.
    pub threads: Option<usize>,
    /// `--lanes` (ONNX Runtime runs at once in each worker); `None`: the worker's default,
    /// sized for its share of the cores.
    pub lanes: Option<usize>,
    /// Appended to the command line after the options above, e.g.
    /// `["--max-texts-per-request", "64"]`.
    pub extra_args: Vec<OsString>,
    /// Variables set for the worker on top of this process's environment (the worker reads
    /// every option not given on its command line from `AKIDB_EMBED_<OPTION>` there).
    pub env: Vec<(OsString, OsString)>,
    pub request_timeout: Duration,
    pub start_timeout: Duration,
    pub close_timeout: Duration,
    pub max_attempts: u32,
    /// Consecutive restarts allowed before the client gives up (every call then fails fast with
    /// `ServiceUnavailable` naming the last death).
    pub restart_limit: u32,
    /// A worker that ran this long after its hello resets the consecutive-restart count.
    pub stable_start_time: Duration,
    /// Backpressure: texts written to the worker and not yet answered, over all callers. More
    /// wait in `embed_batch` until replies come back.
    pub max_in_flight_texts: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            command: Self::python_command(DEFAULT_PYTHON.as_ref()),
            workers: auto_workers(),
            model_dirs: Vec::new(),
            expected_model: None,
            provider: None,
            threads: None,
            lanes: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            start_timeout: DEFAULT_START_TIMEOUT,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            restart_limit: DEFAULT_RESTART_LIMIT,
            stable_start_time: DEFAULT_STABLE_START_TIME,
            max_in_flight_texts: DEFAULT_MAX_IN_FLIGHT_TEXTS,
        }
    }
}

impl WorkerConfig {
    /// The defaults with `command` as the worker's program and leading arguments.
    pub fn with_command<I, S>(command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Self { command: command.into_iter().map(Into::into).collect(), ..Self::default() }
    }

    /// The defaults with the worker run as `python -m akidb_embed.worker`: `python` is the
    /// interpreter of an environment where akidb-embed is installed (a venv's `bin/python`).
    /// A Python without it fails the start with its own "No module named ..." message.
    pub fn from_python(python: impl Into<PathBuf>) -> Self {
        Self { command: Self::python_command(python.into().as_os_str()), ..Self::default() }
    }

    /// The defaults, then what this process's environment says, with the worker's own
    /// variables: the interpreter from `AKIDB_EMBED_PYTHON` (else `python3`), the model
    /// directories from `AKIDB_EMBED_MODEL_DIR` (separated like `PATH`), `AKIDB_EMBED_PROVIDER`
    /// `AKIDB_EMBED_THREADS` and `AKIDB_EMBED_LANES` (per worker), and the client's own
    /// `AKIDB_EMBED_WORKERS` (the pool's size, a number or `auto`; the worker ignores it). The worker inherits the environment, so its other
    /// `AKIDB_EMBED_*` options apply as well. A variable that does not parse is `InvalidInput`.
    pub fn from_env() -> EmbeddingResult<Self> {
        Self::from_vars(|name| std::env::var_os(name))
    }

    fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> EmbeddingResult<Self> {
        let set = |name: &str| var(name).filter(|value| !value.is_empty());
        let mut config = match set(env::PYTHON) {
            Some(python) => Self::from_python(python),
            None => Self::default(),
        };
        if let Some(dirs) = set(env::MODEL_DIR) {
            config.model_dirs =
                std::env::split_paths(&dirs).filter(|dir| !dir.as_os_str().is_empty()).collect();
        }
        if let Some(provider) = set(env::PROVIDER) {
            config.provider = Some(provider.to_string_lossy().into_owned());
        }
        let number = |name: &str, value: OsString, what: &str| {
            let text = value.to_string_lossy();
            text.trim().parse::<usize>().map_err(|_| {
                EmbeddingError::InvalidInput(format!("{name}={text:?} is not a number of {what}"))
            })
        };
        if let Some(threads) = set(env::THREADS) {
            config.threads = Some(number(env::THREADS, threads, "threads")?);
        }
        if let Some(lanes) = set(env::LANES) {
            config.lanes = Some(number(env::LANES, lanes, "lanes")?);
        }
        if let Some(workers) = set(env::WORKERS) {
            config.workers = if workers == "auto" {
                auto_workers()
            } else {
                number(env::WORKERS, workers, "workers")?
            };
        }
        Ok(config)
    }

    fn python_command(python: &OsStr) -> Vec<OsString> {
        vec![python.to_owned(), "-m".into(), WORKER_MODULE.into()]
    }

    /// The full command line of one worker: `command`, then the options, then `extra_args`.
    pub fn argv(&self) -> Vec<OsString> {
        let mut argv = self.command.clone();
        for model_dir in &self.model_dirs {
            argv.push("--model-dir".into());
            argv.push(model_dir.clone().into_os_string());
        }
        if let Some(provider) = &self.provider {
            argv.push("--provider".into());
            argv.push(provider.into());
        }
        if let Some(threads) = self.threads {
            argv.push("--threads".into());
            argv.push(threads.to_string().into());
        }
        if let Some(lanes) = self.lanes {
            argv.push("--lanes".into());
            argv.push(lanes.to_string().into());
        }
        if self.workers > 1 {
            // each worker sizes its default lanes x threads for its share of the cores
            argv.push("--pool-workers".into());
            argv.push(self.workers.to_string().into());
        }
        argv.extend(self.extra_args.iter().cloned());
        argv
    }

    /// Settings that cannot work, as a message; `None` when all is well.
    pub(crate) fn problem(&self) -> Option<String> {
        if self.command.is_empty() {
            return Some("the worker command is empty".into());
        }
        let zero = |name: &str| Some(format!("{name} must be positive"));
        if self.workers == 0 {
            return zero("workers");
        }
        if self.lanes == Some(0) {
            return zero("lanes");
        }
        if self.request_timeout.is_zero() {
            return zero("request_timeout");
        }
        if self.start_timeout.is_zero() {
            return zero("start_timeout");
        }
        if self.max_attempts == 0 {
            return zero("max_attempts");
        }
        if self.max_in_flight_texts == 0 {
            return zero("max_in_flight_texts");
        }
        None
    }

    /// How long to wait before the `consecutive_restarts`-th restart in a row (1-based).
    pub(crate) fn restart_delay(consecutive_restarts: u32) -> Duration {
        let exponent = consecutive_restarts.saturating_sub(1).min(16);
        (RESTART_BACKOFF_FIRST * 2u32.pow(exponent)).min(RESTART_BACKOFF_MAX)
    }
}

impl fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("workers", &self.workers)
            .field("argv", &self.argv())
            .field("expected_model", &self.expected_model)
            .field("env", &self.env)
            .field("request_timeout", &self.request_timeout)
            .field("start_timeout", &self.start_timeout)
            .field("close_timeout", &self.close_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("restart_limit", &self.restart_limit)
            .field("stable_start_time", &self.stable_start_time)
            .field("max_in_flight_texts", &self.max_in_flight_texts)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_puts_options_between_command_and_extra_args() {
        let config = WorkerConfig {
            model_dirs: vec!["/m".into(), "/n".into()],
            provider: Some("cpu".into()),
            threads: Some(1),
            lanes: Some(3),
            workers: 2,
            extra_args: vec!["--max-texts-per-request".into(), "8".into()],
            ..WorkerConfig::with_command(["py", "-m", "w"])
        };
        let argv: Vec<String> =
            config.argv().into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(
            argv,
            [
                "py",
                "-m",
                "w",
                "--model-dir",
                "/m",
                "--model-dir",
                "/n",
                "--provider",
                "cpu",
                "--threads",
                "1",
                "--lanes",
                "3",
                "--pool-workers",
                "2",
                "--max-texts-per-request",
                "8"
            ]
        );
    }

    #[test]
    fn from_env_reads_the_workers_variables() {
        let vars = |name: &str| -> Option<OsString> {
            match name {
                env::PYTHON => Some("/venv/bin/python".into()),
                env::MODEL_DIR => Some("/models/a:/models/b".into()),
                env::PROVIDER => Some("cpu".into()),
                env::THREADS => Some("2".into()),
                env::WORKERS => Some("3".into()),
                env::LANES => Some("4".into()),
                _ => None,
            }
        };
        let config = WorkerConfig::from_vars(vars).unwrap();
        assert_eq!(config.command, ["/venv/bin/python", "-m", "akidb_embed.worker"]);
        assert_eq!(config.model_dirs, [PathBuf::from("/models/a"), PathBuf::from("/models/b")]);
        assert_eq!(config.provider.as_deref(), Some("cpu"));
        assert_eq!(config.threads, Some(2));
        assert_eq!(config.workers, 3);
        assert_eq!(config.lanes, Some(4));

        let nothing = WorkerConfig::from_vars(|_| None).unwrap();
        assert_eq!(nothing.command, WorkerConfig::default().command);
        assert!(nothing.model_dirs.is_empty() && nothing.threads.is_none());
        assert_eq!(nothing.workers, auto_workers());
        let auto = WorkerConfig::from_vars(|name| (name == env::WORKERS).then(|| "auto".into()));
        assert_eq!(auto.unwrap().workers, auto_workers());

        let bad = WorkerConfig::from_vars(|name| (name == env::THREADS).then(|| "many".into()));
        let error = bad.unwrap_err();
        assert!(matches!(&error, EmbeddingError::InvalidInput(m) if m.contains("THREADS")));
        let bad = WorkerConfig::from_vars(|name| (name == env::WORKERS).then(|| "-1".into()));
        let error = bad.unwrap_err();
        assert!(matches!(&error, EmbeddingError::InvalidInput(m) if m.contains("WORKERS")));
    }

    #[test]
    fn restart_delay_doubles_up_to_its_ceiling() {
        assert_eq!(WorkerConfig::restart_delay(1), RESTART_BACKOFF_FIRST);
        assert_eq!(WorkerConfig::restart_delay(2), RESTART_BACKOFF_FIRST * 2);
        assert_eq!(WorkerConfig::restart_delay(40), RESTART_BACKOFF_MAX);
    }
}
