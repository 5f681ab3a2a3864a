//! Shared by the HTTP and Lambda tests: `ember serve --http` as a child process, and the
//! official `openai` Python client (tests/fixtures/openai_client.py) to talk to it or to a
//! Lambda function URL.
#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use ember_tests::smollm_gguf;

pub fn model() -> anyhow::Result<String> {
    Ok(smollm_gguf()?.to_string_lossy().into_owned())
}

/// A running `ember serve --http 127.0.0.1:0`, killed on drop.
pub struct Server {
    child: Child,
    pub url: String,
    _stdout: BufReader<ChildStdout>,
    dir: tempfile::TempDir,
}

impl Server {
    /// `ember serve --http 127.0.0.1:0 --http-only --model MODEL EXTRA...`.
    pub fn start(extra: &[&str]) -> anyhow::Result<Self> {
        let model = model()?;
        let mut args = vec!["--http-only", "--model", &model];
        args.extend_from_slice(extra);
        Self::start_in(tempfile::tempdir()?, &args)
    }

    /// `ember serve --http 127.0.0.1:0 ARGS...` in `dir` (where its embedded queue and results
    /// are, unless ARGS say otherwise). Returns once the server says it is ready.
    pub fn start_in(dir: tempfile::TempDir, args: &[&str]) -> anyhow::Result<Self> {
        let stderr = std::fs::File::create(dir.path().join("stderr.log"))?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(["serve", "--http", "127.0.0.1:0"])
            .args(args)
            .current_dir(dir.path())
            .env("EMBER_LOG", "warn")
            .env_remove("EMBER_API_KEY")
            .env_remove("AWS_ENDPOINT_URL")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let (mut url, mut line) = (None, String::new());
        loop {
            line.clear();
            if stdout.read_line(&mut line)? == 0 {
                let _ = child.wait();
                let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
                bail!("ember serve exited before it was ready: {log}");
            }
            let event: Value = serde_json::from_str(&line).with_context(|| format!("stdout line {line:?}"))?;
            match event["event"].as_str() {
                Some("listening") => url = event["url"].as_str().map(str::to_string),
                Some("ready") => break,
                _ => {}
            }
        }
        let url = url.context("no listening line before ready")?;
        Ok(Self { child, url, _stdout: stdout, dir })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs the `openai` client script with one op; its JSON answer.
    pub fn client(&self, spec: Value) -> anyhow::Result<Value> {
        let mut spec = spec;
        if spec.get("base_url").is_none() {
            spec["base_url"] = json!(self.url);
        }
        client(&spec)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `openai` client script with one op (`spec` names its `base_url`); its JSON answer.
pub fn client(spec: &Value) -> anyhow::Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openai_client.py");
    let out = Command::new("python3").arg(&script).arg(spec.to_string()).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "the openai client failed ({}); is `openai` installed (scripts/install-test-deps.sh)? {stderr}",
            out.status
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("client output; stderr: {stderr}"))
}
