//! One worker of the pool and its supervisor: the process (started through a [`Spawner`]),
//! its stdin lane (`stdin_lane.rs`), its reader task, the hang watch and the restart budget.
//! The requests themselves belong to the dispatcher above (`dispatch.rs`), which this module
//! knows only as the [`Pool`] trait: a supervisor tells it when its worker is ready, what the
//! worker answered, and when the worker is gone, and the dispatcher decides where requests go.
//!
//! ```text
//!   dispatcher ── frames routed to this worker ──▶ FrameSender::send ──▶ stdin: the caller
//!     writes its own frame when the stream is idle, else the lane's writer task
//!   reader task: frame from stdout ── Pool::deliver(slot, generation, id) ──▶ the caller
//!
//!   reader task: stdout EOF / broken frame ─┐
//!   writer task: write to stdin failed ─────┼─▶ Event::WorkerGone(generation) ─┐
//!   deadline: no reply for request_timeout ─┘   (hung: same path)             │
//!     (Pool::quiet_since: the oldest unanswered request routed here)          ▼
//!   replace(): Pool::unroutable (nothing new is routed here) ─▶ SIGKILL + reap, let its
//!     reader deliver what it had read ─▶ Pool::lost: each request it held costs one attempt
//!     (over max_attempts: that call fails) and goes back to the dispatcher, which routes it
//!     to another ready worker at once, or holds it until one is ready ─▶ consecutive
//!     restarts > restart_limit? Pool::gave_up (this slot stops; the others serve on) ─▶
//!     backoff ─▶ start_worker through the Spawner ─▶ install(): new reader and stdin lane,
//!     Pool::ready (the dispatcher routes to it again, held requests first)
//!   a replacement that says why it cannot start (failed hello) ─▶ Pool::gave_up at once
//!
//!   the supervisor task dropped without closing (its tokio runtime shut down, or a panic)
//!     ─▶ Drop: Pool::supervisor_dropped, which fails every waiting and later call at once;
//!        the worker is killed (kill_on_drop)
//! ```
//!
//! Events carry the generation of the worker they are about, so a late event about a worker
//! already replaced is ignored.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::BufReader;
use tokio::process::{Child, ChildStdout};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::WorkerConfig;
use crate::process::{self, Spawner, StderrTail};
use crate::stdin_lane::{self, FrameSender};
use crate::types::{EmbeddingError, EmbeddingResult};
use crate::wire::{self, ReadyHello, ReplyEnvelope};

pub(crate) use crate::process::StartedWorker;

/// A reply frame's payload as the reader read it.
pub(crate) struct Reply {
    pub payload: Vec<u8>,
    /// When its frame's first bytes were read.
    pub first_bytes_at: std::time::Instant,
}

/// Why the requests a worker held are being sent elsewhere.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loss {
    Died,
    Hung,
}

/// What a supervisor needs from the dispatcher above it. `slot` is the worker's place in the
/// pool; `generation` counts the workers that slot has started, so news about a worker
/// already replaced can be told apart.
pub(crate) trait Pool: Send + Sync + 'static {
    fn config(&self) -> &WorkerConfig;
    /// A worker of `slot` wrote its hello: requests may be routed to it through `frames`.
    fn ready(&self, slot: usize, generation: u64, hello: ReadyHello, frames: FrameSender);
    /// The worker answered request `id`.
    fn deliver(&self, slot: usize, generation: u64, id: u64, reply: Reply);
    /// Since when the worker has held a request without answering anything (the oldest such
    /// request); `None` when it holds none.
    fn quiet_since(&self, slot: usize, generation: u64) -> Option<std::time::Instant>;
    /// The worker is about to be retired: route nothing more to it.
    fn unroutable(&self, slot: usize);
    /// The worker is gone: each request it held costs one attempt (a request with none left
    /// fails with a message built from `reason`) and is routed again. Returns how many were
    /// routed again.
    fn lost(&self, slot: usize, generation: u64, loss: Loss, reason: &str) -> usize;
    /// The slot will start no more workers.
    fn gave_up(&self, slot: usize, error: EmbeddingError);
    /// The slot's worker was stopped on purpose (close).
    fn stopped(&self, slot: usize);
    /// The supervisor task was dropped before it stopped.
    fn supervisor_dropped(&self, slot: usize);
}

/// Starts one worker for `slot` and waits for its hello (no retries).
pub(crate) async fn start_worker(
    config: &WorkerConfig,
    spawner: &dyn Spawner,
    slot: usize,
) -> EmbeddingResult<StartedWorker> {
    process::start_worker(config, spawner, slot).await.map_err(|failure| failure.error)
}

/// Stops and reaps a worker that started but will not serve (another of the pool failed).
pub(crate) async fn discard(mut started: StartedWorker) {
    let status = process::stop(&mut started.child).await;
    started.stderr_task.abort();
    let pid = started.hello.pid;
    tracing::info!(pid, "worker {pid} stopped{}", process::describe(status));
}

/// The dispatcher's handle on one supervisor task.
pub(crate) struct SupervisorHandle {
    events: mpsc::UnboundedSender<Event>,
}

impl SupervisorHandle {
    /// Graceful stop (see `WorkerClient::close`), asked for at once; the future ends when the
    /// worker is reaped.
    pub(crate) fn close(&self) -> impl Future<Output = ()> {
        let (done, finished) = oneshot::channel();
        let sent = self.events.send(Event::Close { done }).is_ok();
        async move {
            if sent {
                // an error here: the supervisor was dropped, which fails everything by itself
                let _ = finished.await;
            }
        }
    }

    /// The client's last handle is gone: stop without anyone waiting.
    pub(crate) fn release(&self) {
        let _ = self.events.send(Event::HandlesDropped);
    }
}

/// Hands a started worker to a new supervisor task of `slot` on the current tokio runtime,
/// which starts its replacements through `spawner`; the worker is ready for the dispatcher
/// when this returns.
pub(crate) fn supervise(
    pool: Arc<dyn Pool>,
    spawner: Arc<dyn Spawner>,
    slot: usize,
    started: StartedWorker,
) -> SupervisorHandle {
    let (events, events_rx) = mpsc::unbounded_channel();
    let mut supervisor = Supervisor {
        pool,
        spawner,
        slot,
        events_tx: events.clone(),
        events: events_rx,
        worker: None,
        generation: 0,
        consecutive_restarts: 0,
        last_pid: 0,
    };
    supervisor.install(started);
    tokio::spawn(supervisor.run());
    SupervisorHandle { events }
}

/// How long the reader of a killed worker gets to deliver the replies it had already read.
const READER_DRAIN_GRACE: Duration = Duration::from_secs(2);

enum Event {
    /// The worker of `generation` cannot serve any more (`reason` says what was seen).
    WorkerGone { generation: u64, reason: String },
    /// `WorkerClient::close`: stop gracefully, then signal `done`.
    Close { done: oneshot::Sender<()> },
    /// The last `WorkerClient` handle is gone.
    HandlesDropped,
}

struct LiveWorker {
    generation: u64,
    child: Child,
    pid: u32,
    ready_at: Instant,
    reader: JoinHandle<()>,
    stderr_tail: StderrTail,
    stderr_task: JoinHandle<()>,
}

struct Supervisor {
    pool: Arc<dyn Pool>,
    spawner: Arc<dyn Spawner>,
    slot: usize,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    worker: Option<LiveWorker>,
    generation: u64,
    consecutive_restarts: u32,
    /// The pid of the latest worker, to label events after it is gone.
    last_pid: u32,
}

enum Wake {
    Event(Option<Event>),
    Deadline,
}

impl Supervisor {
    fn config(&self) -> &WorkerConfig {
        self.pool.config()
    }

    async fn run(mut self) {
        loop {
            let deadline = self.next_deadline();
            let wake = tokio::select! {
                event = self.events.recv() => Wake::Event(event),
                () = tokio::time::sleep_until(deadline) => Wake::Deadline,
            };
            match wake {
                Wake::Deadline => {
                    if let Some(reason) = self.hung_worker() {
                        self.replace(reason, Loss::Hung).await;
                    }
                }
                Wake::Event(Some(Event::WorkerGone { generation, reason })) => {
                    if self.worker.as_ref().map(|w| w.generation) == Some(generation) {
                        self.replace(reason, Loss::Died).await;
                    }
                }
                Wake::Event(Some(Event::Close { done })) => {
                    self.close().await;
                    let _ = done.send(());
                    return;
                }
                Wake::Event(Some(Event::HandlesDropped) | None) => {
                    self.close().await;
                    return;
                }
            }
        }
    }

    /// When the oldest request held by the current worker runs out of time. Requests written
    /// later have later deadlines, so waking at most every `request_timeout` misses none.
    fn next_deadline(&self) -> Instant {
        let timeout = self.config().request_timeout;
        let quiet_since = self
            .worker
            .as_ref()
            .and_then(|worker| self.pool.quiet_since(self.slot, worker.generation));
        match quiet_since {
            Some(since) => Instant::from_std(since) + timeout,
            None => Instant::now() + timeout,
        }
    }

    /// A reason when the current worker holds a request and has answered nothing for
    /// `request_timeout` since it was written.
    fn hung_worker(&self) -> Option<String> {
        let timeout = self.config().request_timeout;
        let worker = self.worker.as_ref()?;
        let since = self.pool.quiet_since(self.slot, worker.generation)?;
        (since.elapsed() >= timeout)
            .then(|| format!("answered nothing for {timeout:?} while holding requests"))
    }

    /// Hands a started worker its I/O tasks and tells the dispatcher it is ready.
    fn install(&mut self, started: StartedWorker) {
        self.generation += 1;
        let (slot, generation) = (self.slot, self.generation);
        let StartedWorker { child, stdin, stdout, hello, stderr_tail, stderr_task, ready_at } =
            started;
        let pid = hello.pid;
        self.last_pid = pid;
        tracing::info!(
            pid,
            slot,
            generation,
            "worker {pid} ready (pool slot {slot}): models {}, providers {:?}",
            hello.model_ids(),
            hello.providers
        );
        let max_reply_bytes = hello.limits.max_frame_bytes.max(wire::DEFAULT_MAX_FRAME_BYTES);
        let events = self.events_tx.clone();
        let frames = stdin_lane::open(stdin, move |error| {
            let reason = format!("stopped reading its stdin ({error})");
            let _ = events.send(Event::WorkerGone { generation, reason });
        });
        let reader = tokio::spawn(read_replies(
            stdout,
            self.pool.clone(),
            self.events_tx.clone(),
            (slot, generation),
            pid,
            max_reply_bytes,
        ));
        self.worker = Some(LiveWorker {
            generation,
            child,
            pid,
            ready_at: Instant::from_std(ready_at),
            reader,
            stderr_tail,
            stderr_task,
        });
        self.pool.ready(slot, generation, hello, frames);
    }

    /// Replaces the current worker after it died or hung (see the module picture).
    async fn replace(&mut self, reason: String, loss: Loss) {
        self.pool.unroutable(self.slot);
        let mut last_reason = reason;
        if let Some(worker) = self.worker.take() {
            let pid = worker.pid;
            let lived = worker.ready_at.elapsed();
            let generation = worker.generation;
            let (status, stderr) = retire(worker).await;
            last_reason =
                format!("worker {pid} {last_reason}{}{stderr}", process::describe(status));
            let resent = self.pool.lost(self.slot, generation, loss, &last_reason);
            if lived >= self.config().stable_start_time {
                self.consecutive_restarts = 0;
            }
            tracing::warn!(
                pid,
                slot = self.slot,
                "{last_reason}; starting a new worker, sending again the {resent} requests it held"
            );
        }
        loop {
            self.consecutive_restarts += 1;
            if self.consecutive_restarts > self.config().restart_limit {
                let limit = self.config().restart_limit;
                self.give_up(EmbeddingError::ServiceUnavailable(format!(
                    "the worker failed {} times in a row (restart_limit {limit}); last: \
                     {last_reason}",
                    self.consecutive_restarts
                )));
                return;
            }
            tokio::time::sleep(WorkerConfig::restart_delay(self.consecutive_restarts)).await;
            match process::start_worker(self.config(), &*self.spawner, self.slot).await {
                Ok(started) => {
                    self.install(started);
                    return;
                }
                Err(failure) if !failure.retryable => {
                    self.give_up(failure.error);
                    return;
                }
                Err(failure) => {
                    last_reason = failure.error.to_string();
                    tracing::warn!(slot = self.slot, "a new worker did not start: {last_reason}");
                }
            }
        }
    }

    /// This slot stops for good; the dispatcher decides what that means for the pool.
    fn give_up(&mut self, error: EmbeddingError) {
        tracing::error!(pid = self.last_pid, slot = self.slot, "giving up: {error}");
        self.pool.gave_up(self.slot, error);
    }

    /// Graceful stop: the worker gets EOF on stdin, answers what it holds and exits (killed
    /// after `close_timeout`).
    async fn close(&mut self) {
        // Dropping the frame sender ends the writer task (once it has written what was
        // queued), which closes the worker's stdin.
        self.pool.unroutable(self.slot);
        if let Some(mut worker) = self.worker.take() {
            let close_timeout = self.config().close_timeout;
            let status = process::exit_status_within(&mut worker.child, close_timeout).await;
            let _ = tokio::time::timeout(READER_DRAIN_GRACE, &mut worker.reader).await;
            worker.reader.abort();
            worker.stderr_task.abort();
            let pid = worker.pid;
            tracing::info!(
                pid,
                slot = self.slot,
                "worker {pid} stopped{}",
                process::describe(status)
            );
        }
        self.pool.stopped(self.slot);
    }
}

impl Drop for Supervisor {
    /// Nothing would ever answer the calls routed here, so the dispatcher fails them; the
    /// worker is killed with its `Child` (kill_on_drop).
    fn drop(&mut self) {
        self.pool.supervisor_dropped(self.slot);
    }
}

/// Kills and reaps a worker, lets its reader deliver the replies already in the pipe, and
/// returns its exit status and the quoted tail of its stderr.
async fn retire(mut worker: LiveWorker) -> (Option<std::process::ExitStatus>, String) {
    let status = process::stop(&mut worker.child).await;
    // With the process gone its pipes reach EOF, unless a child of it still holds them.
    let _ = tokio::time::timeout(READER_DRAIN_GRACE, &mut worker.reader).await;
    worker.reader.abort();
    let _ = tokio::time::timeout(READER_DRAIN_GRACE, &mut worker.stderr_task).await;
    worker.stderr_task.abort();
    (status, worker.stderr_tail.quoted())
}

/// Reads replies from the worker's stdout and hands each to the dispatcher, until the stream
/// ends or breaks; then reports the worker gone.
async fn read_replies(
    mut stdout: BufReader<ChildStdout>,
    pool: Arc<dyn Pool>,
    events: mpsc::UnboundedSender<Event>,
    (slot, generation): (usize, u64),
    pid: u32,
    max_reply_bytes: usize,
) {
    let reason = loop {
        match wire::read_frame_timed(&mut stdout, max_reply_bytes).await {
            Ok(Some((payload, first_bytes_at))) => {
                match wire::decode_payload::<ReplyEnvelope>(&payload) {
                    Ok(ReplyEnvelope { id: Some(id), .. }) => {
                        pool.deliver(slot, generation, id, Reply { payload, first_bytes_at })
                    }
                    Ok(ReplyEnvelope { id: None, error, .. }) => {
                        // About no request of ours (a frame the worker could not read): a bug to
                        // log, not a reason to stop.
                        tracing::warn!(pid, "worker reported an error about no request: {error:?}");
                    }
                    Err(error) => break format!("wrote a frame this client cannot read ({error})"),
                }
            }
            Ok(None) => break "closed its stdout".to_owned(),
            Err(error) => break format!("broke the frame stream ({error})"),
        }
    };
    let _ = events.send(Event::WorkerGone { generation, reason });
}
