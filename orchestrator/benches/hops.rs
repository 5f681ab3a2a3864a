//! Per-hop overhead of a pipeline over real SQS (moto): a chain of 100 Pass states, each hop a
//! message received, processed (transition recorded in the in-memory execution store) and
//! deleted, next to 100 bare SQS send + receive + delete round trips against the same moto in
//! the same run. Target: within 1.5x.
//!
//! `cargo bench -p ember-orchestrator --bench hops` (needs `moto_server`; skipped with a
//! message when it is missing).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use ember_orchestrator::pipeline::{
    describe, process_hop, start_execution, Env, ExecutionStatus, HopMessage, HopSender, MemoryStore, Options,
    SendError, StartOptions, Tools,
};
use serde_json::{json, Value};

const CHAIN: usize = 100;
const ROUNDS: usize = 3;

/// A `HopSender` on SQS: one SendMessage per hop, `DelaySeconds` rounded up.
struct SqsSender {
    client: Client,
    queue_url: String,
}

#[async_trait::async_trait]
impl HopSender for SqsSender {
    async fn send(&self, hops: Vec<(HopMessage, Duration)>) -> Result<(), SendError> {
        for (m, d) in hops {
            let body = serde_json::to_string(&m).map_err(|e| SendError { message: e.to_string(), retryable: false })?;
            self.client
                .send_message()
                .queue_url(&self.queue_url)
                .message_body(body)
                .delay_seconds(d.as_secs_f64().ceil() as i32)
                .send()
                .await
                .map_err(|e| SendError { message: format!("{e:?}"), retryable: true })?;
        }
        Ok(())
    }
}

fn chain_definition(n: usize) -> String {
    let mut states = serde_json::Map::new();
    for i in 0..n {
        let mut s = json!({"Type": "Pass", "Parameters": {"step": i, "payload.$": "$.payload"}});
        if i + 1 < n {
            s["Next"] = json!(format!("S{}", i + 1));
        } else {
            s["End"] = json!(true);
        }
        states.insert(format!("S{i}"), s);
    }
    json!({"StartAt": "S0", "States": states}).to_string()
}

async fn run_chain(client: &Client, queue_url: &str, def: &str) -> anyhow::Result<Duration> {
    let env = Env {
        store: Arc::new(MemoryStore::new()),
        sender: Arc::new(SqsSender { client: client.clone(), queue_url: queue_url.to_string() }),
        runner: Arc::new(Tools::builtin()),
        options: Options::default(),
        definitions: Default::default(),
    };
    let t0 = Instant::now();
    let id = start_execution(&env, def, json!({"payload": "x".repeat(200)}), StartOptions::default()).await?;
    let mut hops = 0;
    loop {
        let r = client
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await?;
        for m in r.messages.unwrap_or_default() {
            let msg: HopMessage = serde_json::from_str(m.body.as_deref().unwrap_or("{}"))?;
            process_hop(&env, msg).await?;
            hops += 1;
            client
                .delete_message()
                .queue_url(queue_url)
                .receipt_handle(m.receipt_handle.unwrap_or_default())
                .send()
                .await?;
        }
        if describe(&env, &id).await?.status != ExecutionStatus::Running {
            break;
        }
    }
    let elapsed = t0.elapsed();
    let d = describe(&env, &id).await?;
    anyhow::ensure!(
        d.status == ExecutionStatus::Succeeded && hops == CHAIN,
        "chain did not finish: {d:?}, {hops} hops"
    );
    anyhow::ensure!(d.output.as_ref().and_then(|o| o.get("step")) == Some(&Value::from(CHAIN - 1)));
    Ok(elapsed)
}

async fn run_bare(client: &Client, queue_url: &str) -> anyhow::Result<Duration> {
    let body = json!({"payload": "x".repeat(200), "step": 0}).to_string();
    let t0 = Instant::now();
    let mut done = 0;
    while done < CHAIN {
        client.send_message().queue_url(queue_url).message_body(&body).send().await?;
        loop {
            let r = client
                .receive_message()
                .queue_url(queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await?;
            let msgs = r.messages.unwrap_or_default();
            if msgs.is_empty() {
                continue;
            }
            for m in msgs {
                client
                    .delete_message()
                    .queue_url(queue_url)
                    .receipt_handle(m.receipt_handle.unwrap_or_default())
                    .send()
                    .await?;
            }
            break;
        }
        done += 1;
    }
    Ok(t0.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let moto = match ember_tests::MotoServer::start() {
        Ok(m) => m,
        Err(e) => {
            println!("SKIPPED: moto_server is not available ({e:#}); the hop bench did not run");
            return Ok(());
        }
    };
    let cfg = moto.aws_config().await;
    let client = Client::new(&cfg);
    let hop_q = client.create_queue().queue_name("ember-bench-hops").send().await?.queue_url.unwrap_or_default();
    let bare_q = client.create_queue().queue_name("ember-bench-bare").send().await?.queue_url.unwrap_or_default();
    let def = chain_definition(CHAIN);

    // Warm up connections and moto.
    run_bare(&client, &bare_q).await?;
    run_chain(&client, &hop_q, &def).await?;

    let (mut chains, mut bares) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        bares.push(run_bare(&client, &bare_q).await?);
        chains.push(run_chain(&client, &hop_q, &def).await?);
    }
    let per_hop = median(chains).as_secs_f64() * 1000.0 / CHAIN as f64;
    let per_rt = median(bares).as_secs_f64() * 1000.0 / CHAIN as f64;
    println!("moto SQS, {CHAIN} sequential steps, median of {ROUNDS} rounds:");
    println!("  pipeline hop (receive + process_hop + send next + delete): {per_hop:.2} ms/hop");
    println!("  bare SQS round trip (send + receive + delete):              {per_rt:.2} ms");
    println!("  ratio: {:.2}x (target <= 1.5x)", per_hop / per_rt);
    Ok(())
}
