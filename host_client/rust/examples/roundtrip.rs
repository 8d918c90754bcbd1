//! Measures the Rust client against a real worker: the bridge's own round trip (`ping`), one
//! short sentence at a time, 16 concurrent callers, and one bulk request; prints the figures.
//!
//! ```text
//! .ci/cargo-offline run --release --example roundtrip -- \
//!     [--python PATH] [--model-dir DIR] [--calls 500] [--corpus texts.json]
//! ```
//!
//! `--corpus` takes a JSON array of strings (e.g. the benchmark corpus of `akidb-embed bench`,
//! for figures comparable with the Python client's); without it the bulk workload repeats the
//! model directory's golden sentences to 1,000 texts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use akidb_embed_client::{BatchEmbeddingRequest, WorkerClient, WorkerConfig};

const WARM_UP_CALLS: usize = 10;
const CONCURRENT_CALLERS: usize = 16;
const DEFAULT_BULK_TEXTS: usize = 1000;
/// Texts shorter than this count as "one short sentence" (as in `akidb-embed bench`).
const SHORT_TEXT_CHARS: usize = 120;

struct Options {
    python: PathBuf,
    model_dir: PathBuf,
    calls: usize,
    corpus: Option<PathBuf>,
}

fn options() -> Options {
    let checkout = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut options = Options {
        python: checkout.join(".venv/bin/python"),
        model_dir: checkout.join("models/all-MiniLM-L6-v2"),
        calls: 500,
        corpus: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--python" => options.python = value.into(),
            "--model-dir" => options.model_dir = value.into(),
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

/// `(p50, p95)` in milliseconds.
fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort_unstable();
    let at = |q: f64| {
        let index = ((samples.len() - 1) as f64 * q).round() as usize;
        samples[index].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.95))
}

async fn embed_one(client: &WorkerClient, text: &str) {
    let request = BatchEmbeddingRequest::new("", vec![text.to_owned()]);
    client.embed_batch(request).await.expect("embedding succeeds");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let options = options();
    let golden = read_json_strings(&options.model_dir.join("golden.json"), Some("sentences"));
    let bulk_texts = match &options.corpus {
        Some(path) => read_json_strings(path, None),
        None => golden.iter().cycle().take(DEFAULT_BULK_TEXTS).cloned().collect(),
    };
    let short: Vec<String> = bulk_texts
        .iter()
        .chain(&golden)
        .filter(|text| !text.is_empty() && text.chars().count() < SHORT_TEXT_CHARS)
        .take(50)
        .cloned()
        .collect();

    let spawned = Instant::now();
    let client = WorkerClient::spawn(WorkerConfig {
        model_dir: Some(options.model_dir.clone()),
        ..WorkerConfig::with_command([
            options.python.into_os_string(),
            "-m".into(),
            "akidb_embed.worker".into(),
        ])
    })
    .await
    .expect("the worker starts");
    embed_one(&client, &short[0]).await;
    let cold_start = spawned.elapsed();
    let hello = client.hello();
    println!(
        "akidb-embed-client roundtrip: {} ({}), worker {} on {:?}",
        hello.model.model, hello.model.dimension, hello.pid, hello.providers
    );
    println!("cold start (spawn to first vector): {:.0} ms", cold_start.as_secs_f64() * 1000.0);

    for _ in 0..WARM_UP_CALLS {
        client.ping().await.unwrap();
    }
    let mut samples = Vec::with_capacity(options.calls);
    for _ in 0..options.calls {
        let started = Instant::now();
        client.ping().await.unwrap();
        samples.push(started.elapsed());
    }
    let (p50, p95) = percentiles(&mut samples);
    println!("ping round trip, {} calls: p50 {p50:.3} ms, p95 {p95:.3} ms", options.calls);

    for text in short.iter().take(WARM_UP_CALLS) {
        embed_one(&client, text).await;
    }
    let mut samples = Vec::with_capacity(options.calls);
    for index in 0..options.calls {
        let started = Instant::now();
        embed_one(&client, &short[index % short.len()]).await;
        samples.push(started.elapsed());
    }
    let (p50, p95) = percentiles(&mut samples);
    println!("one sentence, {} calls: p50 {p50:.3} ms, p95 {p95:.3} ms", options.calls);

    let short = Arc::new(short);
    let per_caller = (options.calls / CONCURRENT_CALLERS).max(1);
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
    let (p50, p95) = percentiles(&mut samples);
    println!(
        "{CONCURRENT_CALLERS} concurrent callers, {} calls: {:.0} requests/s, p50 {p50:.3} ms, \
         p95 {p95:.3} ms",
        samples.len(),
        samples.len() as f64 / elapsed
    );

    let started = Instant::now();
    let response = client
        .embed_batch(BatchEmbeddingRequest::new("", bulk_texts.clone()))
        .await
        .expect("bulk embedding succeeds");
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(response.embeddings.len(), bulk_texts.len());
    println!(
        "bulk, {} texts ({} tokens): {:.1} s, {:.0} texts/s",
        bulk_texts.len(),
        response.usage.total_tokens,
        elapsed,
        bulk_texts.len() as f64 / elapsed
    );
    client.close().await;
}
