//! Task resources: the [`TaskRunner`] trait the worker implements, and [`Tools`], the
//! registry of built-in and user tools (`ember:tool:NAME`). The worker adds
//! `ember:generate` on top by wrapping `Tools`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;

use crate::asl::Resources;

/// A task that failed, with the error name Retry/Catch match on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}: {cause}")]
pub struct TaskFailure {
    /// Error name (`Ember.InvalidJson`, `States.TaskFailed`, ...).
    pub error: String,
    /// Human-readable cause.
    pub cause: String,
}

impl TaskFailure {
    /// A failure.
    pub fn new(error: impl Into<String>, cause: impl Into<String>) -> Self {
        Self { error: error.into(), cause: cause.into() }
    }
}

/// What a running task knows about itself, and its heartbeat.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// Execution id.
    pub execution: String,
    /// State name.
    pub state: String,
    /// `$$.Task.Token`: unique per hop.
    pub token: String,
    /// Retries so far.
    pub retry_count: u32,
    heartbeat: Arc<Notify>,
}

impl TaskContext {
    /// A context (the engine builds these; public for runners' own tests).
    pub fn new(execution: &str, state: &str, token: &str, retry_count: u32) -> Self {
        Self {
            execution: execution.into(),
            state: state.into(),
            token: token.into(),
            retry_count,
            heartbeat: Arc::new(Notify::new()),
        }
    }

    /// Tells the engine the task is alive (needed within `HeartbeatSeconds`).
    pub fn heartbeat(&self) {
        self.heartbeat.notify_one();
    }

    pub(crate) fn heartbeat_signal(&self) -> Arc<Notify> {
        self.heartbeat.clone()
    }
}

/// Runs Task resources. The worker implements it (LLM generation plus [`Tools`]).
#[async_trait::async_trait]
pub trait TaskRunner: Send + Sync {
    /// Runs `resource` on `input` (the state's effective Parameters).
    async fn run(&self, resource: &str, input: Value, ctx: &TaskContext) -> Result<Value, TaskFailure>;

    /// The resources this runner accepts (validation rejects the rest).
    fn resources(&self) -> Resources;
}

/// A user tool: an async function of the input.
pub type ToolFn = Arc<dyn Fn(Value) -> Pin<Box<dyn Future<Output = Result<Value, TaskFailure>> + Send>> + Send + Sync>;

enum Tool {
    Json,
    Fail,
    HttpGet(super::http::HttpGet),
    User(ToolFn),
}

/// The tool registry: `json`, `fail`, optionally `http_get`, and user closures.
#[derive(Default)]
pub struct Tools {
    tools: BTreeMap<String, Tool>,
}

impl std::fmt::Debug for Tools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tools").field("names", &self.tools.keys().collect::<Vec<_>>()).finish()
    }
}

impl Tools {
    /// `ember:tool:json` and `ember:tool:fail`.
    pub fn builtin() -> Self {
        let mut t = Self::default();
        t.tools.insert("json".into(), Tool::Json);
        t.tools.insert("fail".into(), Tool::Fail);
        t
    }

    /// Adds `ember:tool:http_get`, which only reaches `allowed_hosts` (host names, or
    /// `host:port`).
    pub fn with_http_get<I: IntoIterator<Item = S>, S: Into<String>>(mut self, allowed_hosts: I) -> Self {
        self.tools.insert("http_get".into(), Tool::HttpGet(super::http::HttpGet::new(allowed_hosts)));
        self
    }

    /// Registers `ember:tool:{name}`.
    pub fn register<F, Fut>(mut self, name: &str, f: F) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, TaskFailure>> + Send + 'static,
    {
        let f: ToolFn = Arc::new(move |v| Box::pin(f(v)));
        self.tools.insert(name.to_string(), Tool::User(f));
        self
    }

    /// The tool names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tools.keys().map(String::as_str)
    }
}

/// The error of a Task whose tool the worker running it does not offer.
pub const TOOL_UNAVAILABLE: &str = "Ember.ToolUnavailable";

#[async_trait::async_trait]
impl TaskRunner for Tools {
    async fn run(&self, resource: &str, input: Value, _ctx: &TaskContext) -> Result<Value, TaskFailure> {
        let name = resource.strip_prefix("ember:tool:").unwrap_or(resource);
        match self.tools.get(name) {
            Some(Tool::Json) => json_tool(&input),
            Some(Tool::Fail) => Err(TaskFailure::new(
                input.get("Error").and_then(Value::as_str).unwrap_or("States.TaskFailed"),
                input.get("Cause").and_then(Value::as_str).unwrap_or(""),
            )),
            Some(Tool::HttpGet(h)) => h.run(&input).await,
            Some(Tool::User(f)) => f(input).await,
            None => Err(TaskFailure::new(
                TOOL_UNAVAILABLE,
                match name {
                    "http_get" => format!("this worker does not offer '{resource}': start it with --http-allow HOSTS (EMBER_HTTP_ALLOW) naming the hosts http_get may reach"),
                    _ => format!("this worker does not offer '{resource}' (it offers: {})", self.names().map(|n| format!("ember:tool:{n}")).collect::<Vec<_>>().join(", ")),
                },
            )),
        }
    }

    fn resources(&self) -> Resources {
        Resources::with_tools(self.names())
    }
}

/// `ember:tool:json`: `{"text": "..."}` -> the JSON value in the text (the whole text, else
/// the first `{...}` or `[...]` in it, so a model's "Here is the JSON: {...}" works).
/// Failure: `Ember.InvalidJson`.
fn json_tool(input: &Value) -> Result<Value, TaskFailure> {
    let text = input
        .get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| TaskFailure::new("Ember.InvalidInput", "ember:tool:json needs {\"text\": string}"))?;
    if let Ok(v) = serde_json::from_str::<Value>(text.trim()) {
        return Ok(v);
    }
    let trimmed = text.trim().trim_start_matches("```json").trim_start_matches("```").trim_end_matches("```");
    if let Ok(v) = serde_json::from_str::<Value>(trimmed.trim()) {
        return Ok(v);
    }
    for (i, c) in text.char_indices() {
        if c == '{' || c == '[' {
            let mut de = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>();
            if let Some(Ok(v)) = de.next() {
                return Ok(v);
            }
        }
    }
    let shown: String = text.chars().take(200).collect();
    Err(TaskFailure::new("Ember.InvalidJson", format!("no JSON value found in the text: {shown:?}")))
}

/// Helper for tests and examples: a runner that wraps [`Tools`] and answers
/// `ember:generate` with a fixed function (the worker's real one runs the model).
pub struct WithGenerate<F> {
    /// The tools.
    pub tools: Tools,
    /// The stand-in for the model.
    pub generate: F,
}

#[async_trait::async_trait]
impl<F> TaskRunner for WithGenerate<F>
where
    F: Fn(Value) -> Result<Value, TaskFailure> + Send + Sync,
{
    async fn run(&self, resource: &str, input: Value, ctx: &TaskContext) -> Result<Value, TaskFailure> {
        if resource == "ember:generate" {
            (self.generate)(input)
        } else {
            self.tools.run(resource, input, ctx).await
        }
    }

    fn resources(&self) -> Resources {
        self.tools.resources()
    }
}

/// Runs a task under its `TimeoutSeconds` (`States.Timeout`) and `HeartbeatSeconds`
/// (`States.HeartbeatTimeout`: no [`TaskContext::heartbeat`] for that long).
pub(crate) async fn run_task(
    runner: &dyn TaskRunner,
    resource: &str,
    params: Value,
    ctx: &TaskContext,
    timeout: Option<f64>,
    heartbeat: Option<f64>,
) -> Result<Value, TaskFailure> {
    let signal = ctx.heartbeat_signal();
    let task = runner.run(resource, params, ctx);
    let timeout_sleep = async {
        match timeout {
            Some(t) => tokio::time::sleep(Duration::from_secs_f64(t)).await,
            None => std::future::pending().await,
        }
    };
    let heartbeat_watch = async {
        match heartbeat {
            Some(h) => loop {
                if tokio::time::timeout(Duration::from_secs_f64(h), signal.notified()).await.is_err() {
                    return;
                }
            },
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = task => r,
        _ = timeout_sleep => Err(TaskFailure::new(crate::asl::names::TIMEOUT, format!("the task ran longer than TimeoutSeconds ({})", timeout.unwrap_or_default()))),
        _ = heartbeat_watch => Err(TaskFailure::new(crate::asl::names::HEARTBEAT_TIMEOUT, format!("no heartbeat for HeartbeatSeconds ({})", heartbeat.unwrap_or_default()))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn json_and_fail_tools() {
        let t = Tools::builtin().register("echo", |v| async move { Ok(v) });
        let ctx = TaskContext::new("e", "s", "tok", 0);
        let v =
            t.run("ember:tool:json", json!({"text": "Sure! {\"tool\": \"x\", \"n\": 1} done"}), &ctx).await.unwrap();
        assert_eq!(v, json!({"tool": "x", "n": 1}));
        let e = t.run("ember:tool:json", json!({"text": "no json"}), &ctx).await.unwrap_err();
        assert_eq!(e.error, "Ember.InvalidJson");
        let e = t.run("ember:tool:fail", json!({"Error": "E", "Cause": "C"}), &ctx).await.unwrap_err();
        assert_eq!(e, TaskFailure::new("E", "C"));
        assert_eq!(t.run("ember:tool:echo", json!(3), &ctx).await.unwrap(), json!(3));
        assert!(t.resources().allows("ember:tool:echo"));
        assert!(!t.resources().allows("ember:tool:http_get"));
    }
}
