//! The options of `ember serve --http`, and starting the server before the model loads.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::http::{HttpOptions, HttpServer};

/// The port `--http` listens on when the address names none.
pub const DEFAULT_HTTP_PORT: u16 = 8080;

#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// Also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /// /v1/models, /health) on this address, sharing the model and the batch with the queue
    /// worker. Without a value: 127.0.0.1:8080; without a port: port 8080.
    #[arg(long, env = "EMBER_HTTP", num_args = 0..=1, default_missing_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub http: Option<String>,
    /// Serve only the HTTP API: take no jobs from the queue.
    #[arg(long, env = "EMBER_HTTP_ONLY", requires = "http", value_parser = clap::builder::BoolishValueParser::new())]
    pub http_only: bool,
    /// Require `Authorization: Bearer <KEY>` on the HTTP API (/health excepted).
    #[arg(long, env = "EMBER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub admit: AdmitArgs,
}

/// How long an HTTP request (from `--http`, or a Lambda function URL) waits to be admitted:
/// one definition for `serve` and `lambda`.
#[derive(Debug, Clone, clap::Args)]
pub struct AdmitArgs {
    /// Milliseconds an HTTP request may wait for room in the batch (the KV cache budget and
    /// the batch size) before it is answered 429 with Retry-After.
    #[arg(long, env = "EMBER_HTTP_ADMIT_MS", default_value_t = 30_000)]
    pub http_admit_ms: u64,
}

impl AdmitArgs {
    pub fn admit_within(&self) -> Duration {
        Duration::from_millis(self.http_admit_ms)
    }
}

impl HttpArgs {
    /// Binds the listener when `--http` is given, and says where on stdout (one JSON line),
    /// so that a caller that asked for port 0 learns the port.
    pub async fn bind(&self) -> anyhow::Result<Option<HttpServer>> {
        let Some(text) = &self.http else { return Ok(None) };
        let addr = parse_addr(text)?;
        let api_key = self.api_key.clone().filter(|k| !k.is_empty());
        if !addr.ip().is_loopback() && api_key.is_none() {
            tracing::warn!(
                %addr,
                "the HTTP API listens beyond this machine without an API key: anyone who can reach it can use the \
                 model; set --api-key (EMBER_API_KEY)"
            );
        }
        let opts = HttpOptions { api_key, admit_within: self.admit.admit_within() };
        let server =
            HttpServer::bind(addr, opts).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--http): {e}"))?;
        let bound = server.local_addr()?;
        println!("{}", serde_json::json!({"event": "listening", "url": format!("http://{bound}")}));
        Ok(Some(server))
    }
}

/// `HOST:PORT`, an IP address alone, `localhost[:PORT]`, or `:PORT` (all interfaces).
pub fn parse_addr(text: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = text.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_HTTP_PORT));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => {
            let port = port.parse().map_err(|_| bad_addr(text))?;
            (host, port)
        }
        None => (text, DEFAULT_HTTP_PORT),
    };
    match host {
        "" => Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)),
        "localhost" => Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
        _ => Err(bad_addr(text)),
    }
}

fn bad_addr(text: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "--http {text:?} is not an address to listen on: give IP:PORT (127.0.0.1:8080), an IP, localhost[:PORT] or :PORT"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_take_the_default_port() -> anyhow::Result<()> {
        assert_eq!(parse_addr("127.0.0.1:9000")?, "127.0.0.1:9000".parse()?);
        assert_eq!(parse_addr("127.0.0.1")?, "127.0.0.1:8080".parse()?);
        assert_eq!(parse_addr("::1")?, "[::1]:8080".parse()?);
        assert_eq!(parse_addr("localhost")?, "127.0.0.1:8080".parse()?);
        assert_eq!(parse_addr(":7000")?, "0.0.0.0:7000".parse()?);
        assert!(parse_addr("example.com:80").is_err());
        assert!(parse_addr("127.0.0.1:http").is_err());
        Ok(())
    }
}
