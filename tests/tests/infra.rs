//! infra/ember.yaml on moto's CloudFormation: the data plane (DeployCompute=false: queues
//! with their DLQs and redrive, buckets with encryption and public access blocked) is
//! created from the template, and one real job goes through the stack's queue and buckets
//! the way infra/README.md says to deploy: the model pushed to the weights bucket with its
//! manifest, `ember submit` and `ember serve` on the output names, the result read back.
//!
//! Lambda, ECS and IAM are not created here (moto runs no Lambda code or GPU tasks):
//! `DeployCompute=false` skips them through a template Condition, so the template tested
//! is the one deployed, not a copy of its data-plane half.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_sdk_cloudformation::types::{Parameter, StackStatus};
use aws_sdk_s3::primitives::ByteStream;
use ember_orchestrator::export::export_for_step_functions;
use ember_tests::{aws_env, smollm_hf, MotoServer};

const MODEL_PREFIX: &str = "models/smollm2-135m-instruct";

/// How long a poll waits for moto or `ember autoscale` before failing: minutes, a guard against
/// a hang, not a bound on how fast a loaded machine answers.
const HANG_GUARD: Duration = Duration::from_secs(300);

/// The `ember` binary of this workspace (built by `cargo test --workspace`; built here when
/// this test runs alone).
fn ember_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).context("test binary outside target/<profile>/deps")?;
    let bin = dir.join("ember");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo).args(["build", "-p", "ember-worker", "--bin", "ember"]).status()?;
        if !status.success() || !bin.exists() {
            bail!("could not build the ember binary at {}", bin.display());
        }
    }
    Ok(bin)
}

async fn deploy(cfn: &aws_sdk_cloudformation::Client, name: &str) -> anyhow::Result<HashMap<String, String>> {
    let template = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/ember.yaml"))?;
    let param = |k: &str, v: &str| Parameter::builder().parameter_key(k).parameter_value(v).build();
    cfn.create_stack()
        .stack_name(name)
        .template_body(template)
        .parameters(param("DeployCompute", "false"))
        .parameters(param("VpcId", "vpc-12345678"))
        .parameters(param("ModelPrefix", MODEL_PREFIX))
        .send()
        .await?;
    let start = Instant::now();
    loop {
        let out = cfn.describe_stacks().stack_name(name).send().await?;
        let stack = out.stacks().first().context("stack missing")?;
        match stack.stack_status() {
            Some(StackStatus::CreateComplete) => {
                return Ok(stack
                    .outputs()
                    .iter()
                    .filter_map(|o| Some((o.output_key()?.to_string(), o.output_value()?.to_string())))
                    .collect());
            }
            Some(StackStatus::CreateInProgress) if start.elapsed() < HANG_GUARD => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => bail!("stack {name}: {other:?} {:?}", stack.stack_status_reason()),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_template_deploys_queues_and_buckets_and_a_job_runs_through_them() -> anyhow::Result<()> {
    let moto = MotoServer::start()?;
    let conf = moto.aws_config().await;
    let cfn = aws_sdk_cloudformation::Client::new(&conf);
    let sqs = aws_sdk_sqs::Client::new(&conf);
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&conf).force_path_style(true).build());

    let out = deploy(&cfn, "ember-ci").await?;
    let get = |k: &str| out.get(k).cloned().with_context(|| format!("output {k} missing: {out:?}"));
    let (queue, dlq, weights, results) =
        (get("JobsQueueName")?, get("JobsDeadLetterQueueName")?, get("WeightsBucketName")?, get("ResultsBucketName")?);
    assert_eq!(queue, "ember-ci-jobs");
    assert!(out.contains_key("PipelineQueueName") && out.contains_key("PipelineDeadLetterQueueName"));
    assert!(!out.contains_key("LambdaFunctionArn"), "compute outputs without compute: {out:?}");

    // The queue: redrive to its DLQ, visibility 6x the 300 s function timeout.
    let url = sqs.get_queue_url().queue_name(&queue).send().await?.queue_url().context("no url")?.to_string();
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
        .send()
        .await?;
    let attr = |k: aws_sdk_sqs::types::QueueAttributeName| attrs.attributes().and_then(|a| a.get(&k)).cloned();
    assert_eq!(attr(aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout).as_deref(), Some("1800"));
    let redrive: serde_json::Value = serde_json::from_str(
        &attr(aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy).context("no redrive policy")?,
    )?;
    assert_eq!(redrive["maxReceiveCount"], 3);
    assert!(redrive["deadLetterTargetArn"].as_str().is_some_and(|a| a.ends_with(&format!(":{dlq}"))), "{redrive}");

    // The buckets: encrypted. (moto's CloudFormation does not apply
    // PublicAccessBlockConfiguration, so that part is checked in the template text; cfn-lint
    // checks its shape.)
    for bucket in [&weights, &results] {
        let enc = s3.get_bucket_encryption().bucket(bucket).send().await?;
        let rules = enc.server_side_encryption_configuration().map(|c| c.rules().len()).unwrap_or(0);
        assert_eq!(rules, 1, "{bucket} has no default encryption");
    }
    let template = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/ember.yaml"))?;
    for flag in ["BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"] {
        assert_eq!(template.matches(&format!("{flag}: true")).count(), 2, "{flag} on both buckets");
    }
    // Both buckets are versioned (the results bucket too, so a bad write never destroys the
    // result before it), and old result versions expire. moto's CloudFormation does not apply
    // VersioningConfiguration either, so this is read from the template.
    assert_eq!(template.matches("VersioningConfiguration:\n        Status: Enabled").count(), 2);
    assert!(template.contains("NoncurrentVersionExpiration"), "old result versions expire");
    // The workers' policy reaches only their prefix of the results bucket (moto does not
    // enforce IAM, so this is read from the template): objects under the prefix, listing
    // only with the prefix as condition.
    assert!(template.contains(r#"Resource: !Sub "${ResultsBucket.Arn}/${ResultsPrefix}/*""#));
    assert!(
        template.contains(r#"Condition: {StringLike: {"s3:prefix": [!Sub "${ResultsPrefix}/*", !Ref ResultsPrefix]}}"#)
    );
    assert!(!template.contains(r#"Resource: !Sub "${ResultsBucket.Arn}/*""#), "a whole-bucket grant is left");

    // Push the model with its manifest (infra/README.md: `ember model manifest DIR` then
    // `aws s3 sync DIR s3://WEIGHTS/PREFIX`).
    let dir = smollm_hf("f16")?;
    assert!(dir.join("ember-manifest.json").exists());
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let body = ByteStream::from_path(&path).await?;
        s3.put_object().bucket(&weights).key(format!("{MODEL_PREFIX}/{name}")).body(body).send().await?;
    }

    // One job through the stack's queue and buckets with the real binary.
    let work = tempfile::tempdir()?;
    let jobs = work.path().join("jobs.jsonl");
    std::fs::write(
        &jobs,
        serde_json::json!({"custom_id": "paris", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                     "max_tokens": 16}})
        .to_string(),
    )?;
    let bin = ember_bin()?;
    let ember = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        let out = Command::new(&bin)
            .args(args)
            .env_remove("AWS_ENDPOINT_URL")
            .envs(aws_env(&moto.endpoint()))
            .env("EMBER_SQS_QUEUE", &queue)
            .env("EMBER_MODEL", format!("s3://{weights}/{MODEL_PREFIX}"))
            .env("EMBER_DTYPE", "f16")
            .env("EMBER_RESULTS", format!("s3://{results}/ember"))
            .env("EMBER_NO_PROGRESS", "1")
            .output()?;
        if !out.status.success() {
            bail!("ember {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out)
    };
    ember(&["submit", &jobs.to_string_lossy(), "--batch-id", "infra"])?;
    let stats: serde_json::Value =
        serde_json::from_slice(&ember(&["serve", "--exit-when-idle", "--wait-seconds", "1"])?.stdout)?;
    assert_eq!(stats["done"], 1, "{stats}");

    let key = "ember/results/infra/paris.json";
    let body = s3.get_object().bucket(&results).key(key).send().await?.body.collect().await?.into_bytes();
    let line: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(line["custom_id"], "paris");
    let content = line["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(content.contains("Paris"), "{line}");
    let status: serde_json::Value = serde_json::from_slice(&ember(&["status", "--json"])?.stdout)?;
    assert_eq!(status, serde_json::json!({"visible": 0, "in_flight": 0, "delayed": 0, "dlq": 0}));
    Ok(())
}

/// The example pipelines and a small routing one, exported for Step Functions.
fn exported_pipelines(arn: &str) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines");
    let mut out = Vec::new();
    for name in ["agent", "summarize"] {
        let def: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.asl.json")))?)?;
        out.push((name.to_string(), export_for_step_functions(&def, arn)?));
    }
    out.push(("route".into(), export_for_step_functions(&route_pipeline(), arn)?));
    Ok(out)
}

/// Routes on `$.skip`: the skip path is service-free (Pass, Choice, Succeed), the other calls
/// the model.
fn route_pipeline() -> serde_json::Value {
    serde_json::json!({"StartAt": "Route", "States": {
        "Route": {"Type": "Choice", "Choices": [{"Variable": "$.skip", "BooleanEquals": true, "Next": "Skip"}], "Default": "Ask"},
        "Skip": {"Type": "Pass", "Parameters": {"answer.$": "States.Format('skipped {}', $.question)"}, "Next": "Done"},
        "Ask": {"Type": "Task", "Resource": "ember:generate",
                "Parameters": {"messages": [{"role": "user", "content.$": "$.question"}], "max_tokens": 16},
                "ResultSelector": {"answer.$": "$.text"}, "Next": "Done"},
        "Done": {"Type": "Succeed"}}})
}

#[tokio::test(flavor = "multi_thread")]
async fn exported_pipelines_pass_cfn_lint_and_run_on_moto_step_functions() -> anyhow::Result<()> {
    let arn = "arn:aws:lambda:us-east-1:123456789012:function:ember-worker";
    let pipelines = exported_pipelines(arn)?;

    // cfn-lint validates a state machine's Definition against the States Language schema.
    let mut resources = serde_json::Map::new();
    for (name, def) in &pipelines {
        let id: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
        resources.insert(
            format!("{id}StateMachine"),
            serde_json::json!({"Type": "AWS::StepFunctions::StateMachine", "Properties": {
                "RoleArn": "arn:aws:iam::123456789012:role/ember-pipelines", "Definition": def}}),
        );
    }
    let work = tempfile::tempdir()?;
    let template = work.path().join("pipelines.json");
    std::fs::write(
        &template,
        serde_json::to_vec_pretty(
            &serde_json::json!({"AWSTemplateFormatVersion": "2010-09-09", "Resources": resources}),
        )?,
    )?;
    let lint = Command::new("cfn-lint")
        .arg(&template)
        .output()
        .context("running cfn-lint: install it with scripts/install-test-deps.sh")?;
    assert!(
        lint.status.success(),
        "cfn-lint on the exported pipelines: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    // moto 5.2.5 runs state machines (no Lambda code): every export is accepted, and the
    // service-free path of the routing pipeline runs to the end.
    let moto = MotoServer::start()?;
    enable_sfn_execution(moto.port)?;
    let sfn = aws_sdk_sfn::Client::new(&moto.aws_config().await);
    let mut machines = HashMap::new();
    for (name, def) in &pipelines {
        let created = sfn
            .create_state_machine()
            .name(format!("ember-{name}"))
            .definition(def.to_string())
            .role_arn("arn:aws:iam::123456789012:role/ember-pipelines")
            .send()
            .await?;
        machines.insert(name.clone(), created.state_machine_arn);
    }
    let exec = sfn
        .start_execution()
        .state_machine_arn(&machines["route"])
        .input(r#"{"skip": true, "question": "why?"}"#)
        .send()
        .await?
        .execution_arn;
    let start = Instant::now();
    loop {
        let d = sfn.describe_execution().execution_arn(&exec).send().await?;
        match d.status.as_str() {
            "RUNNING" if start.elapsed() < HANG_GUARD => tokio::time::sleep(Duration::from_millis(100)).await,
            "SUCCEEDED" => {
                let output: serde_json::Value = serde_json::from_str(d.output().unwrap_or("null"))?;
                assert_eq!(output, serde_json::json!({"answer": "skipped why?"}));
                return Ok(());
            }
            other => bail!("execution {other}: {:?} {:?}", d.error(), d.cause()),
        }
    }
}

/// `POST /moto-api/config` turning on moto's execution of state machines.
fn enable_sfn_execution(port: u16) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let body = r#"{"stepfunctions":{"execute_state_machine":true}}"#;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "POST /moto-api/config HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    if !resp.starts_with("HTTP/1.1 2") && !resp.starts_with("HTTP/1.0 2") {
        bail!("moto config: {resp}");
    }
    Ok(())
}

/// What the ECS and Lambda drivers act on, as moto can create it: a service and an SQS event
/// source mapping (on a queue of its own: moto would try to run the function for messages on
/// it).
const DRIVER_TARGETS: &str = r#"
Resources:
  Role:
    Type: AWS::IAM::Role
    Properties:
      AssumeRolePolicyDocument:
        Version: "2012-10-17"
        Statement: [{Effect: Allow, Principal: {Service: lambda.amazonaws.com}, Action: sts:AssumeRole}]
  Function:
    Type: AWS::Lambda::Function
    Properties:
      FunctionName: ember-worker
      PackageType: Image
      Code: {ImageUri: 123456789012.dkr.ecr.us-east-1.amazonaws.com/ember-lambda:v1}
      Role: !GetAtt Role.Arn
  MappedQueue:
    Type: AWS::SQS::Queue
    Properties: {QueueName: mapped}
  Mapping:
    Type: AWS::Lambda::EventSourceMapping
    Properties:
      EventSourceArn: !GetAtt MappedQueue.Arn
      FunctionName: !Ref Function
      FunctionResponseTypes: [ReportBatchItemFailures]
      ScalingConfig: {MaximumConcurrency: 2}
  Cluster:
    Type: AWS::ECS::Cluster
    Properties: {ClusterName: gpu}
  Task:
    Type: AWS::ECS::TaskDefinition
    Properties:
      Family: ember
      ContainerDefinitions: [{Name: ember, Image: ember-gpu, Memory: 512}]
  Service:
    Type: AWS::ECS::Service
    Properties: {Cluster: !Ref Cluster, ServiceName: ember, TaskDefinition: !Ref Task, DesiredCount: 0}
Outputs:
  Mapping: {Value: !Ref Mapping}
"#;

/// Runs `ember autoscale` on `queue` with `driver_args` until a decision with `desired`
/// workers has been applied, then stops it with SIGTERM.
fn autoscale_until(endpoint: &str, queue: &str, driver_args: &[&str], desired: u64) -> anyhow::Result<()> {
    use std::io::BufRead;
    let mut child = Command::new(ember_bin()?)
        .args([
            "autoscale",
            "--max-workers",
            "4",
            "--interval",
            "0.5",
            "--scale-down-window",
            "0",
            "--idle-cooldown",
            "0",
            // Every queued job should start at once: 40 jobs at 8 per worker want 5 workers.
            "--target-wait",
            "0.1",
        ])
        .args(driver_args)
        .env_remove("AWS_ENDPOINT_URL")
        .envs(aws_env(endpoint))
        .env("EMBER_SQS_QUEUE", queue)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + HANG_GUARD;
    let mut seen = Vec::new();
    let result = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let d: serde_json::Value = serde_json::from_str(&line)?;
                seen.push(line);
                // The tick after the decision sees the driver's new count.
                if d["workers"].as_u64() == Some(desired) && d["desired"].as_u64() == Some(desired) {
                    break Ok(());
                }
            }
            Err(_) => break Err(anyhow::anyhow!("no decision with {desired} workers applied: {seen:#?}")),
        }
    };
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    let status = child.wait()?;
    result?;
    anyhow::ensure!(status.success(), "autoscale exited with {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ecs_and_lambda_drivers_move_the_service_and_the_mapping_with_the_backlog() -> anyhow::Result<()> {
    let moto = MotoServer::start()?;
    let conf = moto.aws_config().await;
    let cfn = aws_sdk_cloudformation::Client::new(&conf);
    cfn.create_stack().stack_name("drivers").template_body(DRIVER_TARGETS).send().await?;
    let mut mapping = None;
    let start = Instant::now();
    while start.elapsed() < HANG_GUARD {
        let out = cfn.describe_stacks().stack_name("drivers").send().await?;
        let stack = out.stacks().first().context("stack missing")?;
        if stack.stack_status() == Some(&StackStatus::CreateComplete) {
            mapping = stack.outputs().first().and_then(|o| o.output_value()).map(str::to_string);
            break;
        }
        anyhow::ensure!(
            stack.stack_status() == Some(&StackStatus::CreateInProgress),
            "{:?}",
            stack.stack_status_reason()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mapping = mapping.context("no mapping output")?;
    let sqs = aws_sdk_sqs::Client::new(&conf);
    // The autoscaler opens the queue as workers do: it must have a DLQ.
    let dlq = sqs.create_queue().queue_name("backlog-dlq").send().await?.queue_url().context("no url")?.to_string();
    let dlq_arn = sqs
        .get_queue_attributes()
        .queue_url(&dlq)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await?
        .attributes()
        .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn).cloned())
        .context("no DLQ arn")?;
    let url = sqs
        .create_queue()
        .queue_name("backlog")
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
            serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3}).to_string(),
        )
        .send()
        .await?
        .queue_url()
        .context("no url")?
        .to_string();
    for i in 0..4 {
        let entries = (0..10)
            .map(|j| {
                aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                    .id(format!("m{j}"))
                    .message_body(format!("{{\"n\": {}}}", i * 10 + j))
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        sqs.send_message_batch().queue_url(&url).set_entries(Some(entries)).send().await?;
    }
    let endpoint = moto.endpoint();
    let ecs = aws_sdk_ecs::Client::new(&conf);
    let desired = |ecs: aws_sdk_ecs::Client| async move {
        let out = ecs.describe_services().cluster("gpu").services("ember").send().await?;
        anyhow::Ok(out.services().first().map(|s| s.desired_count()))
    };

    // 40 jobs at 8 per worker, all to start within 0.1 s: 5 workers, capped at 4.
    let ecs_args = ["--driver", "ecs", "--ecs-cluster", "gpu", "--ecs-service", "ember"];
    let e = endpoint.clone();
    tokio::task::spawn_blocking(move || autoscale_until(&e, "backlog", &ecs_args, 4)).await??;
    assert_eq!(desired(ecs.clone()).await?, Some(4));
    let lambda = aws_sdk_lambda::Client::new(&conf);
    let (e, m) = (endpoint.clone(), mapping.clone());
    tokio::task::spawn_blocking(move || {
        autoscale_until(&e, "backlog", &["--driver", "lambda", "--lambda-mapping", &m], 4)
    })
    .await??;
    let esm = lambda.get_event_source_mapping().uuid(&mapping).send().await?;
    assert_eq!(esm.scaling_config().and_then(|c| c.maximum_concurrency()), Some(4));
    assert_eq!(esm.state(), Some("Enabled"));

    // Empty queue: the service goes to 0 tasks, the mapping is disabled.
    sqs.purge_queue().queue_url(&url).send().await?;
    let e = endpoint.clone();
    tokio::task::spawn_blocking(move || autoscale_until(&e, "backlog", &ecs_args, 0)).await??;
    assert_eq!(desired(ecs).await?, Some(0));
    let (e, m) = (endpoint, mapping.clone());
    tokio::task::spawn_blocking(move || {
        autoscale_until(&e, "backlog", &["--driver", "lambda", "--lambda-mapping", &m], 0)
    })
    .await??;
    let esm = lambda.get_event_source_mapping().uuid(&mapping).send().await?;
    assert_eq!(esm.state(), Some("Disabled"));
    Ok(())
}
