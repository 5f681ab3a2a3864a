//! Sending hops: the worker sends them on SQS (or the embedded queue) with `DelaySeconds`;
//! [`MemoryQueue`] keeps them in memory, due at a time on a [`Clock`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::hop::HopMessage;

/// Sending hops failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sending hops: {message}")]
pub struct SendError {
    /// What happened.
    pub message: String,
    /// Whether a later try could succeed.
    pub retryable: bool,
}

/// Sends hop messages, each after its delay (SQS allows at most 900 s; the engine never asks
/// for more).
#[async_trait::async_trait]
pub trait HopSender: Send + Sync {
    /// Sends every hop (all or an error; a partial send is fine since hops are deduplicated).
    async fn send(&self, hops: Vec<(HopMessage, Duration)>) -> Result<(), SendError>;
}

/// The time the engine reads: the system clock, or a virtual one that the in-process driver
/// moves forward to each message's due time (so waits and retry delays take no real time
/// but are recorded as if they had).
#[derive(Debug, Clone, Default)]
pub struct Clock {
    virtual_ms: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self { virtual_ms: None }
    }

    /// A virtual clock starting at `start`.
    pub fn virtual_at(start: SystemTime) -> Self {
        let ms = start.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Self { virtual_ms: Some(Arc::new(AtomicU64::new(ms))) }
    }

    /// Now.
    pub fn now(&self) -> SystemTime {
        match &self.virtual_ms {
            Some(ms) => UNIX_EPOCH + Duration::from_millis(ms.load(Ordering::SeqCst)),
            None => SystemTime::now(),
        }
    }

    /// Moves a virtual clock forward to `t` (never backwards); no effect on the system clock.
    pub fn advance_to(&self, t: SystemTime) {
        if let Some(ms) = &self.virtual_ms {
            let v = t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            ms.fetch_max(v, Ordering::SeqCst);
        }
    }
}

/// Send counter and the messages by (due time, send order).
type Pending = (u64, BTreeMap<(SystemTime, u64), HopMessage>);

/// A [`HopSender`] that queues hops in memory, ordered by due time then send order.
#[derive(Debug, Default)]
pub struct MemoryQueue {
    clock: Clock,
    inner: Mutex<Pending>,
}

impl MemoryQueue {
    /// An empty queue whose due times come from `clock`.
    pub fn new(clock: Clock) -> Self {
        Self { clock, inner: Mutex::new((0, BTreeMap::new())) }
    }

    /// Takes the earliest message with its due time (whether due yet or not).
    pub fn pop(&self) -> Option<(SystemTime, HopMessage)> {
        let mut g = self.inner.lock().ok()?;
        let key = *g.1.keys().next()?;
        g.1.remove(&key).map(|m| (key.0, m))
    }

    /// Takes every queued message.
    pub fn drain(&self) -> Vec<HopMessage> {
        match self.inner.lock() {
            Ok(mut g) => std::mem::take(&mut g.1).into_values().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// How many messages wait.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.1.len()).unwrap_or(0)
    }

    /// Whether no message waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait::async_trait]
impl HopSender for MemoryQueue {
    async fn send(&self, hops: Vec<(HopMessage, Duration)>) -> Result<(), SendError> {
        let now = self.clock.now();
        let mut g =
            self.inner.lock().map_err(|_| SendError { message: "queue lock poisoned".into(), retryable: false })?;
        for (m, d) in hops {
            g.0 += 1;
            let seq = g.0;
            g.1.insert((now + d, seq), m);
        }
        Ok(())
    }
}
