//! A shard worker's part in the audits of a step: the barrier's answer may
//! carry audit orders. For each it is audited on (`Provide`) it uploads
//! the evidence of that micro-batch (a contribution audit: of every
//! micro-batch of its step, in one set); for each it validates
//! (`Validate`) it fetches the audited replica's evidence, recomputes the
//! micro-batch (a contribution audit: the replica's whole step and its
//! gradient contribution) with its snapshot of the weights of before the
//! step, and signs the hashes. For each parameters order (`Weights`: the
//! coordinator recomputes a micro-batch itself, as second validator of a
//! disputed audit or as the only one of a stage with one training replica)
//! it uploads its stage's parameters of before the step from the snapshot.
//! It reports every order (`POST /v1/audit`), one after the other, and
//! takes the answer to the last as the barrier's, which may carry more
//! orders (a second validation): until one comes without.
//!
//! A quarantined identity is refused on every request (HTTP 403, a body
//! starting `quarantined:`): the worker writes the reason where Kubernetes
//! reads a container's termination message and ends with
//! [`crate::EXIT_QUARANTINED`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::session::Session;
use crate::coord::api::{
    audit_message, contribution_message, AuditClaim, AuditOrder, AuditReport, AuditResult,
    AuditRole, Barrier, ContributionClaim, ContributionScope,
};
use crate::coord::ClientError;
use crate::pipeline::{AttackKind, Evidence, MicroBatchHashes, Snapshot, StageWorker};
use crate::telemetry::span;

/// The environment variable naming the file a quarantined worker writes
/// its reason to (else `/dev/termination-log` when that is writable).
pub const TERMINATION_LOG_ENV: &str = "PIPEWRIGHT_TERMINATION_LOG";

/// This worker's identity was quarantined by the run's coordinator: it
/// must stop. Its message is the coordinator's (`quarantined: …`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Quarantined(pub String);

impl Quarantined {
    /// The quarantine `e` reports, if it is one: logged and written to the
    /// termination message file.
    pub fn from_client(e: &ClientError) -> Option<Quarantined> {
        let message = e.quarantined()?.trim().to_string();
        tracing::error!("{message}");
        match termination_log() {
            Some(path) => {
                if let Err(err) = std::fs::write(&path, format!("{message}\n")) {
                    tracing::warn!("writing {}: {err}", path.display());
                }
            }
            None => tracing::debug!("no termination log to write"),
        }
        Some(Quarantined(message))
    }
}

/// An error for `e`: [`Quarantined`] when it is one, else `e` with
/// `context`.
pub(super) fn client_error(e: ClientError, context: &str) -> anyhow::Error {
    match Quarantined::from_client(&e) {
        Some(q) => anyhow::Error::new(q),
        None => anyhow::Error::new(e).context(context.to_string()),
    }
}

/// `Ok(None)` when `e` says the step's audits are gone (the coordinator
/// no longer knows this worker, the run ended, or it dropped the audits
/// because the wiring changed: asking for the next wiring says what
/// now); else the error, [`Quarantined`] when it is one.
fn moved_on<T>(e: ClientError, context: &str) -> Result<Option<T>> {
    match &e {
        ClientError::Unknown | ClientError::Finished => Ok(None),
        ClientError::Refused {
            code: 400 | 409,
            message,
            ..
        } => {
            tracing::warn!("{context}: {message}; asking for the next wiring");
            Ok(None)
        }
        _ => Err(client_error(e, context)),
    }
}

/// Where a quarantined worker writes its reason: the file
/// [`TERMINATION_LOG_ENV`] names, else Kubernetes' `/dev/termination-log`
/// when it exists and is writable.
fn termination_log() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(TERMINATION_LOG_ENV).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let k8s = Path::new("/dev/termination-log");
    let writable = std::fs::metadata(k8s).is_ok_and(|m| !m.permissions().readonly())
        && std::fs::OpenOptions::new().append(true).open(k8s).is_ok();
    writable.then(|| k8s.to_path_buf())
}

/// Carries out the audit orders `barrier` holds, and those of the answers
/// after it, until an answer without orders, which it returns. `None` when
/// the coordinator no longer knows this worker.
pub(super) fn carry_out(
    session: &Session,
    wk: &mut StageWorker,
    snapshot: &mut Snapshot,
    epoch: u64,
    mut barrier: Barrier,
) -> Result<Option<Barrier>> {
    while !barrier.audits.is_empty() {
        let orders = std::mem::take(&mut barrier.audits);
        let shard = wk.shard();
        let (stage, replica, step) = (shard.stage, shard.replica, wk.steps_done());
        let _s = span!("audits", stage, replica, step, orders = orders.len()).entered();
        // Every worker uploads before it waits for another's evidence, so
        // no two wait on each other.
        let (provide, rest): (Vec<&AuditOrder>, Vec<&AuditOrder>) = orders
            .iter()
            .partition(|o| matches!(o.role, AuditRole::Provide));
        let (weights, validate): (Vec<&AuditOrder>, Vec<&AuditOrder>) = rest
            .into_iter()
            .partition(|o| matches!(o.role, AuditRole::Weights | AuditRole::Update));
        let mut reports = Vec::with_capacity(orders.len());
        for o in provide {
            if provide_evidence(session, wk, o)?.is_none() {
                return Ok(None);
            }
            reports.push(report(session, wk, epoch, o, AuditResult::Provided));
        }
        for o in validate {
            let Some(result) = validate_order(session, wk, snapshot, o)? else {
                return Ok(None);
            };
            reports.push(report(session, wk, epoch, o, result));
        }
        for o in weights {
            if upload_weights(session, wk, snapshot, o)?.is_none() {
                return Ok(None);
            }
            reports.push(report(session, wk, epoch, o, AuditResult::Provided));
        }
        // The coordinator answers a report at once while this worker still
        // has orders to report (listing them), and holds the last one until
        // the step's audits are decided: that answer is the barrier's.
        let mut last = None;
        for r in &reports {
            match session.client.audit(r) {
                Ok(b) => last = Some(b),
                Err(e) => return moved_on(e, "reporting an audit"),
            }
        }
        barrier = last.context("no audit report was answered")?;
    }
    Ok(Some(barrier))
}

fn report(
    session: &Session,
    wk: &StageWorker,
    epoch: u64,
    o: &AuditOrder,
    result: AuditResult,
) -> AuditReport {
    AuditReport {
        worker: session.worker,
        epoch,
        completed: wk.steps_done(),
        audit: o.audit,
        result,
    }
}

/// Uploads what micro-batch `o.mb` of the step received (a contribution
/// audit: every micro-batch of its scope, in one set). A worker that kept
/// nothing for a micro-batch uploads it empty, which the coordinator
/// judges. `None` when the audits moved on.
fn provide_evidence(session: &Session, wk: &StageWorker, o: &AuditOrder) -> Result<Option<()>> {
    let kept = |mb: u64| match wk.evidence(mb) {
        Some(e) => e.clone(),
        None => {
            tracing::warn!(
                "audit {}: nothing kept of micro-batch {mb} of step {}",
                o.audit,
                o.step
            );
            Evidence::default()
        }
    };
    let bytes = match &o.contribution {
        None => kept(o.mb).encode()?,
        Some(scope) => {
            let set = scope
                .micro_batches
                .iter()
                .map(|&mb| (mb, kept(mb)))
                .collect();
            Evidence::encode_set(&set)?
        }
    };
    match session.client.put_evidence(o.audit, session.worker, &bytes) {
        Ok(()) => Ok(Some(())),
        Err(e) => moved_on(e, "uploading an audit's evidence"),
    }
}

/// The snapshot's state of before `o`'s step (with the optimizer's
/// moments when `moments`), or why there is none.
fn state_before<'a>(
    snapshot: &'a mut Snapshot,
    wk: &StageWorker,
    o: &AuditOrder,
    moments: bool,
) -> Result<crate::pipeline::Before<'a>> {
    let before = if moments {
        snapshot.before_with_moments(wk)
    } else {
        snapshot.before(wk)
    };
    before
        .with_context(|| format!("audit {}: the snapshot", o.audit))?
        .with_context(|| {
            format!(
                "audit {}: no snapshot of the weights before step {}",
                o.audit, o.step
            )
        })
}

/// Uploads the stage's parameters of before the audited step, from the
/// snapshot, for the coordinator to recompute a micro-batch itself (a
/// disputed one, or any audited one of a stage with one training
/// replica); the answer comes once it has. `None` when the audits moved
/// on.
fn upload_weights(
    session: &Session,
    wk: &StageWorker,
    snapshot: &mut Snapshot,
    o: &AuditOrder,
) -> Result<Option<()>> {
    let update = o.role == AuditRole::Update;
    let mut before = state_before(snapshot, wk, o, update)?;
    // With the update: the moments of before the step and what the step's
    // update applied, for the coordinator to replay it. A worker that kept
    // none uploads its parameters alone, which the coordinator refuses.
    let bytes = if update {
        wk.encode_update(before.state()).unwrap_or_else(|e| {
            tracing::warn!("audit {}: no update to upload: {e}", o.audit);
            StageWorker::encode_weights(before.state())
        })
    } else {
        StageWorker::encode_weights(before.state())
    };
    let t = std::time::Instant::now();
    match session.client.put_weights(o.audit, session.worker, &bytes) {
        Ok(()) => {
            tracing::info!(
                "audit {}: uploaded stage {}'s parameters of before step {} ({} bytes) in {:.1} ms",
                o.audit,
                o.stage,
                o.step,
                bytes.len(),
                t.elapsed().as_secs_f64() * 1e3
            );
            Ok(Some(()))
        }
        Err(e) => moved_on(e, "uploading an audit's parameters"),
    }
}

/// Recomputes the micro-batch `o` names from the audited replica's
/// evidence and signs the hashes. Evidence that cannot be recomputed
/// (malformed, or refused by the stage) gives zero hashes: it does not
/// reproduce. `None` when the audits moved on.
fn validate_order(
    session: &Session,
    wk: &mut StageWorker,
    snapshot: &mut Snapshot,
    o: &AuditOrder,
) -> Result<Option<AuditResult>> {
    let AuditRole::Validate { audited_replica } = o.role else {
        unreachable!("only validation orders come here")
    };
    let bytes = match session.client.get_evidence(o.audit, session.worker) {
        Ok(b) => b,
        Err(e) => return moved_on(e, "fetching an audit's evidence"),
    };
    let mut before = state_before(snapshot, wk, o, false)?;
    if let Some(scope) = &o.contribution {
        return Ok(Some(validate_contribution(
            session,
            wk,
            before.state(),
            o,
            audited_replica,
            scope,
            &bytes,
        )));
    }
    let t = std::time::Instant::now();
    let recomputed = Evidence::decode(&bytes, wk.evidence_limit())
        .and_then(|e| wk.recompute(before.state(), o.step.saturating_sub(1), o.mb, &e));
    let mut hashes = match recomputed {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(
                "audit {}: micro-batch {} of replica {audited_replica} does not recompute: {e}",
                o.audit,
                o.mb
            );
            MicroBatchHashes::default()
        }
    };
    tracing::info!(
        "audit {}: recomputed micro-batch {} of stage {} replica {audited_replica} at step {} in {:.1} ms",
        o.audit,
        o.mb,
        o.stage,
        o.step,
        t.elapsed().as_secs_f64() * 1e3
    );
    if wk.attack_now() == Some(AttackKind::Lie) {
        // The `lie` drill: a verdict that is not what it computed.
        hashes.output = *blake3::hash(&hashes.output).as_bytes();
    }
    let (input, output, gradient) = (
        hex::encode(hashes.input),
        hex::encode(hashes.output),
        hex::encode(hashes.gradient),
    );
    let claim = AuditClaim {
        run_id: &session.run_hex,
        audit: o.audit,
        step: o.step,
        stage: o.stage,
        mb: o.mb,
        audited_replica,
        input: &input,
        output: &output,
        gradient: &gradient,
    };
    let signature = session
        .identity
        .sign(crate::identity::AUDIT_DOMAIN, &audit_message(&claim));
    Ok(Some(AuditResult::Recomputed {
        output,
        gradient,
        input,
        signature,
    }))
}

/// Uploads the proof of what replica `audited_replica` sent this worker in
/// the step's gathers (the frames it signed, `sync::receipt`) when that is
/// not the contribution it committed to: the coordinator strikes a receipt
/// claimed without one. A failed upload is logged; the claim then stands
/// unproven.
fn prove_receipt(
    session: &Session,
    wk: &StageWorker,
    o: &AuditOrder,
    audited_replica: usize,
    scope: &ContributionScope,
    received: &str,
) {
    let zero = hex::encode([0u8; 32]);
    if received == zero || scope.committed.as_deref().is_none_or(|c| c == received) {
        return;
    }
    let Some(proof) = wk.receipt_proof(audited_replica) else {
        tracing::warn!(
            "audit {}: received contribution {} from replica {audited_replica}, not the one it \
             committed to, but kept no frames of it to prove it",
            o.audit,
            &received[..16]
        );
        return;
    };
    let message = crate::coord::api::receipt_message(
        &session.run_hex,
        o.audit,
        session.worker,
        &hex::encode(blake3::hash(&proof).as_bytes()),
    );
    let signature = session
        .identity
        .sign(crate::identity::AUDIT_DOMAIN, &message);
    match session
        .client
        .put_receipt(o.audit, session.worker, &proof, &signature)
    {
        Ok(()) => tracing::info!(
            "audit {}: proved receiving contribution {} from replica {audited_replica} ({} bytes)",
            o.audit,
            &received[..16],
            proof.len()
        ),
        Err(e) => tracing::warn!("audit {}: the receipt's proof was not taken: {e}", o.audit),
    }
}

/// A contribution audit's verdict: recomputes replica `audited_replica`'s
/// whole step from the evidence set `bytes` with the weights of `before`,
/// and signs the hash of the contribution recomputed together with the
/// hash of the one this worker received from that replica in the step's
/// gather. Evidence that cannot be recomputed (malformed, incomplete, or
/// refused by the stage) gives a zero hash: it does not reproduce; no
/// report of the gather (none was made) gives a zero `received`.
fn validate_contribution(
    session: &Session,
    wk: &mut StageWorker,
    before: &mut crate::pipeline::StageState,
    o: &AuditOrder,
    audited_replica: usize,
    scope: &ContributionScope,
    bytes: &[u8],
) -> AuditResult {
    let t = std::time::Instant::now();
    let limit = wk
        .evidence_limit()
        .saturating_mul(scope.micro_batches.len().max(1));
    let recomputed = Evidence::decode_set(bytes, limit).and_then(|set| {
        wk.recompute_contribution(
            before,
            o.step.saturating_sub(1),
            audited_replica,
            &scope.micro_batches,
            &set,
        )
    });
    let mut recomputed = match recomputed {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(
                "audit {}: the contribution of replica {audited_replica} does not recompute: {e}",
                o.audit
            );
            [0; 32]
        }
    };
    tracing::info!(
        "audit {}: recomputed the contribution of stage {} replica {audited_replica} at step {} \
         ({} micro-batches) in {:.1} ms",
        o.audit,
        o.stage,
        o.step,
        scope.micro_batches.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let received = wk
        .contributions()
        .and_then(|r| {
            let rank =
                (0..r.hashes.len()).find(|&k| wk.replica_of_rank(k) == Some(audited_replica))?;
            r.hashes.get(rank).copied()
        })
        .unwrap_or([0; 32]);
    let mut received = hex::encode(received);
    match wk.attack_now() {
        // The `lie` drill: a verdict that is not what it computed.
        Some(AttackKind::Lie) => recomputed = *blake3::hash(&recomputed).as_bytes(),
        // The `lie-received` drill: a receipt it cannot prove.
        Some(AttackKind::LieReceived) => {
            received = hex::encode(blake3::hash(received.as_bytes()).as_bytes());
        }
        _ => prove_receipt(session, wk, o, audited_replica, scope, &received),
    }
    let recomputed = hex::encode(recomputed);
    let claim = ContributionClaim {
        run_id: &session.run_hex,
        audit: o.audit,
        step: o.step,
        stage: o.stage,
        audited_replica,
        recomputed: &recomputed,
        received: &received,
    };
    let signature = session
        .identity
        .sign(crate::identity::AUDIT_DOMAIN, &contribution_message(&claim));
    AuditResult::Contribution {
        recomputed,
        received,
        signature,
    }
}
