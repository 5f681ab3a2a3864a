//! `ember serve`: the long-running worker. Loads the model once, then polls the queue until
//! SIGTERM/SIGINT (or until the queue is drained, with `--exit-when-idle`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::backends::{QueueArgs, StoreArgs};
use super::common::{AwsArgs, ModelArgs};
use crate::queue::Queue;
use crate::runner::report::{report_loop, Reporter};
use crate::runner::{serve, DeadLetters, JobHandler, ServeOptions, ServeStats, Shutdown};
use crate::store::ObjectStore;
use crate::telemetry::{metrics, since_process_start};
use ember_engine::{Batcher, BatcherOptions, Engine};

/// The continuous batcher's size, shared by `serve` and `lambda`.
#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Jobs running at once in this process. Above 1 they share decode steps (continuous
    /// batching), within the KV cache budget.
    #[arg(long, env = "EMBER_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// KV cache budget for the running jobs, in MiB (default: half the available memory).
    /// A job waits for room before it starts.
    #[arg(long, env = "EMBER_KV_CACHE_MB")]
    pub kv_cache_mb: Option<u64>,
}

impl BatchArgs {
    /// Batching when more than one job runs at once, or when `always`.
    pub fn batcher_options(&self, always: bool) -> Option<BatcherOptions> {
        (always || self.concurrency > 1)
            .then(|| BatcherOptions::new(self.concurrency, self.kv_cache_mb.map(|mb| mb << 20)))
    }
}

/// How the poll loop runs.
#[derive(Debug, Clone, clap::Args)]
pub struct LoopArgs {
    #[command(flatten)]
    pub batch: BatchArgs,
    /// Long-poll wait of each receive, in seconds (at most 20).
    #[arg(long, env = "EMBER_WAIT_SECONDS", default_value_t = 20)]
    pub wait_seconds: u64,
    /// After SIGTERM/SIGINT, seconds that running jobs get to finish before their messages
    /// are released to other workers.
    #[arg(long, env = "EMBER_GRACE_SECONDS", default_value_t = 25)]
    pub grace_seconds: u64,
}

/// What a worker process needs: the model, the queue, the result store and how to poll.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub looping: LoopArgs,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// Exit once the queue has nothing visible, in flight or delayed, instead of waiting for
    /// more work.
    #[arg(long, env = "EMBER_EXIT_WHEN_IDLE", value_parser = clap::builder::BoolishValueParser::new())]
    pub exit_when_idle: bool,
    /// Also run pipeline hops (`ember pipeline start`) from the pipeline queue, with the same
    /// model and concurrency.
    #[arg(long, env = "EMBER_PIPELINES", value_parser = clap::builder::BoolishValueParser::new())]
    pub pipelines: bool,
    #[command(flatten)]
    pub pipeline_queue: super::pipeline::PipelineQueueArgs,
    #[command(flatten)]
    pub tools: super::pipeline::ToolArgs,
    /// Write what this worker measures about itself (cold start, jobs, tokens, busy seconds,
    /// tokens/s when full) to this JSON file every second, for the autoscaler (`ember autoscale
    /// --driver local` sets it for each worker it starts).
    #[arg(long, env = "EMBER_WORKER_REPORT")]
    pub report_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub http: super::http::HttpArgs,
}

/// A loaded worker: the model, the queue, the result store, and the handler that runs jobs
/// (with a batcher when more than one job runs at once).
pub struct Worker {
    pub engine: Arc<Engine>,
    pub queue: Arc<dyn Queue>,
    pub store: Arc<dyn ObjectStore>,
    pub handler: Arc<JobHandler>,
    /// The shared batcher, when jobs run more than one at a time.
    pub batcher: Option<Arc<Batcher>>,
}

impl Worker {
    /// Loads the model and opens the queue and the store, logging the cold-start breakdown.
    /// `always_batch` starts the batcher even for one job at a time (the HTTP server needs it).
    pub async fn start(args: &WorkerArgs, always_batch: bool) -> anyhow::Result<Self> {
        // Open the queue and the store first: a typo in a queue name should not cost a model load.
        let (queue, store) = tokio::try_join!(args.queue.open(&args.aws), args.store.open(&args.aws))?;
        let engine = Arc::new(load_engine(&args.model, &args.aws).await?);
        let handler = JobHandler::new(
            engine.clone(),
            store.clone(),
            DeadLetters::Queue(queue.clone()),
            args.queue.max_receive_count,
        );
        let batcher = match args.looping.batcher_options(always_batch) {
            Some(opts) => Some(Arc::new(Batcher::start(engine.clone(), opts)?)),
            None => None,
        };
        let handler = Arc::new(match &batcher {
            Some(b) => handler.with_batcher(b.clone()),
            None => handler,
        });
        Ok(Self { engine, queue, store, handler, batcher })
    }
}

/// Loads the model into an engine and logs where the start-up time went.
pub async fn load_engine(model: &ModelArgs, aws: &AwsArgs) -> anyhow::Result<Engine> {
    let loaded = model.load(aws).await?;
    metrics::cold_start(&metrics::ColdStart {
        model: &loaded.name,
        timings: &loaded.timings,
        ready_s: since_process_start(),
    });
    Ok(Engine::new(loaded))
}

impl LoopArgs {
    pub fn batcher_options(&self, always: bool) -> Option<BatcherOptions> {
        self.batch.batcher_options(always)
    }

    pub fn options(&self, queue: &QueueArgs, exit_when_idle: bool) -> anyhow::Result<ServeOptions> {
        if self.wait_seconds > 20 {
            anyhow::bail!("--wait-seconds is {}, but queues long-poll for at most 20 seconds", self.wait_seconds);
        }
        if self.batch.concurrency == 0 {
            anyhow::bail!("--concurrency must be at least 1");
        }
        Ok(ServeOptions {
            concurrency: self.batch.concurrency,
            wait: Duration::from_secs(self.wait_seconds),
            visibility: queue.visibility(),
            grace: Duration::from_secs(self.grace_seconds),
            exit_when_idle,
        })
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let opts = args.worker.looping.options(&args.worker.queue, args.exit_when_idle)?;
    // Signals first: SIGTERM during the model load ends the process cleanly once it is loaded.
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    // Listening before the model loads: /health answers "loading" meanwhile.
    let http = args.http.bind().await?;
    if args.http.http_only {
        let server = http.ok_or_else(|| anyhow::anyhow!("--http-only needs --http ADDR"))?;
        return serve_http_only(&args.worker, server, shutdown).await;
    }
    let worker = Worker::start(&args.worker, http.is_some()).await?;
    let http_task = match (http, &worker.batcher) {
        (Some(server), Some(batcher)) => Some(start_http(server, worker.engine.clone(), batcher.clone(), &shutdown)),
        _ => None,
    };
    let stats = Arc::new(ServeStats::default());
    let report_stop = Shutdown::new();
    let report = args.report_file.clone().map(|path| {
        let concurrency = u32::try_from(opts.concurrency).unwrap_or(u32::MAX);
        let reporter = Reporter::new(since_process_start(), concurrency);
        tokio::spawn(report_loop(path, stats.clone(), reporter, report_stop.clone()))
    });
    tracing::info!(concurrency = opts.concurrency, model = %worker.engine.loaded.name, pipelines = args.pipelines, "serving");
    let jobs = serve(worker.queue.clone(), worker.handler.clone(), &opts, &shutdown, stats.clone());
    if !args.pipelines {
        let served = jobs.await;
        stop_http(http_task, &shutdown).await;
        report_stop.trigger();
        if let Some(task) = report {
            let _ = task.await;
        }
        served?;
        println!("{}", stats_json(&stats));
        return Ok(());
    }
    let hop_queue = args.pipeline_queue.open(&args.worker.queue, &args.worker.aws).await?;
    let runner = Arc::new(crate::pipeline::ModelRunner::new(
        worker.engine.clone(),
        worker.batcher.clone(),
        crate::pipeline::tools(&args.tools.http_allow),
    ));
    let env = crate::pipeline::HopHandler::env(hop_queue.clone(), worker.store.clone(), runner, args.tools.max_hops);
    let hops = Arc::new(crate::pipeline::HopHandler::new(env, hop_queue.clone()));
    let hop_stats = Arc::new(ServeStats::default());
    let hop_loop = serve(hop_queue, hops, &opts, &shutdown, hop_stats.clone());
    let served = tokio::try_join!(jobs, hop_loop);
    stop_http(http_task, &shutdown).await;
    report_stop.trigger();
    if let Some(task) = report {
        let _ = task.await;
    }
    served?;
    println!("{}", serde_json::json!({"jobs": stats_json(&stats), "hops": stats_json(&hop_stats)}));
    Ok(())
}

/// Makes the server ready and serves it in a task until `shutdown`.
fn start_http(
    server: crate::http::HttpServer,
    engine: Arc<Engine>,
    batcher: Arc<Batcher>,
    shutdown: &Shutdown,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let model = engine.loaded.name.clone();
    server.readiness().set(engine, batcher);
    println!("{}", serde_json::json!({"event": "ready", "model": model}));
    tracing::info!(%model, "HTTP API ready");
    tokio::spawn(server.serve(shutdown.clone()))
}

/// Stops the HTTP server once the queue loop is done (shut down, or idle with
/// `--exit-when-idle`), letting open requests finish.
async fn stop_http(task: Option<tokio::task::JoinHandle<std::io::Result<()>>>, shutdown: &Shutdown) {
    let Some(task) = task else { return };
    shutdown.trigger();
    match task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the HTTP server stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "the HTTP server task failed"),
    }
}

/// `--http-only`: the model and a batcher, no queue and no result store.
async fn serve_http_only(args: &WorkerArgs, server: crate::http::HttpServer, shutdown: Shutdown) -> anyhow::Result<()> {
    let engine = Arc::new(load_engine(&args.model, &args.aws).await?);
    let opts = args.looping.batcher_options(true).ok_or_else(|| anyhow::anyhow!("no batcher options"))?;
    let batcher = Arc::new(Batcher::start(engine.clone(), opts)?);
    let task = start_http(server, engine, batcher, &shutdown);
    task.await??;
    Ok(())
}

/// The loop's counts as one JSON line.
pub fn stats_json(stats: &ServeStats) -> serde_json::Value {
    serde_json::json!({
        "received": stats.received.load(Ordering::Relaxed),
        "done": stats.done.load(Ordering::Relaxed),
        "poisoned": stats.poisoned.load(Ordering::Relaxed),
        "retried": stats.retried.load(Ordering::Relaxed),
        "released": stats.released.load(Ordering::Relaxed),
    })
}
