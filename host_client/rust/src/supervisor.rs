//! The supervisor: the table of requests waiting for replies, the task that keeps a worker
//! serving them, and the per-worker I/O tasks. [`Service`] is what the client holds.
//!
//! ```text
//!   Service::submit ─▶ pending: id ─▶ {frame, oneshot, attempts} ─▶ writer task ─▶ stdin
//!   reader task: frame from stdout ─▶ routed by id ─▶ the caller's oneshot
//!
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
//!
//!   the supervisor task dropped without closing (its tokio runtime shut down, or a panic)
//!     ─▶ Drop: slot = Failed(ServiceUnavailable), every pending call fails at once, every
//!        later call too; the worker is killed (kill_on_drop)
//! ```
//!
//! Events carry the generation of the worker they are about, so a late event about a worker
//! already replaced is ignored. Callers never wait on a timer of their own: every wait of
//! theirs (in-flight permits, a reply) ends when the supervisor answers, gives up, or is
//! dropped, so a call works from any runtime (the channels are runtime-independent).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::WorkerConfig;
use crate::process::{self, start_worker, StartedWorker, StderrTail};
use crate::types::{EmbeddingError, EmbeddingResult};
use crate::wire::{self, ReadyHello, ReplyEnvelope};

/// A frame shared by the pending table (for re-sending) and the writer task.
type Frame = Arc<Vec<u8>>;

/// One wire request waiting for its reply.
struct Pending {
    frame: Frame,
    reply: oneshot::Sender<EmbeddingResult<Vec<u8>>>,
    /// The worker generation it was last written to, and when; `None` while no worker runs.
    sent_to: Option<(u64, std::time::Instant)>,
    /// Workers it has been written to.
    attempts: u32,
    /// Its share of `max_in_flight_texts`, given back when the entry goes.
    _texts: Option<OwnedSemaphorePermit>,
    /// Whether its reply shows the worker's model path is alive (a `ping` is answered by the
    /// worker's reader alone, so it does not).
    shows_progress: bool,
}

/// Where new requests go.
enum Slot {
    /// A worker is serving; frames for it go through `frames` to its writer task.
    Running {
        generation: u64,
        frames: mpsc::UnboundedSender<Frame>,
        last_reply_at: std::time::Instant,
    },
    /// The worker is being replaced: requests wait in `pending` and are written to the next one.
    Starting,
    /// The supervisor gave up or is gone; every call fails with this error.
    Failed(EmbeddingError),
    /// `close()` ran or the last handle was dropped.
    Closed,
}

struct Shared {
    pending: HashMap<u64, Pending>,
    slot: Slot,
    /// The latest ready worker's hello (kept across restarts for model facts and limits).
    hello: ReadyHello,
}

/// What the service handle, the supervisor and the I/O tasks share.
struct State {
    config: WorkerConfig,
    shared: Mutex<Shared>,
    in_flight_texts: Arc<Semaphore>,
    next_id: AtomicU64,
}

impl State {
    /// The shared table; never held across an await.
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves the table consistent (single-step updates).
        self.shared.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Hands a reply to the caller waiting for request `id`, if any still is.
    fn deliver(&self, id: u64, generation: u64, payload: Vec<u8>) {
        let pending = {
            let mut shared = self.lock();
            let pending = shared.pending.remove(&id);
            let shows_progress = pending.as_ref().is_some_and(|p| p.shows_progress);
            if let Slot::Running { generation: current, last_reply_at, .. } = &mut shared.slot {
                if *current == generation && shows_progress {
                    *last_reply_at = std::time::Instant::now();
                }
            }
            pending
        };
        // Unknown ids are replies to requests already answered by an earlier worker, or whose
        // caller has gone: nothing waits for them.
        if let Some(pending) = pending {
            let _ = pending.reply.send(Ok(payload));
        }
    }

    /// Stops taking calls for good: closed (`None`) or failed with `failure`. Every call still
    /// waiting fails now, every later one at once.
    fn stop_serving(&self, failure: Option<EmbeddingError>) {
        let mut shared = self.lock();
        let error = failure.clone().unwrap_or_else(|| {
            EmbeddingError::ServiceUnavailable(
                "the client was closed before the worker answered".into(),
            )
        });
        shared.slot = failure.map_or(Slot::Closed, Slot::Failed);
        for (_, pending) in shared.pending.drain() {
            let _ = pending.reply.send(Err(error.clone()));
        }
        drop(shared);
        // callers waiting for in-flight permits wake up and see the slot
        self.in_flight_texts.close();
    }
}

fn closed() -> EmbeddingError {
    EmbeddingError::ServiceUnavailable("the client is closed".into())
}

fn supervisor_gone() -> EmbeddingError {
    EmbeddingError::ServiceUnavailable(
        "the client's supervisor has stopped: the tokio runtime that spawned the client shut \
         down (or the supervisor panicked); spawn a new client"
            .into(),
    )
}

/// A supervised worker, as its client sees it. Dropping it tells the supervisor to stop the
/// worker.
pub(crate) struct Service {
    state: Arc<State>,
    events: mpsc::UnboundedSender<Event>,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.events.send(Event::HandlesDropped);
    }
}

impl Service {
    /// Starts a worker, waits for its hello and spawns the supervisor task on the current
    /// tokio runtime. Fails fast, without retrying, when the worker cannot start.
    pub(crate) async fn start(config: WorkerConfig) -> EmbeddingResult<Self> {
        if let Some(problem) = config.problem() {
            return Err(EmbeddingError::InvalidInput(format!("WorkerConfig: {problem}")));
        }
        let started = start_worker(&config).await.map_err(|failure| failure.error)?;
        let state = Arc::new(State {
            in_flight_texts: Arc::new(Semaphore::new(
                config.max_in_flight_texts.min(Semaphore::MAX_PERMITS),
            )),
            config,
            shared: Mutex::new(Shared {
                pending: HashMap::new(),
                slot: Slot::Starting,
                hello: started.hello.clone(),
            }),
            next_id: AtomicU64::new(1),
        });
        let (events, events_rx) = mpsc::unbounded_channel();
        let mut supervisor = Supervisor::new(state.clone(), events.clone(), events_rx);
        supervisor.install(started);
        tokio::spawn(supervisor.run());
        Ok(Self { state, events })
    }

    pub(crate) fn config(&self) -> &WorkerConfig {
        &self.state.config
    }

    /// The latest worker's hello while the service can serve (also while a replacement
    /// starts); the reason it cannot once it gave up, was closed or lost its supervisor.
    pub(crate) fn hello(&self) -> EmbeddingResult<ReadyHello> {
        let shared = self.state.lock();
        match &shared.slot {
            Slot::Failed(error) => Err(error.clone()),
            Slot::Closed => Err(closed()),
            Slot::Running { .. } | Slot::Starting => Ok(shared.hello.clone()),
        }
    }

    /// The pid of the worker serving now.
    pub(crate) fn worker_pid(&self) -> Option<u32> {
        let shared = self.state.lock();
        matches!(shared.slot, Slot::Running { .. }).then_some(shared.hello.pid)
    }

    /// See `WorkerClient::close`.
    pub(crate) async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.events.send(Event::Close { done }).is_ok() {
            // an error here: the supervisor was dropped, which fails everything by itself
            let _ = finished.await;
        }
    }

    /// Enters one wire request in the pending table and writes it to the worker if one runs
    /// (else the supervisor writes it to the next one). Waits first for `texts` in-flight
    /// permits (at most `max_in_flight_texts`: the client's chunks never hold more).
    pub(crate) async fn submit(
        &self,
        texts: usize,
        shows_progress: bool,
        encode: impl FnOnce(u64) -> EmbeddingResult<Vec<u8>>,
    ) -> EmbeddingResult<PendingReply> {
        let state = &self.state;
        let permit = match texts {
            0 => None,
            _ => {
                let wanted = u32::try_from(texts).unwrap_or(u32::MAX);
                match state.in_flight_texts.clone().acquire_many_owned(wanted).await {
                    Ok(permit) => Some(permit),
                    // closed: the service stopped; the slot says why
                    Err(_) => return Err(self.hello().err().unwrap_or_else(closed)),
                }
            }
        };
        let id = state.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = Arc::new(encode(id)?);
        let (reply, receiver) = oneshot::channel();
        let mut shared = state.lock();
        let sent_to = match &shared.slot {
            Slot::Running { generation, frames, .. } => {
                // A closed channel means the worker just died; the supervisor re-sends.
                let _ = frames.send(frame.clone());
                Some((*generation, std::time::Instant::now()))
            }
            Slot::Starting => None,
            Slot::Failed(error) => return Err(error.clone()),
            Slot::Closed => return Err(closed()),
        };
        let attempts = u32::from(sent_to.is_some());
        let pending = Pending { frame, reply, sent_to, attempts, _texts: permit, shows_progress };
        shared.pending.insert(id, pending);
        drop(shared);
        Ok(PendingReply { state: state.clone(), id, reply: Some(receiver) })
    }
}

/// A reply on its way; dropping it withdraws the request (its texts stop counting against
/// `max_in_flight_texts`).
pub(crate) struct PendingReply {
    state: Arc<State>,
    id: u64,
    reply: Option<oneshot::Receiver<EmbeddingResult<Vec<u8>>>>,
}

impl PendingReply {
    /// The reply's payload. Ends when the worker answers, when the request runs out of
    /// attempts, or when the service stops (a dropped sender means exactly that).
    pub(crate) async fn wait(mut self) -> EmbeddingResult<Vec<u8>> {
        let reply = self.reply.as_mut().expect("a reply is awaited once");
        // Borrowed, not taken: if this future is dropped mid-wait, `drop` still withdraws.
        let result = reply.await.unwrap_or_else(|_| Err(supervisor_gone()));
        self.reply = None;
        result
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        if self.reply.is_some() {
            self.state.lock().pending.remove(&self.id);
        }
    }
}

/// How long the reader of a killed worker gets to deliver the replies it had already read.
const READER_DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Bytes buffered towards the worker's stdin before a write system call.
const STDIN_BUFFER_BYTES: usize = 64 * 1024;

enum Event {
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

struct Supervisor {
    state: Arc<State>,
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
    fn new(
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
    fn install(&mut self, started: StartedWorker) {
        self.generation += 1;
        let generation = self.generation;
        let StartedWorker { child, stdin, stdout, hello, stderr_tail, stderr_task, ready_at } =
            started;
        let pid = hello.pid;
        self.last_pid = pid;
        tracing::info!(
            pid,
            generation,
            "worker {pid} ready: models {}, providers {:?}",
            hello.model_ids(),
            hello.providers
        );
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
            tracing::warn!(pid, "{last_reason}; starting a new worker for {unanswered} requests");
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
                Err(failure) => {
                    last_reason = failure.error.to_string();
                    tracing::warn!("a new worker did not start: {last_reason}");
                }
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
        tracing::error!(pid = self.last_pid, "giving up: {error}");
        self.state.stop_serving(Some(error));
    }

    /// Graceful stop: the worker gets EOF on stdin, answers what it holds and exits (killed
    /// after `close_timeout`); calls still waiting afterwards fail.
    async fn close(&mut self) {
        // Dropping the sender ends the writer task, which closes the worker's stdin.
        self.state.lock().slot = Slot::Closed;
        if let Some(mut worker) = self.worker.take() {
            let close_timeout = self.config().close_timeout;
            let status = process::exit_status_within(&mut worker.child, close_timeout).await;
            let _ = tokio::time::timeout(READER_DRAIN_GRACE, &mut worker.reader).await;
            worker.reader.abort();
            worker.stderr_task.abort();
            let pid = worker.pid;
            tracing::info!(pid, "worker {pid} stopped{}", process::describe(status));
        }
        self.state.stop_serving(None);
    }
}

impl Drop for Supervisor {
    /// The supervisor task is dropped without having stopped: its runtime shut down, or it
    /// panicked. Nothing would ever answer the calls waiting, so they fail now, and so does
    /// every later call; the worker is killed with its `Child` (kill_on_drop).
    fn drop(&mut self) {
        let failure = match &self.state.lock().slot {
            // stopped already (a close cut short may have left calls waiting)
            Slot::Closed => None,
            Slot::Failed(error) => Some(error.clone()),
            Slot::Running { .. } | Slot::Starting => {
                let error = supervisor_gone();
                tracing::error!(pid = self.last_pid, "{error}");
                Some(error)
            }
        };
        self.state.stop_serving(failure);
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
                    tracing::warn!(pid, "worker reported an error about no request: {error:?}");
                }
                Err(error) => break format!("wrote a frame this client cannot read ({error})"),
            },
            Ok(None) => break "closed its stdout".to_owned(),
            Err(error) => break format!("broke the frame stream ({error})"),
        }
    };
    let _ = events.send(Event::WorkerGone { generation, reason });
}
