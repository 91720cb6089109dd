//! Leader election over a `coordination.k8s.io/v1` Lease, so that of several
//! operator replicas exactly one reconciles.
//!
//! The holder renews the lease every `retry_period`. Another replica takes
//! the lease over only after it has seen the same record (holder and renew
//! time) unchanged for `lease_duration` by its own clock, so clocks of
//! different machines never need to agree. A holder that cannot renew for
//! `renew_deadline` (shorter than `lease_duration`) stops reconciling before
//! anyone else may start; on shutdown it releases the lease so a standby
//! takes over at once. Every write carries the resource version read just
//! before, so two replicas racing for the lease cannot both win.
//! `tests/leader.rs` checks each of these against a scripted API server.
//!
//! Why this is not a crate (checked December 2026 on crates.io):
//! - `kube-coordinate` (latest 2.0.0-rc.0) depends on `kube` 2; it has no
//!   release for `kube` 5, which this operator uses.
//! - `kube-lease-manager` 0.13.1 does support `kube` 5 (with `k8s-openapi`
//!   0.29), but it decides that a lease expired by adding its duration to
//!   the holder's `renewTime` and comparing with its own wall clock, so a
//!   taker whose clock runs ahead of the holder's takes the lease over
//!   while the holder still acts; the guarantee above (expiry timed by the
//!   taker's own monotonic clock from when it saw the record change) would
//!   be lost. It also needs Rust 1.89, above this workspace's 1.85.
//! - `kube` 5 itself (`kube-runtime`) has no leader election.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};

/// Where the lease lives and how it is timed.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Name of the Lease object.
    pub name: String,
    /// Namespace of the Lease object.
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// How long the holder keeps acting without a successful renewal.
    pub renew_deadline: Duration,
    /// Interval between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The usual timings (15 s lease, 10 s renew deadline, 2 s retry).
    pub fn new(name: String, namespace: String, identity: String) -> Self {
        Self {
            name,
            namespace,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The holder and renew time last seen, and when they were first seen.
type Observed = (Option<String>, Option<MicroTime>, Instant);

/// Acquires, renews and releases one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Mutex<Option<Observed>>,
}

impl LeaderElector {
    /// An elector for the lease in `config`.
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: Mutex::new(None),
        }
    }

    /// The timings and names in use.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// One attempt to take or renew the lease; true when this replica holds
    /// it afterwards.
    ///
    /// # Errors
    /// When the API server fails a request (a lost race is `Ok(false)`).
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let duration = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return lost_race_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.config.identity.as_str());
        if !mine && holder.is_some() {
            let valid_for = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.config.lease_duration, Duration::from_secs);
            if self.unchanged_for(holder, spec.renew_time.clone()) < valid_for {
                return Ok(false);
            }
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        let mut taken = lease;
        taken.spec = Some(LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(duration),
            acquire_time: if mine {
                spec.acquire_time.clone()
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if mine { transitions } else { transitions + 1 }),
            ..spec
        });
        lost_race_is_false(
            self.api
                .replace(&self.config.name, &PostParams::default(), &taken)
                .await,
        )
    }

    /// How long the lease record (`holder`, `renew`) has looked the same.
    fn unchanged_for(&self, holder: Option<String>, renew: Option<MicroTime>) -> Duration {
        let Ok(mut observed) = self.observed.lock() else {
            return Duration::ZERO;
        };
        match observed.as_ref() {
            Some((h, r, since)) if *h == holder && *r == renew => since.elapsed(),
            _ => {
                *observed = Some((holder, renew, Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// Gives the lease up if this replica holds it, so a standby takes over
    /// without waiting for it to expire.
    ///
    /// # Errors
    /// When the API server fails a request.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        lost_race_is_false(
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await,
        )?;
        Ok(())
    }

    /// Tries to acquire the lease every `retry_period` until it succeeds
    /// (true) or `stop` completes (false).
    pub async fn acquire(&self, stop: &tokio_util::sync::CancellationToken) -> bool {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "acquiring the leader lease"),
            }
            tokio::select! {
                () = stop.cancelled() => return false,
                () = tokio::time::sleep(self.config.retry_period) => {}
            }
        }
    }

    /// Renews the lease every `retry_period` until a renewal has not
    /// succeeded for `renew_deadline` (leadership lost: returns) or `stop`
    /// completes (returns too; the caller tells them apart).
    pub async fn keep(&self, stop: &tokio_util::sync::CancellationToken) {
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.config.retry_period) => {}
            }
            // A request that hangs must not outlive the deadline: past it,
            // another replica may already lead.
            let left = self.config.renew_deadline.saturating_sub(renewed.elapsed());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => {
                    tracing::error!("the leader lease was taken by another replica");
                    return;
                }
                Ok(Err(error)) => tracing::warn!(%error, "renewing the leader lease"),
                Err(_) => tracing::warn!("renewing the leader lease timed out"),
            }
            if renewed.elapsed() >= self.config.renew_deadline {
                tracing::error!(
                    deadline = ?self.config.renew_deadline,
                    "could not renew the leader lease in time"
                );
                return;
            }
        }
    }
}

fn lost_race_is_false<T>(result: Result<T, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
