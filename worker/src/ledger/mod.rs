//! The contribution ledger: who did which work, booked durably by the
//! coordinator at each step barrier, and the reward shares derived from it.
//!
//! It is an SQLite database (`ledger.sqlite` in the run directory) in
//! write-ahead-log mode with synchronous commits: a step's entries are on
//! disk before any worker hears that the step passed its barrier. Only the
//! coordinator writes it; `pipewright ledger` reads it. The schema is in
//! `docs/ledger.md`.
//!
//! What is booked is what the coordinator can establish without taking a
//! worker's word for it: the micro-batches the route gave the worker (each
//! one also named in its signed commitment), their tokens, the FLOPs the
//! model's shape implies for them (forward, input-gradient and
//! weight-gradient halves apart) and the bytes the replicas' ring moves.
//! Timings a worker reports are stored but earn nothing.

mod cost;
mod shares;

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

pub use cost::CostModel;
pub use shares::{shares, totals_of, window_of, Share, Totals};

/// File name of the ledger in a run directory.
pub const FILE: &str = "ledger.sqlite";

/// Schema version (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS identities (
    identity    TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    first_seen  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    worker     INTEGER PRIMARY KEY,
    identity   TEXT NOT NULL REFERENCES identities(identity),
    name       TEXT NOT NULL,
    stage      INTEGER,
    replica    INTEGER,
    epoch      INTEGER NOT NULL,
    registered REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    step   INTEGER PRIMARY KEY,
    epoch  INTEGER NOT NULL,
    loss   REAL,
    booked REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    step               INTEGER NOT NULL REFERENCES steps(step),
    stage              INTEGER NOT NULL,
    replica            INTEGER NOT NULL,
    identity           TEXT NOT NULL REFERENCES identities(identity),
    worker             INTEGER NOT NULL,
    epoch              INTEGER NOT NULL,
    micro_batches      TEXT NOT NULL,
    first_layer        INTEGER NOT NULL,
    end_layer          INTEGER NOT NULL,
    tokens             INTEGER NOT NULL,
    forward_flops      REAL NOT NULL,
    input_grad_flops   REAL NOT NULL,
    weight_grad_flops  REAL NOT NULL,
    allreduce_bytes    INTEGER NOT NULL,
    validation_flops   REAL NOT NULL DEFAULT 0,
    loss               REAL,
    commitment         BLOB NOT NULL,
    signature          TEXT NOT NULL,
    reported_seconds   REAL NOT NULL,
    audits_passed      INTEGER NOT NULL DEFAULT 0,
    audits_failed      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (step, stage, replica)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_identity ON entries(identity, step);
CREATE TABLE IF NOT EXISTS quarantine (
    identity     TEXT PRIMARY KEY,
    worker       INTEGER NOT NULL,
    stage        INTEGER NOT NULL,
    replica      INTEGER NOT NULL,
    step         INTEGER NOT NULL,
    reason       TEXT NOT NULL,
    evidence     TEXT NOT NULL,
    forfeit_from INTEGER NOT NULL,
    forfeit_to   INTEGER NOT NULL,
    at           REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS refusals (
    id       INTEGER PRIMARY KEY,
    at       REAL NOT NULL,
    worker   INTEGER,
    identity TEXT,
    reason   TEXT NOT NULL,
    detail   TEXT NOT NULL
);
";

/// Why the ledger could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// SQLite refused.
    #[error("ledger {path}: {source}")]
    Sql {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The file is a ledger of another schema.
    #[error(
        "ledger {path} has schema version {found}; this pipewright reads version {SCHEMA_VERSION}"
    )]
    Version {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
    },
    /// The ledger of another run.
    #[error("ledger {0} belongs to another run; move it away or use another run directory")]
    OtherRun(PathBuf),
    /// Steps are booked but the coordinator has no state to resume them.
    #[error(
        "ledger {path} already books {steps} step(s) but there is no coordinator state to resume \
         them; move the ledger away to start the run afresh"
    )]
    Orphaned {
        /// The database file.
        path: PathBuf,
        /// Steps booked.
        steps: u64,
    },
    /// No ledger there.
    #[error("no ledger at {0} (a run directory holds {FILE} once its coordinator has started)")]
    Missing(PathBuf),
}

/// One worker's booked work in one step.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Step (1-based: the step this entry completed).
    pub step: u64,
    /// Stage.
    pub stage: usize,
    /// Replica.
    pub replica: usize,
    /// The worker's public key (hex).
    pub identity: String,
    /// Worker id (one per registration).
    pub worker: u64,
    /// Epoch it trained in.
    pub epoch: u64,
    /// Global micro-batch indices it ran.
    pub micro_batches: Vec<u64>,
    /// The blocks its stage held (what its FLOPs are computed from).
    pub layers: std::ops::Range<usize>,
    /// Tokens of those micro-batches.
    pub tokens: u64,
    /// Forward FLOPs.
    pub forward_flops: f64,
    /// Input-gradient FLOPs.
    pub input_grad_flops: f64,
    /// Weight-gradient FLOPs.
    pub weight_grad_flops: f64,
    /// Bytes it sent in the replicas' all-reduce.
    pub allreduce_bytes: u64,
    /// FLOPs recomputed to validate others' work.
    pub validation_flops: f64,
    /// Loss it reported (last stages).
    pub loss: Option<f32>,
    /// Root of its signed commitment.
    pub commitment: [u8; 32],
    /// Its signature over the step (hex).
    pub signature: String,
    /// Wall seconds it reported (stored, never credited).
    pub reported_seconds: f64,
    /// Audits of this entry that passed.
    pub audits_passed: u32,
    /// Audits of this entry that failed (the entry then earns nothing).
    pub audits_failed: u32,
}

/// Everything booked for one step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepBooking {
    /// The step.
    pub step: u64,
    /// Epoch it passed its barrier in.
    pub epoch: u64,
    /// Its mean loss.
    pub loss: Option<f32>,
    /// One entry per shard that trained it.
    pub entries: Vec<Entry>,
}

/// A worker's registration: its identity beside its name (pod, host).
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    /// Worker id.
    pub worker: u64,
    /// Public key (hex).
    pub identity: String,
    /// Name it gave (pod name on Kubernetes).
    pub name: String,
    /// Its shard (`None`: a standby).
    pub shard: Option<(usize, usize)>,
    /// Epoch it registered in.
    pub epoch: u64,
}

/// A report the coordinator refused.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// Worker id it claimed.
    pub worker: Option<u64>,
    /// Identity it claimed (hex).
    pub identity: Option<String>,
    /// Short reason (a metric label).
    pub reason: &'static str,
    /// What was wrong.
    pub detail: String,
}

/// A worker convicted of dishonest work: its identity is barred from the
/// run, and its credit over the reward window that ends just before the
/// step it was caught at is forfeited.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Conviction {
    /// The convicted worker's public key (hex).
    pub identity: String,
    /// Its worker id (registration).
    pub worker: u64,
    /// Its stage.
    pub stage: usize,
    /// Its replica.
    pub replica: usize,
    /// The step it was caught at (never booked: the step is trained again).
    pub step: u64,
    /// Why: `failed_audit`, `bad_evidence` or `digest_mismatch`.
    pub reason: String,
    /// The evidence, one line of JSON (micro-batch, committed and
    /// recomputed hashes, validators).
    pub evidence: String,
}

/// A conviction as the ledger keeps it: with the steps whose credit it
/// forfeits.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Quarantined {
    /// The conviction.
    #[serde(flatten)]
    pub conviction: Conviction,
    /// First step whose entries of this identity earn nothing.
    pub forfeit_from: u64,
    /// Last such step (the last booked before the conviction; 0 with
    /// `forfeit_from` 1 when nothing was booked yet).
    pub forfeit_to: u64,
    /// Unix time it was recorded.
    pub at: f64,
}

impl Quarantined {
    /// Whether the entry of this identity at `step` is forfeited.
    pub fn forfeits(&self, identity: &str, step: u64) -> bool {
        self.conviction.identity == identity
            && (self.forfeit_from..=self.forfeit_to).contains(&step)
    }
}

/// An open ledger.
pub struct Ledger {
    conn: Connection,
    path: PathBuf,
    /// Identities already in `identities` (saves a write per entry).
    known: std::collections::HashSet<String>,
    /// Checkpoints the write-ahead log in the background (file ledgers).
    checkpointer: Option<Checkpointer>,
}

/// A thread that copies the ledger's write-ahead log into its database
/// after bookings, over a connection of its own (a passive checkpoint: it
/// never blocks a booking), until the ledger is dropped. Checkpointing
/// soon after each booking lets the log restart from its beginning rather
/// than grow, so a booking overwrites space already allocated.
struct Checkpointer {
    wake: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path) -> Self {
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("ledger-checkpoint".into())
            .spawn(move || {
                let conn = match Connection::open(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("ledger {}: no checkpointer: {e}", path.display());
                        return;
                    }
                };
                let _ = conn.busy_timeout(std::time::Duration::from_secs(5));
                while woken.recv().is_ok() {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!("ledger {}: checkpoint: {e}", path.display());
                    }
                }
            })
            .ok();
        Checkpointer {
            wake: Some(wake),
            thread,
        }
    }

    /// Asks for a checkpoint (one already asked for covers this one).
    fn nudge(&self) {
        if let Some(w) = &self.wake {
            let _ = w.try_send(());
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ledger({})", self.path.display())
    }
}

/// Moves the ledger at `path` (with its write-ahead log) aside to
/// `<path>.previous`, replacing an older one there: a fresh run in the same
/// directory starts a ledger of its own.
pub fn set_aside(path: &Path) -> std::io::Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        let to = PathBuf::from(format!("{}.previous{suffix}", path.display()));
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let _ = std::fs::remove_file(&to);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn mbs_text(mbs: &[u64]) -> String {
    mbs.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn parse_mbs(text: &str) -> Vec<u64> {
    text.split(',').filter_map(|x| x.parse().ok()).collect()
}

impl Ledger {
    /// Opens (creating) the ledger at `path` for writing: WAL, synchronous
    /// commits, foreign keys enforced. `meta` is recorded on creation and
    /// checked against what is there on reopening.
    pub fn open(path: &Path, meta: &[(&str, String)]) -> Result<Self, LedgerError> {
        let err = |source| LedgerError::Sql {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(err)?;
        let mut ledger = Self::init(conn, path, meta)?;
        // The write-ahead log is copied into the database by a thread of
        // its own, not by whichever booking crosses the log's size limit:
        // that copy (and its fsync) would otherwise land on a step's
        // barrier now and then.
        ledger
            .conn
            .execute_batch("PRAGMA wal_autocheckpoint=0")
            .map_err(err)?;
        ledger.checkpointer = Some(Checkpointer::start(path));
        Ok(ledger)
    }

    /// A ledger in memory (tests, benchmarks).
    pub fn in_memory(meta: &[(&str, String)]) -> Result<Self, LedgerError> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| LedgerError::Sql {
            path: path.clone(),
            source,
        })?;
        Self::init(conn, &path, meta)
    }

    fn init(conn: Connection, path: &Path, meta: &[(&str, String)]) -> Result<Self, LedgerError> {
        let err = |source| LedgerError::Sql {
            path: path.to_path_buf(),
            source,
        };
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(err)?;
        if mode != "wal" && mode != "memory" {
            tracing::warn!("ledger {}: journal mode is {mode}, not wal", path.display());
        }
        conn.execute_batch(
            "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;",
        )
        .map_err(err)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        if version != 0 && version != SCHEMA_VERSION {
            return Err(LedgerError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        conn.execute_batch(SCHEMA).map_err(err)?;
        conn.execute_batch(&format!("PRAGMA user_version={SCHEMA_VERSION}"))
            .map_err(err)?;
        if let Some((_, id)) = meta.iter().find(|(k, _)| *k == "run_id") {
            let existing: Option<String> = conn
                .query_row("SELECT value FROM meta WHERE key = 'run_id'", [], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(err)?;
            if existing.as_ref().is_some_and(|e| e != id) {
                return Err(LedgerError::OtherRun(path.to_path_buf()));
            }
        }
        for (k, v) in meta {
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![k, v],
            )
            .map_err(err)?;
        }
        Ok(Ledger {
            conn,
            path: path.to_path_buf(),
            known: Default::default(),
            checkpointer: None,
        })
    }

    /// Opens an existing ledger read-only (`pipewright ledger`).
    pub fn open_read(path: &Path) -> Result<Self, LedgerError> {
        if !path.exists() {
            return Err(LedgerError::Missing(path.to_path_buf()));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| LedgerError::Sql {
            path: path.to_path_buf(),
            source,
        })?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|source| LedgerError::Sql {
                path: path.to_path_buf(),
                source,
            })?;
        if version != SCHEMA_VERSION {
            return Err(LedgerError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        Ok(Ledger {
            conn,
            path: path.to_path_buf(),
            known: Default::default(),
            checkpointer: None,
        })
    }

    fn err(&self, source: rusqlite::Error) -> LedgerError {
        LedgerError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A value of the `meta` table.
    pub fn meta(&self, key: &str) -> Result<Option<String>, LedgerError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Records a registration (and its identity, the first time).
    pub fn session(&mut self, s: &Session) -> Result<(), LedgerError> {
        let tx = self.conn.transaction().map_err(|e| LedgerError::Sql {
            path: self.path.clone(),
            source: e,
        })?;
        let at = now_unix();
        let result = (|| {
            tx.execute(
                "INSERT INTO identities(identity, fingerprint, first_seen) VALUES (?1, ?2, ?3)
                 ON CONFLICT(identity) DO NOTHING",
                params![
                    s.identity,
                    crate::identity::fingerprint_hex(&s.identity),
                    at
                ],
            )?;
            tx.execute(
                "INSERT INTO sessions(worker, identity, name, stage, replica, epoch, registered)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(worker) DO UPDATE SET identity = excluded.identity,
                    name = excluded.name, stage = excluded.stage, replica = excluded.replica",
                params![
                    s.worker as i64,
                    s.identity,
                    s.name,
                    s.shard.map(|x| x.0 as i64),
                    s.shard.map(|x| x.1 as i64),
                    s.epoch as i64,
                    at
                ],
            )?;
            tx.commit()
        })();
        result.map_err(|e| self.err(e))
    }

    /// Books a step's entries in one transaction. Returns `false` when the
    /// step was booked before (a step replayed after a restart): the first
    /// booking stands and nothing is added.
    pub fn book(&mut self, b: &StepBooking) -> Result<bool, LedgerError> {
        let path = self.path.clone();
        let err = move |source| LedgerError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(&err)?;
        let fresh = tx
            .execute(
                "INSERT INTO steps(step, epoch, loss, booked) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(step) DO NOTHING",
                params![b.step as i64, b.epoch as i64, b.loss, now_unix()],
            )
            .map_err(&err)?
            == 1;
        if !fresh {
            return Ok(false);
        }
        {
            let mut id = tx
                .prepare_cached(
                    "INSERT INTO identities(identity, fingerprint, first_seen)
                     VALUES (?1, ?2, ?3) ON CONFLICT(identity) DO NOTHING",
                )
                .map_err(&err)?;
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO entries(step, stage, replica, identity, worker, epoch,
                        micro_batches, tokens, forward_flops, input_grad_flops,
                        weight_grad_flops, allreduce_bytes, validation_flops, loss,
                        commitment, signature, reported_seconds, audits_passed,
                        audits_failed, first_layer, end_layer)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14,
                        ?15, ?16, ?17, ?18, ?19, ?20, ?21)",
                )
                .map_err(&err)?;
            let at = now_unix();
            for e in &b.entries {
                if !self.known.contains(&e.identity) {
                    id.execute(params![
                        e.identity,
                        crate::identity::fingerprint_hex(&e.identity),
                        at
                    ])
                    .map_err(&err)?;
                }
                put.execute(params![
                    e.step as i64,
                    e.stage as i64,
                    e.replica as i64,
                    e.identity,
                    e.worker as i64,
                    e.epoch as i64,
                    mbs_text(&e.micro_batches),
                    e.tokens as i64,
                    e.forward_flops,
                    e.input_grad_flops,
                    e.weight_grad_flops,
                    e.allreduce_bytes as i64,
                    e.validation_flops,
                    e.loss,
                    &e.commitment[..],
                    e.signature,
                    e.reported_seconds,
                    e.audits_passed,
                    e.audits_failed,
                    e.layers.start as i64,
                    e.layers.end as i64,
                ])
                .map_err(&err)?;
            }
        }
        tx.commit().map_err(&err)?;
        self.known
            .extend(b.entries.iter().map(|e| e.identity.clone()));
        if let Some(c) = &self.checkpointer {
            c.nudge();
        }
        Ok(true)
    }

    /// Records a refused report.
    pub fn refused(&mut self, r: &Refusal) -> Result<(), LedgerError> {
        self.conn
            .execute(
                "INSERT INTO refusals(at, worker, identity, reason, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    now_unix(),
                    r.worker.map(|w| w as i64),
                    r.identity,
                    r.reason,
                    r.detail
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Records a conviction, durably when it returns: the identity is
    /// barred and its entries over the reward window that ends at the last
    /// booked step (`spec.rewards.windowSteps` as the run's meta records it;
    /// every step when 0) are forfeited. The first conviction of an
    /// identity stands; a second is ignored (`false`).
    pub fn quarantine(&mut self, c: &Conviction) -> Result<bool, LedgerError> {
        let last = self.last_step()?;
        let rewards: pipewright_spec::RewardsSpec = match self.meta("rewards")? {
            Some(text) => serde_json::from_str(&text).unwrap_or_default(),
            None => pipewright_spec::RewardsSpec::default(),
        };
        let (from, to) = window_of(last, &rewards);
        self.conn
            .execute(
                "INSERT INTO quarantine(identity, worker, stage, replica, step, reason, evidence,
                                        forfeit_from, forfeit_to, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT(identity) DO NOTHING",
                params![
                    c.identity,
                    c.worker as i64,
                    c.stage as i64,
                    c.replica as i64,
                    c.step as i64,
                    c.reason,
                    c.evidence,
                    from as i64,
                    to as i64,
                    now_unix()
                ],
            )
            .map(|n| n == 1)
            .map_err(|e| self.err(e))
    }

    /// Every conviction, in the order they were recorded. An older ledger
    /// without the table has none.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>, LedgerError> {
        if !self.has_quarantine()? {
            return Ok(Vec::new());
        }
        let mut q = self
            .conn
            .prepare(
                "SELECT identity, worker, stage, replica, step, reason, evidence,
                        forfeit_from, forfeit_to, at
                 FROM quarantine ORDER BY at, identity",
            )
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map([], |r| {
                Ok(Quarantined {
                    conviction: Conviction {
                        identity: r.get(0)?,
                        worker: r.get::<_, i64>(1)? as u64,
                        stage: r.get::<_, i64>(2)? as usize,
                        replica: r.get::<_, i64>(3)? as usize,
                        step: r.get::<_, i64>(4)? as u64,
                        reason: r.get(5)?,
                        evidence: r.get(6)?,
                    },
                    forfeit_from: r.get::<_, i64>(7)? as u64,
                    forfeit_to: r.get::<_, i64>(8)? as u64,
                    at: r.get(9)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Whether the ledger has the `quarantine` table (older ledgers, read
    /// only, may not).
    fn has_quarantine(&self) -> Result<bool, LedgerError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'quarantine'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(|e| self.err(e))
    }

    /// The last booked step (0: none).
    pub fn last_step(&self) -> Result<u64, LedgerError> {
        self.conn
            .query_row("SELECT COALESCE(MAX(step), 0) FROM steps", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|s| s as u64)
            .map_err(|e| self.err(e))
    }

    /// Booked steps in `range` (inclusive).
    pub fn steps_in(&self, from: u64, to: u64) -> Result<u64, LedgerError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM steps WHERE step BETWEEN ?1 AND ?2",
                params![from as i64, to as i64],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    /// Every entry of steps `from..=to`, by step, stage, replica.
    pub fn entries(&self, from: u64, to: u64) -> Result<Vec<Entry>, LedgerError> {
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT step, stage, replica, identity, worker, epoch, micro_batches, tokens,
                    forward_flops, input_grad_flops, weight_grad_flops, allreduce_bytes,
                    validation_flops, loss, commitment, signature, reported_seconds,
                    audits_passed, audits_failed, first_layer, end_layer
                 FROM entries WHERE step BETWEEN ?1 AND ?2 ORDER BY step, stage, replica",
            )
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map(params![from as i64, to.min(i64::MAX as u64) as i64], |r| {
                let root: Vec<u8> = r.get(14)?;
                let mut commitment = [0u8; 32];
                if root.len() == 32 {
                    commitment.copy_from_slice(&root);
                }
                Ok(Entry {
                    step: r.get::<_, i64>(0)? as u64,
                    stage: r.get::<_, i64>(1)? as usize,
                    replica: r.get::<_, i64>(2)? as usize,
                    identity: r.get(3)?,
                    worker: r.get::<_, i64>(4)? as u64,
                    epoch: r.get::<_, i64>(5)? as u64,
                    micro_batches: parse_mbs(&r.get::<_, String>(6)?),
                    layers: r.get::<_, i64>(19)? as usize..r.get::<_, i64>(20)? as usize,
                    tokens: r.get::<_, i64>(7)? as u64,
                    forward_flops: r.get(8)?,
                    input_grad_flops: r.get(9)?,
                    weight_grad_flops: r.get(10)?,
                    allreduce_bytes: r.get::<_, i64>(11)? as u64,
                    validation_flops: r.get(12)?,
                    loss: r.get(13)?,
                    commitment,
                    signature: r.get(15)?,
                    reported_seconds: r.get(16)?,
                    audits_passed: r.get(17)?,
                    audits_failed: r.get(18)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Names each identity registered under (pod or host names), in order.
    pub fn names(&self) -> Result<Vec<(String, String)>, LedgerError> {
        let mut q = self
            .conn
            .prepare("SELECT identity, name FROM sessions ORDER BY worker")
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Refused reports by reason.
    pub fn refusal_counts(&self) -> Result<Vec<(String, u64)>, LedgerError> {
        let mut q = self
            .conn
            .prepare("SELECT reason, COUNT(*) FROM refusals GROUP BY reason ORDER BY reason")
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// SQLite's own integrity and foreign-key checks: the problems found.
    pub fn integrity(&self) -> Result<Vec<String>, LedgerError> {
        let mut problems = Vec::new();
        let mut q = self
            .conn
            .prepare("PRAGMA integrity_check")
            .map_err(|e| self.err(e))?;
        for row in q
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?
        {
            let row = row.map_err(|e| self.err(e))?;
            if row != "ok" {
                problems.push(format!("integrity: {row}"));
            }
        }
        let mut q = self
            .conn
            .prepare("PRAGMA foreign_key_check")
            .map_err(|e| self.err(e))?;
        for row in q
            .query_map([], |r| {
                Ok(format!(
                    "table {} row {} breaks a reference to {}",
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<i64>>(1)?.unwrap_or(-1),
                    r.get::<_, String>(2)?
                ))
            })
            .map_err(|e| self.err(e))?
        {
            problems.push(row.map_err(|e| self.err(e))?);
        }
        let orphans: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM steps s WHERE NOT EXISTS
                    (SELECT 1 FROM entries e WHERE e.step = s.step)",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        if orphans > 0 {
            problems.push(format!("{orphans} booked step(s) have no entries"));
        }
        Ok(problems)
    }

    /// Per identity over steps `from..=to`, summed by SQLite: FLOPs by
    /// kind, all-reduce bytes, steps with work, failed audits. The
    /// coordinator's shares come from this; `verify` checks it against a
    /// pass over the raw entries.
    pub fn totals(&self, from: u64, to: u64) -> Result<Vec<shares::Totals>, LedgerError> {
        // An entry is forfeited inside a conviction's range (a ledger from
        // before convictions were kept has none).
        let forfeited = if self.has_quarantine()? {
            "EXISTS (SELECT 1 FROM quarantine q WHERE q.identity = entries.identity
                AND entries.step BETWEEN q.forfeit_from AND q.forfeit_to)"
        } else {
            "0"
        };
        let mut q = self
            .conn
            .prepare_cached(
                &format!("WITH e AS (
                    SELECT entries.*, {forfeited} AS forfeited
                    FROM entries WHERE step BETWEEN ?1 AND ?2
                 )
                 SELECT identity,
                    SUM(CASE WHEN audits_failed = 0 AND NOT forfeited THEN forward_flops ELSE 0 END),
                    SUM(CASE WHEN audits_failed = 0 AND NOT forfeited
                        THEN input_grad_flops ELSE 0 END),
                    SUM(CASE WHEN audits_failed = 0 AND NOT forfeited
                        THEN weight_grad_flops ELSE 0 END),
                    SUM(CASE WHEN audits_failed = 0 AND NOT forfeited
                        THEN validation_flops ELSE 0 END),
                    SUM(CASE WHEN audits_failed = 0 AND NOT forfeited
                        THEN allreduce_bytes ELSE 0 END),
                    COUNT(DISTINCT step), SUM(audits_passed), SUM(audits_failed),
                    SUM(tokens),
                    SUM(CASE WHEN micro_batches = '' THEN 0 ELSE
                        LENGTH(micro_batches) - LENGTH(REPLACE(micro_batches, ',', '')) + 1 END),
                    GROUP_CONCAT(DISTINCT stage),
                    SUM(forfeited)
                 FROM e
                 GROUP BY identity ORDER BY identity"),
            )
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map(params![from as i64, to.min(i64::MAX as u64) as i64], |r| {
                let stages: String = r.get(11)?;
                Ok(shares::Totals {
                    identity: r.get(0)?,
                    forward_flops: r.get(1)?,
                    input_grad_flops: r.get(2)?,
                    weight_grad_flops: r.get(3)?,
                    validation_flops: r.get(4)?,
                    allreduce_bytes: r.get::<_, i64>(5)? as u64,
                    steps: r.get::<_, i64>(6)? as u64,
                    audits_passed: r.get::<_, i64>(7)? as u64,
                    audits_failed: r.get::<_, i64>(8)? as u64,
                    tokens: r.get::<_, i64>(9)? as u64,
                    micro_batches: r.get::<_, i64>(10)? as u64,
                    stages: stages.split(',').filter_map(|s| s.parse().ok()).collect(),
                    forfeited: r.get::<_, i64>(12)? as u64,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests;
