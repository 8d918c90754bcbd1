//! Supervision against fake workers: restarts, backoff, the restart budget, the hang watch,
//! crash loops and failed starts, driven through the dispatcher and its supervisors as the
//! client drives them, with every worker started through a [`Spawner`] that runs
//! `tests/fake_workers/rust_supervised_worker.py` (at the repository's root). Those are real
//! processes speaking the wire's framing, without a model, each misbehaving as the test says,
//! so every case here takes milliseconds to a second. `tests/worker.rs` proves the same paths
//! once more with the real worker and model.
//!
//! The fake worker's interpreter is the real worker's (`tests/common`): it needs msgpack.

#[path = "../tests/common/mod.rs"]
mod common;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::process::Child;

use crate::config::WorkerConfig;
use crate::dispatch::Dispatcher;
use crate::process::{self, Spawner};
use crate::types::EmbeddingResult;
use crate::wire::{self, OpRequest, ReplyEnvelope};
use common::{checkout, expect_error, process_exists, python, within};
use common::{MODEL_NOT_FOUND, SERVICE_UNAVAILABLE};

/// Short, so that a hang is seen quickly; a serving fake worker answers within milliseconds.
const HANG_TIMEOUT: Duration = Duration::from_millis(500);

/// Starts fake workers: the n-th worker of a slot behaves as the n-th entry of that slot's
/// script (the last entry for every later one), one of the behaviours the fake worker's
/// docstring lists.
struct FakeWorkers {
    scripts: Vec<Vec<&'static str>>,
    /// Each spawn's slot and when it was made, in order.
    spawns: Mutex<Vec<(usize, Instant)>>,
}

impl FakeWorkers {
    /// One slot whose workers behave as `script` says, in turn.
    fn one(script: &[&'static str]) -> Arc<Self> {
        Self::pool(&[script])
    }

    fn pool(scripts: &[&[&'static str]]) -> Arc<Self> {
        let scripts = scripts.iter().map(|script| script.to_vec()).collect();
        Arc::new(Self { scripts, spawns: Mutex::default() })
    }

    /// When each worker of `slot` was spawned, in order.
    fn spawned(&self, slot: usize) -> Vec<Instant> {
        let spawns = self.spawns.lock().unwrap();
        spawns.iter().filter(|(of, _)| *of == slot).map(|(_, at)| *at).collect()
    }
}

impl Spawner for FakeWorkers {
    fn spawn(&self, _config: &WorkerConfig, slot: usize) -> std::io::Result<Child> {
        let script = &self.scripts[slot];
        let mut spawns = self.spawns.lock().unwrap();
        let nth = spawns.iter().filter(|(of, _)| *of == slot).count();
        let behaviour = script[nth.min(script.len() - 1)];
        spawns.push((slot, Instant::now()));
        let fake = checkout().join("tests/fake_workers/rust_supervised_worker.py");
        let argv = vec![python().into(), fake.into(), behaviour.into()];
        process::spawn_piped(argv, std::iter::empty::<(&str, &str)>())
    }

    fn shown(&self, _config: &WorkerConfig) -> String {
        "rust_supervised_worker.py".to_owned()
    }
}

/// The defaults, one worker, a restart budget of 3 that only consecutive deaths spend, and a
/// short close (a hung fake worker does not exit when its stdin closes: it is killed).
fn config() -> WorkerConfig {
    WorkerConfig {
        workers: 1,
        restart_limit: 3,
        stable_start_time: Duration::from_secs(3600),
        start_timeout: Duration::from_secs(20),
        close_timeout: Duration::from_millis(200),
        ..WorkerConfig::with_command(["run through FakeWorkers"])
    }
}

/// Runs `test` (within the hang guard) on a dispatcher started with `config` over fake workers
/// whose one slot behaves as `script` says, given the two; closes the dispatcher after it.
async fn with_fake_workers<F: Future<Output = ()>>(
    script: &[&'static str],
    config: WorkerConfig,
    test: impl FnOnce(Arc<FakeWorkers>, Arc<Dispatcher>) -> F,
) {
    with_fake_pool(FakeWorkers::one(script), config, test).await;
}

/// [`with_fake_workers`] with `workers` as the spawner, for a pool of several slots.
async fn with_fake_pool<F: Future<Output = ()>>(
    workers: Arc<FakeWorkers>,
    config: WorkerConfig,
    test: impl FnOnce(Arc<FakeWorkers>, Arc<Dispatcher>) -> F,
) {
    within(async {
        let spawner: Arc<dyn Spawner> = workers.clone();
        let started = Dispatcher::start_with(config, spawner).await;
        let dispatcher = Arc::new(started.expect("the fake workers start"));
        test(workers, dispatcher.clone()).await;
        dispatcher.close().await;
    })
    .await;
}

/// One `health` request through the dispatcher: `Ok` when a worker answered it.
async fn call(dispatcher: &Dispatcher) -> EmbeddingResult<()> {
    let encode = |id| wire::encode_frame(&OpRequest { id, op: "health" });
    let payload = dispatcher.submit(1, 1, (true, false), encode).await?.wait().await?;
    wire::decode_payload::<ReplyEnvelope>(&payload)?.into_result()
}

/// Waits until `condition` holds (bounded by the test's timeout).
async fn eventually(condition: impl Fn() -> bool) {
    while !condition() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_worker_that_dies_holding_a_request_is_replaced_and_the_request_answered() {
    with_fake_workers(&["dies-on-request", "serves"], config(), |workers, dispatcher| async move {
        let first_pid = dispatcher.worker_pid().unwrap();
        call(&dispatcher).await.expect("the replacement answers the request sent again");
        let stats = dispatcher.stats();
        assert_eq!((stats.restarts, stats.resent_requests), (1, 1));
        assert_ne!(dispatcher.worker_pid(), Some(first_pid));
        assert!(!process_exists(first_pid), "the dead worker was reaped");
        assert_eq!(workers.spawned(0).len(), 2);
    })
    .await;
}

#[tokio::test]
async fn a_worker_that_breaks_the_frame_stream_or_its_stdin_is_replaced() {
    for broken in ["answers-garbage", "closes-its-stdin"] {
        with_fake_workers(&[broken, "serves"], config(), |_, dispatcher| async move {
            call(&dispatcher).await.expect("the replacement answers");
            assert_eq!(dispatcher.stats().restarts, 1, "{broken}");
        })
        .await;
    }
}

#[tokio::test]
async fn a_request_whose_every_worker_dies_fails_after_max_attempts() {
    let config = WorkerConfig { max_attempts: 2, ..config() };
    with_fake_workers(&["dies-on-request"], config, |workers, dispatcher| async move {
        // the reason quotes the worker's stderr
        let parts = ["the worker died on each of 2 attempts", "fake worker: dying on request"];
        expect_error(call(&dispatcher).await, SERVICE_UNAVAILABLE, &parts);
        // the second death is replaced too
        eventually(|| dispatcher.worker_pid().is_some()).await;
        assert_eq!(workers.spawned(0).len(), 3, "two deaths, two replacements");
    })
    .await;
}

#[tokio::test]
async fn a_hung_worker_is_killed_and_its_request_answered_by_the_next() {
    let config = WorkerConfig { request_timeout: HANG_TIMEOUT, ..config() };
    with_fake_workers(&["hangs-on-request", "serves"], config, |_, dispatcher| async move {
        let hung_pid = dispatcher.worker_pid().unwrap();
        call(&dispatcher).await.expect("the replacement answers");
        assert!(!process_exists(hung_pid), "the hung worker was killed and reaped");
        assert_eq!(dispatcher.stats().restarts, 1);
    })
    .await;
}

#[tokio::test]
async fn a_request_that_always_hangs_fails_as_timed_out() {
    let config = WorkerConfig { request_timeout: HANG_TIMEOUT, max_attempts: 1, ..config() };
    with_fake_workers(&["hangs-on-request"], config, |_, dispatcher| async move {
        let parts = ["request timed out on each of 1 attempts", "answered nothing for"];
        expect_error(call(&dispatcher).await, SERVICE_UNAVAILABLE, &parts);
    })
    .await;
}

#[tokio::test]
async fn a_crash_loop_spends_the_restart_budget_with_growing_backoff_then_every_call_fails() {
    // attempts to spare: the request outlives the budget and fails with the give-up
    let config = WorkerConfig { restart_limit: 2, max_attempts: 10, ..config() };
    let script = ["dies-on-request", "dies-after-hello"];
    with_fake_workers(&script, config, |workers, dispatcher| async move {
        let parts = ["failed 3 times in a row (restart_limit 2)"];
        let message = expect_error(call(&dispatcher).await, SERVICE_UNAVAILABLE, &parts);
        let spawned = workers.spawned(0);
        assert_eq!(spawned.len(), 3, "the first worker and restart_limit replacements");
        for (restart, pair) in (1..).zip(spawned.windows(2)) {
            let gap = pair[1] - pair[0];
            let backoff = WorkerConfig::restart_delay(restart);
            assert!(gap >= backoff, "restart {restart} after {gap:?}, before its {backoff:?}");
        }
        // given up: later calls fail at once with the same reason, and no worker is started
        assert_eq!(expect_error(call(&dispatcher).await, SERVICE_UNAVAILABLE, &[]), message);
        assert_eq!(dispatcher.stats().workers[0].state, "given up");
        assert_eq!(workers.spawned(0).len(), 3);
    })
    .await;
}

#[tokio::test]
async fn replacements_that_cannot_start_spend_the_budget_and_are_named() {
    let config = WorkerConfig { restart_limit: 2, ..config() };
    let script = ["dies-on-request", "exits-at-start"];
    with_fake_workers(&script, config, |workers, dispatcher| async move {
        let parts = ["restart_limit 2", "fake worker: cannot start", "exit status: 3"];
        expect_error(call(&dispatcher).await, SERVICE_UNAVAILABLE, &parts);
        assert_eq!(workers.spawned(0).len(), 3);
    })
    .await;
}

/// Three workers in a row die on the request; the fourth answers it.
const THREE_DEATHS: [&str; 4] = ["dies-on-request", "dies-on-request", "dies-on-request", "serves"];

#[tokio::test]
async fn a_worker_that_ran_its_stable_start_time_resets_the_restart_budget() {
    // every worker counts as stable: three deaths in a row under a budget of one
    let stable = WorkerConfig {
        restart_limit: 1,
        stable_start_time: Duration::ZERO,
        max_attempts: 4,
        ..config()
    };
    with_fake_workers(&THREE_DEATHS, stable, |_, dispatcher| async move {
        call(&dispatcher).await.expect("the fourth worker answers");
        assert_eq!(dispatcher.stats().restarts, 3);
    })
    .await;
}

#[tokio::test]
async fn deaths_within_the_stable_start_time_spend_the_restart_budget() {
    let unstable = WorkerConfig { restart_limit: 1, max_attempts: 4, ..config() };
    with_fake_workers(&THREE_DEATHS, unstable, |workers, dispatcher| async move {
        let parts = ["failed 2 times in a row (restart_limit 1)"];
        expect_error(call(&dispatcher).await, SERVICE_UNAVAILABLE, &parts);
        assert_eq!(workers.spawned(0).len(), 2);
    })
    .await;
}

#[tokio::test]
async fn a_replacement_that_refuses_to_start_gives_up_at_once() {
    let script = ["dies-on-request", "refuses-to-start"];
    with_fake_workers(&script, config(), |workers, dispatcher| async move {
        expect_error(call(&dispatcher).await, MODEL_NOT_FOUND, &["fake worker: no model here"]);
        assert_eq!(workers.spawned(0).len(), 2, "a worker that says why is not retried");
    })
    .await;
}

#[tokio::test]
async fn a_first_worker_that_does_not_start_fails_the_start_with_its_reason() {
    within(async {
        // the start's error, of `kind` and holding `parts`; the worker is not started again
        let start_fails = |behaviour, config, kind, parts: &'static [&'static str]| async move {
            let workers = FakeWorkers::one(&[behaviour]);
            let spawner: Arc<dyn Spawner> = workers.clone();
            expect_error(Dispatcher::start_with(config, spawner).await, kind, parts);
            assert_eq!(workers.spawned(0).len(), 1, "a first start is not retried");
        };
        let exited = &["fake worker: cannot start", "exit status: 3"];
        start_fails("exits-at-start", config(), SERVICE_UNAVAILABLE, exited).await;
        let impatient = WorkerConfig { start_timeout: Duration::from_millis(300), ..config() };
        let silent = &["wrote no hello within 300ms"];
        start_fails("writes-no-hello", impatient, SERVICE_UNAVAILABLE, silent).await;
        let refused = &["could not start", "fake worker: no model here"];
        start_fails("refuses-to-start", config(), MODEL_NOT_FOUND, refused).await;
    })
    .await;
}

#[tokio::test]
async fn a_slot_that_gives_up_leaves_the_others_serving() {
    let workers = FakeWorkers::pool(&[&["serves"], &["dies-on-request", "exits-at-start"]]);
    let config = WorkerConfig { workers: 2, restart_limit: 1, ..config() };
    with_fake_pool(workers, config, |_, dispatcher| async move {
        // requests take turns between idle workers: some reach slot 1, whose worker dies, and
        // are answered by slot 0
        let calls = tokio::join!(call(&dispatcher), call(&dispatcher), call(&dispatcher));
        for result in [calls.0, calls.1, calls.2] {
            result.expect("slot 0 answers what slot 1 lost");
        }
        let stats = dispatcher.stats();
        assert!(stats.resent_requests >= 1, "{stats:?}");
        eventually(|| dispatcher.stats().workers[1].state == "given up").await;
        assert_eq!(dispatcher.stats().workers[0].state, "ready");
        call(&dispatcher).await.expect("slot 0 serves on");
    })
    .await;
}

#[tokio::test]
async fn closing_kills_a_hung_worker_after_close_timeout_and_fails_its_request() {
    let config = WorkerConfig { close_timeout: Duration::from_millis(200), ..config() };
    with_fake_workers(&["hangs-on-request"], config, |_, dispatcher| async move {
        let pid = dispatcher.worker_pid().unwrap();
        let (result, ()) = tokio::join!(call(&dispatcher), dispatcher.close());
        expect_error(result, SERVICE_UNAVAILABLE, &["closed before the worker answered"]);
        assert!(!process_exists(pid), "the hung worker was killed and reaped");
    })
    .await;
}
