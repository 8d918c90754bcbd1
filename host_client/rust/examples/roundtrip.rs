//! Measures the Rust client against a real worker with the workloads of `akidb-embed bench`:
//! one short sentence at a time, 16 concurrent callers, one bulk request, the cold start
//! (spawn to first vector), and the bridge's own round trip (`ping`); also the start (spawn to
//! ready), the first calls of a fresh worker, and on request where a lone call's time goes.
//!
//! ```text
//! .ci/cargo-offline run --release --example roundtrip -- \
//!     [--python PATH] [--model-dir DIR] [--workers N] [--lanes N] [--threads N] [--calls 500]
//!     [--corpus texts.json] [--breakdown N] [--spin-wait] [--json | --serve]
//! ```
//!
//! `--corpus` takes a JSON array of strings (`akidb-embed bench` passes its own corpus, so the
//! figures sit beside the Python ones); without it the bulk workload repeats the model
//! directory's golden sentences to 1,000 texts. The short sentences are chosen, and the
//! percentiles computed, as the Python runner does. `--json` prints one JSON object
//! (`{"figures": {workload: {metric: value}}, ...}`) instead of the text report.
//!
//! Beside the runner's workloads, `figures` holds `"ready": {"ms"}` (spawn to every worker's
//! hello) and `"first calls": {"p50_ms"}` (the first 30 lone calls, made back to back as soon
//! as the client is ready, before any other call; the first of them is the cold start's).
//! `--breakdown N` makes N lone traced calls (`WorkerClient::embed_traced`, after 10 traced
//! warm-up calls) and adds `"breakdown": {stage: median microseconds}` at the top level:
//! `client_encode_us`, `client_write_us`, `worker_parse_us`, `tokenize_us`, `queue_us`,
//! `ort_run_us`, `pool_us`, `reply_encode_us`, `pipes_and_wakeups_us` (each call's round trip
//! minus every other stage, the reader's read included), `client_decode_us`,
//! `caller_wakeup_us`, `total_us`, `outside_model_us` (the round trip less tokenize, run and
//! pooling). Each is the median over the calls of that stage alone, so
//! the medians need not add up to `total_us`. `--spin-wait` passes `--spin-wait` to the worker.
//! `--serve` measures the start, then runs workloads one stdin command at a time (see `serve`),
//! so that `akidb-embed bench --lone` can alternate them with its in-process blocks.
//!
//! Calls are made from a task on the runtime's worker threads, as an async server makes them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use akidb_embed_client::{BatchEmbeddingRequest, EmbedOptions, WorkerClient, WorkerConfig};
use serde_json::json;

const WARM_UP_CALLS: usize = 10;
const CONCURRENT_CALLERS: usize = 16;
const DEFAULT_BULK_TEXTS: usize = 1000;
/// Texts shorter than this (in characters) count as "one short sentence", as in the runner.
const SHORT_TEXT_CHARS: usize = 120;
const SHORT_TEXTS: usize = 50;
/// Lone calls timed right after the client is ready (`"first calls"`).
const FIRST_CALLS: usize = 30;

struct Options {
    python: PathBuf,
    model_dir: PathBuf,
    workers: usize,
    threads: Option<usize>,
    lanes: Option<usize>,
    calls: usize,
    corpus: Option<PathBuf>,
    json: bool,
    breakdown: usize,
    spin_wait: bool,
    serve: bool,
}

fn options() -> Options {
    let checkout = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut options = Options {
        python: checkout.join(".venv/bin/python"),
        model_dir: checkout.join("models/all-MiniLM-L6-v2"),
        workers: akidb_embed_client::auto_workers(),
        threads: None,
        lanes: None,
        calls: 500,
        corpus: None,
        json: false,
        breakdown: 0,
        spin_wait: false,
        serve: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--json" => options.json = true,
            "--spin-wait" => options.spin_wait = true,
            "--serve" => options.serve = true,
            _ => {}
        }
        if matches!(flag.as_str(), "--json" | "--spin-wait" | "--serve") {
            continue;
        }
        let value = args.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--python" => options.python = value.into(),
            "--model-dir" => options.model_dir = value.into(),
            "--workers" => options.workers = value.parse().expect("--workers takes a number"),
            "--threads" => options.threads = Some(value.parse().expect("--threads takes a number")),
            "--lanes" => options.lanes = Some(value.parse().expect("--lanes takes a number")),
            "--calls" => options.calls = value.parse().expect("--calls takes a number"),
            "--corpus" => options.corpus = Some(value.into()),
            "--breakdown" => options.breakdown = value.parse().expect("--breakdown takes a number"),
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

/// The median of `values`, 0 for none.
fn median(values: &mut [f64]) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn microseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// The stages of `--breakdown`, in the order of a call, then the call's time outside the model
/// (round trip minus tokenize, ONNX Runtime run and pooling).
const STAGES: [&str; 13] = [
    "client_encode_us",
    "client_write_us",
    "worker_parse_us",
    "tokenize_us",
    "queue_us",
    "ort_run_us",
    "pool_us",
    "reply_encode_us",
    "pipes_and_wakeups_us",
    "client_decode_us",
    "caller_wakeup_us",
    "total_us",
    "outside_model_us",
];

/// `calls` lone traced calls (after warm-up ones): each stage's median in microseconds, and
/// the reader's read (part of `pipes_and_wakeups_us`) on its own.
async fn breakdown(
    client: &WorkerClient,
    short: &[String],
    calls: usize,
) -> (serde_json::Value, f64) {
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(calls); STAGES.len()];
    let mut reader_read = Vec::with_capacity(calls);
    for index in 0..WARM_UP_CALLS + calls {
        let request = BatchEmbeddingRequest::new("", vec![short[index % short.len()].clone()]);
        let traced = client
            .embed_traced(request, &EmbedOptions::default())
            .await
            .expect("embedding succeeds");
        if index < WARM_UP_CALLS {
            continue;
        }
        let [trace] = traced.traces[..] else { panic!("a lone text is one wire request") };
        let worker = trace.worker.expect("the worker traces (a worker older than tracing?)");
        let stages = [
            trace.client_encode,
            trace.client_write,
            worker.parse(),
            worker.tokenize(),
            worker.queue(),
            worker.ort_run(),
            worker.pool(),
            worker.reply_encode(),
            trace.pipes_and_wakeups(),
            trace.client_decode,
            trace.caller_wakeup,
            trace.total,
            trace.total.saturating_sub(worker.tokenize() + worker.ort_run() + worker.pool()),
        ];
        for (sample, stage) in samples.iter_mut().zip(stages) {
            sample.push(microseconds(stage));
        }
        reader_read.push(microseconds(trace.reader_read));
    }
    let medians: serde_json::Map<String, serde_json::Value> = STAGES
        .iter()
        .zip(samples.iter_mut())
        .map(|(stage, values)| ((*stage).to_owned(), json!(median(values))))
        .collect();
    (serde_json::Value::Object(medians), median(&mut reader_read))
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

/// `--serve`: after the start figures (one JSON line: `ready_ms`, `first_calls_p50_ms`), one
/// command per stdin line, one JSON line in answer, until EOF: `lone N` (N lone calls:
/// `samples_ms`), `x16 N` (the concurrent workload's figures), `bulk` (`texts_per_s`). The
/// Python bench alternates these blocks with its own, pausing between them.
async fn serve(client: &WorkerClient, short: &[String], bulk_texts: &[String]) {
    loop {
        let line = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|read| (read, line))
        })
        .await
        .expect("stdin reader");
        let Ok((read, line)) = line else { return };
        if read == 0 {
            return;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let count = |at: usize| words.get(at).and_then(|w| w.parse().ok()).unwrap_or(40);
        let answer = match words.first().copied() {
            Some("lone") => {
                let mut samples = Vec::new();
                for index in 0..count(1) {
                    let started = Instant::now();
                    embed_one(client, &short[index % short.len()]).await;
                    samples.push(milliseconds(started.elapsed()));
                }
                json!({ "samples_ms": samples })
            }
            Some("x16") => concurrent(client, short, count(1)).await,
            Some("bulk") => {
                let started = Instant::now();
                client
                    .embed_batch(BatchEmbeddingRequest::new("", bulk_texts.to_vec()))
                    .await
                    .expect("bulk embedding succeeds");
                json!({"texts_per_s": bulk_texts.len() as f64 / started.elapsed().as_secs_f64()})
            }
            _ => json!({ "error": format!("unknown command {line:?}") }),
        };
        println!("{answer}");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Every call is made from a task on the runtime's worker threads, as a server (AkiDB) makes
    // them: waking the main thread parked in `block_on` costs ~65 µs more per call.
    tokio::spawn(run(options())).await.expect("the benchmark task");
}

async fn run(options: Options) {
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
        lanes: options.lanes,
        extra_args: if options.spin_wait { vec!["--spin-wait".into()] } else { vec![] },
        ..WorkerConfig::from_python(&options.python)
    })
    .await
    .expect("the worker starts");
    let ready = milliseconds(spawned.elapsed());
    // The first calls of a fresh worker, back to back: the first one ends the cold start.
    let mut first_samples = Vec::with_capacity(FIRST_CALLS);
    let mut cold_start = 0.0;
    for index in 0..FIRST_CALLS {
        let text = if index == 0 { "hello world" } else { &short[index % short.len()] };
        let started = Instant::now();
        embed_one(&client, text).await;
        first_samples.push(started.elapsed());
        if index == 0 {
            cold_start = milliseconds(spawned.elapsed());
        }
    }
    let first_calls = json!({"p50_ms": percentiles(&mut first_samples)["p50_ms"]});
    let hello = client.hello().expect("the worker serves");
    if options.serve {
        println!("{}", json!({"ready_ms": ready, "first_calls_p50_ms": first_calls["p50_ms"]}));
        serve(&client, &short, &bulk_texts).await;
        client.close().await;
        return;
    }

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
    let breakdown = match options.breakdown {
        0 => None,
        calls => Some(breakdown(&client, &short, calls).await),
    };
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
    let mut report = json!({
        "model": hello.model.model,
        "worker_pid": hello.pid,
        "providers": hello.providers,
        "figures": {
            "single": single,
            concurrent_workload.as_str(): concurrent,
            "bulk": {"texts_per_s": bulk_texts.len() as f64 / seconds, "seconds": seconds},
            "cold start": {"ms_to_first_answer": cold_start},
            "ping": ping,
            "first calls": first_calls,
            "ready": {"ms": ready},
        },
    });
    if let Some((stages, _)) = &breakdown {
        report["breakdown"] = stages.clone();
    }
    if options.json {
        println!("{report}");
        return;
    }
    let figures = &report["figures"];
    println!(
        "akidb-embed-client roundtrip: {} ({} dims), worker {} on {:?}",
        hello.model.model, hello.model.dimension, hello.pid, hello.providers
    );
    println!("ready (spawn to hello): {ready:.0} ms");
    println!("cold start (spawn to first vector): {cold_start:.0} ms");
    println!(
        "first {FIRST_CALLS} calls: p50 {:.3} ms",
        figures["first calls"]["p50_ms"].as_f64().unwrap_or_default()
    );
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
    if let Some((stages, reader_read)) = &breakdown {
        println!(
            "one sentence, traced, {} calls: median microseconds per stage",
            options.breakdown
        );
        for stage in STAGES {
            println!("  {stage:<22} {:>9.1}", stages[stage].as_f64().unwrap_or_default());
        }
        println!("  (of pipes_and_wakeups: the client reader's read {reader_read:.1})");
    }
}
