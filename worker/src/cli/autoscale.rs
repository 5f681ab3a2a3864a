//! `ember autoscale`: runs the scaling loop (a policy and a driver) on the jobs queue, and
//! `ember autoscale simulate` compares the policies on arrival traces.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ember_orchestrator::autoscale::sim::{compare, standard_rows, table, SimOptions, WorkerModel};
use ember_orchestrator::autoscale::trace::Trace;
use ember_orchestrator::autoscale::{Driver, DriverKind, DryRunDriver, PolicyConfig, PolicyKind};

use super::backends::QueueArgs;
use super::common::AwsArgs;
use crate::autoscale::ecs::EcsService;
use crate::autoscale::lambda::LambdaMapping;
use crate::autoscale::local::{LocalPool, LocalPoolOptions};
use crate::autoscale::run_loop;
use crate::runner::Shutdown;

/// `ember autoscale [OPTIONS]` runs the loop; `ember autoscale simulate` replays traces.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AutoscaleArgs {
    #[command(subcommand)]
    pub command: Option<AutoscaleCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum AutoscaleCommand {
    /// Replay arrival traces (JSON or CSV, see examples/autoscale) against simulated workers
    /// at several cold starts, under every policy at its defaults and tuned, and print queue
    /// wait percentiles, worker-seconds and cold starts side by side, each trace and cold
    /// start ending with a clairvoyant lower bound on worker-seconds.
    Simulate(SimulateArgs),
}

/// Overrides of a policy's defaults (every policy has its own; see `--policy`).
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyOverrides {
    /// Fewest workers (0 allows scale to zero).
    #[arg(long, env = "EMBER_AUTOSCALE_MIN_WORKERS", allow_negative_numbers = true)]
    pub min_workers: Option<i64>,
    /// Most workers (default 10).
    #[arg(long, env = "EMBER_AUTOSCALE_MAX_WORKERS", allow_negative_numbers = true)]
    pub max_workers: Option<i64>,
    /// Queued plus running jobs one worker should carry (KEDA queueLength 5; RunPod scaler
    /// value 4; for ember, the jobs a worker runs at once until workers report it, default 8).
    #[arg(long, env = "EMBER_AUTOSCALE_TARGET_BACKLOG", allow_negative_numbers = true)]
    pub target_backlog: Option<f64>,
    /// From zero workers, start only when the backlog is above this many jobs (default 0).
    #[arg(long, env = "EMBER_AUTOSCALE_ACTIVATION", allow_negative_numbers = true)]
    pub activation: Option<i64>,
    /// Count delayed messages (retries, pipeline hops waiting) as backlog.
    #[arg(long, env = "EMBER_AUTOSCALE_INCLUDE_DELAYED", value_parser = clap::builder::BoolishValueParser::new())]
    pub include_delayed: Option<bool>,
    /// Seconds the backlog must call for more workers before scaling up (default 0).
    #[arg(long, env = "EMBER_AUTOSCALE_SCALE_UP_WINDOW", allow_negative_numbers = true)]
    pub scale_up_window: Option<f64>,
    /// Seconds the backlog must call for fewer workers before scaling down (keda 300; ember
    /// decides from its forecast instead).
    #[arg(long, env = "EMBER_AUTOSCALE_SCALE_DOWN_WINDOW", allow_negative_numbers = true)]
    pub scale_down_window: Option<f64>,
    /// Seconds without backlog before the last worker stops (keda 300, runpod 5; ember keeps
    /// it by the ski-rental rule instead).
    #[arg(long, env = "EMBER_AUTOSCALE_IDLE_COOLDOWN", allow_negative_numbers = true)]
    pub idle_cooldown: Option<f64>,
    /// runpod-delay: seconds a job may wait before a worker is added (default 4).
    #[arg(long, env = "EMBER_AUTOSCALE_QUEUE_DELAY", allow_negative_numbers = true)]
    pub queue_delay: Option<f64>,
    /// Seconds between decisions (ember 1, keda 15, runpod 1).
    #[arg(long, env = "EMBER_AUTOSCALE_INTERVAL", allow_negative_numbers = true)]
    pub interval: Option<f64>,
    /// keda: seconds between KEDA's polls, which activate (0 -> 1) and scale to zero (default 30).
    #[arg(long, env = "EMBER_AUTOSCALE_POLL_INTERVAL", allow_negative_numbers = true)]
    pub poll_interval: Option<f64>,
    /// ember: the p95 queue wait to aim for, seconds (default 5). Lower buys latency with
    /// worker-seconds: the policy starts enough workers that the queued jobs start within it.
    #[arg(long, env = "EMBER_AUTOSCALE_TARGET_WAIT", allow_negative_numbers = true)]
    pub target_wait: Option<f64>,
    /// ember: a worker's cold start in seconds until a worker reports its own (default 0.9).
    #[arg(long, env = "EMBER_AUTOSCALE_COLD_START", allow_negative_numbers = true)]
    pub cold_start: Option<f64>,
    /// ember: a full worker's tokens/s until workers report theirs (default 198.3).
    #[arg(long, env = "EMBER_AUTOSCALE_WORKER_TOK_S", allow_negative_numbers = true)]
    pub worker_tok_s: Option<f64>,
    /// ember: tokens per job until workers report theirs (default 128).
    #[arg(long, env = "EMBER_AUTOSCALE_JOB_TOKENS", allow_negative_numbers = true)]
    pub job_tokens: Option<f64>,
}

impl PolicyOverrides {
    /// The defaults of `kind` with these overrides.
    pub fn config(&self, kind: PolicyKind) -> PolicyConfig {
        self.apply(PolicyConfig::defaults(kind))
    }

    /// `c` with these overrides.
    pub fn apply(&self, mut c: PolicyConfig) -> PolicyConfig {
        c.min_workers = self.min_workers.unwrap_or(c.min_workers);
        c.max_workers = self.max_workers.unwrap_or(c.max_workers);
        c.target_backlog = self.target_backlog.unwrap_or(c.target_backlog);
        c.activation = self.activation.unwrap_or(c.activation);
        c.include_delayed = self.include_delayed.unwrap_or(c.include_delayed);
        c.scale_up_window = self.scale_up_window.unwrap_or(c.scale_up_window);
        c.scale_down_window = self.scale_down_window.unwrap_or(c.scale_down_window);
        c.idle_cooldown = self.idle_cooldown.unwrap_or(c.idle_cooldown);
        c.queue_delay = self.queue_delay.unwrap_or(c.queue_delay);
        c.interval = self.interval.unwrap_or(c.interval);
        c.poll_interval = self.poll_interval.unwrap_or(c.poll_interval);
        c.target_wait = self.target_wait.unwrap_or(c.target_wait);
        c.cold_start = self.cold_start.unwrap_or(c.cold_start);
        c.worker_tok_s = self.worker_tok_s.unwrap_or(c.worker_tok_s);
        c.job_tokens = self.job_tokens.unwrap_or(c.job_tokens);
        c
    }
}

/// The scaling loop's options.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The policy: ember, keda, runpod-requests or runpod-delay.
    #[arg(long, env = "EMBER_AUTOSCALE_POLICY", default_value = "ember")]
    pub policy: String,
    /// What applies decisions: dry-run (print only), local (a pool of `ember serve`
    /// processes), ecs (a service's desired count), lambda (an event source mapping's
    /// maximum concurrency).
    #[arg(long, env = "EMBER_AUTOSCALE_DRIVER", default_value = "dry-run")]
    pub driver: String,
    #[command(flatten)]
    pub overrides: PolicyOverrides,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    /// local: arguments after `serve` for each worker, split on whitespace (the model, the
    /// results, the concurrency... or set them as EMBER_* variables, which workers inherit).
    #[arg(long, env = "EMBER_POOL_SERVE_ARGS", default_value = "", allow_hyphen_values = true)]
    pub serve_args: String,
    /// local: a directory for each worker's log (worker-N.log) and final stats (worker-N.out).
    #[arg(long, env = "EMBER_POOL_LOG_DIR")]
    pub pool_log_dir: Option<PathBuf>,
    /// local: when the autoscaler stops, seconds to wait for drained workers before SIGKILL.
    #[arg(long, env = "EMBER_POOL_STOP_TIMEOUT", default_value_t = 60)]
    pub pool_stop_timeout: u64,
    /// ecs: the cluster name or ARN.
    #[arg(long, env = "EMBER_ECS_CLUSTER")]
    pub ecs_cluster: Option<String>,
    /// ecs: the service name or ARN.
    #[arg(long, env = "EMBER_ECS_SERVICE")]
    pub ecs_service: Option<String>,
    /// lambda: the UUID of the SQS event source mapping of the Ember function.
    #[arg(long, env = "EMBER_LAMBDA_EVENT_SOURCE_MAPPING")]
    pub lambda_mapping: Option<String>,
}

/// The simulator's options.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Trace files (.json or .csv; see examples/autoscale): several after one `--trace` (a
    /// shell glob), comma-separated, or `--trace` repeated.
    #[arg(long = "trace", env = "EMBER_AUTOSCALE_TRACES", value_delimiter = ',', num_args = 1.., required = true)]
    pub traces: Vec<PathBuf>,
    /// Policies to compare, comma-separated. Each peer gets two rows: its documented defaults
    /// and a setting a careful operator would choose for the cold start (see
    /// `PolicyConfig::tuned`); ember gets one (its per-worker figures are measured).
    #[arg(
        long,
        env = "EMBER_AUTOSCALE_POLICIES",
        value_delimiter = ',',
        default_value = "ember,keda,runpod-requests,runpod-delay"
    )]
    pub policies: Vec<String>,
    /// Settings applied to every row on top of its defaults or tuning (leave unset for the
    /// fair comparison).
    #[command(flatten)]
    pub overrides: PolicyOverrides,
    /// Worker cold starts to compare at, seconds, comma-separated (0.9 s is this machine's,
    /// from S3; a GPU worker takes tens of seconds; an EC2 GPU instance joining a cluster,
    /// minutes).
    #[arg(long, env = "EMBER_SIM_COLD_START", value_delimiter = ',', default_value = "1,30,90")]
    pub cold_start_seconds: Vec<f64>,
    /// Jobs one simulated worker runs at once.
    #[arg(long, env = "EMBER_SIM_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u32,
    /// Seconds a draining worker's jobs get before they are handed back.
    #[arg(long, env = "EMBER_SIM_GRACE_SECONDS", default_value_t = 25.0)]
    pub grace_seconds: f64,
    /// Print one JSON object per trace and cold start (every row and the bound) instead of
    /// the table.
    #[arg(long, env = "EMBER_SIM_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    pub json: bool,
}

/// Runs `ember autoscale`.
pub async fn run(args: AutoscaleArgs) -> anyhow::Result<()> {
    match args.command {
        Some(AutoscaleCommand::Simulate(sim)) => simulate(sim),
        None => run_autoscaler(args.run).await,
    }
}

fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    if let Some(bad) = args.cold_start_seconds.iter().find(|c| !(c.is_finite() && **c >= 0.0)) {
        anyhow::bail!("--cold-start-seconds has {bad}: use 0 or more seconds");
    }
    if args.concurrency == 0 {
        anyhow::bail!("--concurrency must be at least 1");
    }
    let traces = args.traces.iter().map(|p| Trace::load(p)).collect::<Result<Vec<_>, _>>()?;
    let kinds = args.policies.iter().map(|p| p.parse::<PolicyKind>()).collect::<Result<Vec<_>, _>>()?;
    let model = WorkerModel { concurrency: args.concurrency, grace_s: args.grace_seconds, ..WorkerModel::default() };
    let rows = |m: &WorkerModel| {
        let mut rows = standard_rows(&kinds, m);
        for r in &mut rows {
            r.config = args.overrides.apply(r.config.clone());
        }
        rows
    };
    let groups = compare(&traces, &args.cold_start_seconds, &model, rows, &SimOptions::default())?;
    if args.json {
        for g in &groups {
            println!("{}", serde_json::to_string(g)?);
        }
    } else {
        print!("{}", table(&groups));
    }
    Ok(())
}

/// The environment a pool worker needs to use the autoscaler's queue.
fn worker_env(args: &RunArgs) -> Vec<(String, String)> {
    let q = &args.queue;
    let mut env = vec![
        ("EMBER_QUEUE_PATH".to_string(), q.queue_path.to_string_lossy().into_owned()),
        ("EMBER_VISIBILITY_TIMEOUT".to_string(), q.visibility_timeout.to_string()),
        ("EMBER_MAX_RECEIVE_COUNT".to_string(), q.max_receive_count.to_string()),
    ];
    if let Some(name) = &q.sqs_queue {
        env.push(("EMBER_SQS_QUEUE".into(), name.clone()));
    }
    if let Some(url) = &args.aws.endpoint_url {
        env.push(("AWS_ENDPOINT_URL".into(), url.clone()));
    }
    env
}

async fn driver(args: &RunArgs, kind: DriverKind) -> anyhow::Result<Box<dyn Driver>> {
    Ok(match kind {
        DriverKind::DryRun => Box::new(DryRunDriver::new(std::io::stderr())),
        DriverKind::Local => {
            if let Some(dir) = &args.pool_log_dir {
                std::fs::create_dir_all(dir).with_context(|| format!("creating --pool-log-dir {}", dir.display()))?;
            }
            Box::new(LocalPool::new(LocalPoolOptions {
                exe: std::env::current_exe().context("finding the ember binary for pool workers")?,
                serve_args: args.serve_args.split_whitespace().map(str::to_string).collect(),
                env: worker_env(args),
                log_dir: args.pool_log_dir.clone(),
                stop_timeout: Duration::from_secs(args.pool_stop_timeout),
            }))
        }
        DriverKind::Ecs => {
            let (Some(cluster), Some(service)) = (&args.ecs_cluster, &args.ecs_service) else {
                anyhow::bail!(
                    "--driver ecs needs --ecs-cluster and --ecs-service (EMBER_ECS_CLUSTER, EMBER_ECS_SERVICE)"
                );
            };
            let client = aws_sdk_ecs::Client::new(&args.aws.config().await);
            Box::new(EcsService::new(client, cluster.clone(), service.clone()))
        }
        DriverKind::Lambda => {
            let Some(uuid) = &args.lambda_mapping else {
                anyhow::bail!(
                    "--driver lambda needs --lambda-mapping, the UUID of the event source mapping \
                     (EMBER_LAMBDA_EVENT_SOURCE_MAPPING; the stack in infra/ outputs it)"
                );
            };
            let client = aws_sdk_lambda::Client::new(&args.aws.config().await);
            Box::new(LambdaMapping::new(client, uuid.clone()))
        }
    })
}

async fn run_autoscaler(args: RunArgs) -> anyhow::Result<()> {
    // Check the whole configuration before touching the queue or starting anything.
    let kind: DriverKind = args.driver.parse()?;
    let mut policy = args.overrides.config(args.policy.parse()?).build()?;
    let mut driver = driver(&args, kind).await?;
    let queue = args.queue.open(&args.aws).await?;
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    tracing::info!(policy = policy.name(), driver = driver.name(), "autoscaling");
    let mut out = std::io::stdout();
    run_loop(queue, policy.as_mut(), driver.as_mut(), &shutdown, &mut out).await
}
