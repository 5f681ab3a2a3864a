//! The `Queue` and `ObjectStore` contracts, run by the same check functions against both
//! implementations: SQS + S3 on a moto server on 127.0.0.1, and the embedded SQLite queue +
//! local directory store in a temporary directory. Each check gets its own queue and the
//! checks of one backend run concurrently, so the waits for visibility timeouts overlap.
//!
//! `embedded_survives_kill_9` re-runs this test binary as a child process that receives a
//! message and is then killed with SIGKILL.

use std::collections::HashSet;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use ember_tests::MotoServer;
use ember_worker::queue::embedded::{EmbeddedOptions, EmbeddedQueue};
use ember_worker::queue::sqs::{SqsQueue, SqsQueueSetup};
use ember_worker::queue::{OutgoingMessage, Queue, QueueDepth, QueueError, ReceiveOptions, ReceivedMessage};
use ember_worker::store::local::LocalStore;
use ember_worker::store::s3::S3Store;
use ember_worker::store::{ObjectStore, PutOutcome, StoreError};

const CHILD_ENV: &str = "EMBER_TEST_QUEUE_CHILD";

/// Where a check's fresh queue comes from.
enum Backend {
    Sqs(aws_sdk_sqs::Client),
    Embedded(tempfile::TempDir),
}

impl Backend {
    async fn queue(&self, name: &str, visibility_secs: u64, max_receive_count: u32) -> Result<Arc<dyn Queue>> {
        let visibility_timeout = Duration::from_secs(visibility_secs);
        Ok(match self {
            Backend::Sqs(client) => {
                let setup = SqsQueueSetup { name: name.into(), visibility_timeout, max_receive_count };
                Arc::new(SqsQueue::ensure(client.clone(), &setup).await?)
            }
            Backend::Embedded(dir) => Arc::new(
                EmbeddedQueue::open(
                    dir.path().join(format!("{name}.db")),
                    embedded_options(name, visibility_timeout, max_receive_count),
                )
                .await?,
            ),
        })
    }
}

fn embedded_options(name: &str, visibility_timeout: Duration, max_receive_count: u32) -> EmbeddedOptions {
    EmbeddedOptions {
        name: name.into(),
        visibility_timeout,
        max_receive_count,
        poll_interval: Duration::from_millis(20),
        ..EmbeddedOptions::default()
    }
}

fn wait(secs: u64) -> ReceiveOptions {
    ReceiveOptions::long_poll(Duration::from_secs(secs))
}

/// Receives exactly one message within `secs`.
async fn one(q: &dyn Queue, secs: u64) -> Result<ReceivedMessage> {
    let mut msgs = q.receive(&wait(secs)).await?;
    ensure!(msgs.len() == 1, "expected one message, got {}", msgs.len());
    msgs.pop().context("one message")
}

/// Receives `n` messages, in as many long polls as they take (a few at most).
async fn receive_n(q: &dyn Queue, n: usize) -> Result<Vec<ReceivedMessage>> {
    let mut got = Vec::new();
    for _ in 0..5 {
        if got.len() >= n {
            break;
        }
        got.extend(q.receive(&wait(5)).await?);
    }
    ensure!(got.len() == n, "expected {n} messages, got {}", got.len());
    Ok(got)
}

async fn delete_all(q: &dyn Queue, msgs: &[ReceivedMessage]) -> Result<()> {
    let receipts: Vec<_> = msgs.iter().map(|m| m.receipt.clone()).collect();
    for result in q.delete_batch(&receipts).await {
        result?;
    }
    Ok(())
}

type Check<'a> = (&'static str, Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>);

/// Runs the checks concurrently and reports every failure, not only the first.
async fn run_all(backend: &str, checks: Vec<Check<'_>>) -> Result<()> {
    let (names, futures): (Vec<_>, Vec<_>) = checks.into_iter().unzip();
    let results = futures::future::join_all(futures).await;
    let failures: Vec<String> =
        names.iter().zip(results).filter_map(|(name, r)| r.err().map(|e| format!("{backend}/{name}: {e:#}"))).collect();
    ensure!(failures.is_empty(), "{} check(s) failed:\n{}", failures.len(), failures.join("\n"));
    Ok(())
}

fn queue_checks(b: &Backend) -> Vec<Check<'_>> {
    vec![
        ("round_trip", Box::pin(round_trip(b))),
        ("visibility_timeout", Box::pin(visibility_timeout(b))),
        ("release", Box::pin(release(b))),
        ("dead_letter_and_redrive", Box::pin(dead_letter_and_redrive(b))),
        ("delay", Box::pin(delay(b))),
        ("batch_of_25", Box::pin(batch_of_25(b))),
        ("depth", Box::pin(depth(b))),
        ("redrive_sent_to_dlq", Box::pin(redrive_sent_to_dlq(b))),
        ("trace_context", Box::pin(trace_context(b))),
    ]
}

/// The W3C trace context sent with a message comes back with it, and stays through a redrive.
async fn trace_context(b: &Backend) -> Result<()> {
    let q = b.queue("trace-context", 30, 1).await?;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let sent = q
        .send_batch(vec![
            OutgoingMessage::new("traced").with_traceparent(Some(tp.into())),
            OutgoingMessage::new("plain"),
        ])
        .await;
    ensure!(sent.iter().all(Result::is_ok), "{sent:?}");
    let mut got = receive_n(&*q, 2).await?;
    got.sort_by(|a, b| a.body.cmp(&b.body));
    ensure!(got[0].body == b"plain" && got[0].traceparent.is_none(), "{:?}", got[0]);
    ensure!(got[1].traceparent.as_deref() == Some(tp), "{:?}", got[1]);
    // Released past max_receive_count 1: the next receive moves it to the DLQ; redrive brings it back.
    for m in &got {
        q.change_visibility(&m.receipt, Duration::ZERO).await?;
    }
    ensure!(q.receive(&wait(1)).await?.is_empty(), "messages past max_receive_count came back");
    ensure!(q.redrive().await? == 2, "both redriven");
    let back = receive_n(&*q, 2).await?;
    ensure!(back.iter().any(|m| m.traceparent.as_deref() == Some(tp)), "trace context lost in the redrive: {back:?}");
    delete_all(&*q, &back).await
}

async fn round_trip(b: &Backend) -> Result<()> {
    let q = b.queue("round-trip", 30, 5).await?;
    let before = SystemTime::now() - Duration::from_secs(5);
    let id = q.send(b"hello".to_vec(), None).await?;
    let m = one(&*q, 5).await?;
    ensure!(m.id == id && m.body == b"hello", "got {m:?}");
    ensure!(m.receive_count == 1, "receive count {}", m.receive_count);
    ensure!(m.sent_at >= before && m.sent_at <= SystemTime::now() + Duration::from_secs(5), "sent_at {:?}", m.sent_at);
    q.delete(&m.receipt).await?;
    ensure!(q.depth().await? == QueueDepth::default(), "not empty after delete");
    ensure!(q.receive(&wait(0)).await?.is_empty(), "a deleted message came back");
    Ok(())
}

async fn visibility_timeout(b: &Backend) -> Result<()> {
    // 2 s, so that the two checks during the timeout have room on a loaded machine.
    let q = b.queue("visibility", 2, 5).await?;
    q.send(b"v".to_vec(), None).await?;
    let first = one(&*q, 5).await?;
    ensure!(first.receive_count == 1);
    // Hidden while its visibility timeout runs, as the queue itself reports it ...
    ensure!(q.receive(&wait(0)).await?.is_empty(), "visible during its visibility timeout");
    let depth = q.depth().await?;
    ensure!(depth == QueueDepth { in_flight: 1, ..QueueDepth::default() }, "depth during the timeout {depth:?}");
    // ... and delivered again once the timeout is over, with nobody releasing it.
    let second = one(&*q, 5).await.context("did not come back after the visibility timeout")?;
    ensure!(second.id == first.id && second.receive_count == 2, "got {second:?}");
    q.delete(&second.receipt).await?;
    Ok(())
}

async fn release(b: &Backend) -> Result<()> {
    let q = b.queue("release", 30, 5).await?;
    q.send(b"r".to_vec(), None).await?;
    let first = one(&*q, 5).await?;
    q.change_visibility(&first.receipt, Duration::ZERO).await?;
    // Visible again at once, not after the 30 s visibility timeout.
    let depth = q.depth().await?;
    ensure!(depth == QueueDepth { visible: 1, ..QueueDepth::default() }, "depth after the release {depth:?}");
    let second = one(&*q, 5).await.context("not released by change_visibility(0)")?;
    ensure!(second.receive_count == 2, "receive count {}", second.receive_count);
    q.delete(&second.receipt).await?;
    Ok(())
}

async fn dead_letter_and_redrive(b: &Backend) -> Result<()> {
    let q = b.queue("dead-letter", 1, 2).await?;
    q.send(b"poison".to_vec(), None).await?;
    for expected in 1..=2 {
        let m = one(&*q, 5).await?;
        ensure!(m.receive_count == expected, "receive count {} instead of {expected}", m.receive_count);
    }
    // The third delivery would exceed max_receive_count: the message moves to the DLQ.
    let third = q.receive(&wait(3)).await?;
    ensure!(third.is_empty(), "delivered a third time: {third:?}");
    let depth = q.depth().await?;
    ensure!(depth == QueueDepth { dlq_visible: 1, ..QueueDepth::default() }, "depth {depth:?}");
    ensure!(q.redrive().await? == 1, "redrive did not move one message");
    let back = one(&*q, 5).await?;
    ensure!(back.body == b"poison" && back.receive_count == 1, "after redrive: {back:?}");
    q.delete(&back.receipt).await?;
    Ok(())
}

async fn delay(b: &Backend) -> Result<()> {
    let q = b.queue("delay", 30, 5).await?;
    q.send(b"later".to_vec(), Some(Duration::from_secs(2))).await?;
    let depth = q.depth().await?;
    ensure!(depth == QueueDepth { delayed: 1, ..QueueDepth::default() }, "depth {depth:?}");
    ensure!(q.receive(&wait(0)).await?.is_empty(), "delivered before its delay");
    let m = one(&*q, 5).await.context("not delivered after its delay")?;
    ensure!(m.body == b"later" && m.receive_count == 1, "got {m:?}");
    q.delete(&m.receipt).await?;
    Ok(())
}

async fn batch_of_25(b: &Backend) -> Result<()> {
    let q = b.queue("batch", 30, 5).await?;
    let bodies: HashSet<Vec<u8>> = (0..25).map(|i| format!("job-{i}").into_bytes()).collect();
    let sent = q.send_batch(bodies.iter().cloned().map(OutgoingMessage::new).collect()).await;
    let ids: HashSet<String> = sent.into_iter().map(|r| r.map(|id| id.0)).collect::<Result<_, _>>()?;
    ensure!(ids.len() == 25, "{} distinct ids", ids.len());
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 25 && Instant::now() < deadline {
        let batch = q.receive(&wait(2)).await?;
        ensure!(batch.len() <= 10, "received {} at once", batch.len());
        got.extend(batch);
    }
    let received: HashSet<Vec<u8>> = got.iter().map(|m| m.body.clone()).collect();
    ensure!(got.len() == 25 && received == bodies, "received {} messages", got.len());
    delete_all(&*q, &got).await?;
    ensure!(q.depth().await? == QueueDepth::default(), "not empty after deleting 25");
    Ok(())
}

async fn depth(b: &Backend) -> Result<()> {
    let q = b.queue("depth", 30, 5).await?;
    q.send(b"a".to_vec(), None).await?;
    q.send(b"b".to_vec(), None).await?;
    q.send(b"c".to_vec(), Some(Duration::from_secs(60))).await?;
    let opts = ReceiveOptions { max_messages: 1, ..wait(5) };
    ensure!(q.receive(&opts).await?.len() == 1);
    q.send_to_dlq(b"bad".to_vec(), "invalid job: messages is empty", None).await?;
    let depth = q.depth().await?;
    ensure!(depth == QueueDepth { visible: 1, in_flight: 1, delayed: 1, dlq_visible: 1 }, "depth {depth:?}");
    Ok(())
}

async fn redrive_sent_to_dlq(b: &Backend) -> Result<()> {
    let q = b.queue("redrive", 30, 5).await?;
    // The first keeps the trace it was in through the DLQ and back.
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for i in 0..3 {
        let traceparent = (i == 0).then_some(trace);
        q.send_to_dlq(format!("dead-{i}").into_bytes(), "terminal: unknown model", traceparent).await?;
    }
    ensure!(q.depth().await?.dlq_visible == 3);
    ensure!(q.redrive().await? == 3, "redrive did not move three");
    let mut got = Vec::new();
    while got.len() < 3 {
        let batch = q.receive(&wait(5)).await?;
        ensure!(!batch.is_empty(), "only {} came back", got.len());
        got.extend(batch);
    }
    for m in &got {
        let expected = (m.body == b"dead-0").then_some(trace);
        ensure!(
            m.traceparent.as_deref() == expected,
            "{:?}: traceparent {:?}",
            String::from_utf8_lossy(&m.body),
            m.traceparent
        );
    }
    delete_all(&*q, &got).await?;
    ensure!(q.depth().await? == QueueDepth::default(), "not empty after redrive and delete");
    Ok(())
}

async fn store_contract(store: &dyn ObjectStore) -> Result<()> {
    let key = "results/b1/job-1.json";
    ensure!(store.put_if_absent(key, b"first".to_vec()).await? == PutOutcome::Created);
    ensure!(store.put_if_absent(key, b"second".to_vec()).await? == PutOutcome::AlreadyExists);
    ensure!(store.get(key).await?.as_deref() == Some(&b"first"[..]), "the second put replaced the first");
    ensure!(store.get("results/b1/missing.json").await?.is_none());
    for k in ["results/b1/job-2.json", "results/b10/job-1.json", "other/x"] {
        ensure!(store.put_if_absent(k, k.as_bytes().to_vec()).await? == PutOutcome::Created);
    }
    ensure!(store.list("results/b1/").await? == ["results/b1/job-1.json", "results/b1/job-2.json"]);
    let all_b1 = store.list("results/b1").await?;
    ensure!(all_b1 == ["results/b1/job-1.json", "results/b1/job-2.json", "results/b10/job-1.json"], "{all_b1:?}");
    ensure!(store.list("nothing/").await?.is_empty());
    for bad in ["../escape", "a/../b", "/abs", "a//b", "", "a/"] {
        match store.put_if_absent(bad, b"x".to_vec()).await {
            Err(e @ StoreError::InvalidKey { .. }) => {
                ensure!(!e.is_retryable() && e.label() == "store_invalid_key")
            }
            other => bail!("key {bad:?} was not refused: {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_and_s3_on_moto() -> Result<()> {
    let moto = MotoServer::start()?;
    let config = moto.aws_config().await;
    let backend = Backend::Sqs(aws_sdk_sqs::Client::new(&config));
    let store = S3Store::from_config(&config, "ember-results", "run-1");
    store.client().create_bucket().bucket("ember-results").send().await?;

    let mut checks = queue_checks(&backend);
    checks.push(("store", Box::pin(store_contract(&store))));
    checks.push(("sqs_refuses_bytes", Box::pin(sqs_refuses_bytes(&backend))));
    checks.push(("sqs_open_finds_dlq", Box::pin(sqs_open_finds_dlq(&backend))));
    run_all("sqs", checks).await
}

/// SQS carries text only: bytes it cannot carry are refused before any request.
async fn sqs_refuses_bytes(b: &Backend) -> Result<()> {
    let q = b.queue("bytes", 30, 5).await?;
    match q.send(vec![b'o', b'k', 0xff], None).await {
        Err(e @ QueueError::BodyNotUtf8 { valid_up_to: 2 }) => ensure!(!e.is_retryable()),
        other => bail!("non-UTF-8 body: {other:?}"),
    }
    ensure!(matches!(q.send(b"\x01".to_vec(), None).await, Err(QueueError::BodyInvalid(_))));
    let sent = q
        .send_batch(vec![
            OutgoingMessage::new("good"),
            OutgoingMessage::new(vec![0xc3]),
            OutgoingMessage::new("also good"),
        ])
        .await;
    ensure!(sent[0].is_ok() && sent[2].is_ok(), "{sent:?}");
    ensure!(matches!(sent[1], Err(QueueError::BodyNotUtf8 { .. })), "{sent:?}");
    Ok(())
}

async fn sqs_open_finds_dlq(b: &Backend) -> Result<()> {
    let Backend::Sqs(client) = b else { bail!("not SQS") };
    let created = b.queue("open", 30, 5).await?;
    created.send_to_dlq(b"x".to_vec(), "reason", None).await?;
    let opened = SqsQueue::open(client.clone(), "open").await?;
    ensure!(opened.dlq_url().is_some_and(|u| u.ends_with("open-dlq")), "DLQ {:?}", opened.dlq_url());
    ensure!(opened.depth().await?.dlq_visible == 1);
    match SqsQueue::open(client.clone(), "no-such-queue").await {
        Err(QueueError::QueueNotFound(_)) => Ok(()),
        other => bail!("opening a missing queue: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_and_local() -> Result<()> {
    let backend = Backend::Embedded(tempfile::tempdir()?);
    let store_dir = tempfile::tempdir()?;
    let store = LocalStore::new(store_dir.path().join("results"));
    let mut checks = queue_checks(&backend);
    checks.push(("store", Box::pin(store_contract(&store))));
    checks.push(("store_racing_writers", Box::pin(store_racing_writers(&store))));
    checks.push(("shared_file_and_crashed_holder", Box::pin(shared_file_and_crashed_holder(&backend))));
    checks.push(("concurrent_receivers", Box::pin(concurrent_receivers(&backend))));
    checks.push(("any_bytes", Box::pin(any_bytes(&backend))));
    checks.push(("schema_1_file", Box::pin(schema_1_file(&backend))));
    run_all("embedded", checks).await
}

/// A queue file written by an ember before trace contexts (schema 1) opens, keeps its
/// messages, and carries trace contexts from then on.
async fn schema_1_file(b: &Backend) -> Result<()> {
    let Backend::Embedded(dir) = b else { return Ok(()) };
    let path = dir.path().join("schema-1.db");
    {
        let conn = rusqlite::Connection::open(&path)?;
        conn.execute_batch(
            "CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                 queue TEXT NOT NULL, body BLOB NOT NULL, sent_at INTEGER NOT NULL, visible_at INTEGER NOT NULL,
                 receive_count INTEGER NOT NULL DEFAULT 0, receipt TEXT, reason TEXT);
             INSERT INTO messages (id, queue, body, sent_at, visible_at) VALUES ('old', 'schema-1', CAST('from before' AS BLOB), 0, 0);
             PRAGMA user_version = 1;",
        )?;
    }
    let q = EmbeddedQueue::open(&path, embedded_options("schema-1", Duration::from_secs(30), 5)).await?;
    let old = one(&q, 5).await?;
    ensure!(old.body == b"from before" && old.traceparent.is_none(), "{old:?}");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    q.send_batch(vec![OutgoingMessage::new("new").with_traceparent(Some(tp.into()))]).await;
    let new = one(&q, 5).await?;
    ensure!(new.traceparent.as_deref() == Some(tp), "{new:?}");
    delete_all(&q, &[old, new]).await
}

/// Of many concurrent create-only writes of one key, exactly one wins.
async fn store_racing_writers(store: &LocalStore) -> Result<()> {
    let puts = (0..8).map(|i| store.put_if_absent("race/key", format!("writer-{i}").into_bytes()));
    let outcomes = futures::future::try_join_all(puts).await?;
    let winners: Vec<usize> = (0..8).filter(|&i| outcomes[i] == PutOutcome::Created).collect();
    ensure!(winners.len() == 1, "{} writers won", winners.len());
    let content = store.get("race/key").await?;
    ensure!(content == Some(format!("writer-{}", winners[0]).into_bytes()), "content is not the winner's");
    ensure!(store.list("race/").await? == ["race/key"], "temporary files were left or listed");
    Ok(())
}

/// A second opener of the file (as another process) sees the same messages; a message its
/// holder never deleted comes back, and the holder's stale receipt cannot delete it.
async fn shared_file_and_crashed_holder(b: &Backend) -> Result<()> {
    let Backend::Embedded(dir) = b else { bail!("not embedded") };
    let path = dir.path().join("shared.db");
    let opts = embedded_options("shared", Duration::from_secs(1), 5);
    let a = EmbeddedQueue::open(&path, opts.clone()).await?;
    let id = a.send(b"shared".to_vec(), None).await?;
    let stale = {
        let holder = EmbeddedQueue::open(&path, opts.clone()).await?;
        let m = one(&holder, 5).await?;
        ensure!(m.id == id);
        m.receipt
    }; // the holder is gone without deleting
    ensure!(a.receive(&wait(0)).await?.is_empty(), "visible while held");
    let again = one(&a, 5).await.context("the crashed holder's message did not come back")?;
    ensure!(again.id == id && again.receive_count == 2, "got {again:?}");
    let other = EmbeddedQueue::open(&path, opts).await?;
    other.delete(&stale).await?;
    ensure!(other.depth().await?.in_flight == 1, "a stale receipt deleted a redelivered message");
    match other.change_visibility(&stale, Duration::ZERO).await {
        Err(e @ QueueError::ReceiptInvalid(_)) => ensure!(!e.is_retryable()),
        other => bail!("change_visibility with a stale receipt: {other:?}"),
    }
    a.delete(&again.receipt).await?;
    ensure!(other.depth().await? == QueueDepth::default());
    Ok(())
}

/// Two openers receiving at once never get the same message while it is hidden.
async fn concurrent_receivers(b: &Backend) -> Result<()> {
    let Backend::Embedded(dir) = b else { bail!("not embedded") };
    let path = dir.path().join("concurrent.db");
    let opts = embedded_options("concurrent", Duration::from_secs(30), 5);
    let a = EmbeddedQueue::open(&path, opts.clone()).await?;
    let b = EmbeddedQueue::open(&path, opts).await?;
    for r in a.send_batch((0..40).map(|i| OutgoingMessage::new(format!("m{i}"))).collect()).await {
        r?;
    }
    let drain = |q: EmbeddedQueue| async move {
        let mut got = Vec::new();
        loop {
            let batch = q.receive(&ReceiveOptions { max_messages: 3, ..wait(0) }).await?;
            if batch.is_empty() {
                return anyhow::Ok(got);
            }
            got.extend(batch.into_iter().map(|m| m.id.0));
        }
    };
    let (from_a, from_b) = tokio::try_join!(drain(a), drain(b))?;
    let all: HashSet<&String> = from_a.iter().chain(&from_b).collect();
    ensure!(
        from_a.len() + from_b.len() == 40 && all.len() == 40,
        "a {} b {} distinct {}",
        from_a.len(),
        from_b.len(),
        all.len()
    );
    Ok(())
}

/// The embedded queue carries any bytes, unlike SQS.
async fn any_bytes(b: &Backend) -> Result<()> {
    let q = b.queue("bytes", 30, 5).await?;
    let body = vec![0xff, 0x00, 0xfe, b'\n'];
    q.send(body.clone(), None).await?;
    let m = one(&*q, 5).await?;
    ensure!(m.body == body);
    q.delete(&m.receipt).await?;
    Ok(())
}

/// A real crash: a child process receives a message and is killed with SIGKILL; the message
/// comes back after the visibility timeout, and nothing sent is lost.
#[tokio::test]
async fn embedded_survives_kill_9() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("crash.db");
    let opts = embedded_options("crash", Duration::from_secs(3), 5);
    let q = EmbeddedQueue::open(&path, opts).await?;
    let id = q.send(b"survivor".to_vec(), None).await?;
    q.send(b"bystander".to_vec(), Some(Duration::from_secs(1))).await?;

    let mut child = Command::new(std::env::current_exe()?)
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    // libtest prints "test crash_child ... " before the test's own output, on the same line.
    let reader = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.split_once("RECEIVED ").map(|(_, id)| id.trim().to_string()))
    });
    let reported = tokio::time::timeout(Duration::from_secs(30), reader).await;
    child.kill()?; // SIGKILL
    child.wait()?;
    let reported = reported.context("the child did not report within 30 s")??;
    ensure!(reported.as_deref() == Some(id.as_str()), "child reported {reported:?}");

    let depth = q.depth().await?;
    ensure!(depth.in_flight == 1 && depth.visible + depth.delayed == 1, "depth after the crash {depth:?}");
    let mut got = Vec::new();
    while got.len() < 2 {
        let batch = q.receive(&wait(5)).await?;
        ensure!(!batch.is_empty(), "lost a message: got {got:?}");
        got.extend(batch);
    }
    let survivor = got.iter().find(|m| m.id == id).context("the crashed child's message did not come back")?;
    ensure!(survivor.receive_count == 2, "receive count {}", survivor.receive_count);
    Ok(())
}

/// The child of `embedded_survives_kill_9`; does nothing when run as a normal test.
#[tokio::test]
async fn crash_child() -> Result<()> {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return Ok(());
    };
    let q = EmbeddedQueue::open(path, embedded_options("crash", Duration::from_secs(3), 5)).await?;
    let m = q.receive(&ReceiveOptions { max_messages: 1, ..wait(5) }).await?;
    let Some(m) = m.first() else { bail!("child received nothing") };
    println!("RECEIVED {}", m.id);
    // Hold the message until killed. Stdin is the parent's pipe: its end means the parent
    // is gone without killing this child, which then exits rather than lingering.
    tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await??;
    bail!("child was not killed")
}
