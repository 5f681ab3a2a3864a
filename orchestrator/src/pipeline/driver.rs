//! The in-process driver: runs an execution to its end on the in-memory store and queue,
//! with a virtual clock so waits and retry delays are recorded but take no time.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::Value;

use super::process::{describe, history, process_hop, start_execution, Description, HistoryEvent, StartOptions};
use super::queue::{Clock, MemoryQueue};
use super::store::MemoryStore;
use super::tools::TaskRunner;
use super::{Env, Options, PipelineError, DEFAULT_MAX_HOPS};

/// Options of [`run_to_completion`].
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// See [`Options::max_hops`].
    pub max_hops: u64,
    /// Execution name.
    pub name: Option<String>,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self { max_hops: DEFAULT_MAX_HOPS, name: None }
    }
}

/// A finished in-process run.
#[derive(Debug, Clone)]
pub struct Run {
    /// The final description.
    pub description: Description,
    /// The history.
    pub history: Vec<HistoryEvent>,
    /// Hops processed (including duplicates and re-delays).
    pub hops: u64,
}

/// Starts `definition` on `input` and processes hops (earliest due first, virtual time)
/// until the queue is empty.
pub async fn run_to_completion<R: TaskRunner + 'static>(
    runner: R,
    definition: &str,
    input: Value,
    opts: DriverOptions,
) -> Result<Run, PipelineError> {
    let clock = Clock::virtual_at(SystemTime::now());
    let queue = Arc::new(MemoryQueue::new(clock.clone()));
    let env = Env {
        store: Arc::new(MemoryStore::new()),
        sender: queue.clone(),
        runner: Arc::new(runner),
        options: Options { max_hops: opts.max_hops, clock: clock.clone() },
        definitions: Default::default(),
    };
    let id = start_execution(&env, definition, input, StartOptions { name: opts.name.as_deref() }).await?;
    let mut hops = 0;
    while let Some((due, msg)) = queue.pop() {
        clock.advance_to(due);
        process_hop(&env, msg).await?;
        hops += 1;
    }
    Ok(Run { description: describe(&env, &id).await?, history: history(&env, &id).await?, hops })
}
