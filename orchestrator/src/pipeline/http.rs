//! `ember:tool:http_get`: GET only to hosts on an allowlist given at deploy time.
//!
//! Input `{"url": "https://host/path", "headers": {..}?}`; result
//! `{"status": 200, "headers": {..}, "body": "...", "json": <parsed body or null>}`.
//! A host off the list fails with `Ember.HostNotAllowed` before any connection is made.
//!
//! One deadline covers the whole request (connect, headers and the body to its last byte), so
//! a server that drips its body cannot hold a hop past it (`Ember.HttpTimeout`); the worker
//! also cancels a running hop at shutdown. The `Host` header always names the URL's host: a
//! `Host` in the input's headers is ignored, so the allowlist decides where the request goes
//! and which virtual host answers.

use std::collections::BTreeSet;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Map, Value};

use super::tools::TaskFailure;

/// Largest body read (bytes); more fails with `Ember.ResponseTooLarge`.
const MAX_BODY: usize = 1 << 20;

/// The default total deadline of one GET.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// The HTTP GET tool.
pub struct HttpGet {
    allowed: BTreeSet<String>,
    deadline: Duration,
}

impl HttpGet {
    /// A tool reaching only `allowed_hosts` (`host` or `host:port`, case-insensitive), with
    /// the default deadline (30 s).
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(allowed_hosts: I) -> Self {
        Self {
            allowed: allowed_hosts.into_iter().map(|h| h.into().to_ascii_lowercase()).collect(),
            deadline: DEFAULT_DEADLINE,
        }
    }

    /// The total time one GET may take, from connecting to the body's last byte.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    pub(crate) async fn run(&self, input: &Value) -> Result<Value, TaskFailure> {
        let url = input
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| TaskFailure::new("Ember.InvalidInput", "ember:tool:http_get needs {\"url\": string}"))?;
        let uri: hyper::Uri =
            url.parse().map_err(|e| TaskFailure::new("Ember.InvalidInput", format!("bad url {url:?}: {e}")))?;
        let scheme = uri.scheme_str().unwrap_or("");
        if scheme != "http" && scheme != "https" {
            return Err(TaskFailure::new(
                "Ember.InvalidInput",
                format!("only http and https URLs are allowed, not {url:?}"),
            ));
        }
        let host = uri.host().unwrap_or("").to_ascii_lowercase();
        let with_port = uri.port_u16().map(|p| format!("{host}:{p}"));
        if !self.allowed.contains(&host) && !with_port.as_ref().is_some_and(|h| self.allowed.contains(h)) {
            return Err(TaskFailure::new("Ember.HostNotAllowed", format!("host {host:?} is not on the allowlist")));
        }
        let mut req = hyper::Request::get(uri.clone());
        if let Some(h) = input.get("headers").and_then(Value::as_object) {
            for (k, v) in h {
                if k.eq_ignore_ascii_case("host") {
                    continue;
                }
                if let Some(v) = v.as_str() {
                    req = req.header(k.as_str(), v);
                }
            }
        }
        // The URL's host and port, never its user info.
        req = req.header(hyper::header::HOST, with_port.as_deref().unwrap_or(&host));
        let req = req
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| TaskFailure::new("Ember.InvalidInput", e.to_string()))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| TaskFailure::new("Ember.HttpError", format!("TLS roots: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
        let exchange = async {
            let resp = client
                .request(req)
                .await
                .map_err(|e| TaskFailure::new("Ember.HttpError", format!("GET {url}: {e}")))?;
            let status = resp.status().as_u16();
            let mut headers = Map::new();
            for (k, v) in resp.headers() {
                if let Ok(v) = v.to_str() {
                    headers.insert(k.as_str().to_string(), Value::String(v.to_string()));
                }
            }
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| TaskFailure::new("Ember.ResponseTooLarge", format!("GET {url}: {e}")))?
                .to_bytes();
            Ok::<_, TaskFailure>((status, headers, body))
        };
        let (status, headers, body) = tokio::time::timeout(self.deadline, exchange).await.map_err(|_| {
            TaskFailure::new(
                "Ember.HttpTimeout",
                format!("GET {url} did not complete (headers and whole body) within {:?}", self.deadline),
            )
        })??;
        let text = String::from_utf8_lossy(&body).into_owned();
        let parsed = serde_json::from_str::<Value>(&text).unwrap_or(Value::Null);
        Ok(json!({"status": status, "headers": headers, "body": text, "json": parsed}))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn allowlisted_local_get_and_refusal() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await.unwrap();
            let body = "{\"ok\":true}";
            let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            s.write_all(resp.as_bytes()).await.unwrap();
        });
        let tool = HttpGet::new([format!("127.0.0.1:{port}")]);
        let v = tool.run(&json!({"url": format!("http://127.0.0.1:{port}/x")})).await.unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["json"], json!({"ok": true}));
        let e = tool.run(&json!({"url": "http://example.com/"})).await.unwrap_err();
        assert_eq!(e.error, "Ember.HostNotAllowed");
        let e = tool.run(&json!({"url": format!("http://127.0.0.1:{}/", port.wrapping_add(1))})).await.unwrap_err();
        assert_eq!(e.error, "Ember.HostNotAllowed");
    }

    /// A server that sends its headers at once, then one body byte every 100 ms for a minute:
    /// the deadline covers the body too (before, only the headers were timed).
    #[tokio::test]
    async fn a_dripping_body_fails_within_the_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 600\r\n\r\n").await.unwrap();
            for _ in 0..600 {
                if s.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let tool = HttpGet::new([format!("127.0.0.1:{port}")]).with_deadline(Duration::from_secs(1));
        // The body takes 60 s to arrive; a deadline that covered only the headers would return it.
        let e = tool.run(&json!({"url": format!("http://127.0.0.1:{port}/slow")})).await.unwrap_err();
        assert_eq!(e.error, "Ember.HttpTimeout", "{}", e.cause);
    }

    /// The Host header names the URL's host even when the input sets another.
    #[tokio::test]
    async fn host_is_the_urls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
            let hosts: Vec<&str> = request.lines().filter(|l| l.starts_with("host:")).collect();
            let body = serde_json::to_string(&hosts).unwrap();
            let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            s.write_all(resp.as_bytes()).await.unwrap();
        });
        let tool = HttpGet::new([format!("127.0.0.1:{port}")]);
        let input =
            json!({"url": format!("http://127.0.0.1:{port}/"), "headers": {"Host": "internal.admin", "HOST": "x"}});
        let v = tool.run(&input).await.unwrap();
        assert_eq!(v["json"], json!([format!("host: 127.0.0.1:{port}")]));
    }
}
