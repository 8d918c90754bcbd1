//! One worker of the pool and its supervisor: the process, its stdin lane (written by the
//! callers when idle, else by its writer task), its reader task, the hang watch and the
//! restart budget. The requests themselves belong to the dispatcher above (`dispatch.rs`),
//! which this module knows only as the [`Pool`] trait: a supervisor tells it when its worker
//! is ready, what the worker answered, and when the worker is gone, and the dispatcher decides
//! where requests go.
//!
//! ```text
//!   dispatcher ── frames routed to this worker ──▶ FrameSender::send ──▶ stdin: the caller
//!     writes its own frame when the stream is idle, else the writer task (see FrameSender)
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
//!     backoff ─▶ start_worker ─▶ install(): new reader/writer, Pool::ready (the dispatcher
//!     routes to it again, held requests first)
//!   a replacement that says why it cannot start (failed hello) ─▶ Pool::gave_up at once
//!
//!   the supervisor task dropped without closing (its tokio runtime shut down, or a panic)
//!     ─▶ Drop: Pool::supervisor_dropped, which fails every waiting and later call at once;
//!        the worker is killed (kill_on_drop)
//! ```
//!
//! Events carry the generation of the worker they are about, so a late event about a worker
//! already replaced is ignored.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::WorkerConfig;
use crate::process::{self, StderrTail};
use crate::types::{EmbeddingError, EmbeddingResult};
use crate::wire::{self, ReadyHello, ReplyEnvelope};

pub(crate) use crate::process::StartedWorker;

/// A frame shared by the dispatcher's pending table (for re-sending) and the worker's stdin
/// lane ([`FrameSender`]).
pub(crate) type Frame = Arc<OutFrame>;

/// One request's whole frame, and for a traced request when it was first written whole.
pub(crate) struct OutFrame {
    bytes: Vec<u8>,
    written_at: Option<OnceLock<std::time::Instant>>,
}

impl OutFrame {
    pub(crate) fn new(bytes: Vec<u8>, traced: bool) -> Frame {
        Arc::new(Self { bytes, written_at: traced.then(OnceLock::new) })
    }

    /// The length prefix and payload.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// For a traced frame: the frame has been handed whole to the worker's stdin (the first
    /// time counts: a frame sent again to a new worker keeps its first time).
    fn mark_written(&self) {
        if let Some(written_at) = &self.written_at {
            let _ = written_at.set(std::time::Instant::now());
        }
    }

    /// When a traced frame was first written whole; `None` for an untraced one, or one not
    /// written yet.
    pub(crate) fn written_at(&self) -> Option<std::time::Instant> {
        self.written_at.as_ref().and_then(|at| at.get().copied())
    }
}

/// A reply frame's payload as the reader read it.
pub(crate) struct Reply {
    pub payload: Vec<u8>,
    /// When its frame's first bytes were read.
    pub first_bytes_at: std::time::Instant,
}
/// Where the dispatcher puts the frames routed to one worker ([`FrameSender::send`]): the
/// worker's stdin, written by the caller itself when nobody else is writing, else by the
/// worker's writer task. Dropping it closes the worker's stdin once every frame sent before is
/// written.
///
/// ```text
///   send(frame) ─▶ lane lock ─▶ stdin idle and nothing queued? ─▶ the caller writes the frame
///                    │              now, as far as the pipe takes it without waiting (never
///                    │              awaits, never blocks) ─▶ all of it: done
///                    └─ else (writer busy, or the pipe full) ─▶ queue (the rest of) the frame
///                         ─▶ writer task: takes stdin out of the lane, writes the queue in
///                            order, flushes, puts stdin back once the queue is empty
/// ```
///
/// Frames go out in the order of `send` and never interleave: a caller writes only while the
/// queue is empty and the writer task does not hold the stream, and whatever part of its frame
/// the pipe did not take is queued first. The lane's lock is never held across an await: a
/// worker that stops reading fills the pipe, the caller queues what is left and returns, and
/// only the writer task waits (until the worker reads again, or is killed and its stdin
/// breaks).
pub(crate) struct FrameSender {
    lane: Arc<Lane>,
}

impl FrameSender {
    /// Writes `frame` to the worker's stdin after every frame sent before it: at once, by the
    /// calling thread, when the stream is idle and the pipe has room; what is left is handed
    /// to the writer task. Returns without waiting in either case; a worker whose stdin broke
    /// is reported by the writer task.
    pub(crate) fn send(&self, frame: Frame) {
        let mut lane = self.lane.lock();
        let mut written = 0;
        if cfg!(unix) && lane.queue.is_empty() {
            if let Some(stdin) = lane.idle.as_mut() {
                written = write_now(stdin.get_mut(), frame.bytes(), &self.lane.no_wake);
                if written == frame.bytes().len() {
                    frame.mark_written();
                    return;
                }
            }
        }
        lane.queue.push_back((frame, written));
        drop(lane);
        self.lane.work.notify_one();
    }
}

impl Drop for FrameSender {
    /// The dispatcher routes nothing more here: the writer task writes what is queued and
    /// closes the worker's stdin.
    fn drop(&mut self) {
        self.lane.lock().open = false;
        self.lane.work.notify_one();
    }
}

/// One worker's stdin, shared by the callers (through the [`FrameSender`]) and its writer task.
struct Lane {
    state: Mutex<LaneState>,
    /// Wakes the writer task: a frame was queued, or the sender was dropped.
    work: Notify,
    /// The waker of a caller's write: nobody waits for its readiness (what the pipe does not
    /// take at once goes to the writer task, which waits with its own waker).
    no_wake: Waker,
}

struct LaneState {
    /// The worker's stdin while nobody is writing to it, its buffer empty. The writer task
    /// takes it out while it writes.
    idle: Option<BufWriter<ChildStdin>>,
    /// What the writer task has to write, in order: frames, each with the bytes of it
    /// already written (by a caller whose write the pipe took only in part).
    queue: VecDeque<(Frame, usize)>,
    /// False once the sender is dropped.
    open: bool,
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, LaneState> {
        // Every update is one step: a panic elsewhere leaves the lane consistent.
        self.state.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

struct NoWake;

impl std::task::Wake for NoWake {
    fn wake(self: Arc<Self>) {}
}

/// Writes what the pipe takes of `bytes` right now, without waiting; returns how many bytes
/// were written (0 when the pipe is full or the write failed: the writer task then meets the
/// same error and reports it).
fn write_now(stdin: &mut ChildStdin, mut bytes: &[u8], no_wake: &Waker) -> usize {
    let mut context = Context::from_waker(no_wake);
    let mut written = 0;
    while !bytes.is_empty() {
        match Pin::new(&mut *stdin).poll_write(&mut context, bytes) {
            Poll::Ready(Ok(count)) if count > 0 => {
                written += count;
                bytes = &bytes[count..];
            }
            _ => break,
        }
    }
    written
}

/// A new lane over `stdin` and its sender; `write_frames` is its writer task.
fn lane(stdin: ChildStdin) -> (FrameSender, Arc<Lane>) {
    let lane = Arc::new(Lane {
        state: Mutex::new(LaneState {
            idle: Some(BufWriter::with_capacity(STDIN_BUFFER_BYTES, stdin)),
            queue: VecDeque::new(),
            open: true,
        }),
        work: Notify::new(),
        no_wake: Waker::from(Arc::new(NoWake)),
    });
    (FrameSender { lane: lane.clone() }, lane)
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

/// Starts one worker and waits for its hello (no retries).
pub(crate) async fn start_worker(config: &WorkerConfig) -> EmbeddingResult<StartedWorker> {
    process::start_worker(config).await.map_err(|failure| failure.error)
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

/// Hands a started worker to a new supervisor task of `slot` on the current tokio runtime;
/// the worker is ready for the dispatcher when this returns.
pub(crate) fn supervise(
    pool: Arc<dyn Pool>,
    slot: usize,
    started: StartedWorker,
) -> SupervisorHandle {
    let (events, events_rx) = mpsc::unbounded_channel();
    let mut supervisor = Supervisor {
        pool,
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
        let (frames, lane) = lane(stdin);
        tokio::spawn(write_frames(lane, self.events_tx.clone(), generation));
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
            match process::start_worker(self.config()).await {
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

/// The writer task of a worker's stdin lane: whenever frames are queued, takes the stream out
/// of the lane, writes them in order (several at once are flushed together), and puts the
/// stream back once nothing is queued. Ends when the dispatcher drops the sender (after the
/// frames queued before: the worker's stdin then closes) or when a write fails (the worker is
/// reported gone).
async fn write_frames(lane: Arc<Lane>, events: mpsc::UnboundedSender<Event>, generation: u64) {
    let mut written = Vec::new();
    loop {
        let next = {
            let mut state = lane.lock();
            match (state.queue.is_empty(), state.open) {
                (false, _) => Next::Write(state.idle.take()),
                (true, true) => Next::Wait,
                (true, false) => Next::Close(state.idle.take()),
            }
        };
        let mut stdin = match next {
            Next::Wait => {
                lane.work.notified().await;
                continue;
            }
            Next::Close(stdin) => {
                if let Some(mut stdin) = stdin {
                    let _ = stdin.shutdown().await;
                }
                return;
            }
            // only this task takes the stream out of the lane, and it puts it back before
            // it waits: it is there
            Next::Write(None) => return,
            Next::Write(Some(stdin)) => stdin,
        };
        loop {
            if let Err(error) = write_queued(&lane, &mut stdin, &mut written).await {
                let reason = format!("stopped reading its stdin ({error})");
                let _ = events.send(Event::WorkerGone { generation, reason });
                return;
            }
            let mut state = lane.lock();
            if state.queue.is_empty() {
                state.idle = Some(stdin);
                break;
            }
        }
    }
}

enum Next {
    Write(Option<BufWriter<ChildStdin>>),
    Wait,
    Close(Option<BufWriter<ChildStdin>>),
}

/// Writes the lane's queue to `stdin` until it is empty, and flushes.
async fn write_queued(
    lane: &Lane,
    stdin: &mut BufWriter<ChildStdin>,
    written: &mut Vec<Frame>,
) -> std::io::Result<()> {
    loop {
        let next = lane.lock().queue.pop_front();
        let Some((frame, from)) = next else { break };
        stdin.write_all(&frame.bytes()[from..]).await?;
        written.push(frame);
    }
    stdin.flush().await?;
    written.drain(..).for_each(|frame| frame.mark_written());
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const SENDERS: u32 = 4;
    const FRAMES_EACH: u32 = 200;
    const BODY_BYTES: usize = 2000;

    /// A frame of `BODY_BYTES` bytes naming its sender and its number, filled with a byte of
    /// both, so that a frame cut or interleaved with another is seen.
    fn numbered_frame(sender: u32, number: u32) -> Frame {
        let length = (8 + BODY_BYTES) as u32;
        let mut bytes = length.to_be_bytes().to_vec();
        bytes.extend(sender.to_be_bytes());
        bytes.extend(number.to_be_bytes());
        bytes.extend(std::iter::repeat((sender * 31 + number) as u8).take(BODY_BYTES));
        OutFrame::new(bytes, false)
    }

    /// Several threads send at once to a stdin that reads nothing for a while, then reads fast:
    /// callers' own writes fill the pipe, the rest of a frame goes to the writer task, which
    /// takes the stream over while callers go on sending and hands it back when its queue is
    /// empty, again and again over 1.6 MB. Every frame comes out whole, each sender's in order.
    #[test]
    fn frames_sent_from_many_threads_stay_whole_and_in_order_through_a_full_pipe() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        runtime.block_on(async {
            let mut child = tokio::process::Command::new("sh")
                .args(["-c", "sleep 0.005; exec cat"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdout = child.stdout.take().unwrap();
            let reading = tokio::spawn(async move {
                let mut all = Vec::new();
                stdout.read_to_end(&mut all).await.map(|_| all)
            });
            let (sender, lane) = lane(child.stdin.take().unwrap());
            let (events, _events_kept) = mpsc::unbounded_channel();
            let writer = tokio::spawn(write_frames(lane, events, 0));
            let sender = Arc::new(sender);
            let threads: Vec<_> = (0..SENDERS)
                .map(|who| {
                    let (sender, handle) = (sender.clone(), handle.clone());
                    std::thread::spawn(move || {
                        let _runtime = handle.enter();
                        for number in 0..FRAMES_EACH {
                            sender.send(numbered_frame(who, number));
                            if number % 8 == 0 {
                                // pauses: the pipe drains and callers write themselves again
                                std::thread::sleep(Duration::from_micros(300));
                            }
                        }
                    })
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
            drop(sender); // the last one: the writer closes stdin after what is queued
            writer.await.unwrap();
            let all = reading.await.unwrap().unwrap();
            child.wait().await.unwrap();

            let mut next = vec![0u32; SENDERS as usize];
            let mut rest = &all[..];
            while !rest.is_empty() {
                let length = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                assert_eq!(length, 8 + BODY_BYTES, "a frame cut or interleaved");
                let payload = &rest[4..4 + length];
                let who = u32::from_be_bytes(payload[..4].try_into().unwrap());
                let number = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                assert_eq!(number, next[who as usize], "sender {who}'s frames out of order");
                let fill = (who * 31 + number) as u8;
                assert!(payload[8..].iter().all(|&byte| byte == fill), "a frame's body mixed");
                next[who as usize] += 1;
                rest = &rest[4 + length..];
            }
            assert_eq!(next, vec![FRAMES_EACH; SENDERS as usize], "frames lost");
        });
    }
}
