//! Serves Prometheus metrics on a listener of their own (`GET /metrics`,
//! OpenMetrics text), on a small thread with its own tokio runtime: a
//! worker's metrics, and the coordinator's on the port its pod names
//! `metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;

use anyhow::{Context, Result};
use axum::http::header;
use axum::routing::get;
use axum::Router;

/// OpenMetrics' content type, which Prometheus parses with counters'
/// `_total` samples matched to their families.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `listen` now (so a bad address is an error here) and serves
/// `render()` at `/metrics` until the process exits. Returns the bound
/// address.
pub fn serve(listen: &str, render: Arc<dyn Fn() -> String + Send + Sync>) -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen for metrics on {listen}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the metrics server's runtime")?;
    thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let app = Router::new().route(
                    "/metrics",
                    get(move || {
                        let render = render.clone();
                        async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], render()) }
                    }),
                );
                let result = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => axum::serve(l, app).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = result {
                    tracing::error!("the metrics server stopped: {e}");
                }
            });
        })
        .context("starting the metrics server's thread")?;
    Ok(addr)
}

#[cfg(test)]
/// Every metric family in `text` (OpenMetrics, as rendered) that
/// `docs/metrics.md` does not list with its name and type, as
/// `name (type)`. Counters are listed with their `_total` samples' name.
pub(crate) fn undocumented(text: &str, doc: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(name, kind)| {
            let shown = if kind == "counter" {
                format!("`{name}_total` | counter |")
            } else {
                format!("`{name}` | {kind} |")
            };
            (!doc.contains(&shown)).then(|| format!("{name} ({kind})"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn serves_what_render_returns_and_refuses_a_bad_address() {
        let addr = serve("127.0.0.1:0", Arc::new(|| "up 1\n# EOF\n".to_owned())).expect("serve");
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("read");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("application/openmetrics-text"), "{reply}");
        assert!(reply.ends_with("up 1\n# EOF\n"), "{reply}");
        let err = serve("256.0.0.1:0", Arc::new(String::new)).expect_err("bad address");
        assert!(err.to_string().contains("256.0.0.1:0"), "{err}");
    }
}
