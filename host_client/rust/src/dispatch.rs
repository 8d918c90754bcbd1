//! The dispatcher: admission and routing over the pool's workers. It owns the table of wire
//! requests waiting for replies (`dispatch/table.rs`: each request with its route, loads and
//! routing computed from it) and applies the supervisors' news to it; each worker's process,
//! I/O and supervision are `supervisor.rs`'s, one supervisor per worker. [`Dispatcher`] is
//! what the client holds.
//!
//! ```text
//!   Dispatcher::submit: wait for in-flight text permits (max_in_flight_texts, whole pool)
//!     ─▶ pending: id ─▶ {frame, oneshot, attempts, texts, estimated tokens, route}
//!     ─▶ route: the ready worker with the fewest estimated tokens outstanding (ties in turn)
//!          ┌────────────────────┬──────────┴──────────┬─────────────────────┐
//!          ▼                    ▼                     ▼
//!     supervisor 0         supervisor 1     ...  supervisor N-1      (supervisor.rs)
//!     └ stdin ─▶ worker    └ stdin ─▶ worker       └ stdin ─▶ worker
//!       (written by the caller itself when idle, else by the worker's writer task)
//!       reader ─▶ deliver(id) ─▶ the caller's oneshot
//!
//!   a worker died or hung ─▶ Pool::lost: each request it held costs one attempt (none left:
//!     that call fails) and is routed again at once to another ready worker, or held until
//!     one is ready (with one worker: its replacement)
//!   a slot gives up (restart budget spent, or its worker refuses to start) ─▶ the others
//!     serve on; once every slot has given up, every waiting and later call fails with the
//!     last one's error
//!   a supervisor task dropped (its runtime shut down) ─▶ every waiting and later call fails
//!     at once with ServiceUnavailable
//! ```
//!
//! One lock guards the table and every worker's routing state (the pool's state is small, and
//! one lock keeps "no request lost" easy to see); it is never held across an await. Callers
//! never wait on a timer of their own: every wait of theirs (in-flight permits, a reply) ends
//! when a worker answers, a supervisor gives up, or the supervisors are dropped, so a call
//! works from any runtime (the channels are runtime-independent).

mod table;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{oneshot, Semaphore};

use crate::config::WorkerConfig;
use crate::process::{Spawner, WorkerCommand};
use crate::stdin_lane::{Frame, FrameSender, OutFrame};
use crate::supervisor::{self, Loss, Pool, Reply, StartedWorker, SupervisorHandle};
use crate::types::{EmbeddingError, EmbeddingResult};
use crate::wire::ReadyHello;
pub use table::{ClientStats, WorkerStats};
use table::{Delivery, Pending, Serving, SlotState, Table, WorkerSlot};

/// The client's instants of one traced request, from the encoding of its frame to its caller
/// running again with the reply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientTimes {
    pub encode_started: Instant,
    pub encoded: Instant,
    /// The frame was handed whole to the worker's stdin (`encoded` if it never was: a reply
    /// cannot come before its request, so this does not happen).
    pub written: Instant,
    /// The reader read the first bytes of the reply frame.
    pub reply_read: Instant,
    /// The reply was handed to the caller.
    pub delivered: Instant,
    /// The caller ran again with it.
    pub woke: Instant,
}

/// What the dispatcher, the supervisors and the I/O tasks share.
struct State {
    config: WorkerConfig,
    table: Mutex<Table>,
    in_flight_texts: Arc<Semaphore>,
    next_id: AtomicU64,
}

impl State {
    /// The shared table; never held across an await.
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves the table consistent (single-step updates).
        self.table.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Stops taking calls for good: closed (`None`) or failed with `failure`. Every call still
    /// waiting fails now, every later one at once.
    fn stop_serving(&self, failure: Option<EmbeddingError>) {
        let mut table = self.lock();
        let error = failure.clone().unwrap_or_else(|| {
            EmbeddingError::ServiceUnavailable(
                "the client was closed before the worker answered".into(),
            )
        });
        table.serving = failure.map_or(Serving::Closed, Serving::Failed);
        for slot in &mut table.slots {
            if matches!(slot.state, SlotState::Ready { .. } | SlotState::Starting) {
                slot.state = SlotState::Stopped;
            }
        }
        for (_, pending) in table.pending.drain() {
            let _ = pending.reply.send(Err(error.clone()));
        }
        drop(table);
        // callers waiting for in-flight permits wake up and see `serving`
        self.in_flight_texts.close();
    }
}

impl Pool for State {
    fn config(&self) -> &WorkerConfig {
        &self.config
    }

    fn ready(&self, slot: usize, generation: u64, hello: ReadyHello, frames: FrameSender) {
        let mut table = self.lock();
        if !matches!(table.serving, Serving::Open) {
            return; // dropping `frames` closes the new worker's stdin: it exits
        }
        let pid = hello.pid;
        table.hello = hello;
        let worker = &mut table.slots[slot];
        worker.readies += 1;
        worker.state = SlotState::Ready { generation, pid, frames, last_reply_at: Instant::now() };
        table.route_waiting();
    }

    fn deliver(&self, slot: usize, generation: u64, id: u64, reply: Reply) {
        let pending = {
            let mut table = self.lock();
            let pending = table.pending.remove(&id);
            let worker = &mut table.slots[slot];
            worker.answered += 1;
            if let SlotState::Ready { generation: current, last_reply_at, .. } = &mut worker.state {
                if *current == generation && pending.as_ref().is_some_and(|p| p.shows_progress) {
                    *last_reply_at = Instant::now();
                }
            }
            pending
        };
        // Unknown ids are replies to requests already answered by an earlier worker, or whose
        // caller has gone: nothing waits for them.
        if let Some(pending) = pending {
            let delivered_at = pending.traced.then(Instant::now);
            let Reply { payload, first_bytes_at } = reply;
            let _ = pending.reply.send(Ok(Delivery { payload, first_bytes_at, delivered_at }));
        }
    }

    fn quiet_since(&self, slot: usize, generation: u64) -> Option<Instant> {
        let table = self.lock();
        let SlotState::Ready { generation: current, last_reply_at, .. } = &table.slots[slot].state
        else {
            return None;
        };
        if *current != generation {
            return None;
        }
        table
            .pending
            .values()
            .filter_map(|p| p.route)
            .filter(|route| route.slot == slot && route.generation == generation)
            .map(|route| route.sent_at.max(*last_reply_at))
            .min()
    }

    fn unroutable(&self, slot: usize) {
        let mut table = self.lock();
        let worker = &mut table.slots[slot];
        if matches!(worker.state, SlotState::Ready { .. }) {
            worker.state = SlotState::Starting;
        }
    }

    fn lost(&self, slot: usize, generation: u64, loss: Loss, reason: &str) -> usize {
        let max_attempts = self.config.max_attempts;
        let mut table = self.lock();
        let held: Vec<u64> = table
            .pending
            .iter()
            .filter(|(_, p)| p.route.is_some_and(|r| r.slot == slot && r.generation == generation))
            .map(|(&id, _)| id)
            .collect();
        let mut resent = 0;
        for id in held {
            let Some(pending) = table.pending.get_mut(&id) else { continue };
            if pending.attempts < max_attempts {
                pending.route = None;
                resent += 1;
                continue;
            }
            if let Some(pending) = table.pending.remove(&id) {
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
        table.resent_requests += resent as u64;
        table.route_waiting();
        resent
    }

    fn gave_up(&self, slot: usize, error: EmbeddingError) {
        let mut table = self.lock();
        table.slots[slot].state = SlotState::GaveUp;
        let any_left = table
            .slots
            .iter()
            .any(|s| matches!(s.state, SlotState::Ready { .. } | SlotState::Starting));
        drop(table);
        if !any_left {
            self.stop_serving(Some(error));
        }
    }

    fn stopped(&self, slot: usize) {
        let mut table = self.lock();
        table.slots[slot].state = SlotState::Stopped;
        let all_stopped =
            table.slots.iter().all(|s| matches!(s.state, SlotState::Stopped | SlotState::GaveUp));
        let failed = matches!(table.serving, Serving::Failed(_));
        drop(table);
        if all_stopped && !failed {
            self.stop_serving(None);
        }
    }

    fn supervisor_dropped(&self, slot: usize) {
        let table = self.lock();
        let stopped_on_purpose = matches!(table.slots[slot].state, SlotState::Stopped);
        let serving = matches!(table.serving, Serving::Open | Serving::Closing);
        drop(table);
        if serving && !stopped_on_purpose {
            let error = supervisor_gone();
            tracing::error!(slot, "{error}");
            self.stop_serving(Some(error));
        }
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

/// The pool of supervised workers, as its client sees it. Dropping it tells every supervisor
/// to stop its worker.
pub(crate) struct Dispatcher {
    state: Arc<State>,
    supervisors: Vec<SupervisorHandle>,
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        for supervisor in &self.supervisors {
            supervisor.release();
        }
    }
}

impl Dispatcher {
    /// Starts `config.workers` workers in parallel, waits for every hello and spawns their
    /// supervisors on the current tokio runtime. Fails fast, without retrying, when a worker
    /// cannot start: with the error of the first slot that failed, after stopping the others.
    pub(crate) async fn start(config: WorkerConfig) -> EmbeddingResult<Self> {
        Self::start_with(config, Arc::new(WorkerCommand)).await
    }

    /// [`start`](Self::start), with every worker (the first ones and their replacements)
    /// started through `spawner`.
    pub(crate) async fn start_with(
        config: WorkerConfig,
        spawner: Arc<dyn Spawner>,
    ) -> EmbeddingResult<Self> {
        if let Some(problem) = config.problem() {
            return Err(EmbeddingError::InvalidInput(format!("WorkerConfig: {problem}")));
        }
        let mut starting = tokio::task::JoinSet::new();
        for slot in 0..config.workers {
            let (config, spawner) = (config.clone(), spawner.clone());
            starting.spawn(async move {
                (slot, supervisor::start_worker(&config, &*spawner, slot).await)
            });
        }
        let mut started: Vec<Option<EmbeddingResult<StartedWorker>>> =
            (0..config.workers).map(|_| None).collect();
        while let Some(outcome) = starting.join_next().await {
            match outcome {
                Ok((slot, result)) => started[slot] = Some(result),
                // a start task panicked: a bug, reported as such
                Err(error) => {
                    return Err(EmbeddingError::Internal(format!("a worker start failed: {error}")))
                }
            }
        }
        let mut workers = Vec::with_capacity(config.workers);
        let mut failure = None;
        for result in started.into_iter().flatten() {
            match result {
                Ok(worker) => workers.push(worker),
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        if let Some(error) = failure {
            for worker in workers {
                supervisor::discard(worker).await;
            }
            return Err(error);
        }

        let state = Arc::new(State {
            in_flight_texts: Arc::new(Semaphore::new(
                config.max_in_flight_texts.min(Semaphore::MAX_PERMITS),
            )),
            table: Mutex::new(Table {
                pending: HashMap::new(),
                slots: (0..config.workers)
                    .map(|_| WorkerSlot { state: SlotState::Starting, readies: 0, answered: 0 })
                    .collect(),
                serving: Serving::Open,
                hello: workers[0].hello.clone(),
                resent_requests: 0,
                route_turn: 0,
            }),
            config,
            next_id: AtomicU64::new(1),
        });
        let pool: Arc<dyn Pool> = state.clone();
        let supervisors = workers
            .into_iter()
            .enumerate()
            .map(|(slot, worker)| {
                supervisor::supervise(pool.clone(), spawner.clone(), slot, worker)
            })
            .collect();
        Ok(Self { state, supervisors })
    }

    pub(crate) fn config(&self) -> &WorkerConfig {
        &self.state.config
    }

    /// The latest worker's hello while the pool can serve (also while a replacement starts);
    /// the reason it cannot once it gave up, was closed or lost its supervisors.
    pub(crate) fn hello(&self) -> EmbeddingResult<ReadyHello> {
        let table = self.state.lock();
        match &table.serving {
            Serving::Failed(error) => Err(error.clone()),
            Serving::Closing | Serving::Closed => Err(closed()),
            Serving::Open => Ok(table.hello.clone()),
        }
    }

    /// The pid of the first slot's serving worker.
    pub(crate) fn worker_pid(&self) -> Option<u32> {
        match self.state.lock().slots[0].state {
            SlotState::Ready { pid, .. } => Some(pid),
            _ => None,
        }
    }

    pub(crate) fn stats(&self) -> ClientStats {
        self.state.lock().stats()
    }

    /// See `WorkerClient::close`: every worker is stopped at the same time.
    pub(crate) async fn close(&self) {
        {
            let mut table = self.state.lock();
            if matches!(table.serving, Serving::Open) {
                table.serving = Serving::Closing;
            }
        }
        // every Close is sent before any is awaited
        let closing: Vec<_> = self.supervisors.iter().map(SupervisorHandle::close).collect();
        for closed in closing {
            closed.await;
        }
    }

    /// Enters one wire request in the pending table and writes it to the least-loaded ready
    /// worker (else it waits there for one). Waits first for `texts` in-flight permits (at
    /// most `max_in_flight_texts`: the client's chunks never hold more). `tokens` is its
    /// estimated size, what routing weighs. `traced`: the reply comes with the client's
    /// instants ([`PendingReply::wait_timed`]).
    pub(crate) async fn submit(
        &self,
        texts: usize,
        tokens: usize,
        (shows_progress, traced): (bool, bool),
        encode: impl FnOnce(u64) -> EmbeddingResult<Vec<u8>>,
    ) -> EmbeddingResult<PendingReply> {
        let state = &self.state;
        let permit = match texts {
            0 => None,
            _ => {
                let wanted = u32::try_from(texts).unwrap_or(u32::MAX);
                match state.in_flight_texts.clone().acquire_many_owned(wanted).await {
                    Ok(permit) => Some(permit),
                    // closed: the pool stopped; `serving` says why
                    Err(_) => return Err(self.hello().err().unwrap_or_else(closed)),
                }
            }
        };
        let id = state.next_id.fetch_add(1, Ordering::Relaxed);
        let encode_started = Instant::now();
        let frame = OutFrame::new(encode(id)?, traced);
        let encoded = traced.then(|| (encode_started, Instant::now(), frame.clone()));
        let (reply, receiver) = oneshot::channel();
        let mut table = state.lock();
        match &table.serving {
            Serving::Open => {}
            Serving::Failed(error) => return Err(error.clone()),
            Serving::Closing | Serving::Closed => return Err(closed()),
        }
        let pending = Pending {
            frame,
            reply,
            route: None,
            attempts: 0,
            texts,
            tokens,
            _texts: permit,
            shows_progress,
            traced,
        };
        table.pending.insert(id, pending);
        let mut loads = table.loads();
        table.route(id, &mut loads);
        drop(table);
        Ok(PendingReply { state: state.clone(), id, reply: Some(receiver), encoded })
    }
}

/// A reply on its way; dropping it withdraws the request (its texts stop counting against
/// `max_in_flight_texts`).
pub(crate) struct PendingReply {
    state: Arc<State>,
    id: u64,
    reply: Option<oneshot::Receiver<EmbeddingResult<Delivery>>>,
    /// For a traced request: when its encoding began and ended, and its frame (which holds
    /// when it was written).
    encoded: Option<(Instant, Instant, Frame)>,
}

impl PendingReply {
    /// The reply's payload. Ends when a worker answers, when the request runs out of
    /// attempts, or when the pool stops (a dropped sender means exactly that).
    pub(crate) async fn wait(self) -> EmbeddingResult<Vec<u8>> {
        Ok(self.wait_timed().await?.0)
    }

    /// [`wait`](Self::wait), with the client's instants of a request submitted `traced`.
    pub(crate) async fn wait_timed(mut self) -> EmbeddingResult<(Vec<u8>, Option<ClientTimes>)> {
        let reply = self.reply.as_mut().expect("a reply is awaited once");
        // Borrowed, not taken: if this future is dropped mid-wait, `drop` still withdraws.
        let result = reply.await.unwrap_or_else(|_| Err(supervisor_gone()));
        let woke = Instant::now();
        self.reply = None;
        let Delivery { payload, first_bytes_at, delivered_at } = result?;
        let times = self.encoded.take().map(|(encode_started, encoded, frame)| ClientTimes {
            encode_started,
            encoded,
            written: frame.written_at().unwrap_or(encoded),
            reply_read: first_bytes_at,
            delivered: delivered_at.unwrap_or(woke),
            woke,
        });
        Ok((payload, times))
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        if self.reply.is_some() {
            self.state.lock().pending.remove(&self.id);
        }
    }
}
