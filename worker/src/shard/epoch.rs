//! The epoch loop of a shard worker: ask the coordinator for the wiring,
//! build (or keep) the stage, bring its state to the plan's step
//! ([`super::state`]), link to the neighbours and the replica ring with
//! this epoch's credentials, and train step by step ([`super::step`]) until
//! a peer is lost or the coordinator moves on; then drop the links and ask
//! again.

use std::sync::atomic::Ordering;

use anyhow::{bail, Context, Result};

use super::session::Session;
use super::{state, step};
use crate::coord::api::Wiring;
use crate::link::{RunId, RunKey};
use crate::pipeline::{Auth, Peers, RingPeers, Route, Shard, Snapshot, StageWorker};
use crate::telemetry::{self, span};

/// What a worker holds across epochs: its stage (once wired) and a
/// snapshot of its state one step back, so any plan can roll it back.
struct Held {
    worker: Option<StageWorker>,
    snapshot: Snapshot,
}

impl Held {
    /// The steps it completed and whether it keeps a snapshot, as
    /// registration reports them.
    fn report(&self) -> Option<(u64, bool)> {
        self.worker
            .as_ref()
            .map(|w| (w.steps_done(), self.snapshot.is_one_back(w.steps_done())))
    }
}

impl Session {
    /// Epoch after epoch until the run ends: `Ok` when it succeeded.
    pub(super) fn train(&mut self) -> Result<()> {
        let steps = self.manifest.spec.training.steps;
        let mut held = Held {
            worker: None,
            snapshot: Snapshot::new(self.manifest.spec.training.snapshot),
        };
        let mut after = 0u64;
        loop {
            let report = held.report();
            let w = self.wiring(after, || report)?;
            if let Some(end) = &w.finished {
                if end == "Succeeded" {
                    eprintln!("worker {}: the run succeeded", self.worker);
                    return Ok(());
                }
                bail!("the run ended: {end}");
            }
            let shard = Shard {
                stage: w.shard.0,
                replica: w.shard.1,
            };
            self.fit(&mut held, &w, shard)?;
            self.work_in(w.epoch);
            self.metrics.hold(
                shard.stage,
                shard.replica,
                &self.register.name,
                &self.identity.fingerprint(),
            );
            after = w.epoch;
            self.epoch_seen.fetch_max(w.epoch, Ordering::Relaxed);
            let Held { worker, snapshot } = &mut held;
            let Some(wk) = worker.as_mut() else {
                unreachable!("fitted above")
            };
            if !w.lanes.is_empty() && !w.lanes.contains(&shard.replica) {
                // Its lane sits this epoch out (another of its workers was
                // lost); wait for the next one.
                eprintln!(
                    "worker {}: stage {} replica {} waits for its lane to be filled again",
                    self.worker, shard.stage, shard.replica
                );
                continue;
            }
            if !self.enter(wk, snapshot, &w)? {
                continue;
            }
            step::run(self, wk, snapshot, &w)?;
            if wk.steps_done() >= steps {
                if let Err(e) = wk.flush() {
                    tracing::warn!("flushing the last frames: {e}");
                }
            }
            wk.unlink();
        }
    }

    /// Builds the stage the wiring gives this worker, unless it already
    /// holds that shard and layer range (a new stage has no snapshot).
    fn fit(&self, held: &mut Held, w: &Wiring, shard: Shard) -> Result<()> {
        let layers = w.layers[0]..w.layers[1];
        if held
            .worker
            .as_ref()
            .is_none_or(|x| x.shard() != shard || x.stage().layers != layers)
        {
            held.worker = Some(self.new_stage(shard, layers)?);
            held.snapshot.clear();
        }
        Ok(())
    }

    /// A fresh stage of `shard` over `layers`, initialised from the run's
    /// seed and set up as this worker's flags say (slowdown, send cap,
    /// drill).
    pub(super) fn new_stage(
        &self,
        shard: Shard,
        layers: std::ops::Range<usize>,
    ) -> Result<StageWorker> {
        let mut wk =
            StageWorker::prepare_layers(&self.manifest, shard, self.timeout, Some(layers))?;
        wk.set_slowdown(self.slowdown);
        wk.set_attack(self.attack);
        // Audited stages keep what each micro-batch received until the
        // next step: under micro-batch audits (a stage of one replica too:
        // the coordinator validates it, from this evidence and the
        // snapshot's parameters, which every worker keeps), or under
        // contribution audits (which need another replica).
        let spec = &self.manifest.spec;
        let contributions = spec
            .validation
            .effective_contribution_audit_rate(spec.pipeline.aggregation)
            > 0.0;
        wk.set_retain(
            spec.validation.audit_rate > 0.0 || (contributions && spec.pipeline.replicas > 1),
        );
        wk.set_max_send_rate(self.max_send_rate);
        Ok(wk)
    }

    /// Starts the epoch `w` wires: brings the state to its step, and links.
    /// `false` when there is nothing to train in it (the plan moved on, the
    /// run's steps are done, or linking failed): ask for the next wiring.
    /// Restoring, handing over and linking belong to the trace of the
    /// epoch's first step.
    fn enter(&self, wk: &mut StageWorker, snapshot: &mut Snapshot, w: &Wiring) -> Result<bool> {
        let (stage, replica) = w.shard;
        let setup = span!(
            "epoch start",
            stage,
            replica,
            epoch = w.epoch,
            step = w.step + 1
        );
        telemetry::parent_on(&setup, w.traceparent.as_deref());
        let setup = setup.entered();
        if !state::bring_to_plan(self, wk, snapshot, w)? {
            return Ok(false);
        }
        super::complaint::carry_out_rechecks(self, wk, w);
        if w.recheck_only {
            // An epoch for rechecks: nobody links in it.
            return Ok(false);
        }
        if wk.steps_done() >= self.manifest.spec.training.steps {
            return Ok(false);
        }
        wk.set_abort(self.abort.clone());
        let auth = epoch_auth(&self.run_id, &self.key, w.epoch);
        let peers = self.peers(w)?;
        self.configure(wk, w)?;
        if let Err(e) = wk.link(peers, &auth) {
            tracing::warn!("epoch {}: linking failed: {e}", w.epoch);
            telemetry::fail(&setup, e.to_string());
            step::report_failure(self, w.epoch, &e);
            wk.unlink();
            return Ok(false);
        }
        super::complaint::authorship(self, wk, w)?;
        Ok(true)
    }

    /// The listeners and addresses of this epoch's links: the pipeline
    /// listener where a neighbour connects to this stage (every stage but
    /// the first, and the first too when a tied head far away sends its
    /// gradient), the next stage's replicas, the tied stage, the ring.
    fn peers(&self, w: &Wiring) -> Result<Peers> {
        let spec = &self.manifest.spec;
        let tied_far = spec.model.tied_embeddings && spec.pipeline.stages > 2;
        let listener = (w.shard.0 > 0 || tied_far)
            .then(|| self.pipe.try_clone())
            .transpose()?;
        let ring = match &w.ring_next {
            Some(next) => Some(RingPeers {
                listener: self.ring.try_clone()?,
                next: next.clone(),
            }),
            None => None,
        };
        Ok(Peers {
            listener,
            next: w.next.clone(),
            tie: w.tie.clone(),
            ring,
        })
    }

    /// Sets the epoch's training replicas (all when the wiring names none)
    /// and its route (the lanes when it names none).
    fn configure(&self, wk: &mut StageWorker, w: &Wiring) -> Result<()> {
        let spec = &self.manifest.spec;
        let lanes = if w.lanes.is_empty() {
            (0..spec.pipeline.replicas).collect()
        } else {
            w.lanes.clone()
        };
        // A stage with one training replica under audits keeps what each
        // update applies and commits to it: the coordinator replays the
        // update of each step it audits (`pipeline::update`; the
        // coordinator's side of the rule is `updates_committed`).
        wk.set_keep_update(spec.validation.audit_rate > 0.0 && lanes.len() == 1);
        wk.set_lanes(lanes)
            .context("the coordinator's training replicas do not fit this run")?;
        let route = w.route.clone().unwrap_or_else(|| {
            Route::lanes(
                spec.pipeline.stages,
                spec.pipeline.replicas,
                spec.training.micro_batches,
            )
        });
        wk.set_route(route)
            .context("the coordinator's route does not fit this run")?;
        Ok(())
    }
}

/// The link credentials of one epoch: links of different epochs cannot
/// connect to each other.
fn epoch_auth(run_id: &RunId, key: &RunKey, epoch: u64) -> Auth {
    Auth {
        run_id: crate::link::sign::epoch_run_id(run_id, epoch),
        key: key.clone(),
    }
}
