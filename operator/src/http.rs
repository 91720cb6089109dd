//! The operator's own HTTP endpoints: `/metrics` on the metrics address,
//! `/healthz` and `/readyz` on the health address.
//!
//! `/healthz` answers 200 while the process serves at all. `/readyz`
//! answers 200 once the operator is started (connected to the API server)
//! and 503 while it shuts down; a replica waiting for the leader lease is
//! ready too, so that a rolling update of a Deployment with two replicas
//! does not stall on the standby one.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the health endpoints report.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    leading: AtomicBool,
}

impl Health {
    /// Marks the operator ready (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
    /// Records whether this replica holds the leader lease.
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::SeqCst);
    }
    /// Whether the operator is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
    /// Whether this replica holds the leader lease.
    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }
}

/// What a server answers.
#[derive(Clone)]
pub enum Endpoints {
    /// `/metrics`.
    Metrics(Arc<Metrics>),
    /// `/healthz` and `/readyz`.
    Health(Arc<Health>),
}

impl Endpoints {
    /// Status and text body for a `method` request of `path`.
    pub fn answer(&self, method: &Method, path: &str) -> (StatusCode, String, &'static str) {
        const TEXT: &str = "text/plain; charset=utf-8";
        if method != Method::GET {
            return (
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET\n".to_owned(),
                TEXT,
            );
        }
        match (self, path) {
            (Self::Metrics(metrics), "/metrics") => (
                StatusCode::OK,
                metrics.render(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            (Self::Health(_), "/healthz") => (StatusCode::OK, "ok\n".to_owned(), TEXT),
            (Self::Health(health), "/readyz") => {
                let role = if health.is_leading() {
                    "leader"
                } else {
                    "standby"
                };
                if health.is_ready() {
                    (StatusCode::OK, format!("ok ({role})\n"), TEXT)
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready\n".to_owned(),
                        TEXT,
                    )
                }
            }
            _ => (StatusCode::NOT_FOUND, "not found\n".to_owned(), TEXT),
        }
    }
}

/// Binds `addr` and serves `endpoints` until the task is dropped.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    endpoints: Endpoints,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, %addr, "accepting a connection");
                    continue;
                }
            };
            let endpoints = endpoints.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let (status, body, content_type) =
                        endpoints.answer(request.method(), request.uri().path());
                    let response = Response::builder()
                        .status(status)
                        .header("content-type", content_type)
                        .body(Full::new(Bytes::from(body)));
                    async move {
                        Ok::<_, Infallible>(response.unwrap_or_else(|_| {
                            Response::new(Full::new(Bytes::from_static(b"error\n")))
                        }))
                    }
                });
                if let Err(error) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%error, "serving a connection");
                }
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn health_and_metrics_are_served_over_http() {
        let health = Arc::new(Health::default());
        let metrics = Arc::new(Metrics::new());
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        // Bind to learn a free port, then serve on it.
        let probe = TcpListener::bind(any).await.expect("bind");
        let health_addr = probe.local_addr().expect("address");
        drop(probe);
        let server = serve(health_addr, Endpoints::Health(health.clone()))
            .await
            .expect("serve health");
        assert!(get(health_addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200"));
        assert!(get(health_addr, "/readyz")
            .await
            .starts_with("HTTP/1.1 503"));
        health.set_ready(true);
        health.set_leading(true);
        let ready = get(health_addr, "/readyz").await;
        assert!(
            ready.starts_with("HTTP/1.1 200") && ready.ends_with("ok (leader)\n"),
            "{ready}"
        );
        assert!(get(health_addr, "/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();

        metrics.observe_reconcile(std::time::Duration::from_millis(1), false);
        let probe = TcpListener::bind(any).await.expect("bind");
        let metrics_addr = probe.local_addr().expect("address");
        drop(probe);
        let server = serve(metrics_addr, Endpoints::Metrics(metrics))
            .await
            .expect("serve metrics");
        let text = get(metrics_addr, "/metrics").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.contains("pipewright_operator_reconciles_total 1"),
            "{text}"
        );
        server.abort();
    }
}
