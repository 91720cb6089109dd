//! A shard worker's session with its run's coordinator: what it needs
//! before the first epoch (its identity, the manifest, a memory check, its
//! two listeners, its measured speed, its metrics listener), registration
//! (again after a coordinator restart), the wiring of each epoch, and the
//! heartbeat that tells the epoch loop when the coordinator moved on.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::metrics::ShardMetrics;
use crate::coord::api::{Register, Wiring};
use crate::coord::{Client, ClientError};
use crate::identity::Identity;
use crate::kernels::Trans;
use crate::link::{RunId, RunKey};

/// How a shard worker runs: what `pipewright worker` and `pipewright join`
/// resolve from their arguments.
#[derive(Debug, Clone)]
pub struct Config {
    /// Coordinator URL, e.g. `http://127.0.0.1:7070`.
    pub coordinator: String,
    /// The run's join token.
    pub token: String,
    /// TrainingRun manifest (YAML); fetched from the coordinator when
    /// `None`. It must be the coordinator's.
    pub manifest: Option<PathBuf>,
    /// Stage to serve (`None`: the one the coordinator picks).
    pub stage: Option<usize>,
    /// Replica to serve, with `stage`.
    pub replica: Option<usize>,
    /// Address of the pipeline link listener.
    pub listen: String,
    /// Address of the replica ring listener.
    pub ring_listen: String,
    /// Host name peers use to reach this worker (default: the listen
    /// address's IP; required when listening on 0.0.0.0).
    pub advertise: Option<String>,
    /// Name shown in the coordinator's status (default: host name).
    pub name: Option<String>,
    /// How long to wait for a peer link, and for a coordinator that does
    /// not answer, before giving up.
    pub timeout: Duration,
    /// Kernel threads (default: `training.threads`, else all cores).
    pub threads: Option<usize>,
    /// Every forward and backward takes this many times as long (at least
    /// 1): a drill that emulates a slower machine.
    pub slowdown: f64,
    /// Most bytes per second sent on each link (default: the manifest's
    /// `spec.pipeline.maxSendMegabytesPerSecond`, else no cap).
    pub max_send_rate: Option<u64>,
    /// The identity key file (default: `~/.config/pipewright/identity`).
    pub identity: Option<PathBuf>,
    /// Serve this worker's Prometheus metrics at `http://ADDR/metrics`.
    pub metrics_listen: Option<String>,
}

/// A registered shard worker: its coordinator, credentials, listeners and
/// the flags its heartbeat raises. [`Session::open`] registers it,
/// [`Session::run`] trains until the run ends.
pub struct Session {
    pub(super) client: Client,
    pub(super) manifest: pipewright_spec::TrainingRun,
    /// Whose work this is.
    pub(super) identity: Identity,
    /// The run id in hex, as signed messages carry it.
    pub(super) run_hex: String,
    pub(super) register: Register,
    pub(super) worker: u64,
    pub(super) run_id: RunId,
    pub(super) key: RunKey,
    pub(super) timeout: Duration,
    /// The newest epoch this worker has heard of (wiring or heartbeat).
    pub(super) epoch_seen: Arc<AtomicU64>,
    /// The worker id the heartbeat speaks for.
    id_seen: Arc<AtomicU64>,
    /// Raised when the coordinator moved past `working` (the epoch this
    /// worker is wired for): every wait for a peer stops.
    pub(super) abort: Arc<AtomicBool>,
    working: Arc<Mutex<u64>>,
    pub(super) slowdown: f64,
    /// A drill: what this worker does dishonestly (`PIPEWRIGHT_BYZANTINE`).
    pub(super) attack: Option<crate::pipeline::Attack>,
    pub(super) max_send_rate: Option<u64>,
    /// This worker's own metrics (served with `--metrics-listen`).
    pub(super) metrics: Arc<ShardMetrics>,
    /// The pipeline link listener.
    pub(super) pipe: TcpListener,
    /// The replica ring listener.
    pub(super) ring: TcpListener,
}

impl Session {
    /// Gets ready and registers: loads (or creates) the identity, reads the
    /// manifest, refuses a shard that does not fit this machine's memory,
    /// sizes the kernel thread pool, binds both listeners, measures this
    /// machine's speed when the partition asks for it, starts the metrics
    /// listener, and registers with the coordinator.
    pub fn open(config: Config) -> Result<Session> {
        if !(config.slowdown.is_finite() && config.slowdown >= 1.0) {
            bail!(
                "--slowdown must be a number of at least 1, got {}",
                config.slowdown
            );
        }
        let timeout = config.timeout;
        let identity_path = match &config.identity {
            Some(p) => p.clone(),
            None => crate::identity::default_path()?,
        };
        let identity = Identity::load_or_create(&identity_path)?;
        let client = Client::new(&config.coordinator, &config.token, timeout);
        let manifest = read_manifest(&config, &client)?;
        // Refused before registering: the shard asked for, or the smallest.
        let fits = shard_memory_check(&manifest);
        fits(config.stage)?;
        crate::kernels::init_threads(config.threads.unwrap_or(manifest.spec.training.threads));
        let (pipe, pipe_addr) = bind(&config.listen, config.advertise.as_deref())?;
        let (ring, ring_addr) = bind(&config.ring_listen, config.advertise.as_deref())?;
        let name = config.name.clone().unwrap_or_else(host_name);
        let speed = if manifest.spec.pipeline.partition == pipewright_spec::PartitionKind::Measured
        {
            measure_speed(&manifest)
        } else {
            0.0
        };
        // The flag wins over the run's cap.
        let max_send_rate = config.max_send_rate.or_else(|| run_send_cap(&manifest));
        let run_hex = crate::coord::setup::run_id_hex(&manifest);
        eprintln!(
            "identity {} ({})",
            identity.fingerprint(),
            identity_path.display()
        );
        let metrics = serve_metrics(config.metrics_listen.as_deref())?;
        let mut session = Session {
            client,
            identity,
            run_hex,
            manifest,
            register: Register {
                stage: config.stage,
                replica: config.replica,
                pipe_addr,
                ring_addr,
                worker: None,
                completed: 0,
                has_snapshot: false,
                name: format!("{name}/{}", std::process::id()),
                speed,
                identity: None,
                // Lets the coordinator give a worker without a stage only a
                // shard it has the memory for.
                available_memory: crate::plan::available_memory(),
            },
            worker: 0,
            run_id: RunId([0; 16]),
            key: RunKey([0; 32]),
            timeout,
            epoch_seen: Arc::new(AtomicU64::new(0)),
            id_seen: Arc::new(AtomicU64::new(0)),
            abort: Arc::new(AtomicBool::new(false)),
            working: Arc::new(Mutex::new(0)),
            slowdown: config.slowdown,
            attack: crate::pipeline::attack::from_env().map_err(anyhow::Error::msg)?,
            max_send_rate,
            metrics,
            pipe,
            ring,
        };
        let shard = session.register(None)?;
        // The coordinator chose the stage: refused before any of it is built.
        if let Some((stage, _)) = shard {
            fits(Some(stage))?;
        }
        match shard {
            Some((s, r)) => eprintln!("worker {}: stage {s} replica {r}", session.worker),
            None => eprintln!(
                "worker {}: every shard is taken; waiting as a standby",
                session.worker
            ),
        }
        Ok(session)
    }

    /// The coordinator client (its URL and join token).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The fingerprint of this worker's identity.
    pub fn fingerprint(&self) -> String {
        self.identity.fingerprint()
    }

    /// Trains epoch after epoch, with the heartbeat running, until the run
    /// ends: `Ok` when it succeeded.
    pub fn run(mut self) -> Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let heartbeat = self.heartbeat(stop.clone())?;
        let result = self.train();
        stop.store(true, Ordering::Relaxed);
        let _ = heartbeat.join();
        result
    }

    /// Every 250 ms until `stop`: tells the coordinator this worker lives,
    /// notes the newest epoch, and raises the abort flag when that is past
    /// the one this worker is wired for, or when the coordinator answers
    /// that this worker is quarantined.
    fn heartbeat(&self, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>> {
        let (client, epoch, id, abort, working) = (
            self.client.clone(),
            self.epoch_seen.clone(),
            self.id_seen.clone(),
            self.abort.clone(),
            self.working.clone(),
        );
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match client.heartbeat(id.load(Ordering::Relaxed)) {
                        Ok(e) => {
                            epoch.fetch_max(e, Ordering::Relaxed);
                            let w = working.lock().unwrap_or_else(|e| e.into_inner());
                            if e > *w {
                                abort.store(true, Ordering::Relaxed);
                            }
                        }
                        Err(ClientError::Unknown) | Err(ClientError::Finished) => {}
                        Err(e) if e.quarantined().is_some() => {
                            // Convicted (a complaint or a recheck may come
                            // while this worker waits for its peers): every
                            // wait ends, and its next request says why.
                            abort.store(true, Ordering::Relaxed);
                            tracing::warn!("heartbeat: {e}");
                        }
                        Err(e) => tracing::warn!("heartbeat: {e}"),
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
            .context("starting the heartbeat")
    }

    /// Starts working in `epoch`: clears the abort flag.
    pub(super) fn work_in(&self, epoch: u64) {
        let mut w = self.working.lock().unwrap_or_else(|e| e.into_inner());
        *w = epoch;
        self.abort.store(false, Ordering::Relaxed);
    }

    /// Registers (again), keeping what the worker holds: the steps it
    /// completed and whether it keeps a snapshot one step back.
    pub(super) fn register(&mut self, held: Option<(u64, bool)>) -> Result<Option<(usize, usize)>> {
        let mut r = self.register.clone();
        if let Some((completed, snapshot)) = held {
            r.completed = completed;
            r.has_snapshot = snapshot;
        }
        if self.worker != 0 {
            r.worker = Some(self.worker);
        }
        // A shard may still belong to its previous worker until that one's
        // lease runs out (a pod replaced faster than the lease): retry.
        let deadline = std::time::Instant::now() + self.timeout;
        let reg = loop {
            match self.client.register_as(&r, &self.identity, &self.run_hex) {
                Err(ClientError::Refused {
                    code: 409, message, ..
                }) if std::time::Instant::now() < deadline => {
                    tracing::info!("{message}; retrying");
                    std::thread::sleep(Duration::from_millis(250));
                }
                other => {
                    break other.map_err(|e| {
                        super::audit::client_error(e, "registering with the coordinator")
                    })?
                }
            }
        };
        self.worker = reg.worker;
        self.id_seen.store(reg.worker, Ordering::Relaxed);
        self.key = RunKey(decode_hex("run key", &reg.run_key)?);
        self.run_id = RunId(decode_hex("run id", &reg.run_id)?);
        if let Some((s, r)) = reg.shard {
            // Keep asking for this shard after a coordinator restart.
            self.register.stage = Some(s);
            self.register.replica = Some(r);
        }
        Ok(reg.shard)
    }

    /// The wiring of the first epoch after `after`, registering again when
    /// the coordinator lost track of this worker (`held`: what it holds).
    pub(super) fn wiring(
        &mut self,
        after: u64,
        held: impl Fn() -> Option<(u64, bool)>,
    ) -> Result<Wiring> {
        loop {
            match self.client.wiring(self.worker, after) {
                Ok(w) => return Ok(w),
                Err(ClientError::Unknown) => {
                    tracing::warn!("the coordinator lost track of this worker; registering again");
                    self.register(held())?;
                }
                Err(e) => return Err(super::audit::client_error(e, "waiting for the wiring")),
            }
        }
    }
}

/// The manifest the configuration names, else the coordinator's.
fn read_manifest(config: &Config, client: &Client) -> Result<pipewright_spec::TrainingRun> {
    match &config.manifest {
        Some(p) => pipewright_spec::load_manifest(p)
            .with_context(|| format!("{} is not a valid TrainingRun", p.display())),
        None => client
            .manifest()
            .with_context(|| format!("fetching the run from {}", config.coordinator)),
    }
}

/// This machine's host name (`worker` when it cannot be read).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into())
}

/// The run's cap on what each worker sends per link, bytes per second.
fn run_send_cap(manifest: &pipewright_spec::TrainingRun) -> Option<u64> {
    manifest
        .spec
        .pipeline
        .max_send_megabytes_per_second
        .map(|mb| mb.saturating_mul(1_000_000))
}

/// This worker's metrics, served at `http://LISTEN/metrics` when `listen`
/// is given.
fn serve_metrics(listen: Option<&str>) -> Result<Arc<ShardMetrics>> {
    let metrics = Arc::new(ShardMetrics::new());
    if let Some(listen) = listen {
        let m = metrics.clone();
        let addr = crate::exposition::serve(listen, Arc::new(move || m.render()))?;
        eprintln!("metrics: http://{addr}/metrics");
    }
    Ok(metrics)
}

/// `N` bytes from `2N` hex digits (`what` names them in the error).
fn decode_hex<const N: usize>(what: &str, text: &str) -> Result<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text.trim(), &mut out)
        .map_err(|_| anyhow::anyhow!("{what} must be {} hex digits", 2 * N))?;
    Ok(out)
}

/// Binds `addr`; the listener and the `host:port` peers reach it by.
fn bind(addr: &str, advertise: Option<&str>) -> Result<(TcpListener, String)> {
    let l = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let local = l.local_addr()?;
    let host = match advertise {
        Some(h) => h.to_string(),
        None if local.ip().is_unspecified() => {
            bail!(
                "listening on {local} needs --advertise HOST (the name peers reach this worker by)"
            )
        }
        None => local.ip().to_string(),
    };
    Ok((l, format!("{host}:{}", local.port())))
}

/// A check that a shard of a stage (any stage when `None`) fits this
/// machine's available memory, from the run's plan; it passes where memory
/// or the vocabulary cannot be known here.
fn shard_memory_check(
    manifest: &pipewright_spec::TrainingRun,
) -> impl Fn(Option<usize>) -> Result<()> {
    use crate::plan::{available_memory, plan, shard_fits, vocab};
    let planned = vocab(manifest)
        .ok()
        .map(|v| plan(manifest, v, None))
        .zip(available_memory());
    move |stage| match &planned {
        Some((p, available)) => shard_fits(p, stage, *available)
            .map_err(|e| anyhow::anyhow!("this worker cannot serve the run: {e}")),
        None => Ok(()),
    }
}

/// This machine's speed for `partition: measured`: GFLOP/s of the
/// products a transformer block of this run does, over about 0.15 s.
fn measure_speed(manifest: &pipewright_spec::TrainingRun) -> f64 {
    let m = &manifest.spec.model;
    let rows = (manifest.spec.training.micro_batch_size * m.seq_len).clamp(64, 4096);
    let (k, n) = (m.dim, m.ffn_dim);
    let a = vec![0.5f32; rows * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0.0f32; rows * n];
    let start = std::time::Instant::now();
    let mut flops = 0.0f64;
    while start.elapsed() < Duration::from_millis(150) {
        crate::kernels::matmul(&mut c, &a, Trans::No, &b, Trans::No, rows, k, n, false);
        flops += 2.0 * (rows * k * n) as f64;
    }
    let speed = flops / start.elapsed().as_secs_f64() / 1e9;
    tracing::info!("measured {speed:.1} GFLOP/s for the layer partition");
    speed
}

#[cfg(test)]
mod tests {
    use super::decode_hex;

    #[test]
    fn run_keys_and_ids_are_exactly_their_hex_digits() {
        assert_eq!(decode_hex::<2>("run id", " 0aff\n").unwrap(), [0x0a, 0xff]);
        for bad in ["0af", "0aff00", "0agg", "é0"] {
            let err = decode_hex::<2>("run id", bad).unwrap_err().to_string();
            assert_eq!(err, "run id must be 4 hex digits", "{bad}");
        }
    }
}
