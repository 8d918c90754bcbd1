//! The adapter (`akidb_embed_provider.rs`) as AkiDB uses it: an `Arc<dyn EmbeddingProvider>`
//! over the real worker (`python -m akidb_embed.worker`) and the real model, every vector
//! compared with the Python client's (`akidb_embed.host_client`) for the same text.
//!
//! The interpreter and the model are found as `tests/common` of the client crate says.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use akidb_embed_client::{WorkerClient, WorkerConfig};
use akidb_embedding::akidb_embed_provider::AkidbEmbedProvider;
use akidb_embedding::provider::EmbeddingProvider;
use akidb_embedding::types::{BatchEmbeddingRequest, EmbeddingError, EmbeddingResult};
use common::{
    cosine, dies_soon, expect_error, model_dir, model_id, on_a_thread_within, python, signal,
    within, MIN_COSINE, MODEL_NOT_FOUND, SERVICE_UNAVAILABLE,
};

const CALLERS: usize = 64;

fn config() -> WorkerConfig {
    WorkerConfig {
        model_dirs: vec![model_dir()],
        expected_model: Some(model_id()),
        // two tests at a time on small machines: one ONNX Runtime thread per worker
        threads: Some(1),
        ..WorkerConfig::from_python(python())
    }
}

/// How AkiDB starts the provider (the adapter's own doc line).
async fn spawn(config: WorkerConfig) -> EmbeddingResult<(Arc<dyn EmbeddingProvider>, u32)> {
    let client = WorkerClient::spawn(config).await?;
    let pid = client.worker_pid().expect("a worker serves");
    Ok((Arc::new(AkidbEmbedProvider(client)), pid))
}

/// `CALLERS` different texts of everyday length.
fn texts() -> &'static [String] {
    static TEXTS: OnceLock<Vec<String>> = OnceLock::new();
    TEXTS.get_or_init(|| {
        let golden = std::fs::read_to_string(model_dir().join("golden.json")).unwrap();
        let golden: serde_json::Value = serde_json::from_str(&golden).unwrap();
        let sentences: Vec<&str> = golden["sentences"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s.as_str())
            .filter(|s| !s.is_empty() && s.len() < 300)
            .collect();
        (0..CALLERS).map(|i| format!("{} ({i})", sentences[i % sentences.len()])).collect()
    })
}

/// The Python client's vectors of `texts()`, in order.
fn python_vectors() -> &'static [Vec<f32>] {
    static VECTORS: OnceLock<Vec<Vec<f32>>> = OnceLock::new();
    VECTORS.get_or_init(|| {
        let script = "import json, sys\n\
            from akidb_embed.host_client import EmbeddingClient\n\
            texts = json.load(sys.stdin)\n\
            with EmbeddingClient(sys.argv[1], threads=1) as client:\n\
            \x20   json.dump(client.embed(texts).tolist(), sys.stdout)\n";
        let mut child = std::process::Command::new(python())
            .args(["-c", script])
            .arg(model_dir())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        serde_json::to_writer(child.stdin.take().unwrap(), texts()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "the Python client failed: {}", output.status);
        serde_json::from_slice(&output.stdout).unwrap()
    })
}

fn assert_like_python(index: usize, vector: &[f32]) {
    let want = &python_vectors()[index];
    assert_eq!(vector.len(), want.len(), "dimension of text {index}");
    let cosine = cosine(vector, want);
    assert!(cosine >= MIN_COSINE, "text {index}: cosine {cosine} to the Python client's vector");
}

/// One caller's request: its own text and the next one (so order within a batch is checked).
fn request_of(caller: usize, model: &str) -> (BatchEmbeddingRequest, [usize; 2]) {
    let indices = [caller % CALLERS, (caller + 1) % CALLERS];
    let inputs = indices.iter().map(|&i| texts()[i].clone()).collect();
    (BatchEmbeddingRequest { model: model.to_owned(), inputs, normalize: true }, indices)
}

async fn call_and_check(provider: &dyn EmbeddingProvider, caller: usize, model: &str) {
    let (request, indices) = request_of(caller, model);
    let response = provider.embed_batch(request).await.expect("every call succeeds");
    assert_eq!(response.model, model);
    assert_eq!(response.embeddings.len(), 2);
    for (vector, index) in response.embeddings.iter().zip(indices) {
        assert_like_python(index, vector);
    }
    assert!(response.usage.total_tokens > 0);
}

/// Runs `test` on a runtime of its own, bounded by `TEST_TIMEOUT`.
fn run(test: impl std::future::Future<Output = ()> + Send + 'static) {
    python_vectors(); // before any worker of ours runs, and outside the timeout
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(within(test));
}

#[test]
fn sixty_four_concurrent_calls_through_arc_dyn_match_the_python_client() {
    run(async {
        let (provider, _) = spawn(config()).await.unwrap();
        let info = provider.model_info().await.unwrap();
        assert_eq!(
            (info.model.as_str(), info.dimension, info.max_tokens),
            (&*model_id(), 384, 256)
        );
        provider.health_check().await.unwrap();
        let calls: Vec<_> = (0..CALLERS)
            .map(|caller| {
                let (provider, model) = (provider.clone(), info.model.clone());
                tokio::spawn(async move { call_and_check(&*provider, caller, &model).await })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
    });
}

#[test]
fn a_sigkill_in_the_middle_of_64_concurrent_callers_loses_no_call() {
    run(async {
        const CALLS_PER_CALLER: usize = 4;
        let (provider, first_pid) = spawn(config()).await.unwrap();
        let model = provider.model_info().await.unwrap().model;
        let done = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..CALLERS)
            .map(|caller| {
                let (provider, model, done) = (provider.clone(), model.clone(), done.clone());
                tokio::spawn(async move {
                    for call in 0..CALLS_PER_CALLER {
                        call_and_check(&*provider, caller + call * 7, &model).await;
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        while done.load(Ordering::SeqCst) < CALLERS / 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        signal(first_pid, "KILL");
        let done_at_kill = done.load(Ordering::SeqCst);
        assert!(done_at_kill < CALLERS * CALLS_PER_CALLER, "the kill came with calls in flight");
        for caller in callers {
            caller.await.expect("no call failed because of the kill");
        }
        assert_eq!(done.load(Ordering::SeqCst), CALLERS * CALLS_PER_CALLER);
        eprintln!(
            "SIGKILL after {done_at_kill} of {} calls: all answered",
            done.load(Ordering::SeqCst)
        );
        provider.health_check().await.unwrap();
    });
}

#[test]
fn a_dropped_client_runtime_fails_every_call_at_once_with_service_unavailable() {
    python_vectors();
    on_a_thread_within(|| {
        let client_runtime =
            tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        let (provider, pid) = client_runtime.block_on(spawn(config())).unwrap();
        let model = client_runtime.block_on(provider.model_info()).unwrap().model;
        client_runtime.block_on(call_and_check(&*provider, 0, &model));

        // a call in flight from another runtime, to a worker that cannot answer it
        let other = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        signal(pid, "STOP");
        let in_flight = {
            let (provider, (request, _)) = (provider.clone(), request_of(1, &model));
            other.spawn(async move { provider.embed_batch(request).await.map(drop) })
        };
        std::thread::sleep(Duration::from_millis(100));

        let dropped_at = Instant::now();
        drop(client_runtime);
        let unavailable = |result: EmbeddingResult<()>| {
            expect_error(result, SERVICE_UNAVAILABLE, &["runtime"]);
        };
        unavailable(other.block_on(in_flight).unwrap());
        let (request, _) = request_of(2, &model);
        unavailable(other.block_on(provider.embed_batch(request)).map(drop));
        unavailable(other.block_on(provider.model_info()).map(drop));
        unavailable(other.block_on(provider.health_check()));
        let elapsed = dropped_at.elapsed();
        eprintln!("dropped runtime: the call in flight and three new calls failed in {elapsed:?}");
        // a hang guard only: the figure itself is printed (and measured well under a second)
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        // killed with the runtime: gone or a zombie once the kernel has torn it down
        assert!(dies_soon(pid), "worker {pid} still runs");
    });
}

#[test]
fn a_worker_serving_another_model_is_refused_with_akidbs_model_not_found() {
    run(async {
        let expecting_other =
            WorkerConfig { expected_model: Some("BAAI/bge-small-en-v1.5".into()), ..config() };
        let refused = spawn(expecting_other).await;
        let message = expect_error(refused, MODEL_NOT_FOUND, &["BAAI/bge-small-en-v1.5"]);
        assert!(message.contains(&model_id()), "{message}");
    });
}

#[test]
fn akidbs_request_fields_and_errors_map_one_to_one() {
    run(async {
        let (provider, _) = spawn(config()).await.unwrap();
        let model = model_id();
        let empty = BatchEmbeddingRequest { model: model.clone(), inputs: vec![], normalize: true };
        match provider.embed_batch(empty).await {
            Err(EmbeddingError::InvalidInput(message)) => assert_eq!(message, "empty input batch"),
            other => panic!("{other:?}"),
        }
        let (mut other_model, _) = request_of(0, "sentence-transformers/not-loaded");
        let error = provider.embed_batch(other_model.clone()).await.map(drop).unwrap_err();
        assert!(matches!(error, EmbeddingError::ModelNotFound(_)), "{error:?}");
        // normalize is passed through: MiniLM's raw mean-pooled vectors are not unit length
        other_model.model = model;
        other_model.normalize = false;
        let raw = provider.embed_batch(other_model).await.unwrap();
        for (index, vector) in raw.embeddings.iter().enumerate() {
            let norm = vector.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() > 0.01, "vector {index} has norm {norm}");
            assert_like_python([0, 1][index], vector); // same direction as the normalised one
        }
    });
}
