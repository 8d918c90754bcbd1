//! The supervisor task and the per-worker I/O tasks.
//!
//! ```text
//!   reader task: stdout EOF / broken frame ─┐
//!   writer task: write to stdin failed ─────┼─▶ Event::WorkerGone(generation) ─┐
//!   deadline: no reply for request_timeout ─┘   (hung: same path)             │
//!                                                                           ▼
//!   replace(): slot = Starting (new calls wait in `pending`) ─▶ SIGKILL + reap old worker,
//!     let its reader deliver what it had read ─▶ charge one attempt to each request it held
//!     (over max_attempts: that call fails) ─▶ consecutive restarts > restart_limit? give up
//!     (slot = Failed, every pending call fails) ─▶ backoff ─▶ start_worker ─▶ install():
//!     new reader/writer, every pending frame written again in id order, slot = Running
//!   a replacement that says why it cannot start (failed hello) ─▶ give up at once
//! ```
//!
//! Events carry the generation of the worker they are about, so a late event about a worker
//! already replaced is ignored.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::{Frame, Slot, State};
use crate::config::WorkerConfig;
use crate::process::{self, start_worker, StartedWorker, StderrTail};
use crate::types::EmbeddingError;
use crate::wire::{self, ReplyEnvelope};

/// How long the reader of a killed worker gets to deliver the replies it had already read.
const READER_DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Bytes buffered towards the worker's stdin before a write system call.
const STDIN_BUFFER_BYTES: usize = 64 * 1024;

pub(crate) enum Event {
    /// The worker of `generation` cannot serve any more (`reason` says what was seen).
    WorkerGone { generation: u64, reason: String },
    /// `WorkerClient::close`: stop gracefully, then signal `done`.
    Close { done: oneshot::Sender<()> },
    /// The last `WorkerClient` handle is gone.
    HandlesDropped,
}

/// Why the requests a worker held are being sent elsewhere.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Loss {
    Died,
    Hung,
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

pub(crate) struct Supervisor {
    state: Arc<State>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    worker: Option<LiveWorker>,
    generation: u64,
    consecutive_restarts: u32,
    /// The pid of the latest worker, to label the client's notes after it is gone.
    last_pid: u32,
}

enum Wake {
    Event(Option<Event>),
    Deadline,
}

impl Supervisor {
    pub(crate) fn new(
        state: Arc<State>,
        events_tx: mpsc::UnboundedSender<Event>,
        events: mpsc::UnboundedReceiver<Event>,
    ) -> Self {
        Self {
            state,
            events_tx,
            events,
            worker: None,
            generation: 0,
            consecutive_restarts: 0,
            last_pid: 0,
        }
    }

    fn config(&self) -> &WorkerConfig {
        &self.state.config
    }

    fn note(&self, pid: u32, message: &str) {
        (self.config().stderr_sink)(pid, &format!("akidb-embed-client: {message}"));
    }

    pub(crate) async fn run(mut self) {
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

    /// When the earliest request held by the current worker runs out of time. Requests written
    /// later have later deadlines, so waking at most every `request_timeout` misses none.
    fn next_deadline(&self) -> Instant {
        let timeout = self.config().request_timeout;
        let mut earliest = Instant::now() + timeout;
        let shared = self.state.lock();
        if let Slot::Running { generation, last_reply_at, .. } = &shared.slot {
            for (current, sent_at) in shared.pending.values().filter_map(|p| p.sent_to) {
                if current == *generation {
                    let deadline = Instant::from_std(sent_at.max(*last_reply_at)) + timeout;
                    earliest = earliest.min(deadline);
                }
            }
        }
        earliest
    }

    /// A reason when the current worker holds a request and has answered nothing for
    /// `request_timeout` since it was written.
    fn hung_worker(&self) -> Option<String> {
        let timeout = self.config().request_timeout;
        let now = std::time::Instant::now();
        let shared = self.state.lock();
        let Slot::Running { generation, last_reply_at, .. } = &shared.slot else {
            return None;
        };
        let held = shared
            .pending
            .values()
            .filter_map(|p| p.sent_to)
            .filter(|(current, _)| current == generation)
            .map(|(_, sent_at)| sent_at.max(*last_reply_at))
            .filter(|&quiet_since| now.duration_since(quiet_since) >= timeout)
            .count();
        (held > 0).then(|| format!("answered nothing for {timeout:?} while holding requests"))
    }

    /// Hands a started worker its I/O tasks and writes every pending request to it.
    pub(crate) fn install(&mut self, started: StartedWorker) {
        self.generation += 1;
        let generation = self.generation;
        let StartedWorker { child, stdin, stdout, hello, stderr_tail, stderr_task, ready_at } =
            started;
        let pid = hello.pid;
        self.last_pid = pid;
        let max_reply_bytes = hello.limits.max_frame_bytes.max(wire::DEFAULT_MAX_FRAME_BYTES);
        let (frames, frames_rx) = mpsc::unbounded_channel();
        tokio::spawn(write_frames(stdin, frames_rx, self.events_tx.clone(), generation));
        let reader = tokio::spawn(read_replies(
            stdout,
            self.state.clone(),
            self.events_tx.clone(),
            generation,
            pid,
            max_reply_bytes,
        ));
        {
            let mut shared = self.state.lock();
            let now = std::time::Instant::now();
            let mut ids: Vec<u64> = shared.pending.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                if let Some(pending) = shared.pending.get_mut(&id) {
                    let _ = frames.send(pending.frame.clone());
                    pending.sent_to = Some((generation, now));
                    pending.attempts += 1;
                }
            }
            shared.hello = hello;
            shared.slot = Slot::Running { generation, frames, last_reply_at: now };
        }
        self.worker = Some(LiveWorker {
            generation,
            child,
            pid,
            ready_at: Instant::from_std(ready_at),
            reader,
            stderr_tail,
            stderr_task,
        });
    }

    /// Replaces the current worker after it died or hung (see the module picture).
    async fn replace(&mut self, reason: String, loss: Loss) {
        self.state.lock().slot = Slot::Starting;
        let mut last_reason = reason;
        if let Some(worker) = self.worker.take() {
            let pid = worker.pid;
            let lived = worker.ready_at.elapsed();
            let generation = worker.generation;
            let (status, stderr) = retire(worker).await;
            last_reason =
                format!("worker {pid} {last_reason}{}{stderr}", process::describe(status));
            self.charge_attempts(generation, loss, &last_reason);
            if lived >= self.config().stable_start_time {
                self.consecutive_restarts = 0;
            }
            let unanswered = self.state.lock().pending.len();
            let note = format!("{last_reason}; starting a new worker for {unanswered} requests");
            self.note(pid, &note);
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
            match start_worker(self.config()).await {
                Ok(started) => {
                    self.install(started);
                    return;
                }
                Err(failure) if !failure.retryable => {
                    self.give_up(failure.error);
                    return;
                }
                Err(failure) => last_reason = failure.error.to_string(),
            }
        }
    }

    /// Costs every request the lost worker held one attempt; those with none left fail.
    fn charge_attempts(&self, generation: u64, loss: Loss, reason: &str) {
        let max_attempts = self.config().max_attempts;
        let mut shared = self.state.lock();
        let spent: Vec<u64> = shared
            .pending
            .iter()
            .filter(|(_, p)| {
                p.attempts >= max_attempts && p.sent_to.is_some_and(|(g, _)| g == generation)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in spent {
            if let Some(pending) = shared.pending.remove(&id) {
                let what = match loss {
                    Loss::Hung => "request timed out",
                    Loss::Died => "the worker died",
                };
                let _ = pending.reply.send(Err(EmbeddingError::ServiceUnavailable(format!(
                    "{what} on each of {} attempts; last: {reason}",
                    pending.attempts
                ))));
            }
        }
    }

    /// Stops for good: every waiting call and every later one fails with `error`.
    fn give_up(&mut self, error: EmbeddingError) {
        self.note(self.last_pid, &format!("giving up: {error}"));
        let mut shared = self.state.lock();
        shared.slot = Slot::Failed(error.clone());
        for (_, pending) in shared.pending.drain() {
            let _ = pending.reply.send(Err(error.clone()));
        }
    }

    /// Graceful stop: the worker gets EOF on stdin, answers what it holds and exits (killed
    /// after `close_timeout`); calls still waiting afterwards fail.
    async fn close(&mut self) {
        // Dropping the sender ends the writer task, which closes the worker's stdin.
        self.state.lock().slot = Slot::Closed;
        if let Some(mut worker) = self.worker.take() {
            let close_timeout = self.config().close_timeout;
            process::exit_status_within(&mut worker.child, close_timeout).await;
            let _ = tokio::time::timeout(READER_DRAIN_GRACE, &mut worker.reader).await;
            worker.reader.abort();
            worker.stderr_task.abort();
        }
        let mut shared = self.state.lock();
        for (_, pending) in shared.pending.drain() {
            let _ = pending.reply.send(Err(EmbeddingError::ServiceUnavailable(
                "the client was closed before the worker answered".into(),
            )));
        }
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

/// Writes frames to the worker's stdin in the order they were queued, batching whatever is
/// queued into one flush. Ends (closing stdin) when the client stops routing to this worker.
async fn write_frames(
    stdin: ChildStdin,
    mut frames: mpsc::UnboundedReceiver<Frame>,
    events: mpsc::UnboundedSender<Event>,
    generation: u64,
) {
    let mut stdin = BufWriter::with_capacity(STDIN_BUFFER_BYTES, stdin);
    while let Some(frame) = frames.recv().await {
        let mut written = stdin.write_all(&frame).await;
        while written.is_ok() {
            match frames.try_recv() {
                Ok(frame) => written = stdin.write_all(&frame).await,
                Err(_) => break,
            }
        }
        if written.is_ok() {
            written = stdin.flush().await;
        }
        if let Err(error) = written {
            let reason = format!("stopped reading its stdin ({error})");
            let _ = events.send(Event::WorkerGone { generation, reason });
            return;
        }
    }
    let _ = stdin.shutdown().await;
}

/// Reads replies from the worker's stdout and routes each to its caller by id, until the
/// stream ends or breaks; then reports the worker gone.
async fn read_replies(
    mut stdout: BufReader<ChildStdout>,
    state: Arc<State>,
    events: mpsc::UnboundedSender<Event>,
    generation: u64,
    pid: u32,
    max_reply_bytes: usize,
) {
    let reason = loop {
        match wire::read_frame(&mut stdout, max_reply_bytes).await {
            Ok(Some(payload)) => match wire::decode_payload::<ReplyEnvelope>(&payload) {
                Ok(ReplyEnvelope { id: Some(id), .. }) => state.deliver(id, generation, payload),
                Ok(ReplyEnvelope { id: None, error, .. }) => {
                    // About no request of ours (a frame the worker could not read): a bug to
                    // log, not a reason to stop.
                    let message = format!(
                        "akidb-embed-client: worker reported an error about no request: {error:?}"
                    );
                    (state.config.stderr_sink)(pid, &message);
                }
                Err(error) => break format!("wrote a frame this client cannot read ({error})"),
            },
            Ok(None) => break "closed its stdout".to_owned(),
            Err(error) => break format!("broke the frame stream ({error})"),
        }
    };
    let _ = events.send(Event::WorkerGone { generation, reason });
}
