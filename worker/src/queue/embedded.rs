//! The embedded default queue: one SQLite file with SQS semantics (visibility timeout,
//! receive count, redrive to a DLQ after `max_receive_count`, per-message delay, long poll).
//!
//! Durability: the file is in WAL mode with `synchronous=FULL`, so a send that returned is on
//! disk; a kill -9 (or power loss) of any process loses no message, and a message a dead
//! process had received comes back when its visibility timeout passes.
//!
//! Several processes may open the same file. Every state change runs in a `BEGIN IMMEDIATE`
//! transaction (it takes the write lock at once, so two receivers never pick the same row),
//! and each delivery gets a fresh receipt handle stored in the row: a delete or visibility
//! change must quote the latest handle, so a stale holder cannot touch a redelivered message.
//!
//! Schema (`user_version` 2): one table `messages` holds the queue and its DLQ, told apart by
//! the `queue` column (`<name>` and `<name>-dlq`), so one file can hold several queues:
//!
//! | column | meaning |
//! | --- | --- |
//! | `seq` | insertion order (rowid) |
//! | `id` | message id (UUID), kept across redeliveries and the DLQ |
//! | `queue` | logical queue name |
//! | `body` | the bytes as sent: any bytes, unlike SQS which carries only text |
//! | `sent_at`, `visible_at` | milliseconds since the Unix epoch; a row is visible once `visible_at <= now` |
//! | `receive_count` | deliveries so far; 0 and not yet visible means delayed |
//! | `receipt` | the latest delivery's receipt handle, NULL before the first and in the DLQ |
//! | `reason` | why the message is in the DLQ |
//! | `traceparent` | the W3C trace context it was sent with (schema 2) |
//!
//! `max_receive_count` and the visibility timeout are options of each opener, not stored in
//! the file: processes sharing a file should pass the same values.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::{oneshot, Notify};

use super::{
    check_delay, check_receive, check_size, check_visibility, DeadLetter, MessageId, OutgoingMessage, Queue,
    QueueDepth, QueueError, ReceiptHandle, ReceiveOptions, ReceivedMessage, MAX_BODY_BYTES,
};

const SCHEMA_VERSION: i64 = 2;
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    sent_at INTEGER NOT NULL,
    visible_at INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    reason TEXT,
    traceparent TEXT
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, visible_at);
CREATE UNIQUE INDEX IF NOT EXISTS messages_receipt ON messages (receipt) WHERE receipt IS NOT NULL;
";

/// Options of an [`EmbeddedQueue`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Logical queue name; its DLQ is `<name>-dlq` in the same file.
    pub name: String,
    /// Default visibility timeout of a receive.
    pub visibility_timeout: Duration,
    /// A message delivered this many times goes to the DLQ instead of a further delivery.
    pub max_receive_count: u32,
    /// How often a long poll looks at the file for messages sent by other processes (sends
    /// through this handle wake it at once).
    pub poll_interval: Duration,
    /// Largest body accepted; the SQS limit by default, so jobs that queue here queue on SQS.
    pub max_body_bytes: usize,
    /// How long to wait for another process's lock before failing with `Busy`.
    pub busy_timeout: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            name: "ember".into(),
            visibility_timeout: Duration::from_secs(30),
            max_receive_count: 5,
            poll_interval: Duration::from_millis(50),
            max_body_bytes: MAX_BODY_BYTES,
            busy_timeout: Duration::from_secs(10),
        }
    }
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// One message to insert.
struct Row {
    body: Vec<u8>,
    delay_ms: i64,
    reason: Option<String>,
    traceparent: Option<String>,
}

/// A handle to the queue; clones share one connection, owned by one thread (the actor) that
/// runs the blocking SQLite calls off the async runtime, one at a time.
#[derive(Clone)]
pub struct EmbeddedQueue {
    jobs: mpsc::Sender<Job>,
    /// Wakes this handle's long polls when this handle sends.
    sent: Arc<Notify>,
    opts: Arc<Settings>,
}

struct Settings {
    main: String,
    dlq: String,
    visibility_ms: i64,
    max_receive_count: i64,
    poll_interval: Duration,
    max_body_bytes: usize,
}

impl EmbeddedQueue {
    /// Opens (creating if needed) the queue in the SQLite file at `path`.
    pub async fn open(path: impl AsRef<Path>, options: EmbeddedOptions) -> Result<Self, QueueError> {
        check_visibility(options.visibility_timeout)?;
        if options.max_receive_count == 0 {
            return Err(QueueError::InvalidArgument("max_receive_count must be at least 1".into()));
        }
        let path: PathBuf = path.as_ref().to_path_buf();
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let busy_timeout = options.busy_timeout;
        std::thread::Builder::new()
            .name("ember-queue-sqlite".into())
            .spawn(move || match open_connection(&path, busy_timeout) {
                Ok(mut conn) => {
                    let _ = ready_tx.send(Ok(()));
                    // Runs until every handle is dropped.
                    for job in inbox {
                        job(&mut conn);
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| QueueError::Database(format!("starting the queue thread: {e}")))?;
        ready_rx.await.map_err(|_| QueueError::Closed)??;
        Ok(Self {
            jobs,
            sent: Arc::new(Notify::new()),
            opts: Arc::new(Settings {
                dlq: format!("{}-dlq", options.name),
                main: options.name,
                visibility_ms: millis(options.visibility_timeout),
                max_receive_count: i64::from(options.max_receive_count),
                poll_interval: options.poll_interval.max(Duration::from_millis(1)),
                max_body_bytes: options.max_body_bytes,
            }),
        })
    }

    /// Runs `f` on the connection's thread and awaits its answer.
    async fn call<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Settings) -> Result<T, QueueError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let opts = Arc::clone(&self.opts);
        let job: Job = Box::new(move |conn| {
            let _ = tx.send(f(conn, &opts));
        });
        self.jobs.send(job).map_err(|_| QueueError::Closed)?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    async fn insert(&self, queue_is_dlq: bool, rows: Vec<Row>) -> Result<Vec<MessageId>, QueueError> {
        let ids = self
            .call(move |conn, s| {
                let queue = if queue_is_dlq { &s.dlq } else { &s.main };
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let now = now_ms();
                let mut ids = Vec::with_capacity(rows.len());
                {
                    let mut stmt = tx.prepare_cached(
                        "INSERT INTO messages (id, queue, body, sent_at, visible_at, reason, traceparent)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )?;
                    for Row { body, delay_ms, reason, traceparent } in rows {
                        let id = uuid::Uuid::new_v4().to_string();
                        stmt.execute(params![id, queue, body, now, now + delay_ms, reason, traceparent])?;
                        ids.push(MessageId(id));
                    }
                }
                tx.commit()?;
                Ok(ids)
            })
            .await?;
        self.sent.notify_waiters();
        Ok(ids)
    }

    /// One receive attempt: moves messages past `max_receive_count` to the DLQ, then hides
    /// and hands out up to `max` visible ones, each with a fresh receipt handle.
    fn try_receive(
        conn: &mut Connection,
        s: &Settings,
        max: usize,
        visibility_ms: i64,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let now = now_ms();
        // A cheap read first: with WAL it takes no lock, so idle pollers do not queue up for
        // the write lock.
        let ready: Option<i64> = conn
            .prepare_cached("SELECT 1 FROM messages WHERE queue = ?1 AND visible_at <= ?2 LIMIT 1")?
            .query_row(params![s.main, now], |r| r.get(0))
            .optional()?;
        if ready.is_none() {
            return Ok(Vec::new());
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        tx.prepare_cached(
            "UPDATE messages SET queue = ?1, receipt = NULL, visible_at = ?2,
                 reason = 'received ' || receive_count || ' times without being deleted (max_receive_count)'
             WHERE queue = ?3 AND visible_at <= ?2 AND receive_count >= ?4",
        )?
        .execute(params![s.dlq, now, s.main, s.max_receive_count])?;
        let seqs: Vec<i64> = tx
            .prepare_cached(
                "SELECT seq FROM messages WHERE queue = ?1 AND visible_at <= ?2
                 ORDER BY visible_at, seq LIMIT ?3",
            )?
            .query_map(params![s.main, now, max as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(seqs.len());
        {
            let mut deliver = tx.prepare_cached(
                "UPDATE messages SET receipt = ?1, receive_count = receive_count + 1, visible_at = ?2
                 WHERE seq = ?3 RETURNING id, body, receive_count, sent_at, traceparent",
            )?;
            for seq in seqs {
                let receipt = format!("{seq}:{}", uuid::Uuid::new_v4());
                let msg = deliver.query_row(params![receipt, now + visibility_ms, seq], |r| {
                    Ok(ReceivedMessage {
                        id: MessageId(r.get(0)?),
                        receipt: ReceiptHandle(receipt.clone()),
                        body: r.get(1)?,
                        receive_count: r.get(2)?,
                        sent_at: UNIX_EPOCH + Duration::from_millis(r.get::<_, i64>(3)?.max(0) as u64),
                        traceparent: r.get(4)?,
                    })
                })?;
                out.push(msg);
            }
        }
        tx.commit()?;
        Ok(out)
    }
}

#[async_trait::async_trait]
impl Queue for EmbeddedQueue {
    /// Not a well-known system in the conventions: Ember's own queue, in a local SQLite file.
    fn system(&self) -> &'static str {
        "ember_embedded"
    }

    async fn send(&self, body: Vec<u8>, delay: Option<Duration>) -> Result<MessageId, QueueError> {
        check_delay(delay)?;
        check_size(&body, self.opts.max_body_bytes)?;
        let row = Row { body, delay_ms: delay.map_or(0, millis), reason: None, traceparent: None };
        let mut ids = self.insert(false, vec![row]).await?;
        ids.pop().ok_or_else(|| QueueError::MalformedResponse("the new message id".into()))
    }

    async fn send_batch(&self, messages: Vec<OutgoingMessage>) -> Vec<Result<MessageId, QueueError>> {
        let mut results: Vec<Result<MessageId, QueueError>> = Vec::with_capacity(messages.len());
        let mut rows = Vec::new();
        let mut slots = Vec::new();
        for (i, m) in messages.into_iter().enumerate() {
            match check_delay(m.delay).and_then(|()| check_size(&m.body, self.opts.max_body_bytes)) {
                Ok(()) => {
                    let delay_ms = m.delay.map_or(0, millis);
                    rows.push(Row { body: m.body, delay_ms, reason: None, traceparent: m.traceparent });
                    slots.push(i);
                    results.push(Err(QueueError::Closed)); // replaced below
                }
                Err(e) => results.push(Err(e)),
            }
        }
        // One transaction for the whole batch: with synchronous=FULL each commit is an fsync.
        match self.insert(false, rows).await {
            Ok(ids) => {
                for (slot, id) in slots.into_iter().zip(ids) {
                    results[slot] = Ok(id);
                }
            }
            Err(e) => {
                for slot in slots {
                    results[slot] = Err(e.clone());
                }
            }
        }
        results
    }

    async fn receive(&self, opts: &ReceiveOptions) -> Result<Vec<ReceivedMessage>, QueueError> {
        check_receive(opts)?;
        let max = opts.max_messages;
        let visibility_ms = opts.visibility_timeout.map_or(self.opts.visibility_ms, millis);
        let deadline = Instant::now() + opts.wait;
        loop {
            // Registered before looking, so a send by this handle in between still wakes us.
            let woken = self.sent.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let msgs = self.call(move |conn, s| Self::try_receive(conn, s, max, visibility_ms)).await?;
            let now = Instant::now();
            if !msgs.is_empty() || now >= deadline {
                return Ok(msgs);
            }
            let nap = self.opts.poll_interval.min(deadline - now);
            tokio::select! {
                _ = tokio::time::sleep(nap) => {}
                _ = woken => {}
            }
        }
    }

    async fn delete_batch(&self, receipts: &[ReceiptHandle]) -> Vec<Result<(), QueueError>> {
        let handles: Vec<String> = receipts.iter().map(|r| r.0.clone()).collect();
        let n = handles.len();
        let done = self
            .call(move |conn, s| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                {
                    let mut stmt = tx.prepare_cached("DELETE FROM messages WHERE receipt = ?1 AND queue = ?2")?;
                    for h in &handles {
                        stmt.execute(params![h, s.main])?;
                    }
                }
                tx.commit()?;
                Ok(())
            })
            .await;
        match done {
            Ok(()) => (0..n).map(|_| Ok(())).collect(),
            Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
        }
    }

    async fn change_visibility(&self, receipt: &ReceiptHandle, timeout: Duration) -> Result<(), QueueError> {
        check_visibility(timeout)?;
        let handle = receipt.0.clone();
        let timeout_ms = millis(timeout);
        let changed = self
            .call(move |conn, s| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let n = tx
                    .prepare_cached("UPDATE messages SET visible_at = ?1 WHERE receipt = ?2 AND queue = ?3")?
                    .execute(params![now_ms() + timeout_ms, handle, s.main])?;
                tx.commit()?;
                Ok(n)
            })
            .await?;
        if changed == 0 {
            return Err(QueueError::ReceiptInvalid(receipt.0.clone()));
        }
        if timeout.is_zero() {
            self.sent.notify_waiters();
        }
        Ok(())
    }

    async fn send_to_dlq(
        &self,
        body: Vec<u8>,
        reason: &str,
        traceparent: Option<&str>,
    ) -> Result<MessageId, QueueError> {
        let row =
            Row { body, delay_ms: 0, reason: Some(reason.to_string()), traceparent: traceparent.map(str::to_string) };
        let mut ids = self.insert(true, vec![row]).await?;
        ids.pop().ok_or_else(|| QueueError::MalformedResponse("the new message id".into()))
    }

    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        self.call(|conn, s| {
            let now = now_ms();
            let count = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<u64, QueueError> {
                let n: i64 = conn.prepare_cached(sql)?.query_row(p, |r| r.get(0))?;
                Ok(n.max(0) as u64)
            };
            Ok(QueueDepth {
                visible: count(
                    "SELECT COUNT(*) FROM messages WHERE queue = ?1 AND visible_at <= ?2",
                    &[&s.main, &now],
                )?,
                in_flight: count(
                    "SELECT COUNT(*) FROM messages WHERE queue = ?1 AND visible_at > ?2 AND receive_count > 0",
                    &[&s.main, &now],
                )?,
                delayed: count(
                    "SELECT COUNT(*) FROM messages WHERE queue = ?1 AND visible_at > ?2 AND receive_count = 0",
                    &[&s.main, &now],
                )?,
                dlq_visible: count("SELECT COUNT(*) FROM messages WHERE queue = ?1", &[&s.dlq])?,
            })
        })
        .await
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.call(move |conn, s| {
            // The redrive policy's move writes its own reason; that one means "no worker gave
            // a reason", as with SQS.
            let rows = conn
                .prepare_cached(
                    "SELECT id, body, reason FROM messages WHERE queue = ?1 ORDER BY sent_at, seq LIMIT ?2",
                )?
                .query_map(params![s.dlq, max as i64], |r| {
                    let reason: Option<String> = r.get(2)?;
                    Ok(DeadLetter {
                        id: MessageId(r.get(0)?),
                        body: r.get(1)?,
                        reason: reason.filter(|r| !r.starts_with(REDRIVE_POLICY_REASON)),
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    fn receive_is_cancel_safe(&self) -> bool {
        // Between attempts it only waits; an attempt cut off mid-way at worst hides what it
        // took for the visibility timeout, which a crash could do too.
        true
    }

    async fn redrive(&self) -> Result<u64, QueueError> {
        let moved = self
            .call(|conn, s| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let n = tx
                    .prepare_cached(
                        "UPDATE messages SET queue = ?1, receive_count = 0, receipt = NULL, visible_at = ?2,
                             reason = NULL
                         WHERE queue = ?3",
                    )?
                    .execute(params![s.main, now_ms(), s.dlq])?;
                tx.commit()?;
                Ok(n as u64)
            })
            .await?;
        if moved > 0 {
            self.sent.notify_waiters();
        }
        Ok(moved)
    }
}

/// How the reason the redrive policy's move writes begins (see `try_receive`).
const REDRIVE_POLICY_REASON: &str = "received ";

/// Opens the file in WAL mode and creates the schema if needed.
fn open_connection(path: &Path, busy_timeout: Duration) -> Result<Connection, QueueError> {
    let mut conn =
        Connection::open(path).map_err(|e| QueueError::Database(format!("opening {}: {e}", path.display())))?;
    conn.busy_timeout(busy_timeout)?;
    // WAL lets depth queries and idle polls read while another process writes; FULL makes
    // every commit durable, so an acknowledged send survives power loss, not only kill -9.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(QueueError::Database(format!(
            "{} has queue schema version {version}, newer than this ember ({SCHEMA_VERSION}): upgrade ember",
            path.display()
        )));
    }
    tx.execute_batch(SCHEMA)?;
    // Schema 1 files (from an older ember) get the trace context column.
    if version == 1 {
        tx.execute_batch("ALTER TABLE messages ADD COLUMN traceparent TEXT")?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(conn)
}

impl From<rusqlite::Error> for QueueError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                QueueError::Busy(e.to_string())
            }
            _ => QueueError::Database(e.to_string()),
        }
    }
}

fn now_ms() -> i64 {
    // A clock before 1970 reads as 0: messages then become visible early, never late.
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}
