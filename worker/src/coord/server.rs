//! The coordinator process: the state machine behind an HTTP API, a lease
//! sweeper, checkpoint commits and a state file that outlives restarts.
//!
//! HTTP is served by axum on a small tokio runtime of its own; every request
//! is handled on tokio's blocking pool, so long polls (which wait on the
//! state machine's condition variable) never starve other requests such as
//! heartbeats.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::{Failure, Heartbeat, HeartbeatReply, Register, Registered, StepDone};
use super::state::{CoordError, Coordinator, Persisted, Phase, Status};
use crate::checkpoint::{self, Meta};
use crate::data::Tokenizer;
use crate::model::ModelConfig;

/// How long a long-polling request waits before answering "not yet" (the
/// client asks again).
const POLL: Duration = Duration::from_secs(5);
/// Largest JSON body accepted.
const MAX_JSON: u64 = 1 << 20;
/// Largest stage state accepted for a hand-off.
const MAX_STATE: u64 = 1 << 36;

/// What the checkpoint commit needs beyond the state machine.
pub struct CheckpointContext {
    /// Run directory.
    pub root: PathBuf,
    /// Metadata shared by every checkpoint of the run (step and losses are
    /// filled in at commit).
    pub meta: Meta,
    /// The run's tokenizer.
    pub tokenizer: Tokenizer,
    /// Checkpoints to keep (0: all).
    pub keep: usize,
}

/// Everything a coordinator is started with.
pub struct Config {
    /// The run, as workers receive it.
    pub manifest: pipewright_spec::TrainingRun,
    /// Join token workers present.
    pub token: String,
    /// Run key (hex) handed to registered workers.
    pub run_key: String,
    /// Run id (hex).
    pub run_id: String,
    /// Lease after which a silent worker is lost.
    pub lease: Duration,
    /// Directory for the state file.
    pub state_dir: PathBuf,
    /// Checkpoints (`None`: the run keeps none).
    pub checkpoint: Option<CheckpointContext>,
    /// Model shape (for stage layer ranges).
    pub model: ModelConfig,
}

struct Metrics {
    registry: Registry,
    step: Gauge,
    loss: Gauge<f64, AtomicU64>,
    tokens_per_second: Gauge<f64, AtomicU64>,
    epoch: Gauge,
    reassignments: Gauge,
    workers: Gauge,
    phase: Family<Vec<(String, String)>, Gauge>,
    bubble: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>,
    requests: Family<Vec<(String, String)>, Counter>,
    rejected: Counter,
    rejected_frames: Gauge,
    shard_micro_batches: Family<Vec<(String, String)>, Gauge>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("pipewright");
        let m = Metrics {
            registry: Registry::default(),
            step: Gauge::default(),
            loss: Gauge::default(),
            tokens_per_second: Gauge::default(),
            epoch: Gauge::default(),
            reassignments: Gauge::default(),
            workers: Gauge::default(),
            phase: Family::default(),
            bubble: Family::default(),
            requests: Family::default(),
            rejected: Counter::default(),
            rejected_frames: Gauge::default(),
            shard_micro_batches: Family::default(),
        };
        registry.register("step", "Steps completed by every worker", m.step.clone());
        registry.register(
            "loss",
            "Mean training loss of the last committed step",
            m.loss.clone(),
        );
        registry.register(
            "tokens_per_second",
            "Training tokens per second over recent steps",
            m.tokens_per_second.clone(),
        );
        registry.register("epoch", "Wiring generation of the run", m.epoch.clone());
        registry.register(
            "reassignments",
            "Shards given to a new worker after theirs was lost",
            m.reassignments.clone(),
        );
        registry.register(
            "workers_live",
            "Shards with a live worker",
            m.workers.clone(),
        );
        registry.register("phase", "1 for the run's current phase", m.phase.clone());
        registry.register(
            "stage_bubble_ratio",
            "Fraction of its last step a stage's slowest worker waited",
            m.bubble.clone(),
        );
        registry.register("requests", "API requests by endpoint", m.requests.clone());
        registry.register(
            "rejected_requests",
            "Requests refused for a missing or wrong join token or a malformed body",
            m.rejected.clone(),
        );
        registry.register(
            "rejected_frames",
            "Frames the live workers' links refused (malformed, forged, wrong sender) in this epoch",
            m.rejected_frames.clone(),
        );
        registry.register(
            "shard_micro_batches",
            "Micro-batches a shard ran in its last step (its share under routing: throughput)",
            m.shard_micro_batches.clone(),
        );
        Metrics { registry, ..m }
    }

    fn render(&self, s: &Status) -> String {
        self.step.set(s.step as i64);
        self.loss.set(s.loss.map_or(f64::NAN, f64::from));
        self.tokens_per_second.set(s.tokens_per_second);
        self.epoch.set(s.epoch as i64);
        self.reassignments.set(s.reassignments as i64);
        self.workers
            .set(s.shards.iter().filter(|x| x.worker.is_some()).count() as i64);
        self.rejected_frames
            .set(s.shards.iter().map(|x| x.rejected_frames as i64).sum());
        for p in [
            Phase::Pending,
            Phase::Initializing,
            Phase::Training,
            Phase::Checkpointing,
            Phase::Succeeded,
            Phase::Failed,
        ] {
            self.phase
                .get_or_create(&vec![("phase".into(), format!("{p:?}"))])
                .set(i64::from(p == s.phase));
        }
        for st in &s.stages {
            self.bubble
                .get_or_create(&vec![("stage".into(), st.stage.to_string())])
                .set(st.bubble);
        }
        for sh in &s.shards {
            self.shard_micro_batches
                .get_or_create(&vec![
                    ("stage".into(), sh.stage.to_string()),
                    ("replica".into(), sh.replica.to_string()),
                ])
                .set(sh.micro_batches as i64);
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Stage states handed from a live replica to a new one, by (epoch, stage).
type Handoffs = HashMap<(u64, usize), Arc<Vec<u8>>>;

struct Shared {
    coord: Mutex<Coordinator>,
    changed: Condvar,
    config: Config,
    handoff: Mutex<Handoffs>,
    metrics: Metrics,
    written: Mutex<Option<Persisted>>,
}

/// A running coordinator.
pub struct Handle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Arc<tokio::sync::Notify>,
}

impl Handle {
    /// Address the API listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The run's status now.
    pub fn status(&self) -> Status {
        lock(&self.shared.coord).status(Instant::now())
    }

    /// Mean loss of each committed step.
    pub fn losses(&self) -> Vec<f32> {
        lock(&self.shared.coord).losses().to_vec()
    }

    /// Vacates `worker`'s slot at once (its process was seen to exit).
    pub fn lose(&self, worker: u64) {
        let mut c = lock(&self.shared.coord);
        if c.lose(worker, Instant::now()) {
            tracing::warn!("worker {worker} exited; epoch {}", c.epoch());
        }
        drop(c);
        self.shared.after_change();
    }

    /// Workers by id with their shard.
    pub fn workers(&self) -> std::collections::BTreeMap<u64, (usize, usize)> {
        lock(&self.shared.coord).workers()
    }

    /// Stops serving.
    pub fn shutdown(&self) {
        self.stop.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the state a previous coordinator of this run left in `dir`.
pub fn load_state(dir: &Path) -> Result<Option<Persisted>> {
    let path = dir.join("state.json");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!("{} is not a coordinator state file", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

impl Shared {
    /// Persists the state when it changed and wakes every long poll.
    fn after_change(&self) {
        let p = lock(&self.coord).persisted();
        let mut written = lock(&self.written);
        if written.as_ref() != Some(&p) {
            if let Err(e) = write_state(&self.config.state_dir, &p) {
                tracing::error!("cannot save the coordinator state: {e:#}");
            } else {
                *written = Some(p);
            }
        }
        drop(written);
        self.changed.notify_all();
    }

    /// Waits (up to [`POLL`]) until `f` decides; `None` on timeout.
    fn poll<T>(
        &self,
        mut f: impl FnMut(&mut Coordinator) -> Result<Option<T>, CoordError>,
    ) -> Result<Option<T>, CoordError> {
        let deadline = Instant::now() + POLL;
        let mut c = lock(&self.coord);
        loop {
            if let Some(v) = f(&mut c)? {
                return Ok(Some(v));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            c = self
                .changed
                .wait_timeout(c, left.min(Duration::from_millis(200)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn commit_checkpoint(&self, step: u64) {
        let Some(ctx) = &self.config.checkpoint else {
            return;
        };
        let mut meta = ctx.meta.clone();
        meta.step = step;
        {
            let c = lock(&self.coord);
            meta.losses = c.losses().to_vec();
            meta.stage_layers = c.layout().stage_layers.clone();
        }
        let result = checkpoint::commit(&ctx.root, &meta, &ctx.tokenizer, ctx.keep);
        let mut c = lock(&self.coord);
        match result {
            Ok(dir) => {
                tracing::info!("checkpoint {}", dir.display());
                c.checkpoint_committed(step, dir.to_string_lossy().into_owned());
            }
            Err(e) => c.abort(format!("checkpoint of step {step} failed: {e}")),
        }
    }
}

fn write_state(dir: &Path, p: &Persisted) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(".state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(p)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("state.json"))
        .with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

/// Training tokens in one step of `spec` (every replica's micro-batches).
pub fn tokens_per_step(spec: &pipewright_spec::TrainingRunSpec) -> u64 {
    let t = &spec.training;
    (t.micro_batch_size * t.micro_batches * spec.model.seq_len * spec.pipeline.replicas) as u64
}

/// Starts the coordinator of `config` on `listen`.
pub fn start(config: Config, listen: &str) -> Result<Handle> {
    let persisted = load_state(&config.state_dir)?;
    if let Some(p) = &persisted {
        tracing::info!(
            "resuming coordinator state: epoch {}, step {}",
            p.epoch,
            p.committed
        );
    }
    let spec = &config.manifest.spec;
    let stage_layers = crate::model::partition(&config.model, spec.pipeline.stages, &[]);
    let layout = super::state::Layout {
        stages: spec.pipeline.stages,
        replicas: spec.pipeline.replicas,
        steps: spec.training.steps,
        tied: config.model.tied,
        stage_layers,
        checkpoint_every: spec.checkpoint.every,
        tokens_per_step: tokens_per_step(spec),
        measured: spec.pipeline.partition == pipewright_spec::PartitionKind::Measured,
        micro_batches: spec.training.micro_batches,
        routed: spec.pipeline.routing == pipewright_spec::Routing::Throughput,
    };
    let (model, stages) = (config.model.clone(), spec.pipeline.stages);
    let root = config
        .checkpoint
        .as_ref()
        .map(|c| c.root.to_string_lossy().into_owned());
    let coord = Coordinator::new(
        &config.manifest.metadata.name,
        layout,
        config.lease,
        root,
        persisted,
    )
    .with_partitioner(Box::new(move |speeds| {
        crate::model::partition(&model, stages, speeds)
    }));
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        coord: Mutex::new(coord),
        changed: Condvar::new(),
        config,
        handoff: Mutex::new(HashMap::new()),
        metrics: Metrics::new(),
        written: Mutex::new(None),
    });
    shared.after_change();
    let stop = Arc::new(tokio::sync::Notify::new());
    {
        let (shared, stop) = (shared.clone(), stop.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_io()
            .thread_name("coord-http")
            .build()
            .context("starting the coordinator's HTTP runtime")?;
        thread::Builder::new()
            .name("coord-http".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let app = axum::Router::new().fallback(serve).with_state(shared);
                    let result = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => axum::serve(l, app)
                            .with_graceful_shutdown(async move { stop.notified().await })
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = result {
                        tracing::error!("the coordinator's HTTP server stopped: {e}");
                    }
                });
            })
            .context("starting the coordinator's server thread")?;
    }
    {
        let shared = shared.clone();
        thread::Builder::new()
            .name("coord-leases".into())
            .spawn(move || loop {
                thread::sleep(Duration::from_millis(100));
                let lost = lock(&shared.coord).expire(Instant::now());
                for (s, r) in &lost {
                    tracing::warn!("stage {s} replica {r}: lease expired; shard vacated");
                }
                shared.after_change();
            })
            .context("starting the lease sweeper")?;
    }
    Ok(Handle { shared, addr, stop })
}

enum Reply {
    Json(u16, Vec<u8>),
    Text(u16, String),
    Bytes(Arc<Vec<u8>>),
    Empty(u16),
}

fn json(v: &impl Serialize) -> Reply {
    match serde_json::to_vec(v) {
        Ok(b) => Reply::Json(200, b),
        Err(e) => Reply::Text(500, e.to_string()),
    }
}

fn coord_error(e: CoordError) -> Reply {
    let code = match e {
        CoordError::UnknownWorker(_) => 404,
        CoordError::Invalid(_) => 400,
        CoordError::Taken(..) => 409,
        CoordError::Finished(_) => 410,
    };
    Reply::Text(code, e.to_string())
}

fn query(url: &str, key: &str) -> Option<u64> {
    let q = url.split_once('?')?.1;
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

fn authorized(shared: &Shared, auth: Option<&str>) -> bool {
    let expected = format!("Bearer {}", shared.config.token);
    // Compare digests, so the time taken says nothing about the token.
    auth.is_some_and(|a| blake3::hash(a.as_bytes()) == blake3::hash(expected.as_bytes()))
}

/// One request as the routes see it, its body already read.
struct Req {
    method: Method,
    path: String,
    url: String,
    auth: Option<String>,
    body: axum::body::Bytes,
}

fn read_body(req: &Req, max: u64) -> Result<&[u8], Reply> {
    if req.body.len() as u64 > max {
        return Err(Reply::Text(413, format!("body larger than {max} bytes")));
    }
    Ok(&req.body)
}

fn parse<T: DeserializeOwned>(req: &Req) -> Result<T, Reply> {
    let body = read_body(req, MAX_JSON)?;
    serde_json::from_slice(body).map_err(|e| Reply::Text(400, format!("malformed request: {e}")))
}

/// Reads the body (up to the endpoint's limit, refused early when the
/// declared length is over it) and runs the route on the blocking pool.
async fn serve(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    request: Request<Body>,
) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let limit = if path.starts_with("/v1/state/") || path.starts_with("/v1/checkpoint/") {
        MAX_STATE
    } else {
        MAX_JSON
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let auth = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let reply = if declared.is_some_and(|n| n > limit) {
        shared.metrics.rejected.inc();
        Reply::Text(413, format!("body larger than {limit} bytes"))
    } else {
        match axum::body::to_bytes(body, limit as usize).await {
            Ok(body) => {
                let req = Req {
                    method: parts.method,
                    url: parts
                        .uri
                        .path_and_query()
                        .map_or_else(|| path.clone(), |p| p.to_string()),
                    path,
                    auth,
                    body,
                };
                let shared = shared.clone();
                tokio::task::spawn_blocking(move || handle(&shared, &req))
                    .await
                    .unwrap_or_else(|e| Reply::Text(500, format!("request handler failed: {e}")))
            }
            Err(e) => {
                shared.metrics.rejected.inc();
                Reply::Text(413, format!("reading the body: {e}"))
            }
        }
    };
    reply.into_response()
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

fn handle(shared: &Shared, req: &Req) -> Reply {
    shared
        .metrics
        .requests
        .get_or_create(&vec![("path".into(), endpoint_label(&req.path))])
        .inc();
    let reply = route(shared, req);
    if let Reply::Text(400 | 401 | 413, _) = &reply {
        shared.metrics.rejected.inc();
    }
    reply
}

fn endpoint_label(path: &str) -> String {
    if path.starts_with("/v1/state/") {
        "/v1/state".into()
    } else if matches!(
        path,
        "/healthz"
            | "/status"
            | "/metrics"
            | "/v1/manifest"
            | "/v1/register"
            | "/v1/heartbeat"
            | "/v1/wiring"
            | "/v1/step"
            | "/v1/checkpoint"
            | "/v1/fail"
    ) {
        path.into()
    } else {
        "other".into()
    }
}

fn route(shared: &Shared, req: &Req) -> Reply {
    let now = Instant::now;
    let (method, path, url) = (&req.method, req.path.as_str(), req.url.as_str());
    match (method, path) {
        (&Method::GET, "/healthz") => return Reply::Text(200, "ok\n".into()),
        (&Method::GET, "/status") => return json(&lock(&shared.coord).status(now())),
        (&Method::GET, "/metrics") => {
            let status = lock(&shared.coord).status(now());
            return Reply::Text(200, shared.metrics.render(&status));
        }
        _ => {}
    }
    if !path.starts_with("/v1/") {
        return Reply::Text(404, format!("no such endpoint: {path}"));
    }
    if !authorized(shared, req.auth.as_deref()) {
        return Reply::Text(401, "missing or wrong join token".into());
    }
    let reply = match (method, path) {
        (&Method::GET, "/v1/manifest") => json(&shared.config.manifest),
        (&Method::POST, "/v1/register") => {
            let r: Register = match parse(req) {
                Ok(r) => r,
                Err(e) => return e,
            };
            let result = lock(&shared.coord).register(r, now());
            match result {
                Ok((worker, shard)) => json(&Registered {
                    worker,
                    shard,
                    run_key: shared.config.run_key.clone(),
                    run_id: shared.config.run_id.clone(),
                    heartbeat_ms: (shared.config.lease.as_millis() as u64 / 8).max(50),
                }),
                Err(e) => coord_error(e),
            }
        }
        (&Method::POST, "/v1/heartbeat") => {
            let h: Heartbeat = match parse(req) {
                Ok(h) => h,
                Err(e) => return e,
            };
            let result = lock(&shared.coord).heartbeat(h.worker, now());
            match result {
                Ok(epoch) => return json(&HeartbeatReply { epoch }),
                Err(e) => coord_error(e),
            }
        }
        (&Method::GET, "/v1/wiring") => {
            let (Some(worker), Some(after)) = (query(url, "worker"), query(url, "after")) else {
                return Reply::Text(400, "wiring needs ?worker=ID&after=EPOCH".into());
            };
            match shared.poll(|c| c.wiring(worker, after)) {
                Ok(Some(w)) => json(&w),
                Ok(None) => Reply::Empty(204),
                Err(e) => coord_error(e),
            }
        }
        (&Method::POST, "/v1/step") => {
            let d: StepDone = match parse(req) {
                Ok(d) => d,
                Err(e) => return e,
            };
            let first = lock(&shared.coord).step_done(&d, now());
            shared.after_change();
            let decided = match first {
                Ok(Some(b)) => Ok(Some(b)),
                Ok(None) => shared.poll(|c| Ok(c.barrier(d.worker, d.epoch, d.completed, now()))),
                Err(e) => Err(e),
            };
            let mut c = lock(&shared.coord);
            c.finish_without_checkpoint();
            drop(c);
            match decided {
                Ok(Some(b)) => json(&b),
                Ok(None) => Reply::Empty(204),
                Err(e) => coord_error(e),
            }
        }
        (m, p) if p.starts_with("/v1/checkpoint/") => {
            let (Some(stage), Some(step)) = (
                p["/v1/checkpoint/".len()..].parse::<usize>().ok(),
                query(url, "step"),
            ) else {
                return Reply::Text(400, "checkpoint needs /v1/checkpoint/STAGE?step=N".into());
            };
            match *m {
                Method::PUT => put_checkpoint(shared, req, stage, step, query(url, "worker")),
                Method::GET => get_checkpoint(shared, stage, step),
                _ => Reply::Text(405, "checkpoint takes GET or PUT".into()),
            }
        }
        (&Method::POST, "/v1/fail") => {
            let f: Failure = match parse(req) {
                Ok(f) => f,
                Err(e) => return e,
            };
            if f.fatal {
                tracing::error!("worker {} failed: {}", f.worker, f.error);
            } else {
                tracing::warn!("worker {}: {}", f.worker, f.error);
            }
            let result = lock(&shared.coord).fail(&f, now());
            match result {
                Ok(()) => Reply::Json(200, b"{}".to_vec()),
                Err(e) => coord_error(e),
            }
        }
        (m, p) if p.starts_with("/v1/state/") => {
            let (Some(stage), Some(epoch)) = (
                p["/v1/state/".len()..].parse::<usize>().ok(),
                query(url, "epoch"),
            ) else {
                return Reply::Text(400, "state needs /v1/state/STAGE?epoch=E".into());
            };
            match *m {
                Method::PUT => match read_body(req, MAX_STATE) {
                    Ok(body) => {
                        let mut h = lock(&shared.handoff);
                        // Only the current epoch's hand-offs are kept.
                        h.retain(|(e, _), _| *e >= epoch);
                        h.insert((epoch, stage), Arc::new(body.to_vec()));
                        drop(h);
                        Reply::Json(200, b"{}".to_vec())
                    }
                    Err(e) => e,
                },
                Method::GET => {
                    let found = shared.poll(|c| {
                        if c.epoch() != epoch {
                            return Err(CoordError::Invalid(format!(
                                "epoch {epoch} is over (now {})",
                                c.epoch()
                            )));
                        }
                        Ok(lock(&shared.handoff).get(&(epoch, stage)).cloned())
                    });
                    match found {
                        Ok(Some(b)) => Reply::Bytes(b),
                        Ok(None) => Reply::Empty(204),
                        Err(e) => Reply::Text(409, e.to_string()),
                    }
                }
                _ => Reply::Text(405, "state takes GET or PUT".into()),
            }
        }
        _ => Reply::Text(404, format!("no such endpoint: {method} {path}")),
    };
    shared.after_change();
    reply
}

/// A stage's part of the pending checkpoint, from its writer: stored in the
/// checkpoint's temporary directory; the last part commits the checkpoint.
fn put_checkpoint(
    shared: &Shared,
    req: &Req,
    stage: usize,
    step: u64,
    worker: Option<u64>,
) -> Reply {
    let Some(worker) = worker else {
        return Reply::Text(400, "checkpoint upload needs &worker=ID".into());
    };
    let Some(ctx) = &shared.config.checkpoint else {
        return Reply::Text(409, "this run keeps no checkpoints".into());
    };
    match lock(&shared.coord).checkpoint_stage(worker, step) {
        Ok(s) if s == stage => {}
        Ok(s) => {
            return Reply::Text(
                400,
                format!("worker {worker} serves stage {s}, not {stage}"),
            )
        }
        Err(e) => return coord_error(e),
    }
    let body = match read_body(req, MAX_STATE) {
        Ok(b) => b,
        Err(e) => return e,
    };
    // Refuse a part that is not this stage's state before it is kept.
    let params_ok = {
        let tmp = checkpoint::tmp_dir(&ctx.root, step);
        let path = tmp.join(format!("stage-{stage}.safetensors"));
        let all = lock(&shared.coord).layout().stage_layers.clone();
        let layers = all.get(stage).cloned().unwrap_or(0..0);
        let rank = ctx
            .meta
            .manifest
            .spec
            .pipeline
            .lowrank_rank(ctx.meta.model.dim);
        let st = crate::model::Stage::with_bottleneck(
            &ctx.meta.model,
            stage,
            all.len(),
            layers,
            ctx.meta.seed,
            rank,
        );
        checkpoint::decode_stage(body, &st.params(), &path)
            .map(|_| path)
            .map_err(|e| e.to_string())
    };
    let path = match params_ok {
        Ok(p) => p,
        Err(e) => return Reply::Text(400, format!("not a state of stage {stage}: {e}")),
    };
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            let part = path.with_extension("partial");
            std::fs::write(&part, body)?;
            std::fs::rename(&part, &path)
        });
    if let Err(e) = written {
        return Reply::Text(500, format!("writing {}: {e}", path.display()));
    }
    let done = lock(&shared.coord).checkpoint_written(worker, step);
    match done {
        Ok(Some(step)) => {
            shared.commit_checkpoint(step);
            Reply::Json(200, b"{}".to_vec())
        }
        Ok(None) => Reply::Json(200, b"{}".to_vec()),
        Err(e) => coord_error(e),
    }
}

/// A stage's file of a committed checkpoint, for a worker restoring it.
fn get_checkpoint(shared: &Shared, stage: usize, step: u64) -> Reply {
    let Some(ctx) = &shared.config.checkpoint else {
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
}
