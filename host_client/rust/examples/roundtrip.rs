//! Measures the Rust client against a real worker with the workloads of `akidb-embed bench`:
//! one short sentence at a time, 16 concurrent callers, one bulk request, the cold start
//! (spawn to first vector), and the bridge's own round trip (`ping`).
//!
//! ```text
//! .ci/cargo-offline run --release --example roundtrip -- \
//!     [--python PATH] [--model-dir DIR] [--workers 1] [--threads N] [--calls 500]
//!     [--corpus texts.json] [--json]
//! ```
//!
//! `--corpus` takes a JSON array of strings (`akidb-embed bench` passes its own corpus, so the
//! figures sit beside the Python ones); without it the bulk workload repeats the model
//! directory's golden sentences to 1,000 texts. The short sentences are chosen, and the
//! percentiles computed, as the Python runner does. `--json` prints one JSON object
//! (`{"figures": {workload: {metric: value}}, ...}`) instead of the text report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use akidb_embed_client::{BatchEmbeddingRequest, WorkerClient, WorkerConfig};
use serde_json::json;

const WARM_UP_CALLS: usize = 10;
const CONCURRENT_CALLERS: usize = 16;
const DEFAULT_BULK_TEXTS: usize = 1000;
/// Texts shorter than this (in characters) count as "one short sentence", as in the runner.
const SHORT_TEXT_CHARS: usize = 120;
const SHORT_TEXTS: usize = 50;

struct Options {
    python: PathBuf,
    model_dir: PathBuf,
    workers: usize,
    threads: Option<usize>,
    calls: usize,
    corpus: Option<PathBuf>,
    json: bool,
}

fn options() -> Options {
    let checkout = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut options = Options {
        python: checkout.join(".venv/bin/python"),
        model_dir: checkout.join("models/all-MiniLM-L6-v2"),
        workers: akidb_embed_client::DEFAULT_WORKERS,
        threads: None,
        calls: 500,
        corpus: None,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--json" {
            options.json = true;
            continue;
        }
        let value = args.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--python" => options.python = value.into(),
            "--model-dir" => options.model_dir = value.into(),
            "--workers" => options.workers = value.parse().expect("--workers takes a number"),
            "--threads" => options.threads = Some(value.parse().expect("--threads takes a number")),
            "--calls" => options.calls = value.parse().expect("--calls takes a number"),
            "--corpus" => options.corpus = Some(value.into()),
            other => panic!("unknown option {other}"),
        }
    }
    options
}

fn read_json_strings(path: &PathBuf, field: Option<&str>) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let list = match field {
        Some(field) => value[field].clone(),
        None => value,
    };
    serde_json::from_value(list).expect("a list of strings")
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// p50, p95 and p99 in milliseconds, interpolated linearly between samples (numpy's default).
fn percentiles(samples: &mut [Duration]) -> serde_json::Value {
    samples.sort_unstable();
    let at = |q: f64| {
        let position = (samples.len() - 1) as f64 * q;
        let (low, high) = (position.floor() as usize, position.ceil() as usize);
        let (low_ms, high_ms) = (milliseconds(samples[low]), milliseconds(samples[high]));
        low_ms + (high_ms - low_ms) * (position - low as f64)
    };
    json!({"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99)})
}

async fn embed_one(client: &WorkerClient, text: &str) {
    let request = BatchEmbeddingRequest::new("", vec![text.to_owned()]);
    client.embed_batch(request).await.expect("embedding succeeds");
}

/// One sentence per call from one caller.
async fn single(client: &WorkerClient, short: &[String], calls: usize) -> serde_json::Value {
    for text in short.iter().take(WARM_UP_CALLS) {
        embed_one(client, text).await;
    }
    let mut samples = Vec::with_capacity(calls);
    for index in 0..calls {
        let started = Instant::now();
        embed_one(client, &short[index % short.len()]).await;
        samples.push(started.elapsed());
    }
    percentiles(&mut samples)
}

/// `CONCURRENT_CALLERS` tasks, each sending one sentence per call.
async fn concurrent(client: &WorkerClient, short: &[String], calls: usize) -> serde_json::Value {
    let short = Arc::new(short.to_vec());
    let per_caller = (calls / CONCURRENT_CALLERS).max(1);
    let started = Instant::now();
    let callers: Vec<_> = (0..CONCURRENT_CALLERS)
        .map(|caller| {
            let (client, short) = (client.clone(), short.clone());
            tokio::spawn(async move {
                let mut mine = Vec::with_capacity(per_caller);
                for index in 0..per_caller {
                    let call_started = Instant::now();
                    embed_one(&client, &short[(caller * 7 + index) % short.len()]).await;
                    mine.push(call_started.elapsed());
                }
                mine
            })
        })
        .collect();
    let mut samples = Vec::new();
    for caller in callers {
        samples.extend(caller.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut figures = percentiles(&mut samples);
    figures["requests_per_s"] = json!(samples.len() as f64 / elapsed);
    figures
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let options = options();
    let golden = read_json_strings(&options.model_dir.join("golden.json"), Some("sentences"));
    let bulk_texts = match &options.corpus {
        Some(path) => read_json_strings(path, None),
        None => golden.iter().cycle().take(DEFAULT_BULK_TEXTS).cloned().collect(),
    };
    let mut short: Vec<String> = bulk_texts
        .iter()
        .filter(|text| text.chars().count() < SHORT_TEXT_CHARS)
        .take(SHORT_TEXTS)
        .cloned()
        .collect();
    if short.is_empty() {
        short = bulk_texts.iter().take(SHORT_TEXTS).cloned().collect();
    }

    let spawned = Instant::now();
    let client = WorkerClient::spawn(WorkerConfig {
        model_dirs: vec![options.model_dir.clone()],
        workers: options.workers,
        threads: options.threads,
        ..WorkerConfig::from_python(&options.python)
    })
    .await
    .expect("the worker starts");
    embed_one(&client, "hello world").await;
    let cold_start = milliseconds(spawned.elapsed());
    let hello = client.hello().expect("the worker serves");

    let mut ping_samples = Vec::with_capacity(options.calls);
    for index in 0..WARM_UP_CALLS + options.calls {
        let started = Instant::now();
        client.ping().await.unwrap();
        if index >= WARM_UP_CALLS {
            ping_samples.push(started.elapsed());
        }
    }
    let ping = percentiles(&mut ping_samples);
    let single = single(&client, &short, options.calls).await;
    let concurrent = concurrent(&client, &short, options.calls).await;

    let started = Instant::now();
    let response = client
        .embed_batch(BatchEmbeddingRequest::new("", bulk_texts.clone()))
        .await
        .expect("bulk embedding succeeds");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(response.embeddings.len(), bulk_texts.len());
    client.close().await;

    let concurrent_workload = format!("concurrent x{CONCURRENT_CALLERS}");
    let report = json!({
        "model": hello.model.model,
        "worker_pid": hello.pid,
        "providers": hello.providers,
        "figures": {
            "single": single,
            concurrent_workload.as_str(): concurrent,
            "bulk": {"texts_per_s": bulk_texts.len() as f64 / seconds, "seconds": seconds},
            "cold start": {"ms_to_first_answer": cold_start},
            "ping": ping,
        },
    });
    if options.json {
        println!("{report}");
        return;
    }
    let figures = &report["figures"];
    println!(
        "akidb-embed-client roundtrip: {} ({} dims), worker {} on {:?}",
        hello.model.model, hello.model.dimension, hello.pid, hello.providers
    );
    println!("cold start (spawn to first vector): {cold_start:.0} ms");
    let latency = |workload: &str| {
        let ms = |metric: &str| figures[workload][metric].as_f64().unwrap_or_default();
        format!(
            "p50 {:.3} ms, p95 {:.3} ms, p99 {:.3} ms",
            ms("p50_ms"),
            ms("p95_ms"),
            ms("p99_ms")
        )
    };
    println!("ping round trip, {} calls: {}", options.calls, latency("ping"));
    println!("one sentence, {} calls: {}", options.calls, latency("single"));
    println!(
        "{concurrent_workload}: {:.0} requests/s, {}",
        figures[&concurrent_workload]["requests_per_s"].as_f64().unwrap_or_default(),
        latency(&concurrent_workload)
    );
    println!(
        "bulk, {} texts ({} tokens): {seconds:.1} s, {:.0} texts/s",
        bulk_texts.len(),
        response.usage.total_tokens,
        bulk_texts.len() as f64 / seconds
    );
}
