//! The worker's job throughput next to the raw queue, in one run against the same moto SQS
//! on 127.0.0.1:
//!
//!     scripts/fetch-model.sh && scripts/install-test-deps.sh
//!     cargo bench -p ember-worker --bench throughput
//!
//! Baseline: receive (10 at a time) + batch delete, as fast as the queue allows, with as many
//! loops as the worker has jobs in flight. Worker: `serve` with the real small model and its
//! batcher (as `ember serve` runs it), jobs of
//! `max_tokens` 1, results written create-only to moto S3. Prints both rates and the ratio
//! (the target is 0.8x or more).
//!
//! Then the cost of tracing: the same worker run in child processes, in turn with
//! OpenTelemetry off (no endpoint), on with every trace sampled out (`always_off`: the
//! instrumentation alone), and exporting every span over OTLP to Arize Phoenix on 127.0.0.1 (a
//! real backend, installed by scripts/install-test-deps.sh, sharing the machine's cores).
//! Also to a receiver in this process that only reads and counts the OTLP requests: the
//! worker's own cost, as with a collector on another machine. Prints the rates and their
//! ratios to tracing off (the target is 0.97x or more).
//!
//! Settings (environment): EMBER_BENCH_JOBS (300), EMBER_BENCH_CONCURRENCY (8),
//! EMBER_BENCH_RUNS (3, the median counts).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_engine::{Batcher, BatcherOptions, Engine};
use ember_model_loader::{load, LoadOptions};
use ember_tests::{aws_config_for, smollm_hf, MotoServer, PhoenixServer};
use ember_worker::queue::sqs::{SqsQueue, SqsQueueSetup};
use ember_worker::queue::{OutgoingMessage, Queue, ReceiveOptions};
use ember_worker::runner::{serve, DeadLetters, JobHandler, ServeOptions, ServeStats, Shutdown};
use ember_worker::store::s3::S3Store;
use serde_json::json;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn fill(queue: &dyn Queue, n: usize, batch: &str) -> anyhow::Result<()> {
    let bodies: Vec<OutgoingMessage> = (0..n)
        .map(|i| {
            // A trivial generation: a one-token plain prompt, one new token. (A chat job pays
            // for its template's 30-odd tokens of system prompt first, which measures prefill
            // speed, not the worker.)
            let line = json!({"custom_id": format!("j{i}"), "method": "POST", "url": "/v1/completions",
                "ember": {"batch_id": batch},
                "body": {"model": "default", "prompt": "Hi", "max_tokens": 1}});
            OutgoingMessage::new(line.to_string())
        })
        .collect();
    for r in queue.send_batch(bodies).await {
        r?;
    }
    Ok(())
}

/// Raw receive + batch delete with `loops` concurrent loops until `n` messages are gone.
async fn raw_rate(queue: Arc<dyn Queue>, n: usize, loops: usize) -> anyhow::Result<f64> {
    fill(queue.as_ref(), n, "raw").await?;
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..loops {
        let (queue, taken) = (queue.clone(), taken.clone());
        tasks.push(tokio::spawn(async move {
            let opts = ReceiveOptions { max_messages: 10, wait: Duration::from_secs(1), visibility_timeout: None };
            while taken.load(Ordering::Relaxed) < n {
                let msgs = queue.receive(&opts).await?;
                let receipts: Vec<_> = msgs.iter().map(|m| m.receipt.clone()).collect();
                for r in queue.delete_batch(&receipts).await {
                    r?;
                }
                taken.fetch_add(msgs.len(), Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn worker_rate(
    queue: Arc<dyn Queue>,
    handler: Arc<JobHandler>,
    n: usize,
    concurrency: usize,
    batch: &str,
) -> anyhow::Result<f64> {
    fill(queue.as_ref(), n, batch).await?;
    let stats = Arc::new(ServeStats::default());
    let shutdown = Shutdown::new();
    let opts = ServeOptions {
        concurrency,
        wait: Duration::from_secs(1),
        visibility: Duration::from_secs(60),
        grace: Duration::from_secs(10),
        exit_when_idle: false,
    };
    let start = Instant::now();
    let task = {
        let (queue, stats, shutdown) = (queue.clone(), stats.clone(), shutdown.clone());
        tokio::spawn(async move { serve(queue, handler, &opts, &shutdown, stats).await })
    };
    while stats.done.load(Ordering::Relaxed) < n as u64 {
        if task.is_finished() || start.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("the worker stopped after {} of {n} jobs", stats.done.load(Ordering::Relaxed));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    shutdown.trigger();
    // `serve` lets its last long poll end and hands back what it got before returning, so the
    // next phase starts with every message visible.
    task.await??;
    Ok(rate)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Set in the child processes of the tracing comparison: the moto endpoint to use.
const CHILD_ENV: &str = "EMBER_BENCH_CHILD_MOTO";

fn main() -> anyhow::Result<()> {
    ember_worker::telemetry::set_thread_count(None);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match std::env::var(CHILD_ENV) {
        Ok(endpoint) => runtime.block_on(child(&endpoint)),
        Err(_) => runtime.block_on(bench()),
    }
}

/// The queue on moto and a job handler as `ember serve` builds it: the real model, its
/// batcher (the jobs in flight share forward passes), results to moto S3.
async fn worker_setup(
    conf: &aws_config::SdkConfig,
    concurrency: usize,
) -> anyhow::Result<(Arc<dyn Queue>, Arc<JobHandler>)> {
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(conf).force_path_style(true).build());
    if s3.head_bucket().bucket("bench").send().await.is_err() {
        s3.create_bucket().bucket("bench").send().await?;
    }
    let setup =
        SqsQueueSetup { name: "throughput".into(), visibility_timeout: Duration::from_secs(60), max_receive_count: 3 };
    let queue: Arc<dyn Queue> = Arc::new(SqsQueue::ensure(aws_sdk_sqs::Client::new(conf), &setup).await?);
    let engine =
        Arc::new(Engine::new(load(&smollm_hf("f32")?.to_string_lossy().parse()?, &LoadOptions::default()).await?));
    let store = Arc::new(S3Store::new(s3, "bench", "out"));
    let batcher = Arc::new(Batcher::start(engine.clone(), BatcherOptions::new(concurrency, None))?);
    let handler = Arc::new(JobHandler::new(engine, store, DeadLetters::Queue(queue.clone()), 3).with_batcher(batcher));
    Ok((queue, handler))
}

/// One worker run in this process, with the telemetry `ember` sets up (tracing on when
/// OTEL_EXPORTER_OTLP_ENDPOINT is set); prints the rate.
async fn child(endpoint: &str) -> anyhow::Result<()> {
    let tracing = ember_worker::telemetry::init(None, "warn")?;
    let (n, concurrency) = (env_usize("EMBER_BENCH_JOBS", 300), env_usize("EMBER_BENCH_CONCURRENCY", 8));
    let (queue, handler) = worker_setup(&aws_config_for(endpoint).await, concurrency).await?;
    let batch = std::env::var("EMBER_BENCH_BATCH").unwrap_or_else(|_| "child".into());
    let rate = worker_rate(queue, handler, n, concurrency, &batch).await?;
    // Flushing the last spans is part of the cost, but not of the jobs' rate.
    tokio::task::spawn_blocking(move || tracing.shutdown()).await?;
    println!("{rate}");
    Ok(())
}

/// A worker run in a child process, with the given OpenTelemetry environment.
fn child_rate(endpoint: &str, otel: &[(&str, &str)], batch: &str) -> anyhow::Result<f64> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.env(CHILD_ENV, endpoint).env("EMBER_BENCH_BATCH", batch).env("EMBER_LOG", "warn");
    for var in ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER"] {
        cmd.env_remove(var);
    }
    cmd.envs(otel.iter().copied()).env("OTEL_SERVICE_NAME", "ember-bench");
    let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
    anyhow::ensure!(out.status.success(), "the benchmark's child process failed");
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

async fn bench() -> anyhow::Result<()> {
    let (n, concurrency, runs) =
        (env_usize("EMBER_BENCH_JOBS", 300), env_usize("EMBER_BENCH_CONCURRENCY", 8), env_usize("EMBER_BENCH_RUNS", 3));
    let moto = MotoServer::start()?;
    let conf = moto.aws_config().await;
    let (queue, handler) = worker_setup(&conf, concurrency).await?;

    let (mut raw, mut worker) = (Vec::new(), Vec::new());
    for run in 0..runs {
        raw.push(raw_rate(queue.clone(), n, concurrency).await?);
        worker.push(worker_rate(queue.clone(), handler.clone(), n, concurrency, &format!("run{run}")).await?);
        eprintln!("run {run}: raw {:.1}/s, worker {:.1}/s", raw[run], worker[run]);
    }
    let (r, w) = (median(raw), median(worker));
    println!("\n## Worker throughput on moto SQS + S3 (127.0.0.1), {n} jobs of max_tokens 1, {concurrency} in flight, median of {runs}");
    println!("| raw receive + batch delete | ember worker (validate, generate, write result, delete) | ratio |");
    println!("| ---: | ---: | ---: |");
    println!("| {r:.1} msg/s | {w:.1} jobs/s | {:.2} |", w / r);

    // Tracing off, on but sampled out (the instrumentation alone), every span exported to
    // Phoenix on these same two cores, and every span exported to a receiver that only reads
    // and counts what it is sent (the worker's own cost, as with a collector on another
    // machine): interleaved, each in a fresh process (the subscriber is global).
    let phoenix = PhoenixServer::start()?;
    let otlp = phoenix.otlp_endpoint();
    let sink = OtlpSink::start().await?;
    let sink_url = sink.endpoint.clone();
    let variants: [&[(&str, &str)]; 4] = [
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp), ("OTEL_TRACES_SAMPLER", "always_off")],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &sink_url)],
    ];
    let mut rates = vec![Vec::new(); variants.len()];
    for run in 0..runs {
        for (v, otel) in variants.iter().enumerate() {
            // Phoenix ingests for a while after an exported run: let it finish first.
            tokio::task::block_in_place(|| phoenix.wait_idle(Duration::from_secs(300)))?;
            let rate = tokio::task::block_in_place(|| child_rate(&moto.endpoint(), otel, &format!("t{v}-{run}")))?;
            rates[v].push(rate);
        }
        eprintln!(
            "run {run}: off {:.1}/s, sampled out {:.1}/s, exported to Phoenix {:.1}/s, exported to the sink {:.1}/s",
            rates[0][run], rates[1][run], rates[2][run], rates[3][run]
        );
    }
    let [off, sampled_out, phoenix_rate, sink_rate] = [0, 1, 2, 3].map(|v| median(rates[v].clone()));
    let (requests, bytes) = (sink.requests.load(Ordering::Relaxed), sink.bytes.load(Ordering::Relaxed));
    anyhow::ensure!(bytes > 0, "the OTLP sink received nothing: the exported runs sent no spans");
    println!("\n## Tracing overhead: the same worker with OpenTelemetry off, on but sampled out, and exporting every span over OTLP HTTP (to Arize Phoenix on the same two cores; to a receiver that only reads the requests, the worker's own cost), {n} jobs, median of {runs}");
    println!("| tracing off | sampled out (ratio) | exported to Phoenix, same cores (ratio) | exported, worker's own cost (ratio) |");
    println!("| ---: | ---: | ---: | ---: |");
    println!(
        "| {off:.1} jobs/s | {sampled_out:.1} jobs/s ({:.3}) | {phoenix_rate:.1} jobs/s ({:.3}) | {sink_rate:.1} jobs/s ({:.3}) |",
        sampled_out / off,
        phoenix_rate / off,
        sink_rate / off
    );
    println!("(the receiver read {requests} OTLP requests, {:.1} MB, over {runs} runs)", bytes as f64 / 1e6);
    Ok(())
}

/// An OTLP/HTTP endpoint that reads each export request whole and answers 200, counting
/// requests and bytes: a collector that costs the worker's machine next to nothing.
struct OtlpSink {
    endpoint: String,
    requests: Arc<std::sync::atomic::AtomicU64>,
    bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl OtlpSink {
    async fn start() -> anyhow::Result<Self> {
        use std::sync::atomic::AtomicU64;
        let (requests, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let counters = (requests.clone(), bytes.clone());
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let (requests, bytes) = counters.clone();
                    async move {
                        requests.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                        // An empty ExportTraceServiceResponse is an empty protobuf message.
                        ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], Vec::<u8>::new())
                    }
                }),
            )
            .layer(axum::extract::DefaultBodyLimit::disable());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { endpoint, requests, bytes })
    }
}
