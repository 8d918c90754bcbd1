//! The client against the real worker (`python -m akidb_embed.worker`) and the real model
//! (where they are: `tests/common`).

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use akidb_embed_client::{
    f16_bits_to_f32, BatchEmbeddingRequest, BatchEmbeddingResponse, EmbedOptions, EmbeddingError,
    EmbeddingProvider, EncodedValues, Encoding, TruncationSide, WorkerClient, WorkerConfig,
};
use common::{
    checkout, cosine, dies_soon, expect_error, model_dir, on_a_thread_within, process_exists,
    python, signal, within, INVALID_INPUT, MIN_COSINE, MODEL_NOT_FOUND, SERVICE_UNAVAILABLE,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct ModelMetadata {
    model: String,
    dimension: u32,
    max_tokens: usize,
}

fn metadata() -> ModelMetadata {
    let text = std::fs::read_to_string(model_dir().join("akidb-embed.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[derive(Deserialize)]
struct Golden {
    sentences: Vec<String>,
    token_counts: Vec<usize>,
    embeddings: Vec<Vec<f32>>,
    normalize: bool,
}

fn golden() -> Golden {
    let text = std::fs::read_to_string(model_dir().join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every `tracing` event of the tests (they run in threads of one process, so the collector
/// is global; a test picks its own lines by the worker pids it knows), echoed to stderr.
#[derive(Default)]
struct Log(Mutex<Vec<String>>);

impl Log {
    fn get() -> &'static Log {
        static LOG: OnceLock<&'static Log> = OnceLock::new();
        LOG.get_or_init(|| {
            let log: &'static Log = Box::leak(Box::default());
            tracing::subscriber::set_global_default(Collector(log)).expect("one subscriber");
            log
        })
    }

    /// Lines (`target LEVEL message`) that contain every one of `parts`.
    fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        let lines = self.0.lock().unwrap();
        lines.iter().filter(|line| parts.iter().all(|part| line.contains(part))).cloned().collect()
    }

    /// The number right after `prefix` in the first line holding both.
    fn number_after(&self, prefix: &str, also: &str) -> Option<usize> {
        let line = self.lines_with(&[prefix, also]).into_iter().next()?;
        let rest = &line[line.find(prefix)? + prefix.len()..];
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    }
}

/// A minimal `tracing` subscriber: each event as one line, spans ignored.
struct Collector(&'static Log);

impl tracing::Subscriber for Collector {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        let meta = event.metadata();
        let line = format!("{} {} {}", meta.target(), meta.level(), message.0);
        eprintln!("{line}");
        self.0 .0.lock().unwrap().push(line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn worker_command() -> WorkerConfig {
    WorkerConfig::from_python(python())
}

fn config() -> WorkerConfig {
    Log::get();
    WorkerConfig {
        model_dirs: vec![model_dir()],
        // Tests run two at a time on small machines: one ONNX Runtime thread per worker.
        threads: Some(1),
        ..worker_command()
    }
}

async fn spawn(config: WorkerConfig) -> WorkerClient {
    WorkerClient::spawn(config).await.expect("the worker starts")
}

/// Runs `test` (within the hang guard) on a client started with `config`; closes the client
/// after it.
async fn with_client<F: Future<Output = ()>>(
    config: WorkerConfig,
    test: impl FnOnce(WorkerClient) -> F,
) {
    within(async {
        let client = spawn(config).await;
        test(client.clone()).await;
        client.close().await;
    })
    .await;
}

/// Waits (bounded) until `condition` holds.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..2400 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "number of vectors");
    for (index, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "dimension of vector {index}");
        let similarity = cosine(g, w);
        assert!(similarity >= MIN_COSINE, "vector {index}: cosine {similarity}");
    }
}

fn request(client_model: &str, inputs: &[String]) -> BatchEmbeddingRequest {
    BatchEmbeddingRequest::new(client_model, inputs.to_vec())
}

#[tokio::test]
async fn golden_sentences_embed_like_sentence_transformers() {
    with_client(config(), |client| async move {
        let golden = golden();
        let model = client.model_info().await.unwrap().model;
        let mut batch = request(&model, &golden.sentences);
        batch.normalize = golden.normalize;
        let response = client.embed_batch(batch).await.unwrap();
        assert_eq!(response.model, model);
        assert_close(&response.embeddings, &golden.embeddings);
        assert_eq!(response.usage.total_tokens, golden.token_counts.iter().sum::<usize>());
        // 21 sentences, some of 256 tokens: well over a millisecond in the worker
        assert!(response.usage.duration_ms > 0);
    })
    .await;
}

#[tokio::test]
async fn model_info_and_hello_match_the_model_directory() {
    with_client(config(), |client| async move {
        let expected = metadata();
        let info = EmbeddingProvider::model_info(&client).await.unwrap();
        assert_eq!(info.model, expected.model);
        assert_eq!(info.dimension, expected.dimension);
        assert_eq!(info.max_tokens, expected.max_tokens);
        let hello = client.hello().unwrap();
        assert_eq!(Some(hello.pid), client.worker_pid());
        assert!(!hello.providers.is_empty());
        assert!(hello.limits.max_texts_per_request > 0);
        // one model: `models` holds it (from the hello's `models`, or from `model` of a worker
        // that has no `models`)
        let models = client.models().unwrap();
        assert_eq!(models.len(), 1);
        assert_eq!(models[0].info(), info);
        assert_eq!(client.model_info_for("").unwrap(), info);
        assert_eq!(client.model_info_for(&info.model).unwrap(), info);
        expect_error(client.model_info_for("no/such-model"), MODEL_NOT_FOUND, &[&info.model]);
    })
    .await;
}

#[tokio::test]
async fn a_models_short_name_names_it() {
    with_client(config(), |client| async move {
        let info = client.model_info().await.unwrap();
        let short_name = info.model.rsplit('/').next().unwrap().to_owned();
        assert_ne!(short_name, info.model, "the model id has an organisation part");
        assert_eq!(client.model_info_for(&short_name).unwrap(), info);
        let texts = vec!["a cat on a mat".to_owned()];
        let by_short_name = client.embed_batch(request(&short_name, &texts)).await.unwrap();
        let by_id = client.embed_batch(request(&info.model, &texts)).await.unwrap();
        assert_eq!(by_short_name.model, info.model);
        assert_eq!(by_short_name.embeddings, by_id.embeddings);
    })
    .await;
}

#[tokio::test]
async fn health_check_and_ping_succeed() {
    with_client(config(), |client| async move {
        EmbeddingProvider::health_check(&client).await.unwrap();
        client.ping().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_traced_call_gives_the_workers_marks_in_order_and_the_same_vectors() {
    with_client(config(), |client| async move {
        let texts = vec!["where does the time of a lone query go?".to_owned()];
        let untraced = client.embed_batch(request("", &texts)).await.unwrap();
        let traced =
            client.embed_traced(request("", &texts), &EmbedOptions::default()).await.unwrap();
        // a trace changes nothing in the response but the worker's duration
        assert_eq!(traced.response.embeddings, untraced.embeddings);
        assert_eq!(traced.response.model, untraced.model);
        assert_eq!(traced.response.usage.total_tokens, untraced.usage.total_tokens);
        let [trace] = traced.traces[..] else {
            panic!("one text is one wire request: {:?}", traced.traces)
        };
        let worker = trace.worker.expect("the worker sent its marks");
        let mut marks = vec![worker.read, worker.parsed, worker.tokenized];
        marks.extend(worker.queued);
        marks.extend([worker.started, worker.ran, worker.pooled]);
        assert!(marks.windows(2).all(|pair| pair[0] <= pair[1]), "marks out of order: {worker:?}");
        assert!(worker.read > 0 && worker.encode_ns > 0, "{worker:?}");
        assert!(worker.ort_run() > Duration::ZERO, "{worker:?}");
        for stage in [trace.client_encode, trace.client_write, trace.client_decode] {
            assert!(stage > Duration::ZERO, "{trace:?}");
        }
        // the host's stages follow one another within the round trip, and so do the worker's;
        // the two may overlap (a writer descheduled after its write while the worker reads)
        let host = trace.client_encode
            + trace.client_write
            + trace.reader_read
            + trace.caller_wakeup
            + trace.client_decode;
        assert!(host <= trace.total, "{trace:?}");
        assert!(worker.stages() <= trace.total, "{trace:?}");
    })
    .await;
}

#[tokio::test]
async fn a_request_for_another_model_is_model_not_found() {
    with_client(config(), |client| async move {
        let error = client
            .embed_batch(request("sentence-transformers/not-this-one", &["hi".to_owned()]))
            .await
            .unwrap_err();
        assert!(matches!(error, EmbeddingError::ModelNotFound(_)), "{error:?}");
        // The worker keeps serving after an error reply.
        client.embed_batch(request("", &["hi".to_owned()])).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn an_over_long_input_is_invalid_input_only_without_truncation() {
    with_client(config(), |client| async move {
        let info = client.model_info().await.unwrap();
        let long_text = vec!["word ".repeat(info.max_tokens * 2)];
        let refused = EmbedOptions { truncate: Some(false), ..EmbedOptions::default() };
        let refused_long =
            client.embed_batch_with(request(&info.model, &long_text), &refused).await;
        // in this crate's words, not the wire's
        let parts = ["more than max_tokens", "EmbedOptions::truncate"];
        let message = expect_error(refused_long, INVALID_INPUT, &parts);
        assert!(!message.contains("send truncate"), "{message}");
        let truncated = client.embed_batch(request(&info.model, &long_text)).await.unwrap();
        assert_eq!(truncated.usage.total_tokens, info.max_tokens);
    })
    .await;
}

#[tokio::test]
async fn an_empty_batch_is_invalid_input_as_akidb_providers_answer() {
    with_client(config(), |client| async move {
        let error = client.embed_batch(request("", &[])).await.unwrap_err();
        assert_eq!(error, EmbeddingError::InvalidInput("empty input batch".into()));
        assert_eq!(error.to_string(), "Invalid input: empty input batch");
    })
    .await;
}

#[tokio::test]
async fn many_concurrent_tasks_each_get_their_own_vectors() {
    with_client(config(), |client| async move {
        let golden = Arc::new(golden());
        let tasks: Vec<_> = (0..64)
            .map(|task| {
                let (client, golden) = (client.clone(), golden.clone());
                tokio::spawn(async move {
                    let index = task % golden.sentences.len();
                    let text = golden.sentences[index].clone();
                    let response = client.embed_batch(request("", &[text])).await.unwrap();
                    (index, response.embeddings)
                })
            })
            .collect();
        for task in tasks {
            let (index, embeddings) = task.await.unwrap();
            assert_close(&embeddings, &golden.embeddings[index..=index]);
        }
    })
    .await;
}

/// A client whose worker takes at most 8 texts per request, so that batches are split.
async fn spawn_with_small_requests(extra_args: &[&str]) -> WorkerClient {
    let mut config = config();
    config.extra_args =
        ["--max-texts-per-request", "8"].iter().chain(extra_args).map(|arg| arg.into()).collect();
    let client = spawn(config).await;
    assert_eq!(client.hello().unwrap().limits.max_texts_per_request, 8);
    client
}

#[tokio::test]
async fn a_mixed_length_batch_split_and_sent_shortest_first_comes_back_in_order() {
    within(async {
        let golden = golden();
        let client = spawn_with_small_requests(&[]).await;
        // The golden sentences shuffled, then reversed: 42 texts of 0 to 1838 bytes, which go
        // out shortest first in 6 wire requests.
        let count = golden.sentences.len();
        let shuffled = (0..count).map(|i| (i * 8 + 5) % count);
        let indices: Vec<usize> = shuffled.chain((0..count).rev()).collect();
        let texts: Vec<String> = indices.iter().map(|&i| golden.sentences[i].clone()).collect();
        let want: Vec<Vec<f32>> = indices.iter().map(|&i| golden.embeddings[i].clone()).collect();
        assert!(
            texts.windows(2).any(|pair| pair[0].len() > pair[1].len()),
            "the batch is not already shortest first"
        );
        let response = client.embed_batch(request("", &texts)).await.unwrap();
        assert_close(&response.embeddings, &want);
        assert_eq!(response.usage.total_tokens, 2 * golden.token_counts.iter().sum::<usize>());
        // the same in one flat buffer
        let flat = client.embed_flat(request("", &texts), &EmbedOptions::default()).await.unwrap();
        assert_eq!((flat.dimension, flat.values.len()), (384, texts.len() * 384));
        assert_close(&flat.rows().map(<[f32]>::to_vec).collect::<Vec<_>>(), &want);
        assert_eq!(flat.usage.total_tokens, response.usage.total_tokens);
        // traced: the same vectors, and one trace per wire request
        let traced =
            client.embed_traced(request("", &texts), &EmbedOptions::default()).await.unwrap();
        assert_eq!(traced.response.embeddings.len(), texts.len());
        assert_close(&traced.response.embeddings, &want);
        assert_eq!(traced.traces.len(), 6);
        assert!(traced.traces.iter().all(|trace| trace.worker.is_some()));
        client.close().await;
    })
    .await;
}

#[tokio::test]
async fn an_error_about_one_text_of_a_split_batch_names_the_callers_index() {
    within(async {
        let client = spawn_with_small_requests(&["--max-text-bytes", "4096"]).await;
        let info = client.model_info().await.unwrap();
        let with_text_13 = |text: String| {
            let mut texts: Vec<String> =
                (0..30).map(|i| format!("short text number {i} {}", "x".repeat(i % 7))).collect();
            texts.insert(13, text);
            texts
        };

        // The worker refuses it: sent last (the longest), in the fourth wire request.
        let over_long = request(&info.model, &with_text_13("word ".repeat(info.max_tokens * 2)));
        let refuse = EmbedOptions { truncate: Some(false), ..EmbedOptions::default() };
        let refused = client.embed_batch_with(over_long, &refuse).await;
        let message = expect_error(refused, INVALID_INPUT, &["tokens"]);
        assert!(message.starts_with("inputs[13] has "), "{message}");

        // The client refuses it before sending anything.
        let too_big = request(&info.model, &with_text_13("y".repeat(5000)));
        let message = expect_error(client.embed_batch(too_big).await, INVALID_INPUT, &[]);
        assert!(message.starts_with("inputs[13] has 5000 UTF-8 bytes"), "{message}");

        // The worker keeps serving after the error reply.
        let fine = client.embed_batch(request(&info.model, &with_text_13("fine".into()))).await;
        assert_eq!(fine.unwrap().embeddings.len(), 31);
        client.close().await;
    })
    .await;
}

const TASKS: usize = 8;
const CALLS_PER_TASK: usize = 40;

type GoldenCalls = Vec<(Vec<usize>, Result<BatchEmbeddingResponse, EmbeddingError>)>;

/// `TASKS` tasks of `CALLS_PER_TASK` calls each, batches of 1 to 4 golden sentences different in
/// every call; `done` counts the calls answered.
fn golden_load(
    client: &WorkerClient,
    golden: &Arc<Golden>,
    done: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<GoldenCalls>> {
    (0..TASKS)
        .map(|task| {
            let (client, golden, done) = (client.clone(), golden.clone(), done.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                for call in 0..CALLS_PER_TASK {
                    let start = (task * 7 + call * 3) % golden.sentences.len();
                    let count = 1 + (task + call) % 4;
                    let indices: Vec<usize> =
                        (start..start + count).map(|i| i % golden.sentences.len()).collect();
                    let texts: Vec<String> =
                        indices.iter().map(|&i| golden.sentences[i].clone()).collect();
                    let response = client.embed_batch(request("", &texts)).await;
                    done.fetch_add(1, Ordering::SeqCst);
                    results.push((indices, response));
                }
                results
            })
        })
        .collect()
}

/// Every call of `golden_load` succeeded with its golden vectors; how many there were.
async fn golden_answers(
    tasks: Vec<tokio::task::JoinHandle<GoldenCalls>>,
    golden: &Golden,
) -> usize {
    let mut answered = 0;
    for task in tasks {
        for (indices, response) in task.await.unwrap() {
            let response = response.expect("no call fails because a worker was killed");
            let want: Vec<Vec<f32>> =
                indices.iter().map(|&i| golden.embeddings[i].clone()).collect();
            assert_close(&response.embeddings, &want);
            answered += 1;
        }
    }
    answered
}

/// SIGKILLs `pid` once `golden_load` has answered a few calls per task (`done`) and before it
/// is over; how many calls were answered then.
async fn kill_under_load(pid: u32, done: &AtomicUsize) -> usize {
    while done.load(Ordering::SeqCst) < TASKS * 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    signal(pid, "KILL");
    let done_at_kill = done.load(Ordering::SeqCst);
    assert!(done_at_kill < TASKS * CALLS_PER_TASK, "the kill came under load");
    done_at_kill
}

#[tokio::test]
async fn a_killed_worker_loses_no_request() {
    killed_under_load_loses_no_request(WorkerConfig { lanes: Some(1), ..config() }).await;
}

#[tokio::test]
async fn a_killed_worker_with_busy_lanes_loses_no_request() {
    // two ONNX Runtime runs at once in the worker (one thread each): both lanes hold requests
    // when it dies
    killed_under_load_loses_no_request(WorkerConfig { lanes: Some(2), ..config() }).await;
}

/// Under `golden_load`, the worker of a client started with `config` is killed: every call
/// still gets its golden vectors, and the replacement has the same lanes.
async fn killed_under_load_loses_no_request(config: WorkerConfig) {
    let lanes = config.lanes.expect("the test names its lanes");
    with_client(config, |client| async move {
        let golden = Arc::new(golden());
        assert_eq!(client.hello().unwrap().lanes, lanes);
        let first_pid = client.worker_pid().unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let tasks = golden_load(&client, &golden, &done);
        kill_under_load(first_pid, &done).await;
        let answered = golden_answers(tasks, &golden).await;
        assert_eq!(answered, TASKS * CALLS_PER_TASK);
        let second_pid = client.worker_pid().expect("a new worker serves");
        assert_ne!(second_pid, first_pid);
        let resent = Log::get()
            .number_after("sending again the ", &format!("worker {first_pid} "))
            .expect("a restart note");
        assert!(resent > 0, "requests were in flight when the worker was killed");
        assert_eq!(client.hello().unwrap().lanes, lanes);
    })
    .await;
}

/// A client (request_timeout 3 s) whose worker was just stopped with SIGSTOP, and that pid.
async fn client_with_a_stopped_worker() -> (WorkerClient, u32) {
    let mut config = config();
    config.request_timeout = Duration::from_secs(3);
    let client = spawn(config).await;
    let stopped_pid = client.worker_pid().unwrap();
    signal(stopped_pid, "STOP");
    (client, stopped_pid)
}

/// The stopped worker was replaced, then killed and reaped; the client is closed.
async fn replaced_and_closed(client: WorkerClient, stopped_pid: u32) {
    assert_ne!(client.worker_pid(), Some(stopped_pid));
    eventually("the stopped worker is killed and reaped", || !process_exists(stopped_pid)).await;
    client.close().await;
}

#[tokio::test]
async fn a_stopped_worker_times_out_and_is_replaced() {
    within(async {
        let (client, stopped_pid) = client_with_a_stopped_worker().await;
        let response = client.embed_batch(request("", &["still answered".to_owned()])).await;
        assert_eq!(response.unwrap().embeddings.len(), 1);
        replaced_and_closed(client, stopped_pid).await;
    })
    .await;
}

/// A text whose frame is larger than a pipe holds (64 KiB on Linux): its caller's own write
/// can take only part of it, the writer task writes the rest.
fn over_a_pipe() -> String {
    "a long text that does not fit in the pipe at once ".repeat(4000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_larger_than_the_pipe_are_finished_before_the_next_ones() {
    with_client(config(), |client| async move {
        let long = over_a_pipe();
        let short: Vec<String> = (0..20).map(|i| format!("a short sentence {i}")).collect();
        let alone = client.embed_batch(request("", std::slice::from_ref(&long))).await.unwrap();
        let want = client.embed_batch(request("", &short)).await.unwrap().embeddings;
        // Each task sends the long frame, then the short ones while the pipe is still full,
        // and the tasks overlap: a frame written into the middle of another would break the
        // stream (the worker would exit 3 and be replaced).
        let pid = client.worker_pid();
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let (client, long, short) = (client.clone(), long.clone(), short.clone());
                tokio::spawn(async move {
                    let calls = std::iter::once(&long)
                        .chain(&short)
                        .map(|text| client.embed_batch(request("", std::slice::from_ref(text))));
                    futures_join_all(calls).await
                })
            })
            .collect();
        for task in tasks {
            let mut responses = task.await.unwrap().into_iter();
            let first = responses.next().unwrap().unwrap();
            assert_close(&first.embeddings, &alone.embeddings);
            let got: Vec<Vec<f32>> =
                responses.map(|response| response.unwrap().embeddings.remove(0)).collect();
            assert_close(&got, &want);
        }
        assert_eq!(client.worker_pid(), pid, "the same worker answered all");
        assert_eq!(client.stats().restarts, 0);
    })
    .await;
}

#[tokio::test]
async fn a_stopped_worker_with_a_full_pipe_blocks_no_caller() {
    within(async {
        let (client, stopped_pid) = client_with_a_stopped_worker().await;
        // The pipe fills up and stays full: every call still returns to its task at once (this
        // test's runtime has one thread: a caller blocked in a write would stop everything,
        // the supervisor's hang watch included), and the replacement answers them all.
        let long = over_a_pipe();
        let texts = [long.clone(), "one".to_owned(), long, "two".to_owned()];
        let calls =
            texts.iter().map(|text| client.embed_batch(request("", std::slice::from_ref(text))));
        for response in futures_join_all(calls).await {
            assert_eq!(response.unwrap().embeddings.len(), 1);
        }
        replaced_and_closed(client, stopped_pid).await;
    })
    .await;
}

#[tokio::test]
async fn a_request_that_always_times_out_fails_with_service_unavailable() {
    let mut config = config();
    config.request_timeout = Duration::from_secs(2);
    config.max_attempts = 1;
    with_client(config, |client| async move {
        signal(client.worker_pid().unwrap(), "STOP");
        let never = client.embed_batch(request("", &["never".to_owned()])).await;
        expect_error(never, SERVICE_UNAVAILABLE, &["timed out"]);
        // The replacement serves the next call.
        client.embed_batch(request("", &["answered".to_owned()])).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn the_restart_budget_ends_in_service_unavailable() {
    within(async {
        let mut config = config();
        config.restart_limit = 1;
        config.stable_start_time = Duration::from_secs(3600);
        let client = spawn(config).await;
        let first_pid = client.worker_pid().unwrap();
        signal(first_pid, "KILL");
        eventually("a replacement serves", || {
            client.worker_pid().is_some_and(|pid| pid != first_pid)
        })
        .await;
        signal(client.worker_pid().unwrap(), "KILL");
        // With the budget spent the client gives up instead of starting a third worker.
        eventually("the client stops serving", || client.worker_pid().is_none()).await;
        let after = client.embed_batch(request("", &["x".to_owned()])).await;
        expect_error(after, SERVICE_UNAVAILABLE, &["restart_limit"]);
        expect_error(client.model_info().await, SERVICE_UNAVAILABLE, &["restart_limit"]);
    })
    .await;
}

#[tokio::test]
async fn a_worker_without_its_model_fails_fast_with_model_not_found() {
    within(async {
        let mut config = config();
        config.model_dirs = vec![checkout().join("models/no-such-model")];
        expect_error(WorkerClient::spawn(config).await, MODEL_NOT_FOUND, &["no-such-model"]);
    })
    .await;
}

#[tokio::test]
async fn a_worker_command_that_exits_at_start_is_service_unavailable_with_its_reason() {
    within(async {
        let config = WorkerConfig {
            command: vec![
                python().into_os_string(),
                "-c".into(),
                "import sys; sys.stderr.write('cannot go on\\n'); sys.exit(3)".into(),
            ],
            ..config()
        };
        let parts = ["cannot go on", "exit status: 3"];
        expect_error(WorkerClient::spawn(config).await, SERVICE_UNAVAILABLE, &parts);
        let missing = WorkerConfig::with_command([checkout().join("no-such-program")]);
        let parts = ["cannot run the worker", "no-such-program"];
        expect_error(WorkerClient::spawn(missing).await, SERVICE_UNAVAILABLE, &parts);
    })
    .await;
}

#[tokio::test]
async fn closing_answers_requests_in_flight_and_reaps_the_worker() {
    with_client(config(), |client| async move {
        let golden = golden();
        let pid = client.worker_pid().unwrap();
        // join! polls the call first, so its request is written before close begins.
        let (response, ()) =
            tokio::join!(client.embed_batch(request("", &golden.sentences)), client.close());
        assert_close(&response.unwrap().embeddings, &golden.embeddings);
        assert!(!process_exists(pid), "worker {pid} reaped");
        let error = client.embed_batch(request("", &["late".to_owned()])).await.unwrap_err();
        assert!(matches!(error, EmbeddingError::ServiceUnavailable(_)), "{error:?}");
    })
    .await;
}

#[tokio::test]
async fn dropping_the_client_leaves_no_worker_process() {
    within(async {
        let client = spawn(config()).await;
        let clone = client.clone();
        let pid = client.worker_pid().unwrap();
        drop(client);
        clone.ping().await.unwrap();
        drop(clone);
        eventually("the worker is gone and reaped", || !process_exists(pid)).await;
    })
    .await;
}

#[tokio::test]
async fn distinct_ids_route_replies_under_pipelining() {
    with_client(config(), |client| async move {
        let texts: Vec<String> = (0..200).map(|i| format!("sentence number {i}")).collect();
        let calls =
            texts.iter().map(|text| client.embed_batch(request("", std::slice::from_ref(text))));
        let mut seen = HashSet::new();
        let mut single = Vec::new();
        for response in futures_join_all(calls).await {
            let vector = response.unwrap().embeddings.remove(0);
            seen.insert(vector.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            single.push(vector);
        }
        assert_eq!(seen.len(), texts.len(), "every call got a vector of its own");
        let batch = client.embed_batch(request("", &texts)).await.unwrap();
        assert_close(&single, &batch.embeddings);
    })
    .await;
}

/// Awaits all futures concurrently on this task, keeping their order (no futures crate).
async fn futures_join_all<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let futures: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let mut futures: Vec<Option<_>> = futures.into_iter().map(Some).collect();
    std::future::poll_fn(|context| {
        let mut pending = false;
        for (slot, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(context) {
                    std::task::Poll::Ready(value) => {
                        *output = Some(value);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("every future finished")).collect()
}

#[tokio::test]
async fn a_worker_serving_another_model_than_expected_fails_fast_with_model_not_found() {
    within(async {
        let other =
            WorkerConfig { expected_model: Some("intfloat/e5-small-v2".into()), ..config() };
        let parts = ["expected \"intfloat/e5-small-v2\"", &metadata().model];
        expect_error(WorkerClient::spawn(other).await, MODEL_NOT_FOUND, &parts);
        let matching = WorkerConfig { expected_model: Some(metadata().model), ..config() };
        let client = spawn(matching).await;
        client.embed_batch(request("", &["the expected model".to_owned()])).await.unwrap();
        client.close().await;
    })
    .await;
}

#[tokio::test]
async fn a_python_without_the_worker_module_fails_with_its_own_message() {
    within(async {
        // an interpreter that sees no site-packages at all, so no akidb_embed
        let bare =
            std::env::temp_dir().join(format!("akidb-embed-bare-python-{}", std::process::id()));
        std::fs::write(&bare, format!("#!/bin/sh\nexec {:?} -I -S \"$@\"\n", python())).unwrap();
        std::process::Command::new("chmod").arg("+x").arg(&bare).status().unwrap();
        let config =
            WorkerConfig { model_dirs: vec![model_dir()], ..WorkerConfig::from_python(&bare) };
        let started = WorkerClient::spawn(config).await;
        std::fs::remove_file(&bare).unwrap();
        expect_error(started, SERVICE_UNAVAILABLE, &["No module named"]);
    })
    .await;
}

#[tokio::test]
async fn the_workers_stderr_and_the_supervisors_events_go_to_tracing() {
    within(async {
        let client = spawn(config()).await;
        let pid = client.worker_pid().unwrap();
        client.close().await;
        let worker_prefix = format!("akidb-embed-worker[{pid}]");
        let started = Log::get().lines_with(&["akidb_embed_client::worker INFO", &worker_prefix]);
        assert!(started.iter().any(|line| line.contains("starting:")), "{started:?}");
        let ready = format!("worker {pid} ready");
        assert_eq!(Log::get().lines_with(&["akidb_embed_client", "INFO", &ready]).len(), 1);
        let stopped = format!("worker {pid} stopped");
        assert_eq!(Log::get().lines_with(&["akidb_embed_client", "INFO", &stopped]).len(), 1);
    })
    .await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn calls_from_another_runtime_are_served_while_the_spawning_one_runs() {
    on_a_thread_within(|| {
        let golden = golden();
        let spawning = runtime();
        let client = spawning.block_on(spawn(config()));
        let other = tokio::runtime::Builder::new_current_thread().build().unwrap();
        // `other` has neither I/O nor timers: a call needs none of its own
        let response = other.block_on(client.embed_batch(request("", &golden.sentences))).unwrap();
        assert_close(&response.embeddings, &golden.embeddings);
        other.block_on(client.health_check()).unwrap();
        spawning.block_on(client.close());
    });
}

#[test]
fn a_dropped_runtime_fails_every_call_at_once_with_service_unavailable() {
    on_a_thread_within(|| {
        let spawning = runtime();
        let client = spawning.block_on(spawn(config()));
        let pid = client.worker_pid().unwrap();
        spawning.block_on(client.embed_batch(request("", &["before".to_owned()]))).unwrap();
        // a call in flight on another runtime, to a worker that cannot answer it, when the
        // supervisor's runtime goes
        signal(pid, "STOP");
        let other = runtime();
        let in_flight = {
            let client = client.clone();
            other.spawn(async move { client.embed_batch(request("", &["never".into()])).await })
        };
        std::thread::sleep(Duration::from_millis(100));
        let started = std::time::Instant::now();
        drop(spawning);

        let unavailable = |result: Result<(), EmbeddingError>| {
            expect_error(result, SERVICE_UNAVAILABLE, &["runtime"]);
        };
        unavailable(other.block_on(in_flight).unwrap().map(drop));
        unavailable(
            other.block_on(client.embed_batch(request("", &["after".to_owned()]))).map(drop),
        );
        unavailable(other.block_on(client.model_info()).map(drop));
        unavailable(other.block_on(client.health_check()));
        other.block_on(client.close());
        let elapsed = started.elapsed();
        eprintln!("dropped runtime: every call failed within {elapsed:?}");
        // a hang guard, not a timing test: the calls fail at once, measured in the report
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        assert_eq!(client.worker_pid(), None);
        // the worker was killed with its runtime (a zombie until some runtime reaps it)
        assert!(dies_soon(pid), "worker {pid} still runs");
    });
}

const SECOND_MODEL: &str = "akidb-embed-test/minilm-with-a-prompt";

/// A second model directory: the provisioned model's files (hard links) under another id and
/// with one prompt, `query` = "query: " (pooled with the input, as its metadata says).
fn second_model_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("second-model");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["model.onnx", "tokenizer.json", "golden.json"] {
            let (from, to) = (model_dir().join(file), dir.join(file));
            std::fs::hard_link(&from, &to)
                .or_else(|_| std::fs::copy(&from, &to).map(drop))
                .unwrap();
        }
        let text = std::fs::read_to_string(model_dir().join("akidb-embed.json")).unwrap();
        let mut metadata: serde_json::Value = serde_json::from_str(&text).unwrap();
        metadata["format"] = 2.into();
        metadata["model"] = SECOND_MODEL.into();
        metadata["prompts"] = serde_json::json!({"query": "query: "});
        metadata["include_prompt"] = true.into();
        std::fs::write(dir.join("akidb-embed.json"), metadata.to_string()).unwrap();
        dir
    })
    .clone()
}

#[tokio::test]
async fn two_models_are_served_by_name_with_their_prompts() {
    let golden = golden();
    let default_model = metadata().model;
    let config = WorkerConfig {
        model_dirs: vec![model_dir(), second_model_dir()],
        expected_model: Some(default_model.clone()),
        ..config()
    };
    with_client(config, |client| async move {
        let models = client.models().unwrap();
        let ids: Vec<&str> = models.iter().map(|m| m.model.as_str()).collect();
        assert_eq!(ids, [default_model.as_str(), SECOND_MODEL]);
        assert_eq!(models[1].prompts, ["query"]);
        assert_eq!(
            (models[1].pooling.as_deref(), models[1].normalize_default),
            (Some("mean"), true)
        );
        assert_eq!(client.model_info().await.unwrap().model, default_model);
        assert_eq!(client.model_info_for(SECOND_MODEL).unwrap().dimension, 384);

        // each request is served by the model it names, the default one for an empty name
        let second = client.embed_batch(request(SECOND_MODEL, &golden.sentences)).await.unwrap();
        assert_eq!(second.model, SECOND_MODEL);
        assert_close(&second.embeddings, &golden.embeddings); // the same weights
        let default = client.embed_batch(request("", &golden.sentences[..2])).await.unwrap();
        assert_eq!(default.model, default_model);

        // a prompt name puts the prompt's text before every input
        let texts = ["a cat sits on the mat".to_owned(), "stock markets fell".to_owned()];
        let query = EmbedOptions { prompt_name: Some("query".into()), ..EmbedOptions::default() };
        let prompted =
            client.embed_batch_with(request(SECOND_MODEL, &texts), &query).await.unwrap();
        let by_hand: Vec<String> = texts.iter().map(|text| format!("query: {text}")).collect();
        let spelled_out = client.embed_batch(request(SECOND_MODEL, &by_hand)).await.unwrap();
        assert_close(&prompted.embeddings, &spelled_out.embeddings);
        let plain = client.embed_batch(request(SECOND_MODEL, &texts)).await.unwrap();
        assert!(cosine(&prompted.embeddings[0], &plain.embeddings[0]) < 0.999, "the prompt counts");

        let unknown = EmbedOptions { prompt_name: Some("passage".into()), ..query.clone() };
        let unknown_prompt = client.embed_batch_with(request(SECOND_MODEL, &texts), &unknown).await;
        // the message lists the prompts
        expect_error(unknown_prompt, INVALID_INPUT, &["query"]);
    })
    .await;
}

// The pool: `workers` supervised workers behind one client.

fn pool_config(workers: usize) -> WorkerConfig {
    WorkerConfig { workers, ..config() }
}

fn pids(client: &WorkerClient) -> Vec<u32> {
    client.stats().workers.iter().map(|w| w.pid.expect("every worker serves")).collect()
}

#[tokio::test]
async fn a_pool_of_three_gives_the_same_vectors_as_one_worker() {
    within(async {
        let golden = golden();
        let mut pool_config = pool_config(3);
        // small wire requests, so that one batch is spread over the workers
        pool_config.extra_args = vec!["--max-texts-per-request".into(), "4".into()];
        let (pool, one) = tokio::join!(spawn(pool_config), spawn(config()));
        let stats = pool.stats();
        assert_eq!(stats.workers.len(), 3);
        assert_eq!(pids(&pool).iter().collect::<HashSet<_>>().len(), 3, "three processes");
        assert_eq!(pool.worker_pid(), stats.workers[0].pid);

        let texts: Vec<String> =
            golden.sentences.iter().chain(&golden.sentences).cloned().collect();
        let by_one = one.embed_batch(request("", &texts)).await.unwrap();
        let by_pool = pool.embed_batch(request("", &texts)).await.unwrap();
        assert_close(&by_pool.embeddings, &by_one.embeddings);
        assert_close(&by_pool.embeddings[..golden.sentences.len()], &golden.embeddings);
        assert_eq!(by_pool.usage.total_tokens, by_one.usage.total_tokens);
        let singles = futures_join_all(
            golden
                .sentences
                .iter()
                .map(|text| pool.embed_batch(request("", std::slice::from_ref(text)))),
        )
        .await;
        for (index, response) in singles.into_iter().enumerate() {
            assert_close(&response.unwrap().embeddings, &golden.embeddings[index..=index]);
        }
        pool.health_check().await.unwrap();

        let stats = pool.stats();
        for worker in &stats.workers {
            assert!(worker.answered_requests > 0, "every worker served: {stats:?}");
            assert_eq!((worker.state, worker.restarts, worker.in_flight_texts), ("ready", 0, 0));
        }
        assert_eq!((stats.in_flight_texts, stats.restarts), (0, 0));
        tokio::join!(pool.close(), one.close());
    })
    .await;
}

#[tokio::test]
async fn a_killed_worker_of_a_pool_loses_nothing_while_the_others_answer() {
    within(async {
        let golden = Arc::new(golden());
        let client = spawn(pool_config(3)).await;
        let first_pids = pids(&client);
        let killed = first_pids[1];
        let done = Arc::new(AtomicUsize::new(0));
        let tasks = golden_load(&client, &golden, &done);
        let done_at_kill = kill_under_load(killed, &done).await;
        // calls answered before the killed worker's slot has a worker again
        let replaced =
            |client: &WorkerClient| client.stats().workers[1].pid.is_some_and(|pid| pid != killed);
        eventually("the killed worker is replaced or the load is over", || {
            replaced(&client) || done.load(Ordering::SeqCst) == TASKS * CALLS_PER_TASK
        })
        .await;
        let answered_while_restarting = done.load(Ordering::SeqCst) - done_at_kill;

        let answered = golden_answers(tasks, &golden).await;
        assert_eq!(answered, TASKS * CALLS_PER_TASK);
        assert!(answered_while_restarting > 0, "the other workers kept answering");
        eventually("the killed worker is replaced", || replaced(&client)).await;
        let stats = client.stats();
        let now = pids(&client);
        assert_eq!((now[0], now[2]), (first_pids[0], first_pids[2]), "the others untouched");
        let restarts: Vec<u32> = stats.workers.iter().map(|w| w.restarts).collect();
        assert_eq!(restarts, [0, 1, 0]);
        eprintln!(
            "pool kill: {answered} calls answered, {answered_while_restarting} of them after the \
             kill and before the replacement was ready; {} wire requests sent again; restarts \
             {restarts:?}",
            stats.resent_requests
        );
        client.close().await;
        assert!(now.iter().all(|&pid| !process_exists(pid)), "every worker reaped");
    })
    .await;
}

#[tokio::test]
async fn a_pool_whose_second_worker_cannot_start_fails_with_that_workers_error() {
    within(async {
        // The first worker started runs the real worker (and notes its pid); any other exits.
        let dir = std::env::temp_dir().join(format!("akidb-embed-pool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("worker");
        let first = dir.join("first");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nif mkdir {first:?} 2>/dev/null; then echo $$ > {first:?}/pid; exec \
                 {:?} \"$@\"; fi\necho 'this worker cannot start: no room' >&2\nexit 3\n",
                python()
            ),
        )
        .unwrap();
        std::process::Command::new("chmod").arg("+x").arg(&script).status().unwrap();
        let config = WorkerConfig {
            command: vec![script.into_os_string(), "-m".into(), "akidb_embed.worker".into()],
            ..pool_config(2)
        };
        let parts = ["this worker cannot start: no room", "exit status: 3"];
        expect_error(WorkerClient::spawn(config).await, SERVICE_UNAVAILABLE, &parts);
        let started: u32 =
            std::fs::read_to_string(first.join("pid")).unwrap().trim().parse().unwrap();
        assert!(!process_exists(started), "the worker that did start was stopped and reaped");
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await;
}

#[tokio::test]
async fn closing_or_dropping_a_pool_leaves_no_worker_process() {
    within(async {
        let (closed, dropped) = tokio::join!(spawn(pool_config(2)), spawn(pool_config(2)));
        let closed_pids = pids(&closed);
        closed.ping().await.unwrap();
        closed.close().await;
        assert!(closed_pids.iter().all(|&pid| !process_exists(pid)), "{closed_pids:?} reaped");
        let stats = closed.stats();
        assert!(stats.workers.iter().all(|w| w.pid.is_none() && w.state == "stopped"));
        let error = closed.ping().await.unwrap_err();
        assert!(matches!(error, EmbeddingError::ServiceUnavailable(_)), "{error:?}");

        let dropped_pids = pids(&dropped);
        drop(dropped);
        eventually("every worker of the dropped pool is gone and reaped", || {
            dropped_pids.iter().all(|&pid| !process_exists(pid))
        })
        .await;
    })
    .await;
}

// The request options beyond AkiDB's fields: dimensions, encodings, truncation side, tokenize.

fn sign_bits(vector: &[f32]) -> Vec<u8> {
    vector
        .chunks(8)
        .map(|chunk| chunk.iter().fold(0u8, |byte, &x| (byte << 1) | u8::from(x > 0.0)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimensions_encodings_truncation_side_and_tokenize_reach_the_worker() {
    with_client(config(), |client| async move {
        let golden = golden();
        let texts = &golden.sentences;
        let described = &client.models().unwrap()[0];
        assert_eq!(described.encodings.len(), 6, "{:?}", described.encodings);
        assert!(described.matryoshka_dimensions.is_empty());

        // dimensions: the first components, normalised again
        let whole = client.embed_batch(request("", texts)).await.unwrap();
        let cut = EmbedOptions { dimensions: Some(128), ..EmbedOptions::default() };
        let short = client.embed_batch_with(request("", texts), &cut).await.unwrap();
        for (short, whole) in short.embeddings.iter().zip(&whole.embeddings) {
            assert_eq!(short.len(), 128);
            assert!(cosine(short, &whole[..128]) > MIN_COSINE);
            let norm: f32 = short.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        }

        // encodings: typed, and the packed bits are the float vectors' signs
        let packed =
            client.embed_encoded(request("", texts), &cut, Encoding::Ubinary).await.unwrap();
        assert_eq!((packed.encoding, packed.width), (Encoding::Ubinary, 16));
        let EncodedValues::Uint8(bits) = &packed.values else { panic!("{:?}", packed.values) };
        let mut differing = 0;
        for (row, vector) in bits.chunks(16).zip(&short.embeddings) {
            let want = sign_bits(vector);
            differing += row.iter().zip(&want).filter(|(a, b)| a != b).count();
        }
        assert_eq!(differing, 0, "bits of {} texts", texts.len());
        let binary =
            client.embed_encoded(request("", texts), &cut, Encoding::Binary).await.unwrap().values;
        let EncodedValues::Int8(signed) = binary else { panic!("{binary:?}") };
        assert!(signed.iter().zip(bits).all(|(&s, &u)| (s as i16 + 128) as u8 == u));
        let half = client
            .embed_encoded(request("", texts), &EmbedOptions::default(), Encoding::Float16)
            .await
            .unwrap();
        let EncodedValues::Float16(halves) = &half.values else { panic!("{:?}", half.values) };
        let widened: Vec<f32> = halves.iter().map(|&h| f16_bits_to_f32(h)).collect();
        for (row, vector) in widened.chunks(384).zip(&whole.embeddings) {
            assert!(row.iter().zip(vector).all(|(a, b)| (a - b).abs() < 1e-3));
        }

        // int8: the same codes alone and in a batch
        let int8 = |inputs: &[String]| {
            let client = client.clone();
            let inputs = inputs.to_vec();
            async move {
                let options = EmbedOptions::default();
                client.embed_encoded(request("", &inputs), &options, Encoding::Int8).await
            }
        };
        let together = int8(texts).await.unwrap();
        let alone = int8(&texts[2..3]).await.unwrap();
        let (EncodedValues::Int8(together), EncodedValues::Int8(alone)) =
            (together.values, alone.values)
        else {
            panic!("int8 values")
        };
        assert_eq!(&together[2 * 384..3 * 384], &alone[..]);
        let (minimum, maximum) = client.quantization_ranges("", None, None).await.unwrap();
        assert_eq!((minimum.len(), maximum.len()), (384, 384));
        assert!(minimum.iter().zip(&maximum).all(|(low, high)| low < high));
        let (short_min, _) = client.quantization_ranges("", Some(64), Some(false)).await.unwrap();
        assert_eq!(short_min.len(), 64);

        // bad options: invalid_input naming the field
        let too_long = EmbedOptions { dimensions: Some(385), ..EmbedOptions::default() };
        let refused = client.embed_batch_with(request("", texts), &too_long).await;
        let message = expect_error(refused, INVALID_INPUT, &[]);
        assert!(message.starts_with("dimensions must be from 1 to 384"), "{message}");
        let unpackable = EmbedOptions { dimensions: Some(100), ..EmbedOptions::default() };
        let refused = client.embed_encoded(request("", texts), &unpackable, Encoding::Binary).await;
        let message = expect_error(refused, INVALID_INPUT, &[]);
        assert!(message.starts_with("dimensions 100 is not a multiple of 8"), "{message}");

        // tokenize: the counts the worker runs with; left truncation keeps the end
        let counts = client.count_tokens("", texts.clone(), &EmbedOptions::default()).await;
        assert_eq!(counts.unwrap(), golden.token_counts);
        let long = format!(
            "{}{} the very end",
            "cats and dogs play in the garden. ".repeat(60),
            "stock markets fell on inflation fears. ".repeat(60)
        );
        let left =
            EmbedOptions { truncation_side: Some(TruncationSide::Left), ..Default::default() };
        let right_ids = client.tokenize("", vec![long.clone()], &EmbedOptions::default()).await;
        let left_ids = client.tokenize("", vec![long.clone()], &left).await.unwrap();
        let right_ids = right_ids.unwrap();
        assert_eq!((left_ids[0].len(), right_ids[0].len()), (256, 256));
        assert_ne!(left_ids, right_ids);
        let kept_end = client.tokenize("", vec!["the very end".into()], &left).await.unwrap();
        let end = &kept_end[0][1..kept_end[0].len() - 1]; // without [CLS] and [SEP]
        assert!(left_ids[0][..left_ids[0].len() - 1].ends_with(end));
        let by_side =
            client.embed_batch_with(request("", std::slice::from_ref(&long)), &left).await.unwrap();
        let by_right = client.embed_batch(request("", &[long])).await.unwrap();
        assert!(cosine(&by_side.embeddings[0], &by_right.embeddings[0]) < 0.99);
    })
    .await;
}
