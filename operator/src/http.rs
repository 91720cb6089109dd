//! The operator's own HTTP endpoints: `/metrics` on the metrics address,
//! `/healthz` and `/readyz` on the health address.
//!
//! `/healthz` answers 200 while the process serves at all. `/readyz`
//! answers 200 once the operator is started (connected to the API server)
//! and 503 while it shuts down; a replica waiting for the leader lease is
//! ready too, so that a rolling update of a Deployment with two replicas
//! does not stall on the standby one. Any other path is 404; any method but
//! GET (and HEAD, its body left out) is 405.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// Content type of plain answers.
const TEXT: &str = "text/plain; charset=utf-8";
/// Content type of `/metrics`.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

/// `/metrics`: the operator's metrics in the OpenMetrics text format.
pub fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text).fallback(only_get))
        .fallback(not_found)
        .with_state(metrics)
}

/// `/healthz` and `/readyz`.
pub fn health_router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz).fallback(only_get))
        .route("/readyz", get(readyz).fallback(only_get))
        .fallback(not_found)
        .with_state(health)
}

/// Binds `addr` and serves `router` until the task is aborted; returns the
/// address bound (the port chosen, for port 0) and the task.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::warn!(%error, %bound, "serving HTTP");
        }
    });
    Ok((bound, task))
}

fn text(status: StatusCode, body: String) -> Response {
    (status, [(CONTENT_TYPE, TEXT)], body).into_response()
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> Response {
    ([(CONTENT_TYPE, OPENMETRICS)], metrics.render()).into_response()
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n".to_owned())
}

async fn readyz(State(health): State<Arc<Health>>) -> Response {
    if !health.is_ready() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned());
    }
    let role = if health.is_leading() {
        "leader"
    } else {
        "standby"
    };
    text(StatusCode::OK, format!("ok ({role})\n"))
}

async fn only_get() -> Response {
    text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned())
}

async fn not_found(method: Method) -> Response {
    if method == Method::GET || method == Method::HEAD {
        text(StatusCode::NOT_FOUND, "not found\n".to_owned())
    } else {
        only_get().await
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    /// Status, content type and body of `method` `path` sent to `router`.
    async fn call(router: Router, method: Method, path: &str) -> (StatusCode, String, String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .expect("request");
        let response = router.oneshot(request).await.expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let body = String::from_utf8(body.to_vec()).expect("utf-8");
        (status, content_type, body)
    }

    #[tokio::test]
    async fn healthz_answers_while_the_process_serves() {
        let router = health_router(Arc::new(Health::default()));
        let (status, content_type, body) = call(router, Method::GET, "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
        assert_eq!(content_type, TEXT);
    }

    #[tokio::test]
    async fn readyz_says_ready_and_the_role() {
        let health = Arc::new(Health::default());
        let router = health_router(health.clone());
        let (status, _, body) = call(router.clone(), Method::GET, "/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        );
        health.set_ready(true);
        let (status, _, body) = call(router.clone(), Method::GET, "/readyz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok (standby)\n"));
        health.set_leading(true);
        let (status, _, body) = call(router.clone(), Method::GET, "/readyz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok (leader)\n"));
        health.set_ready(false);
        let (status, _, _) = call(router, Method::GET, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_text() {
        let metrics = Arc::new(Metrics::new());
        metrics.observe_reconcile(std::time::Duration::from_millis(1), false);
        let (status, content_type, body) =
            call(metrics_router(metrics), Method::GET, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, OPENMETRICS);
        assert!(
            body.contains("pipewright_operator_reconciles_total 1"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[tokio::test]
    async fn other_paths_and_methods_are_refused() {
        let health = health_router(Arc::new(Health::default()));
        let metrics = metrics_router(Arc::new(Metrics::new()));
        let cases = [
            (
                health.clone(),
                Method::GET,
                "/nope",
                StatusCode::NOT_FOUND,
                "not found\n",
            ),
            (
                health.clone(),
                Method::GET,
                "/metrics",
                StatusCode::NOT_FOUND,
                "not found\n",
            ),
            (
                metrics.clone(),
                Method::GET,
                "/healthz",
                StatusCode::NOT_FOUND,
                "not found\n",
            ),
            (
                health.clone(),
                Method::POST,
                "/healthz",
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET\n",
            ),
            (
                health,
                Method::DELETE,
                "/nope",
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET\n",
            ),
            (
                metrics,
                Method::PUT,
                "/metrics",
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET\n",
            ),
        ];
        for (router, method, path, want, want_body) in cases {
            let (status, _, body) = call(router, method.clone(), path).await;
            assert_eq!(
                (status, body.as_str()),
                (want, want_body),
                "{method} {path}"
            );
        }
    }

    #[tokio::test]
    async fn the_routers_are_served_over_tcp() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let health = Arc::new(Health::default());
        health.set_ready(true);
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let (addr, server) = serve(any, health_router(health)).await.expect("serve");
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = "GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("ok (standby)\n"), "{response}");
        server.abort();
    }
}
