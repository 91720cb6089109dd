//! `GET /`: the run page. One self-contained HTML document (`page.html`,
//! inline CSS and script, nothing loaded from elsewhere) that reads
//! `/status` and `/v1/history` every 2 s and shows the run's progress,
//! the pipeline as a stage × replica grid, loss and throughput curves and
//! recent events. Every string it shows goes in as text, never as markup,
//! and the content security policy sent with it lets the page talk only
//! to the coordinator that served it.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The page.
pub(super) const PAGE: &str = include_str!("page.html");

/// What the page may do: its own inline style and script, requests to
/// this origin, nothing else.
const POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; img-src data:; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /`.
pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE,
    )
        .into_response()
}
