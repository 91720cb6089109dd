//! What the operator asks a run's coordinator: `GET /status`, whose
//! progress figures (step, loss, tokens/s) go into the run's status.
//!
//! The fetch is behind [`CoordinatorProbe`] so that reconciles are tested
//! without a network; [`HttpProbe`] is the real one, on the HTTP/1 client
//! the Kubernetes client already brings.

use std::time::Duration;

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

/// The part of the coordinator's `GET /status`
/// ([`pipewright_spec::coordinator::Status`]) the operator reads; other
/// fields are ignored, and a missing one is `None`, so a coordinator of
/// another version still reports what it can. [`From`] the full status
/// ties each field to the one it is read from: a renamed field fails to
/// compile here, and a test checks the wire names agree.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct CoordinatorReport {
    /// `Pending`, `Initializing`, `Training`, `Checkpointing`, `Succeeded`
    /// or `Failed`.
    #[serde(default)]
    pub phase: Option<String>,
    /// Last optimizer step.
    #[serde(default)]
    pub step: Option<u64>,
    /// Training loss at `step`.
    #[serde(default)]
    pub loss: Option<f64>,
    /// Throughput over the last reporting window.
    #[serde(default)]
    pub tokens_per_second: Option<f64>,
    /// Contributors by share, largest first.
    #[serde(default)]
    pub contributions: Vec<pipewright_spec::coordinator::Contribution>,
}

impl From<&pipewright_spec::coordinator::Status> for CoordinatorReport {
    fn from(s: &pipewright_spec::coordinator::Status) -> Self {
        CoordinatorReport {
            phase: Some(s.phase.name().to_owned()),
            step: Some(s.step),
            loss: s.loss.map(f64::from),
            tokens_per_second: Some(s.tokens_per_second),
            contributions: s.contributions.clone(),
        }
    }
}

/// Why the coordinator could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No connection, or the request failed on the way.
    #[error("GET {url}: {message}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The coordinator answered with an error status.
    #[error("GET {url}: HTTP {status}")]
    Status {
        /// The URL asked.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The answer was not the expected JSON.
    #[error("GET {url}: unexpected body: {message}")]
    Body {
        /// The URL asked.
        url: String,
        /// The parser's message.
        message: String,
    },
}

/// Asks a coordinator for its status.
pub trait CoordinatorProbe: Send + Sync {
    /// `GET {base_url}/status`.
    fn status<'a>(
        &'a self,
        base_url: &'a str,
    ) -> BoxFuture<'a, Result<CoordinatorReport, ProbeError>>;
}

/// Largest status body read (the shard list grows with the run).
const MAX_BODY: usize = 4 << 20;

/// [`CoordinatorProbe`] over plain HTTP with a per-request timeout.
pub struct HttpProbe {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl HttpProbe {
    /// A probe giving up on a request after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    async fn fetch(&self, url: String) -> Result<CoordinatorReport, ProbeError> {
        let unreachable = |message: String| ProbeError::Unreachable {
            url: url.clone(),
            message,
        };
        let uri: hyper::Uri = url.parse().map_err(|e| unreachable(format!("{e}")))?;
        let response = tokio::time::timeout(self.timeout, self.client.get(uri))
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| unreachable(e.to_string()))?;
        if !response.status().is_success() {
            return Err(ProbeError::Status {
                url,
                status: response.status().as_u16(),
            });
        }
        let body = tokio::time::timeout(
            self.timeout,
            Limited::new(response.into_body(), MAX_BODY).collect(),
        )
        .await
        .map_err(|_| unreachable(format!("body not complete within {:?}", self.timeout)))?
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
        serde_json::from_slice(&body).map_err(|e| ProbeError::Body {
            url,
            message: e.to_string(),
        })
    }
}

impl CoordinatorProbe for HttpProbe {
    fn status<'a>(
        &'a self,
        base_url: &'a str,
    ) -> BoxFuture<'a, Result<CoordinatorReport, ProbeError>> {
        Box::pin(self.fetch(format!("{base_url}/status")))
    }
}

/// A probe that answers every request with a fixed report, or as an
/// unreachable coordinator when it has none; for tests.
pub struct StaticProbe(pub Option<CoordinatorReport>);

impl CoordinatorProbe for StaticProbe {
    fn status<'a>(
        &'a self,
        base_url: &'a str,
    ) -> BoxFuture<'a, Result<CoordinatorReport, ProbeError>> {
        let answer = self.0.clone().ok_or_else(|| ProbeError::Unreachable {
            url: format!("{base_url}/status"),
            message: "connection refused".to_owned(),
        });
        Box::pin(async move { answer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves one HTTP response on a loopback port and returns its base URL.
    async fn serve_once(response: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut request = vec![0u8; 4096];
            let n = stream.read(&mut request).await.expect("read");
            assert!(String::from_utf8_lossy(&request[..n]).starts_with("GET /status HTTP/1.1"));
            stream.write_all(response.as_bytes()).await.expect("write");
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn reads_the_coordinator_status_and_ignores_other_fields() {
        let body = r#"{"run":"demo","phase":"Training","step":42,"steps":100,"loss":2.5,"tokens_per_second":1234.5,"stages":[]}"#;
        let response: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let url = serve_once(response).await;
        let report = HttpProbe::new(Duration::from_secs(2))
            .status(&url)
            .await
            .expect("status");
        assert_eq!(
            report,
            CoordinatorReport {
                phase: Some("Training".to_owned()),
                step: Some(42),
                loss: Some(2.5),
                tokens_per_second: Some(1234.5),
                contributions: Vec::new(),
            }
        );
    }

    #[test]
    fn the_report_reads_the_fields_the_coordinator_writes() {
        use pipewright_spec::coordinator::{Phase, Status};
        let status = Status {
            run: "demo".to_owned(),
            phase: Phase::Checkpointing,
            reason: String::new(),
            step: 17,
            steps: 100,
            loss: Some(2.5),
            tokens_per_second: 4096.0,
            epoch: 2,
            reassignments: 1,
            checkpoint_step: Some(16),
            standby: 0,
            stages: Vec::new(),
            shards: Vec::new(),
            contributions: Vec::new(),
            refused_reports: 0,
            recoveries: 0,
            recovery_seconds_total: 0.0,
            last_recovery_seconds: None,
            quarantined: Vec::new(),
        };
        let wire = serde_json::to_vec(&status).expect("json");
        let read: CoordinatorReport = serde_json::from_slice(&wire).expect("report");
        assert_eq!(read, CoordinatorReport::from(&status));
        assert_eq!(read.phase.as_deref(), Some("Checkpointing"));
        assert_eq!(read.step, Some(17));
    }

    #[tokio::test]
    async fn errors_name_the_url_and_the_problem() {
        let url = serve_once(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        let error = HttpProbe::new(Duration::from_secs(2))
            .status(&url)
            .await
            .expect_err("503");
        assert_eq!(error.to_string(), format!("GET {url}/status: HTTP 503"));

        // Nothing listens on a port just freed.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        drop(listener);
        let error = HttpProbe::new(Duration::from_secs(2))
            .status(&url)
            .await
            .expect_err("refused");
        assert!(matches!(error, ProbeError::Unreachable { .. }), "{error}");
    }
}
