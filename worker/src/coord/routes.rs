//! The coordinator's HTTP API: one handler per endpoint on an axum
//! [`Router`].
//!
//! `/healthz`, `/status` and `/metrics` are open; every `/v1/` endpoint
//! wants the run's join token (`Authorization: Bearer`), checked by a layer
//! before the handler runs. JSON bodies are at most [`MAX_JSON`] bytes,
//! stage states [`MAX_STATE`]; a body declared larger is refused before
//! anything else. Handlers that touch the state machine run on tokio's
//! blocking pool, so long polls (which wait on the state machine's condition
//! variable) never starve other requests such as heartbeats.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::api::{
    register_message, step_message, AuditReport, Challenge, Failure, Heartbeat, HeartbeatReply,
    Register, Registered, StepClaim, StepDone,
};
use super::server::{lock, Shared};
use super::state::CoordError;
use crate::checkpoint;

/// Largest JSON body accepted.
const MAX_JSON: usize = 1 << 20;
/// Largest stage state accepted for a hand-off or a checkpoint part.
const MAX_STATE: usize = 1 << 36;

type Coord = State<Arc<Shared>>;

/// The API of the coordinator behind `shared`.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    let checkpoint = get(get_checkpoint)
        .put(put_checkpoint)
        .fallback(checkpoint_method)
        .layer(DefaultBodyLimit::max(MAX_STATE));
    let state = get(get_state)
        .put(put_state)
        .fallback(state_method)
        .layer(DefaultBodyLimit::max(MAX_STATE));
    let evidence = get(get_evidence)
        .put(put_evidence)
        .fallback(evidence_method)
        .layer(DefaultBodyLimit::max(shared.evidence_body_limit));
    let weights = axum::routing::put(put_weights)
        .fallback(weights_method)
        .layer(DefaultBodyLimit::max(shared.weights_body_limit));
    // A receipt holds one contribution (4 bytes a parameter and frame
    // headers), within the weights' limit (16 bytes a parameter).
    let receipt = axum::routing::put(put_receipt)
        .fallback(receipt_method)
        .layer(DefaultBodyLimit::max(shared.weights_body_limit));
    let complaints = post(complaint)
        .fallback(no_such_endpoint)
        .layer(DefaultBodyLimit::max(complaint_limit(&shared)));
    let api = Router::new()
        .route("/v1/manifest", only(get(manifest)))
        .route("/v1/challenge", only(post(challenge)))
        .route("/v1/register", only(post(register)))
        .route("/v1/heartbeat", only(post(heartbeat)))
        .route("/v1/wiring", only(get(wiring)))
        .route("/v1/step", only(post(step)))
        .route("/v1/fail", only(post(fail)))
        .route("/v1/audit", only(post(audit)))
        .route("/v1/audit/{audit}/evidence", evidence)
        .route("/v1/audit/{audit}/weights", weights)
        .route("/v1/audit/{audit}/receipt", receipt)
        .route("/v1/complaint", complaints)
        .route("/v1/broken", only(post(broken)))
        .route("/v1/recheck", only(post(recheck)))
        .route("/v1/checkpoint/", checkpoint.clone())
        .route("/v1/checkpoint/{*stage}", checkpoint)
        .route("/v1/state/", state.clone())
        .route("/v1/state/{*stage}", state)
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", only(get(healthz)))
        .route("/status", only(get(status)))
        .route("/v1/ledger", only(get(ledger)))
        .route("/v1/history", only(get(history)))
        .route("/", only(get(super::page::page)))
        .route("/metrics", only(get(metrics)))
        .merge(api)
        .fallback(no_such_endpoint)
        .layer(DefaultBodyLimit::max(MAX_JSON))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            refuse_oversized,
        ))
        .layer(middleware::from_fn_with_state(shared.clone(), count))
        .with_state(shared)
}

/// A route whose other methods are unknown endpoints (404), as for a path
/// that does not exist.
fn only(route: MethodRouter<Arc<Shared>>) -> MethodRouter<Arc<Shared>> {
    route.fallback(no_such_endpoint)
}

/// An answer of the API.
#[derive(Debug)]
enum Reply {
    Json(u16, Vec<u8>),
    Text(u16, String),
    Bytes(Arc<Vec<u8>>),
    Empty(u16),
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let status = |c: u16| StatusCode::from_u16(c).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        match self {
            Reply::Json(code, body) => (
                status(code),
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response(),
            Reply::Text(code, text) => (
                status(code),
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                text,
            )
                .into_response(),
            Reply::Bytes(b) => (StatusCode::OK, b.as_ref().clone()).into_response(),
            Reply::Empty(code) => status(code).into_response(),
        }
    }
}

fn json(v: &impl Serialize) -> Reply {
    match serde_json::to_vec(v) {
        Ok(b) => Reply::Json(200, b),
        Err(e) => Reply::Text(500, e.to_string()),
    }
}

/// The empty JSON object most writes answer with.
fn ok() -> Reply {
    Reply::Json(200, b"{}".to_vec())
}

fn coord_error(e: CoordError) -> Reply {
    let code = match e {
        CoordError::UnknownWorker(_) => 404,
        CoordError::Invalid(_) => 400,
        CoordError::Taken(..) => 409,
        CoordError::Finished(_) => 410,
        CoordError::Busy(_) => 409,
        CoordError::Refused(..) => 403,
        CoordError::Quarantined(_) => 403,
    };
    Reply::Text(code, e.to_string())
}

/// Runs `f` on the blocking pool.
/// A handler that panics answers 500 and is counted
/// (`pipewright_handler_panics_total`); the server goes on.
async fn blocking(shared: Arc<Shared>, f: impl FnOnce(&Shared) -> Reply + Send + 'static) -> Reply {
    let mine = shared.clone();
    tokio::task::spawn_blocking(move || f(&shared))
        .await
        .unwrap_or_else(|e| {
            mine.metrics.count_panic();
            tracing::error!("a request handler failed: {e}");
            Reply::Text(500, format!("request handler failed: {e}"))
        })
}

/// Runs `f` on the blocking pool, then saves the state and wakes the long
/// polls.
async fn changing(shared: Arc<Shared>, f: impl FnOnce(&Shared) -> Reply + Send + 'static) -> Reply {
    blocking(shared, |s| {
        let reply = f(s);
        s.after_change();
        reply
    })
    .await
}

// ---- Layers ----

/// Whether `auth` is `Bearer <token>`. The digests are compared in
/// constant time, so neither the time taken nor the length says anything
/// about the token.
fn authorized(token: &str, auth: Option<&str>) -> bool {
    let expected = blake3::hash(format!("Bearer {token}").as_bytes());
    auth.is_some_and(|a| {
        bool::from(
            blake3::hash(a.as_bytes())
                .as_bytes()
                .ct_eq(expected.as_bytes()),
        )
    })
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// Lets a request through only with the run's join token.
async fn require_token(State(shared): Coord, request: Request, next: Next) -> Response {
    if authorized(&shared.config.token, bearer(request.headers())) {
        next.run(request).await
    } else {
        unauthorized().into_response()
    }
}

fn unauthorized() -> Reply {
    Reply::Text(401, "missing or wrong join token".into())
}

/// Refuses a body whose declared length is over its endpoint's limit
/// before anything else looks at the request.
async fn refuse_oversized(State(shared): Coord, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let limit = if path.starts_with("/v1/audit/")
        && (path.ends_with("/weights") || path.ends_with("/receipt"))
    {
        shared.weights_body_limit
    } else if path.starts_with("/v1/state/") || path.starts_with("/v1/checkpoint/") {
        MAX_STATE
    } else if path.starts_with("/v1/audit/") {
        shared.evidence_body_limit
    } else if path == "/v1/complaint" {
        complaint_limit(&shared)
    } else {
        MAX_JSON
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Reply::Text(413, format!("body larger than {limit} bytes")).into_response();
    }
    next.run(request).await
}

/// Counts every request and every refusal in the metrics.
async fn count(State(shared): Coord, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    shared.metrics.count(&path, response.status());
    response
}

/// Any path or method the API does not have. Under `/v1/` the token is
/// checked first, so strangers learn nothing about the endpoints.
async fn no_such_endpoint(
    State(shared): Coord,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Reply {
    let path = uri.path();
    if !path.starts_with("/v1/") {
        return Reply::Text(404, format!("no such endpoint: {path}"));
    }
    if !authorized(&shared.config.token, bearer(&headers)) {
        return unauthorized();
    }
    Reply::Text(404, format!("no such endpoint: {method} {path}"))
}

// ---- Extractors ----

/// A JSON request body. Unlike axum's `Json` it does not insist on a
/// `Content-Type` and refuses a malformed body with 400 and serde's words
/// (which name the field), as the API always has.
struct JsonBody<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Reply;

    async fn from_request(request: Request, state: &S) -> Result<Self, Reply> {
        let RawBody(body) = RawBody::from_request(request, state).await?;
        serde_json::from_slice(&body)
            .map(JsonBody)
            .map_err(|e| Reply::Text(400, format!("malformed request: {e}")))
    }
}

/// A request body up to the route's [`DefaultBodyLimit`].
struct RawBody(Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = Reply;

    async fn from_request(request: Request, state: &S) -> Result<Self, Reply> {
        Bytes::from_request(request, state)
            .await
            .map(RawBody)
            .map_err(|e| Reply::Text(413, format!("reading the body: {e}")))
    }
}

/// The stage number that follows `prefix` in `path`.
fn stage_after(path: &str, prefix: &str) -> Option<usize> {
    path.strip_prefix(prefix)?.parse().ok()
}

/// Where a checkpoint part goes: `/v1/checkpoint/{stage}?step=N[&worker=ID]`.
#[derive(Clone)]
struct CheckpointAt {
    stage: usize,
    step: u64,
    /// The uploading worker; checked by the upload, which needs it.
    worker: Option<u64>,
}

impl<S: Send + Sync> FromRequestParts<S> for CheckpointAt {
    type Rejection = Reply;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Reply> {
        #[derive(Deserialize)]
        struct Q {
            step: u64,
            worker: Option<String>,
        }
        let bad = || Reply::Text(400, "checkpoint needs /v1/checkpoint/STAGE?step=N".into());
        let stage = stage_after(parts.uri.path(), "/v1/checkpoint/").ok_or_else(bad)?;
        let Query(q) = Query::<Q>::try_from_uri(&parts.uri).map_err(|_| bad())?;
        Ok(CheckpointAt {
            stage,
            step: q.step,
            worker: q.worker.and_then(|w| w.parse().ok()),
        })
    }
}

/// A stage state in transit: `/v1/state/{stage}?epoch=E`.
struct StateAt {
    stage: usize,
    epoch: u64,
}

impl<S: Send + Sync> FromRequestParts<S> for StateAt {
    type Rejection = Reply;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Reply> {
        #[derive(Deserialize)]
        struct Q {
            epoch: u64,
        }
        let bad = || Reply::Text(400, "state needs /v1/state/STAGE?epoch=E".into());
        let stage = stage_after(parts.uri.path(), "/v1/state/").ok_or_else(bad)?;
        let Query(q) = Query::<Q>::try_from_uri(&parts.uri).map_err(|_| bad())?;
        Ok(StateAt {
            stage,
            epoch: q.epoch,
        })
    }
}

/// `GET /v1/wiring?worker=W&after=E`.
#[derive(Deserialize)]
struct WiringQuery {
    worker: u64,
    after: u64,
}

// ---- Open endpoints ----

/// `GET /healthz`.
async fn healthz() -> Reply {
    Reply::Text(200, "ok\n".into())
}

/// `GET /status`: the run's status as JSON.
async fn status(State(shared): Coord) -> Reply {
    blocking(shared, |s| json(&lock(&s.coord).status(Instant::now()))).await
}

/// `GET /v1/history`: the run's recent steps and events as JSON (open
/// like `/status`).
async fn history(State(shared): Coord) -> Reply {
    blocking(shared, |s| {
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        json(&lock(&s.coord).history(Instant::now(), unix_now))
    })
    .await
}

/// `GET /metrics`: Prometheus text.
async fn metrics(State(shared): Coord) -> Reply {
    blocking(shared, |s| Reply::Text(200, super::metrics::scrape(s))).await
}

// ---- Worker endpoints (join token) ----

/// `GET /v1/manifest`: the run, as workers receive it.
async fn manifest(State(shared): Coord) -> Reply {
    changing(shared, |s| json(&s.config.manifest)).await
}

/// `GET /v1/ledger`: every contributor's standing over the reward window
/// (read-only, open like `/status`).
async fn ledger(State(shared): Coord) -> Reply {
    blocking(shared, |s| {
        let c = lock(&s.coord);
        let Some(l) = c.ledger() else {
            return Reply::Text(404, "this coordinator keeps no ledger".into());
        };
        let last = l.last_step().unwrap_or(0);
        let (from, to) = crate::ledger::window_of(last, &c.layout().rewards);
        json(&serde_json::json!({
            "run": c.status(Instant::now()).run,
            "window": [from, to],
            "rewards": c.layout().rewards,
            "shares": c.shares(),
            "refused": c.refused(),
        }))
    })
    .await
}

/// `POST /v1/challenge`: a fresh nonce for a worker to sign when it
/// registers.
async fn challenge(State(shared): Coord) -> Reply {
    blocking(shared, |s| {
        json(&Challenge {
            nonce: s.challenges.issue(),
        })
    })
    .await
}

/// Checks a registration's proof: a challenge this coordinator issued and
/// has not seen used, signed by the key it names.
fn check_proof(shared: &Shared, r: &Register) -> Result<(), Reply> {
    let Some(p) = &r.identity else {
        return Err(Reply::Text(
            400,
            "registering needs an identity: POST /v1/challenge, sign it, send the proof".into(),
        ));
    };
    let refuse = |reason: &'static str, detail: String| {
        let e = lock(&shared.coord).refuse(
            crate::ledger::Refusal {
                worker: r.worker,
                identity: Some(p.public_key.clone()),
                reason,
                detail,
            },
            Instant::now(),
        );
        coord_error(e)
    };
    if !shared.challenges.redeem(&p.nonce) {
        return Err(refuse(
            "challenge",
            "the challenge is unknown, used or expired; ask for a new one".into(),
        ));
    }
    let message = register_message(&shared.config.run_id, &p.nonce, &p.public_key);
    if !crate::identity::verify(
        &p.public_key,
        crate::identity::REGISTER_DOMAIN,
        &message,
        &p.signature,
    ) {
        return Err(refuse(
            "signature",
            "the registration is not signed by the key it names".into(),
        ));
    }
    Ok(())
}

/// Checks a step report's signature against the identity that holds the
/// reporting worker's slot.
fn check_step_signature(shared: &Shared, d: &StepDone) -> Result<(), Reply> {
    let Some(c) = &d.commitment else {
        // The state machine refuses it and counts it.
        return Ok(());
    };
    let mut coord = lock(&shared.coord);
    let Some((identity, shard)) = coord.identity_of(d.worker) else {
        return Ok(());
    };
    let indices = c.indices();
    let claim = StepClaim {
        run_id: &shared.config.run_id,
        worker: d.worker,
        epoch: d.epoch,
        completed: d.completed,
        shard,
        loss: d.loss,
        micro_batches: &indices,
        root: c.root(),
    };
    if crate::identity::verify(
        &identity,
        crate::identity::STEP_DOMAIN,
        &step_message(&claim),
        &c.signature,
    ) {
        return Ok(());
    }
    let e = coord.refuse(
        crate::ledger::Refusal {
            worker: Some(d.worker),
            identity: Some(identity),
            reason: "signature",
            detail: format!(
                "the report of step {} is not signed by worker {}'s identity",
                d.completed, d.worker
            ),
        },
        Instant::now(),
    );
    Err(coord_error(e))
}

/// `POST /v1/register`: a worker asks for a shard.
async fn register(State(shared): Coord, JsonBody(r): JsonBody<Register>) -> Reply {
    changing(shared, move |s| {
        if let Err(reply) = check_proof(s, &r) {
            return reply;
        }
        let result = lock(&s.coord).register(r, Instant::now());
        match result {
            Ok((worker, shard)) => json(&Registered {
                worker,
                shard,
                run_key: s.config.run_key.clone(),
                run_id: s.config.run_id.clone(),
                heartbeat_ms: (s.config.lease.as_millis() as u64 / 8).max(50),
            }),
            Err(e) => coord_error(e),
        }
    })
    .await
}

/// `POST /v1/heartbeat`: a worker renews its lease. Renewing changes
/// nothing worth saving, so only a refusal wakes the long polls.
async fn heartbeat(State(shared): Coord, JsonBody(h): JsonBody<Heartbeat>) -> Reply {
    blocking(shared, move |s| {
        let result = lock(&s.coord).heartbeat(h.worker, Instant::now());
        match result {
            Ok(epoch) => json(&HeartbeatReply { epoch }),
            Err(e) => {
                let reply = coord_error(e);
                s.after_change();
                reply
            }
        }
    })
    .await
}

/// `GET /v1/wiring?worker=W&after=E` (long poll): the worker's peers for
/// the first epoch after `E`; 204 when there is none yet.
async fn wiring(
    State(shared): Coord,
    query: Result<Query<WiringQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let Ok(Query(WiringQuery { worker, after })) = query else {
        return Reply::Text(400, "wiring needs ?worker=ID&after=EPOCH".into());
    };
    changing(shared, move |s| match s.poll(|c| c.wiring(worker, after)) {
        Ok(Some(mut w)) => {
            if w.finished.is_none() && (w.lanes.is_empty() || w.lanes.contains(&w.shard.1)) {
                w.traceparent = s.traces.wiring(w.epoch, w.step + 1);
            }
            json(&w)
        }
        Ok(None) => Reply::Empty(204),
        Err(e) => coord_error(e),
    })
    .await
}

/// `POST /v1/step` (long poll): a worker finished a step and waits at the
/// barrier; 204 when it is not decided yet.
async fn step(State(shared): Coord, JsonBody(d): JsonBody<StepDone>) -> Reply {
    changing(shared, move |s| {
        if let Err(reply) = check_step_signature(s, &d) {
            return reply;
        }
        let now = Instant::now;
        let first = lock(&s.coord).step_done(&d, now());
        s.after_change();
        let decided = match first {
            Ok(Some(b)) => Ok(Some(b)),
            Ok(None) => s.poll(|c| Ok(c.barrier(d.worker, d.epoch, d.completed, now()))),
            Err(e) => Err(e),
        };
        lock(&s.coord).finish_without_checkpoint(now());
        match decided {
            Ok(Some(mut b)) => {
                // (An answer with audit orders has not passed the barrier.)
                if b.proceed && b.audits.is_empty() {
                    b.traceparent = s.traces.barrier_passed(d.epoch, d.completed);
                    if b.checkpoint {
                        s.traces.checkpoint_ordered(d.completed);
                    }
                }
                json(&b)
            }
            Ok(None) => Reply::Empty(204),
            Err(e) => coord_error(e),
        }
    })
    .await
}

/// `POST /v1/audit` (long poll): a worker carried out an audit order; the
/// answer is the barrier's (204 while the step's audits are not decided),
/// which may carry further orders.
async fn audit(State(shared): Coord, JsonBody(r): JsonBody<AuditReport>) -> Reply {
    changing(shared, move |s| {
        let now = Instant::now;
        let first = lock(&s.coord).audit_report(&r, &s.config.run_id, now());
        s.after_change();
        let decided = match first {
            Ok(Some(b)) => Ok(Some(b)),
            Ok(None) => s.poll(|c| Ok(c.barrier(r.worker, r.epoch, r.completed, now()))),
            Err(e) => Err(e),
        };
        lock(&s.coord).finish_without_checkpoint(now());
        match decided {
            Ok(Some(mut b)) => {
                if b.proceed && b.audits.is_empty() {
                    b.traceparent = s.traces.barrier_passed(r.epoch, r.completed);
                    if b.checkpoint {
                        s.traces.checkpoint_ordered(r.completed);
                    }
                }
                json(&b)
            }
            Ok(None) => Reply::Empty(204),
            Err(e) => coord_error(e),
        }
    })
    .await
}

/// The audit and worker of `/v1/audit/{audit}/{suffix}?worker=W`; a 400
/// naming that form when the request is not of it.
fn audit_at(parts: &Parts, suffix: &str, what: &str) -> Result<(u64, u64), Reply> {
    #[derive(Deserialize)]
    struct Q {
        worker: u64,
    }
    let bad = || Reply::Text(400, format!("{what} /v1/audit/AUDIT/{suffix}?worker=ID"));
    let audit = parts
        .uri
        .path()
        .strip_prefix("/v1/audit/")
        .and_then(|p| p.strip_suffix(suffix))
        .and_then(|p| p.strip_suffix('/'))
        .and_then(|a| a.parse().ok())
        .ok_or_else(bad)?;
    let Query(q) = Query::<Q>::try_from_uri(&parts.uri).map_err(|_| bad())?;
    Ok((audit, q.worker))
}

/// `/v1/audit/{audit}/evidence?worker=W`.
struct EvidenceAt {
    audit: u64,
    worker: u64,
}

impl<S: Send + Sync> FromRequestParts<S> for EvidenceAt {
    type Rejection = Reply;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Reply> {
        let (audit, worker) = audit_at(parts, "evidence", "evidence needs")?;
        Ok(EvidenceAt { audit, worker })
    }
}

/// `PUT /v1/audit/{audit}/evidence?worker=W`: the audited worker's
/// payloads for the audited micro-batch (a safetensors file), or for a
/// contribution audit the set of every micro-batch it ran (at most
/// [`Shared::evidence_limit`] bytes per micro-batch).
async fn put_evidence(State(shared): Coord, at: EvidenceAt, RawBody(body): RawBody) -> Reply {
    changing(shared, move |s| {
        let limit = s.evidence_limit;
        let result =
            lock(&s.coord).put_evidence(at.worker, at.audit, body.to_vec(), limit, Instant::now());
        match result {
            Ok(()) => ok(),
            Err(e) => coord_error(e),
        }
    })
    .await
}

/// `GET /v1/audit/{audit}/evidence?worker=W` (long poll): the evidence for
/// a validator of the audit; 204 while it is not provided.
async fn get_evidence(State(shared): Coord, at: EvidenceAt) -> Reply {
    blocking(shared, move |s| {
        match s.poll(|c| c.evidence_for(at.worker, at.audit)) {
            Ok(Some(b)) => Reply::Bytes(b),
            Ok(None) => Reply::Empty(204),
            Err(e) => coord_error(e),
        }
    })
    .await
}

/// `/v1/audit/{audit}/weights?worker=W`.
struct WeightsAt {
    audit: u64,
    worker: u64,
}

impl<S: Send + Sync> FromRequestParts<S> for WeightsAt {
    type Rejection = Reply;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Reply> {
        let (audit, worker) = audit_at(parts, "weights", "weights need")?;
        Ok(WeightsAt { audit, worker })
    }
}

/// `/v1/audit/{audit}/receipt?worker=W&signature=S`.
struct ReceiptAt {
    audit: u64,
    worker: u64,
    signature: String,
}

impl<S: Send + Sync> FromRequestParts<S> for ReceiptAt {
    type Rejection = Reply;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Reply> {
        #[derive(Deserialize)]
        struct Q {
            signature: String,
        }
        let what = "a receipt needs";
        let (audit, worker) = audit_at(parts, "receipt", what)?;
        let Query(q) = Query::<Q>::try_from_uri(&parts.uri).map_err(|_| {
            Reply::Text(
                400,
                format!("{what} /v1/audit/AUDIT/receipt?worker=ID&signature=HEX"),
            )
        })?;
        Ok(ReceiptAt {
            audit,
            worker,
            signature: q.signature,
        })
    }
}

/// The run's id, as the coordinator's configuration gives it in hex.
fn run_id(s: &Shared) -> Result<crate::link::RunId, Reply> {
    let mut run = [0u8; 16];
    hex::decode_to_slice(&s.config.run_id, &mut run)
        .map_err(|_| Reply::Text(500, "the coordinator's run id is not hex".into()))?;
    Ok(crate::link::RunId(run))
}

/// `PUT /v1/audit/{audit}/receipt?worker=W&signature=S`: a contribution
/// audit's validator proves what the audited replica sent it in the
/// step's gathers with the frames it received (`sync::receipt`), signed
/// by its identity. The frames are checked on this request's thread,
/// outside the state machine's lock: each signature, and that they are a
/// whole contribution of at most the model's parameters.
async fn put_receipt(State(shared): Coord, at: ReceiptAt, RawBody(body): RawBody) -> Reply {
    changing(shared, move |s| {
        let run = match run_id(s) {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        let author = lock(&s.coord).receipt_job(
            at.worker,
            at.audit,
            &body,
            &at.signature,
            &run,
            Instant::now(),
        );
        let author = match author {
            Ok(a) => a,
            Err(e) => return coord_error(e),
        };
        // The weights' limit is 16 bytes a parameter of the whole model.
        let max_elements = (s.weights_body_limit / 16) as u64 + 1;
        let proven = crate::sync::receipt::verify(&body, &author, max_elements);
        let done =
            lock(&s.coord).receipt_done(at.worker, at.audit, &author, proven, Instant::now());
        match done {
            Ok(()) => ok(),
            Err(e) => coord_error(e),
        }
    })
    .await
}

async fn receipt_method(_: ReceiptAt) -> Reply {
    Reply::Text(405, "a receipt takes PUT".into())
}

/// `PUT /v1/audit/{audit}/weights?worker=W`: a replica ordered to (a
/// disputed micro-batch audit with no second validator, or any audit of a
/// stage with one training replica) uploads its stage's parameters of
/// before the step. One upload at a time is taken: the coordinator checks
/// their digest against the agreed one (the replicas' committed digest,
/// the sole replica's own, or at the first step the initial parameters')
/// and recomputes the micro-batch on this request's thread, outside the
/// state machine's lock; the answer comes once it is done.
async fn put_weights(State(shared): Coord, at: WeightsAt, RawBody(body): RawBody) -> Reply {
    changing(shared, move |s| {
        let mut referees = lock(&s.referee);
        if s.referee.is_poisoned() {
            // A recomputation panicked: its stage may hold micro-batches
            // in flight. Every kept stage is built again.
            referees.clear();
            s.referee.clear_poison();
        }
        let job = lock(&s.coord).referee_job(at.worker, at.audit);
        let job = match job {
            Ok(Some(j)) => j,
            Ok(None) => return ok(),
            Err(e) => return coord_error(e),
        };
        let t = Instant::now();
        let result = s.recompute_disputed(&mut referees, &job, &body);
        let seconds = t.elapsed().as_secs_f64();
        let done =
            lock(&s.coord).referee_done(at.worker, at.audit, result, seconds, Instant::now());
        match done {
            Ok(()) => ok(),
            Err(e) => coord_error(e),
        }
    })
    .await
}

async fn weights_method(_: WeightsAt) -> Reply {
    Reply::Text(405, "weights take PUT".into())
}

async fn evidence_method(_: EvidenceAt) -> Reply {
    Reply::Text(405, "evidence takes GET or PUT".into())
}

/// The largest complaint accepted: one frame, the largest of an
/// activation block of a micro-batch (within the evidence limit), a tied
/// embedding gradient (`vocab × dim` f32) and a gradient ring segment,
/// plus room for its header.
fn complaint_limit(shared: &Shared) -> usize {
    let m = &shared.config.model;
    let tied = m.vocab.saturating_mul(m.dim).saturating_mul(4);
    let largest = tied.max(crate::sync::SEGMENT_BYTES);
    shared.evidence_limit.max(largest.saturating_add(64 << 10))
}

/// `POST /v1/complaint?worker=W&epoch=E`.
#[derive(Deserialize)]
struct ComplaintQuery {
    worker: u64,
    epoch: u64,
}

/// `POST /v1/complaint?worker=W&epoch=E`: a worker shows the signed
/// pipeline frame it refused in epoch `E`, encoded as it arrived
/// (`coord::complaint`); the answer names the author convicted, or the
/// refusal of the complaint.
async fn complaint(
    State(shared): Coord,
    Query(q): Query<ComplaintQuery>,
    RawBody(body): RawBody,
) -> Reply {
    changing(shared, move |s| {
        let (mut key, mut run) = ([0u8; 32], [0u8; 16]);
        if hex::decode_to_slice(&s.config.run_key, &mut key).is_err()
            || hex::decode_to_slice(&s.config.run_id, &mut run).is_err()
        {
            return Reply::Text(500, "the coordinator's run key or id is not hex".into());
        }
        let result = lock(&s.coord).complaint(
            q.worker,
            q.epoch,
            &body,
            &crate::link::RunKey(key),
            &crate::link::RunId(run),
            Instant::now(),
        );
        match result {
            Ok(super::state::ComplaintVerdict::Convicted { shard, worker }) => Reply::Text(
                200,
                format!(
                    "convicted worker {worker} (stage {} replica {}), the frame's author",
                    shard.0, shard.1
                ),
            ),
            Ok(super::state::ComplaintVerdict::AlreadyConvicted) => {
                Reply::Text(200, "the frame's author was convicted before".into())
            }
            Err(e) => coord_error(e),
        }
    })
    .await
}

/// `POST /v1/broken`: after a step broke off, a worker reports the signed
/// headers of the frames it took and its suspects; the answer says how
/// many rechecks it caused (`coord::complaint`).
async fn broken(
    State(shared): Coord,
    JsonBody(b): JsonBody<super::complaint_api::BrokenStep>,
) -> Reply {
    changing(shared, move |s| {
        let run = match run_id(s) {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        let result = lock(&s.coord).broken_step(&b, &run, Instant::now());
        match result {
            Ok(n) => Reply::Text(200, format!("{n} recheck(s) ordered")),
            Err(e) => coord_error(e),
        }
    })
    .await
}

/// `POST /v1/recheck`: a validator's signed verdict on a recheck.
async fn recheck(
    State(shared): Coord,
    JsonBody(r): JsonBody<super::complaint_api::RecheckReport>,
) -> Reply {
    changing(shared, move |s| {
        let result = lock(&s.coord).recheck_report(&r, &s.config.run_id, Instant::now());
        match result {
            Ok(()) => ok(),
            Err(e) => coord_error(e),
        }
    })
    .await
}

/// `POST /v1/fail`: a worker reports an error (fatal or not).
async fn fail(State(shared): Coord, JsonBody(f): JsonBody<Failure>) -> Reply {
    changing(shared, move |s| {
        if f.fatal {
            tracing::error!("worker {} failed: {}", f.worker, f.error);
        } else {
            tracing::warn!("worker {}: {}", f.worker, f.error);
        }
        let result = lock(&s.coord).fail(&f, Instant::now());
        match result {
            Ok(()) => ok(),
            Err(e) => coord_error(e),
        }
    })
    .await
}

/// `PUT /v1/state/{stage}?epoch=E`: a live replica hands its stage state
/// to a new one. Only the current epoch's hand-offs are kept.
async fn put_state(State(shared): Coord, at: StateAt, RawBody(body): RawBody) -> Reply {
    changing(shared, move |s| {
        let mut h = lock(&s.handoff);
        h.retain(|(e, _), _| *e >= at.epoch);
        h.insert((at.epoch, at.stage), Arc::new(body.to_vec()));
        ok()
    })
    .await
}

/// `GET /v1/state/{stage}?epoch=E` (long poll): the state handed off for
/// the new replica; 204 when it has not arrived yet, 409 once the epoch is
/// over.
async fn get_state(State(shared): Coord, at: StateAt) -> Reply {
    changing(shared, move |s| {
        let StateAt { stage, epoch } = at;
        let found = s.poll(|c| {
            if c.epoch() != epoch {
                return Err(CoordError::Invalid(format!(
                    "epoch {epoch} is over (now {})",
                    c.epoch()
                )));
            }
            Ok(lock(&s.handoff).get(&(epoch, stage)).cloned())
        });
        match found {
            Ok(Some(b)) => Reply::Bytes(b),
            Ok(None) => Reply::Empty(204),
            Err(e) => Reply::Text(409, e.to_string()),
        }
    })
    .await
}

async fn state_method(_: StateAt) -> Reply {
    Reply::Text(405, "state takes GET or PUT".into())
}

/// `PUT /v1/checkpoint/{stage}?step=N&worker=ID`: a stage's part of the
/// pending checkpoint, from its writer, written to the checkpoint's
/// temporary directory as it arrives (the coordinator never holds a part
/// in memory), checked from its header, then kept; the last part commits
/// the checkpoint.
async fn put_checkpoint(State(shared): Coord, at: CheckpointAt, body: axum::body::Body) -> Reply {
    let target = {
        let at = at.clone();
        tokio::task::spawn_blocking({
            let shared = shared.clone();
            move || checkpoint_part_path(&shared, &at)
        })
        .await
    };
    let path = match target {
        Ok(Ok(p)) => p,
        Ok(Err(reply)) => return reply,
        Err(e) => return Reply::Text(500, format!("request handler failed: {e}")),
    };
    // Its own name per upload, so a retried upload never meets one still
    // arriving.
    static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = path.with_extension(format!("{n}.partial"));
    if let Err(reply) = receive_to_file(body, &partial).await {
        let _ = std::fs::remove_file(&partial);
        return reply;
    }
    changing(shared, move |s| {
        store_checkpoint_part(s, &at, &path, &partial)
    })
    .await
}

/// Writes a request body to `path` as it arrives, refusing one over
/// [`MAX_STATE`] bytes.
async fn receive_to_file(mut body: axum::body::Body, path: &std::path::Path) -> Result<(), Reply> {
    use axum::body::HttpBody;
    use std::io::Write;
    let failed = |e: std::io::Error| Reply::Text(500, format!("writing {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let mut file =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).map_err(failed)?);
    let mut received = 0usize;
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame.map_err(|e| Reply::Text(400, format!("reading the body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            received += data.len();
            if received > MAX_STATE {
                return Err(Reply::Text(
                    413,
                    format!("body larger than {MAX_STATE} bytes"),
                ));
            }
            file.write_all(&data).map_err(failed)?;
        }
    }
    file.flush().map_err(failed)
}

/// Where the part `at` names goes, once its uploader is known to be the
/// writer of that stage's part of a pending checkpoint.
fn checkpoint_part_path(shared: &Shared, at: &CheckpointAt) -> Result<std::path::PathBuf, Reply> {
    let (stage, step) = (at.stage, at.step);
    let Some(worker) = at.worker else {
        return Err(Reply::Text(
            400,
            "checkpoint upload needs &worker=ID".into(),
        ));
    };
    let Some(ctx) = &shared.config.checkpoint else {
        return Err(Reply::Text(409, "this run keeps no checkpoints".into()));
    };
    match lock(&shared.coord).checkpoint_stage(worker, step) {
        Ok(s) if s == stage => {}
        Ok(s) => {
            return Err(Reply::Text(
                400,
                format!("worker {worker} serves stage {s}, not {stage}"),
            ))
        }
        Err(e) => return Err(coord_error(e)),
    }
    Ok(checkpoint::tmp_dir(&ctx.root, step).join(format!("stage-{stage}.safetensors")))
}

/// Keeps the part received in `partial` as `path` once its writer is
/// still the one expected and its header fits the stage; a part that does
/// not is removed.
fn store_checkpoint_part(
    shared: &Shared,
    at: &CheckpointAt,
    path: &std::path::Path,
    partial: &std::path::Path,
) -> Reply {
    let stage = at.stage;
    let Some(worker) = at.worker else {
        return Reply::Text(400, "checkpoint upload needs &worker=ID".into());
    };
    // The plan may have moved on while the part arrived.
    if let Err(reply) = checkpoint_part_path(shared, at) {
        let _ = std::fs::remove_file(partial);
        return reply;
    }
    let Some(ctx) = &shared.config.checkpoint else {
        return Reply::Text(409, "this run keeps no checkpoints".into());
    };
    // Refuse a part that is not this stage's state before it is kept.
    let params_ok = {
        let all = lock(&shared.coord).layout().stage_layers.clone();
        let layers = all.get(stage).cloned().unwrap_or(0..0);
        let rank = ctx
            .meta
            .manifest
            .spec
            .pipeline
            .lowrank_rank(ctx.meta.model.dim);
        let tensors = checkpoint::stream::stage_tensors(
            &ctx.meta.model,
            stage,
            all.len(),
            layers,
            ctx.meta.seed,
            rank,
        );
        checkpoint::stream::check_stage_file(partial, &tensors).map_err(|e| e.to_string())
    };
    if let Err(e) = params_ok {
        let _ = std::fs::remove_file(partial);
        return Reply::Text(400, format!("not a state of stage {stage}: {e}"));
    }
    if let Err(e) = std::fs::rename(partial, path) {
        return Reply::Text(500, format!("writing {}: {e}", path.display()));
    }
    let done = lock(&shared.coord).checkpoint_written(worker, at.step);
    match done {
        Ok(Some(step)) => {
            shared.commit_checkpoint(step);
            ok()
        }
        Ok(None) => ok(),
        Err(e) => coord_error(e),
    }
}

/// `GET /v1/checkpoint/{stage}?step=N`: a stage's file of a committed
/// checkpoint, for a worker restoring it.
async fn get_checkpoint(State(shared): Coord, at: CheckpointAt) -> Reply {
    changing(shared, move |s| {
        let CheckpointAt { stage, step, .. } = at;
        let Some(ctx) = &s.config.checkpoint else {
            return Reply::Text(409, "this run keeps no checkpoints".into());
        };
        if stage >= ctx.meta.stage_layers.len() {
            return Reply::Text(400, format!("no stage {stage} in this run"));
        }
        let path = checkpoint::step_dir(&ctx.root, step).join(format!("stage-{stage}.safetensors"));
        match std::fs::read(&path) {
            Ok(b) => Reply::Bytes(Arc::new(b)),
            Err(e) => Reply::Text(409, format!("checkpoint file {}: {e}", path.display())),
        }
    })
    .await
}

async fn checkpoint_method(_: CheckpointAt) -> Reply {
    Reply::Text(405, "checkpoint takes GET or PUT".into())
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;
    use crate::coord::server::Config;
    use crate::model::ModelConfig;

    pub(in crate::coord) const TOKEN: &str = "let-me-in";

    /// A coordinator of the quickstart run (two stages, one replica, no
    /// checkpoints) with its state file in `dir`.
    pub(in crate::coord) fn coordinator(dir: &std::path::Path) -> Arc<Shared> {
        coordinator_with(dir, None)
    }

    /// The same, booking into the ledger at `ledger`.
    pub(in crate::coord) fn coordinator_with(
        dir: &std::path::Path,
        ledger: Option<std::path::PathBuf>,
    ) -> Arc<Shared> {
        let mut manifest =
            pipewright_spec::parse_manifest(include_str!("../../../examples/quickstart.yaml"))
                .expect("quickstart manifest");
        // The handler tests send reports by hand and carry out no audit
        // order: a drawn audit would hold the barrier (whether one is drawn
        // at step 1 depends on how soon the initial digests are known).
        manifest.spec.validation.audit_rate = 0.0;
        let model = ModelConfig::from_spec(&manifest.spec.model, 256);
        Arc::new(
            Shared::new(Config {
                manifest,
                token: TOKEN.into(),
                run_key: "0".repeat(64),
                run_id: "1".repeat(32),
                lease: Duration::from_secs(60),
                state_dir: dir.to_path_buf(),
                checkpoint: None,
                model,
                ledger,
            })
            .expect("coordinator"),
        )
    }

    #[test]
    fn a_panicking_handler_answers_500_is_counted_and_the_server_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = coordinator(dir.path());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let reply = runtime.block_on(blocking(c.clone(), |s| {
            // Poisons the state's lock on the way out, as a real bug would.
            let _held = lock(&s.coord);
            panic!("a bug in a handler")
        }));
        assert!(matches!(reply, Reply::Text(500, _)));
        let (status, text) = send(&c, request(Method::GET, "/metrics", None, ""));
        assert_eq!(status, StatusCode::OK);
        assert!(
            text.lines()
                .any(|l| l == "pipewright_handler_panics_total 1"),
            "{text}"
        );
        let (status, _) = send(&c, request(Method::GET, "/status", None, ""));
        assert_eq!(status, StatusCode::OK);
    }

    /// Sends one request through the router: (status, body as text).
    pub(in crate::coord) fn send(
        shared: &Arc<Shared>,
        request: axum::http::Request<Body>,
    ) -> (StatusCode, String) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let response = router(shared.clone())
                .oneshot(request)
                .await
                .expect("infallible");
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("body");
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    }

    pub(in crate::coord) fn request(
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: &str,
    ) -> axum::http::Request<Body> {
        let mut b = axum::http::Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(Body::from(body.to_owned())).expect("request")
    }

    /// A registration for `stage` by `id`, with a proof over a challenge
    /// fetched from `c`.
    pub(in crate::coord) fn register_body(
        c: &Arc<Shared>,
        stage: usize,
        id: &crate::identity::Identity,
    ) -> String {
        let (code, text) = send(c, request(Method::POST, "/v1/challenge", Some(TOKEN), ""));
        assert_eq!(code, StatusCode::OK, "{text}");
        let nonce = serde_json::from_str::<Challenge>(&text)
            .expect("challenge")
            .nonce;
        let public_key = id.public_hex();
        let message = register_message(&c.config.run_id, &nonce, &public_key);
        serde_json::to_string(&Register {
            stage: Some(stage),
            replica: Some(0),
            pipe_addr: "w:1".into(),
            ring_addr: "w:2".into(),
            name: format!("w{stage}"),
            identity: Some(super::super::api::IdentityProof {
                signature: id.sign(crate::identity::REGISTER_DOMAIN, &message),
                public_key,
                nonce,
            }),
            ..Register::default()
        })
        .expect("json")
    }

    #[test]
    fn a_missing_or_wrong_token_is_refused_with_401() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = coordinator(dir.path());
        for token in [None, Some("guess"), Some("let-me-in-please")] {
            let (code, text) = send(&c, request(Method::POST, "/v1/register", token, "{}"));
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{token:?}: {text}");
            assert!(text.contains("join token"), "{text}");
            // Unknown endpoints under /v1/ say nothing before the token.
            let (code, _) = send(&c, request(Method::GET, "/v1/nothing", token, ""));
            assert_eq!(code, StatusCode::UNAUTHORIZED);
        }
        assert!(c
            .metrics
            .render(&lock(&c.coord).status(Instant::now()), &Default::default())
            .contains("pipewright_rejected_requests_total 6"));
        // Nothing registered.
        assert!(lock(&c.coord).workers().is_empty());
    }

    #[test]
    fn a_malformed_body_is_refused_with_400_naming_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = coordinator(dir.path());
        let (code, text) = send(
            &c,
            request(Method::POST, "/v1/register", Some(TOKEN), r#"{"stage": 0}"#),
        );
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(
            text.contains("malformed request") && text.contains("pipe_addr"),
            "{text}"
        );
        let (code, text) = send(
            &c,
            request(Method::POST, "/v1/heartbeat", Some(TOKEN), "not json"),
        );
        assert_eq!(code, StatusCode::BAD_REQUEST, "{text}");
        let (code, text) = send(
            &c,
            request(Method::GET, "/v1/wiring?worker=1", Some(TOKEN), ""),
        );
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(text.contains("after=EPOCH"), "{text}");
        let (code, text) = send(
            &c,
            request(Method::GET, "/v1/state/x?epoch=1", Some(TOKEN), ""),
        );
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(text.contains("STAGE"), "{text}");
    }

    #[test]
    fn a_body_declared_too_large_is_refused_with_413_before_the_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = coordinator(dir.path());
        let big = axum::http::Request::builder()
            .method(Method::POST)
            .uri("/v1/register")
            .header(header::CONTENT_LENGTH, (MAX_JSON + 1).to_string())
            .body(Body::empty())
            .expect("request");
        let (code, text) = send(&c, big);
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(text.contains("larger than"), "{text}");
        // A body that is too large without saying so is cut off while read.
        let long = format!("\"{}\"", "x".repeat(MAX_JSON));
        let (code, _) = send(&c, request(Method::POST, "/v1/fail", Some(TOKEN), &long));
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn audit_endpoints_want_the_token_bound_their_bodies_and_refuse_strangers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = coordinator(dir.path());
        let uri = "/v1/audit/1/evidence?worker=1";
        // No token: 401, whatever the path.
        let (code, _) = send(&c, request(Method::GET, uri, None, ""));
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        // Evidence larger than a micro-batch's payloads can be: 413.
        let big = axum::http::Request::builder()
            .method(Method::PUT)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header(
                header::CONTENT_LENGTH,
                (c.evidence_body_limit + 1).to_string(),
            )
            .body(Body::empty())
            .expect("request");
        let (code, text) = send(&c, big);
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
        assert!(
            c.evidence_limit > MAX_JSON,
            "room for a micro-batch's payloads"
        );
        // A worker the coordinator does not know: 404; a bad query: 400.
        let (code, text) = send(&c, request(Method::PUT, uri, Some(TOKEN), "junk"));
        assert_eq!(code, StatusCode::NOT_FOUND, "{text}");
        let (code, _) = send(&c, request(Method::GET, uri, Some(TOKEN), ""));
        assert_eq!(code, StatusCode::NOT_FOUND);
        for bad in ["/v1/audit/x/evidence?worker=1", "/v1/audit/1/evidence"] {
            let (code, text) = send(&c, request(Method::GET, bad, Some(TOKEN), ""));
            assert_eq!(code, StatusCode::BAD_REQUEST, "{bad}: {text}");
        }
        let (code, _) = send(&c, request(Method::POST, uri, Some(TOKEN), ""));
        assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
        // A malformed report: 400 naming the problem.
        let (code, text) = send(
            &c,
            request(Method::POST, "/v1/audit", Some(TOKEN), r#"{"worker":1}"#),
        );
        assert_eq!(code, StatusCode::BAD_REQUEST, "{text}");
        assert!(text.contains("epoch"), "{text}");
        let report =
            r#"{"worker":1,"epoch":1,"completed":1,"audit":1,"result":{"kind":"provided"}}"#;
        let (code, _) = send(&c, request(Method::POST, "/v1/audit", Some(TOKEN), report));
        assert_eq!(code, StatusCode::NOT_FOUND);
        let (_, text) = send(&c, request(Method::GET, "/metrics", None, ""));
        assert!(
            text.contains("pipewright_requests_total{path=\"/v1/audit\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("pipewright_requests_total{path=\"/v1/audit/evidence\"}"),
            "{text}"
        );
    }

    #[test]
    fn unknown_paths_and_methods_are_404_and_stage_endpoints_405() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = coordinator(dir.path());
        let (code, text) = send(&c, request(Method::GET, "/nothing", None, ""));
        assert_eq!(
            (code, text.as_str()),
            (StatusCode::NOT_FOUND, "no such endpoint: /nothing")
        );
        let (code, text) = send(&c, request(Method::POST, "/healthz", None, ""));
        assert_eq!(code, StatusCode::NOT_FOUND, "{text}");
        let (code, text) = send(&c, request(Method::GET, "/v1/nothing", Some(TOKEN), ""));
        assert_eq!(
            (code, text.as_str()),
            (StatusCode::NOT_FOUND, "no such endpoint: GET /v1/nothing")
        );
        let (code, _) = send(&c, request(Method::GET, "/v1/register", Some(TOKEN), ""));
        assert_eq!(code, StatusCode::NOT_FOUND);
        let (code, text) = send(
            &c,
            request(Method::DELETE, "/v1/state/0?epoch=1", Some(TOKEN), ""),
        );
        assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED, "{text}");
        let (code, text) = send(
            &c,
            request(Method::GET, "/v1/checkpoint/0?step=4", Some(TOKEN), ""),
        );
        assert_eq!(code, StatusCode::CONFLICT, "{text}");
    }

    #[test]
    fn a_stage_state_handed_off_in_this_epoch_comes_back_and_another_epoch_is_409() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = coordinator(dir.path());
        let epoch = lock(&c.coord).epoch();
        let put = format!("/v1/state/1?epoch={epoch}");
        let (code, text) = send(&c, request(Method::PUT, &put, Some(TOKEN), "weights"));
        assert_eq!((code, text.as_str()), (StatusCode::OK, "{}"));
        let (code, text) = send(&c, request(Method::GET, &put, Some(TOKEN), ""));
        assert_eq!((code, text.as_str()), (StatusCode::OK, "weights"));
        let other = format!("/v1/state/1?epoch={}", epoch + 1);
        let (code, text) = send(&c, request(Method::GET, &other, Some(TOKEN), ""));
        assert_eq!(code, StatusCode::CONFLICT, "{text}");
        assert!(text.contains("is over"), "{text}");
    }

    #[test]
    fn register_then_status_and_heartbeat_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = coordinator(dir.path());
        let (code, text) = send(&c, request(Method::GET, "/healthz", None, ""));
        assert_eq!((code, text.as_str()), (StatusCode::OK, "ok\n"));

        let (code, text) = send(
            &c,
            request(
                Method::POST,
                "/v1/register",
                Some(TOKEN),
                &register_body(&c, 1, &crate::identity::Identity::from_secret([1; 32])),
            ),
        );
        assert_eq!(code, StatusCode::OK, "{text}");
        let got: Registered = serde_json::from_str(&text).expect("Registered");
        assert_eq!(got.shard, Some((1, 0)));
        assert_eq!(got.run_key, "0".repeat(64));
        // A lease of 60 s: a heartbeat every 7.5 s.
        assert_eq!(got.heartbeat_ms, 7500);
        // The registration is saved for a restarted coordinator.
        let saved = crate::coord::persist::load_state(dir.path()).expect("state file");
        assert!(saved.is_some());

        let (code, text) = send(&c, request(Method::GET, "/status", None, ""));
        assert_eq!(code, StatusCode::OK);
        let status: serde_json::Value = serde_json::from_str(&text).expect("status json");
        let shard = status["shards"]
            .as_array()
            .expect("shards")
            .iter()
            .find(|s| s["stage"] == 1)
            .expect("stage 1");
        assert_eq!(shard["worker"], got.worker);
        assert_eq!(shard["name"], "w1");

        let beat = format!(r#"{{"worker": {}}}"#, got.worker);
        let (code, text) = send(
            &c,
            request(Method::POST, "/v1/heartbeat", Some(TOKEN), &beat),
        );
        assert_eq!(code, StatusCode::OK, "{text}");
        let reply: HeartbeatReply = serde_json::from_str(&text).expect("HeartbeatReply");
        assert_eq!(reply.epoch, lock(&c.coord).epoch());
        let (code, _) = send(
            &c,
            request(
                Method::POST,
                "/v1/heartbeat",
                Some(TOKEN),
                r#"{"worker": 999}"#,
            ),
        );
        assert_eq!(code, StatusCode::NOT_FOUND);

        let (code, text) = send(&c, request(Method::GET, "/metrics", None, ""));
        assert_eq!(code, StatusCode::OK);
        assert!(text.contains("pipewright_workers_live 1"), "{text}");
        assert!(
            text.contains(r#"pipewright_requests_total{path="/v1/register"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn the_run_page_and_the_history_are_open_and_the_page_loads_nothing_from_elsewhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = coordinator(dir.path());
        let response = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(router(c.clone()).oneshot(request(Method::GET, "/", None, "")))
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
        let h = response.headers();
        assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let policy = h[header::CONTENT_SECURITY_POLICY].to_str().expect("ascii");
        assert!(policy.contains("default-src 'none'") && policy.contains("connect-src 'self'"));
        let (_, page) = send(&c, request(Method::GET, "/", None, ""));
        assert!(page.contains(r#"id="step""#), "{page}");
        // Nothing from another origin, and no markup built from strings.
        for banned in [
            "https://",
            " src=",
            "stylesheet",
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
        ] {
            assert!(!page.contains(banned), "the page holds {banned}");
        }
        let (code, text) = send(&c, request(Method::GET, "/v1/history", None, ""));
        assert_eq!(code, StatusCode::OK, "{text}");
        let h: super::super::history::HistoryView = serde_json::from_str(&text).expect("history");
        assert!(h.steps.is_empty());
        let (code, _) = send(&c, request(Method::POST, "/v1/history", Some(TOKEN), ""));
        assert_eq!(code, StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_signed_step_report_of_step_zero_is_refused_with_400_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = coordinator(dir.path());
        let id = crate::identity::Identity::from_secret([7; 32]);
        let (code, text) = send(
            &c,
            request(
                Method::POST,
                "/v1/register",
                Some(TOKEN),
                &register_body(&c, 0, &id),
            ),
        );
        assert_eq!(code, StatusCode::OK, "{text}");
        let worker = serde_json::from_str::<Registered>(&text)
            .expect("Registered")
            .worker;
        let mbs = lock(&c.coord).routed_to(worker);
        let signed = |completed: u64| {
            let report = super::super::ledger_tests::report(&c, worker, 0, completed, &mbs, &id);
            serde_json::to_string(&report).expect("json")
        };
        for completed in [0, u64::MAX] {
            let (code, text) = send(
                &c,
                request(Method::POST, "/v1/step", Some(TOKEN), &signed(completed)),
            );
            assert_eq!(code, StatusCode::BAD_REQUEST, "{text}");
            assert!(text.contains("completed must be 1 to"), "{text}");
        }
        let metrics = c
            .metrics
            .render(&lock(&c.coord).status(Instant::now()), &Default::default());
        assert!(
            metrics.contains("pipewright_rejected_requests_total 2"),
            "{metrics}"
        );
        assert_eq!(lock(&c.coord).committed(), 0);
    }
}
