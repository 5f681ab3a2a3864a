//! `ember serve`: the long-running worker. Loads the model once, then polls the queue until
//! SIGTERM/SIGINT (or until the queue is drained, with `--exit-when-idle`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ember_model_loader::load;

use super::backends::{QueueArgs, StoreArgs};
use super::common::{AwsArgs, ModelArgs};
use crate::queue::Queue;
use crate::runner::report::{report_loop, Reporter};
use crate::runner::{serve, DeadLetters, JobHandler, ServeOptions, ServeStats, Shutdown};
use crate::store::ObjectStore;
use crate::telemetry::{metrics, since_process_start};
use ember_engine::{Batcher, BatcherOptions, Engine};

/// How the poll loop runs.
#[derive(Debug, Clone, clap::Args)]
pub struct LoopArgs {
    /// Jobs running at once in this process. Above 1 they share decode steps (continuous
    /// batching), within the KV cache budget.
    #[arg(long, env = "EMBER_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// KV cache budget for the running jobs, in MiB (default: half the available memory).
    /// A job waits for room before it starts.
    #[arg(long, env = "EMBER_KV_CACHE_MB")]
    pub kv_cache_mb: Option<u64>,
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
    pub async fn start(args: &WorkerArgs) -> anyhow::Result<Self> {
        // Open the queue and the store first: a typo in a queue name should not cost a model load.
        let (queue, store) = tokio::try_join!(args.queue.open(&args.aws), args.store.open(&args.aws))?;
        let engine = Arc::new(load_engine(&args.model, &args.aws).await?);
        let handler = JobHandler::new(
            engine.clone(),
            store.clone(),
            DeadLetters::Queue(queue.clone()),
            args.queue.max_receive_count,
        );
        let batcher = match args.looping.batcher_options() {
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
    let reference = model.reference()?;
    let opts = model.load_options(aws).await?;
    let loaded = load(&reference, &opts).await?;
    let t = loaded.timings;
    metrics::cold_start(&metrics::ColdStart {
        model: &loaded.name,
        fetch_s: t.fetch_s,
        verify_s: t.verify_s,
        build_s: t.build_s,
        ready_s: since_process_start(),
    });
    Ok(Engine::new(loaded))
}

impl LoopArgs {
    /// Batching when more than one job runs at once.
    pub fn batcher_options(&self) -> Option<BatcherOptions> {
        (self.concurrency > 1).then(|| BatcherOptions::new(self.concurrency, self.kv_cache_mb.map(|mb| mb << 20)))
    }

    pub fn options(&self, queue: &QueueArgs, exit_when_idle: bool) -> anyhow::Result<ServeOptions> {
        if self.wait_seconds > 20 {
            anyhow::bail!("--wait-seconds is {}, but queues long-poll for at most 20 seconds", self.wait_seconds);
        }
        if self.concurrency == 0 {
            anyhow::bail!("--concurrency must be at least 1");
        }
        Ok(ServeOptions {
            concurrency: self.concurrency,
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
    let worker = Worker::start(&args.worker).await?;
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
    report_stop.trigger();
    if let Some(task) = report {
        let _ = task.await;
    }
    served?;
    println!("{}", serde_json::json!({"jobs": stats_json(&stats), "hops": stats_json(&hop_stats)}));
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
