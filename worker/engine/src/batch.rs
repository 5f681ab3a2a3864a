//! Continuous batching: many generations share each decode step, so the weights are read once
//! per step for all of them instead of once per job.
//!
//! One thread owns the running sequences. Each turn it takes new requests, admits those the
//! batch has room for (up to [`MAX_PREFILL_TOKENS`] of prompt per turn, so a burst of new jobs
//! delays the running ones by a bounded amount), and runs one forward pass over the new
//! prompts and the next token of every running sequence together. A sequence that finishes
//! leaves at once and its slot goes to the next waiting request; nothing waits for the batch
//! to drain.
//!
//! Admission keeps the KV cache within a budget: each sequence reserves room for its prompt
//! and its `max_tokens` when it joins, and a request waits while the reservations of the
//! running ones leave no room for it (a request bigger than the whole budget runs alone).
//!
//! Interactive requests (the HTTP server's) wait ahead of batch jobs (the queue's) but never
//! push out a running one; they may give up waiting after a bound ([`Submit::admit_within`])
//! and can follow their text as it is made ([`Batcher::submit`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ember_model_loader::SeqCache;
use tokio::sync::oneshot;

#[cfg(feature = "cuda")]
use crate::sampling::sample_error;
use crate::EngineError;
use crate::{Completion, Engine, GenerateRequest, Sequence, Step};

/// How big batches may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherOptions {
    /// Most sequences in one decode step.
    pub max_batch: usize,
    /// Bytes the KV caches of the running sequences may take together.
    pub kv_budget_bytes: u64,
}

impl BatcherOptions {
    /// `kv_budget_bytes`, or half the memory available now (from `/proc/meminfo`; 2 GiB where
    /// that cannot be read).
    pub fn new(max_batch: usize, kv_budget_bytes: Option<u64>) -> Self {
        let budget = kv_budget_bytes.unwrap_or_else(|| available_memory().map_or(2 << 30, |m| m / 2));
        Self { max_batch: max_batch.max(1), kv_budget_bytes: budget }
    }
}

/// Bytes of keys and values one token takes in the cache of this model: keys in f32 (the
/// precision of the attention scores), values in the model's dtype (see `SeqCache`).
pub fn kv_bytes_per_token(engine: &Engine) -> u64 {
    let cfg = engine.loaded.config();
    let value = engine.loaded.model.dtype().size_in_bytes();
    (cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (4 + value)) as u64
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Most prompt tokens prefilled in one pass, so that a burst of new jobs delays the running
/// ones by a bounded amount (a longer single prompt still goes in alone).
pub const MAX_PREFILL_TOKENS: usize = 512;

/// The target of the trace spans (the worker exports it to OpenTelemetry, keeps it out of logs).
const TRACE: &str = "ember::trace";

/// Which waiting requests go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// Queued work: waits behind interactive requests.
    #[default]
    Batch,
    /// Someone is waiting for the answer: admitted before any waiting batch job.
    Interactive,
}

/// How a request joins the batch.
#[derive(Debug, Clone, Default)]
pub struct Submit {
    pub priority: Priority,
    /// Give up with [`EngineError::Overloaded`] when the request has not been admitted this
    /// long after it arrived (`None`: wait as long as it takes).
    pub admit_within: Option<Duration>,
    /// Follow the request with [`Event`]s on [`Ticket::events`].
    pub stream: bool,
    /// Set to stop the request (checked every step); a dropped [`Ticket`] stops it too.
    pub cancel: Arc<AtomicBool>,
}

/// What a followed request reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// It left the waiting line and runs from the next pass.
    Admitted,
    /// New text ([`Sequence::take_ready_text`](crate::Sequence::take_ready_text)).
    Text(String),
}

/// A request in the batcher. `events` ends when the request leaves the batch; `done` then
/// holds its answer. Dropping the ticket frees its slot at the next step.
pub struct Ticket {
    pub events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    pub done: oneshot::Receiver<Result<Completion, EngineError>>,
}

/// Counts of what the batcher is doing and has done, for health checks and benchmarks.
#[derive(Debug, Default)]
pub struct BatchStats {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub overloaded: AtomicU64,
}

impl BatchStats {
    /// The counts as `(name, value)` pairs.
    pub fn snapshot(&self) -> [(&'static str, u64); 5] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("running", get(&self.running)),
            ("waiting", get(&self.waiting)),
            ("finished", get(&self.finished)),
            ("cancelled", get(&self.cancelled)),
            ("overloaded", get(&self.overloaded)),
        ]
    }
}

struct Submission {
    req: GenerateRequest,
    priority: Priority,
    deadline: Option<Instant>,
    arrived: Instant,
    /// The caller's span: admission, prefill and decode are its children.
    span: tracing::Span,
    cancel: Arc<AtomicBool>,
    events: Option<tokio::sync::mpsc::UnboundedSender<Event>>,
    reply: oneshot::Sender<Result<Completion, EngineError>>,
}

/// The handle of the batching thread; dropping every handle stops it once its work is done.
pub struct Batcher {
    tx: mpsc::Sender<Submission>,
    budget_tokens: usize,
    opts: BatcherOptions,
    stats: Arc<BatchStats>,
}

impl Batcher {
    /// Starts the batching thread. The KV budget is the smaller of `opts.kv_budget_bytes` and
    /// what `max_batch` sequences of the model's full context would take.
    pub fn start(engine: Arc<Engine>, mut opts: BatcherOptions) -> std::io::Result<Self> {
        let per_token = kv_bytes_per_token(&engine).max(1);
        let budget_tokens = ((opts.kv_budget_bytes / per_token) as usize).min(opts.max_batch * engine.context_length());
        opts.kv_budget_bytes = budget_tokens as u64 * per_token;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(BatchStats::default());
        let counts = stats.clone();
        std::thread::Builder::new().name("ember-batcher".into()).spawn(move || {
            Loop {
                engine,
                rx,
                max_batch: opts.max_batch,
                budget_tokens,
                waiting: VecDeque::new(),
                running: Vec::new(),
                stats: counts,
            }
            .run()
        })?;
        tracing::info!(
            max_batch = opts.max_batch,
            kv_budget_mb = opts.kv_budget_bytes >> 20,
            budget_tokens,
            "batching"
        );
        Ok(Self { tx, budget_tokens, opts, stats })
    }

    pub fn options(&self) -> BatcherOptions {
        self.opts
    }

    /// Tokens of KV cache the budget holds.
    pub fn budget_tokens(&self) -> usize {
        self.budget_tokens
    }

    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Runs one batch-priority request in the shared batch; gives up with
    /// [`EngineError::Cancelled`] once `cancel` is set (checked every step).
    pub async fn generate(&self, req: GenerateRequest, cancel: Arc<AtomicBool>) -> Result<Completion, EngineError> {
        let ticket = self.submit(req, Submit { cancel, ..Submit::default() })?;
        ticket.done.await.map_err(|_| EngineError::Stopped)?
    }

    /// Puts a request in the batch and answers at once with its [`Ticket`].
    pub fn submit(&self, req: GenerateRequest, opts: Submit) -> Result<Ticket, EngineError> {
        let (reply, done) = oneshot::channel();
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let arrived = Instant::now();
        let span = tracing::Span::current();
        let submission = Submission {
            req,
            priority: opts.priority,
            deadline: opts.admit_within.map(|d| arrived + d),
            arrived,
            span,
            cancel: opts.cancel,
            events: opts.stream.then_some(events_tx),
            reply,
        };
        self.tx.send(submission).map_err(|_| EngineError::Stopped)?;
        Ok(Ticket { events, done })
    }
}

struct Waiting {
    seq: Sequence,
    prompt: Vec<u32>,
    span: tracing::Span,
    /// Open while the request waits for room in the batch.
    admission: tracing::Span,
    priority: Priority,
    deadline: Option<Instant>,
    arrived: Instant,
    cancel: Arc<AtomicBool>,
    events: Option<tokio::sync::mpsc::UnboundedSender<Event>>,
    reply: oneshot::Sender<Result<Completion, EngineError>>,
}

struct Running {
    seq: Sequence,
    span: tracing::Span,
    /// `prefill` until the prompt is in the cache, then `decode`.
    phase: tracing::Span,
    cache: SeqCache,
    next: u32,
    reserved: usize,
    cancel: Arc<AtomicBool>,
    events: Option<tokio::sync::mpsc::UnboundedSender<Event>>,
    reply: oneshot::Sender<Result<Completion, EngineError>>,
}

impl Running {
    /// Gone: cancelled, or nobody is left to read the answer (a client that disconnected).
    fn abandoned(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
            || self.reply.is_closed()
            || self.events.as_ref().is_some_and(|e| e.is_closed())
    }
}

impl Waiting {
    fn abandoned(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
            || self.reply.is_closed()
            || self.events.as_ref().is_some_and(|e| e.is_closed())
    }
}

struct Loop {
    engine: Arc<Engine>,
    rx: mpsc::Receiver<Submission>,
    max_batch: usize,
    budget_tokens: usize,
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
    stats: Arc<BatchStats>,
}

impl Loop {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(s) => self.take(s),
                    Err(_) => return,
                }
            }
            while let Ok(s) = self.rx.try_recv() {
                self.take(s);
            }
            self.drop_cancelled();
            self.count();
            // A panic in one pass (model, tokenizer, template) must not stop the batcher for
            // good: the jobs it dropped see `Stopped` and are retried; the rest go on.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step())).is_err() {
                tracing::error!("a batched pass panicked; its jobs will be retried");
            }
            self.count();
        }
    }

    fn count(&self) {
        self.stats.running.store(self.running.len() as u64, Ordering::Relaxed);
        self.stats.waiting.store(self.waiting.len() as u64, Ordering::Relaxed);
    }

    /// Checks and renders a new request; a bad one is answered at once.
    fn take(&mut self, s: Submission) {
        match Sequence::start(&self.engine, &s.req) {
            Ok((seq, _)) if seq.wants_nothing() => {
                let _ = s.reply.send(Ok(seq.finish(&self.engine, 0.0)));
            }
            Ok((seq, prompt)) => {
                let admission = tracing::info_span!(target: TRACE, parent: &s.span, "batcher admission",
                    ember.waiting = self.waiting.len(), ember.running = self.running.len());
                let w = Waiting {
                    seq,
                    prompt,
                    span: s.span,
                    admission,
                    priority: s.priority,
                    deadline: s.deadline,
                    arrived: s.arrived,
                    cancel: s.cancel,
                    events: s.events,
                    reply: s.reply,
                };
                // Interactive requests line up behind each other, ahead of every batch job.
                let at = match w.priority {
                    Priority::Interactive => {
                        self.waiting.iter().position(|o| o.priority == Priority::Batch).unwrap_or(self.waiting.len())
                    }
                    Priority::Batch => self.waiting.len(),
                };
                self.waiting.insert(at, w);
            }
            Err(e) => {
                let _ = s.reply.send(Err(e));
            }
        }
    }

    fn reserved(&self) -> usize {
        self.running.iter().map(|r| r.reserved).sum()
    }

    fn drop_cancelled(&mut self) {
        let (cancelled, kept): (Vec<_>, Vec<_>) = self.running.drain(..).partition(Running::abandoned);
        self.running = kept;
        self.stats.cancelled.fetch_add(cancelled.len() as u64, Ordering::Relaxed);
        for r in cancelled {
            let _ = r.reply.send(Err(EngineError::Cancelled));
        }
        let (cancelled, kept): (Vec<_>, Vec<_>) = self.waiting.drain(..).partition(Waiting::abandoned);
        self.waiting = kept.into();
        self.stats.cancelled.fetch_add(cancelled.len() as u64, Ordering::Relaxed);
        for w in cancelled {
            let _ = w.reply.send(Err(EngineError::Cancelled));
        }
    }

    /// Answers the waiting requests whose bound on waiting has passed (after this turn's
    /// admissions, so each gets at least one chance).
    fn refuse_overdue(&mut self) {
        let now = Instant::now();
        let (overdue, kept): (Vec<_>, Vec<_>) =
            self.waiting.drain(..).partition(|w| w.deadline.is_some_and(|d| d <= now));
        self.waiting = kept.into();
        self.stats.overloaded.fetch_add(overdue.len() as u64, Ordering::Relaxed);
        for w in overdue {
            let waited_ms = u64::try_from(now.duration_since(w.arrived).as_millis()).unwrap_or(u64::MAX);
            let _ = w.reply.send(Err(EngineError::Overloaded { waited_ms }));
        }
    }

    /// Takes the waiting requests the batch and the KV budget have room for, up to
    /// [`MAX_PREFILL_TOKENS`] of prompt in one pass (at least one request, if any fits).
    fn admit(&mut self) -> Vec<Waiting> {
        let mut reserved = self.reserved();
        let (mut admitted, mut prompt_tokens) = (Vec::new(), 0);
        while let Some(front) = self.waiting.front() {
            let need = front.seq.max_len();
            let alone = self.running.is_empty() && admitted.is_empty();
            let room = self.running.len() + admitted.len() < self.max_batch
                && (alone || reserved + need <= self.budget_tokens)
                && (admitted.is_empty() || prompt_tokens + front.prompt.len() <= MAX_PREFILL_TOKENS);
            if !room {
                break;
            }
            let Some(w) = self.waiting.pop_front() else { break };
            reserved += need;
            prompt_tokens += w.prompt.len();
            admitted.push(w);
        }
        admitted
    }

    /// One forward pass: the prompts of the newly admitted requests and the next token of
    /// every running sequence, together; then each samples its next token.
    fn step(&mut self) {
        let admitted = self.admit();
        self.refuse_overdue();
        // A long prompt's head is prefilled in chunks first (it was admitted alone); its tail
        // joins the pass. The admitted requests then run like the others.
        let (mut tails, mut joining) = (Vec::with_capacity(admitted.len()), Vec::with_capacity(admitted.len()));
        for w in admitted {
            drop(w.admission);
            let phase = tracing::info_span!(target: TRACE, parent: &w.span, "prefill",
                gen_ai.usage.input_tokens = w.prompt.len(), ember.batch = self.running.len() + 1);
            let mut cache = SeqCache::with_reserve(w.seq.max_len());
            let tail = phase.in_scope(|| crate::prefill_last(&self.engine, &w.prompt, &mut cache).map(<[u32]>::to_vec));
            let reserved = w.seq.max_len();
            if let Some(events) = &w.events {
                let _ = events.send(Event::Admitted);
            }
            let (seq, span, cancel, events, reply) = (w.seq, w.span, w.cancel, w.events, w.reply);
            let r = Running { seq, span, phase, cache, next: 0, reserved, cancel, events, reply };
            match tail {
                Ok(tail) => {
                    tails.push(tail);
                    joining.push(r);
                }
                Err(e) => fail_all(vec![r], &e),
            }
        }
        let mut batch: Vec<Running> = self.running.drain(..).collect();
        let old = batch.len();
        batch.extend(joining);
        if batch.is_empty() {
            return;
        }
        let logits = {
            let mut chunks: Vec<&[u32]> = Vec::with_capacity(batch.len());
            let mut caches: Vec<&mut SeqCache> = Vec::with_capacity(batch.len());
            for (i, r) in batch.iter_mut().enumerate() {
                chunks.push(if i < old { std::slice::from_ref(&r.next) } else { &tails[i - old] });
                caches.push(&mut r.cache);
            }
            self.engine.loaded.model.forward_ragged(&chunks, &mut caches).map_err(EngineError::from)
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => return fail_all(batch, &e),
        };
        // On CUDA the whole batch samples in one kernel and only the token ids come back; on
        // the CPU each sequence samples from its row.
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            let params: Vec<_> = batch.iter().map(|r| r.seq.row_params()).collect();
            let seen: Vec<&[u32]> = batch.iter().map(|r| r.seq.seen()).collect();
            // Only a failed launch fails the batch; a row's bad logits fail that row alone.
            let rows = match ember_kernels::cuda::sample_batch_cuda(&logits, &params, &seen, 0) {
                Ok(rows) => rows,
                Err(e) => return fail_all(batch, &EngineError::NumericalError(e.to_string())),
            };
            for (i, (mut r, token)) in batch.into_iter().zip(rows).enumerate() {
                if i >= old {
                    r.seq.prefilled();
                    r.start_decode();
                }
                let step = token.map_err(sample_error).and_then(|t| r.seq.accept_drawn(&self.engine, t));
                self.settle(r, step);
            }
            return;
        }
        let rows = match logits.to_vec2::<f32>() {
            Ok(rows) => rows,
            Err(e) => return fail_all(batch, &e.into()),
        };
        for (i, (mut r, row)) in batch.into_iter().zip(rows).enumerate() {
            if i >= old {
                r.seq.prefilled();
                r.start_decode();
            }
            let step = r.seq.step(&self.engine, &row);
            self.settle(r, step);
        }
    }

    /// After a sequence's step: keep it running, or answer it.
    fn settle(&mut self, mut r: Running, step: Result<Step, EngineError>) {
        match step {
            Ok(Step::Next(next)) => {
                r.next = next;
                if let Some(events) = &r.events {
                    if let Some(piece) = r.seq.take_ready_text() {
                        let _ = events.send(Event::Text(piece));
                    }
                }
                self.running.push(r);
            }
            Ok(Step::Finished) => {
                self.stats.finished.fetch_add(1, Ordering::Relaxed);
                let decode_s = r.seq.decode_s();
                let completion = r.seq.finish(&self.engine, decode_s);
                r.phase.record("gen_ai.usage.output_tokens", completion.usage.completion_tokens);
                let _ = r.reply.send(Ok(completion));
            }
            Err(e) => {
                let _ = r.reply.send(Err(e));
            }
        }
    }
}

impl Running {
    /// The prompt is in: the prefill span ends, the decode span starts.
    fn start_decode(&mut self) {
        self.phase = tracing::info_span!(target: TRACE, parent: &self.span, "decode",
            gen_ai.usage.output_tokens = tracing::field::Empty);
    }
}

/// Answers every job of a failed pass with its own copy of the error.
fn fail_all(jobs: Vec<Running>, e: &EngineError) {
    let message = e.to_string();
    for r in jobs {
        let _ = r.reply.send(Err(EngineError::Candle(candle_core::Error::Msg(message.clone()))));
    }
}
