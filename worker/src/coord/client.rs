//! The worker's side of the coordinator API.

use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use ureq::Agent;

use crate::pipeline::StatePart;

use super::api::{
    AuditReport, Barrier, Failure, Heartbeat, HeartbeatReply, Register, Registered, StepDone,
    Wiring,
};

/// The start of the body of a refusal (HTTP 403) the coordinator gives a
/// quarantined identity, on any request.
pub const QUARANTINED_PREFIX: &str = "quarantined:";

/// Why a request to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator does not know this worker (it restarted, or the
    /// worker's lease expired): register again.
    #[error("the coordinator does not know this worker")]
    Unknown,
    /// The run is over.
    #[error("the run has finished")]
    Finished,
    /// The coordinator refused the request.
    #[error("the coordinator refused {what} ({code}): {message}")]
    Refused {
        /// Request.
        what: &'static str,
        /// HTTP status.
        code: u16,
        /// Its explanation.
        message: String,
    },
    /// No answer for longer than the client's patience.
    #[error("no answer from the coordinator at {url} for {seconds}s: {last}")]
    Unreachable {
        /// Coordinator URL.
        url: String,
        /// Seconds tried.
        seconds: u64,
        /// Last transport error.
        last: String,
    },
    /// An answer that is not what the API promises.
    #[error("malformed answer to {what}: {message}")]
    Malformed {
        /// Request.
        what: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl ClientError {
    /// The coordinator's explanation when this is the refusal it gives a
    /// quarantined identity (HTTP 403, a body starting `quarantined:`).
    pub fn quarantined(&self) -> Option<&str> {
        match self {
            ClientError::Refused {
                code: 403, message, ..
            } if message.starts_with(QUARANTINED_PREFIX) => Some(message),
            _ => None,
        }
    }
}

/// A connection to one run's coordinator, authenticated by the join token.
/// Transport errors are retried for `patience` (a coordinator may be
/// restarting); refusals are returned at once.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    auth: String,
    agent: Agent,
    patience: Duration,
}

enum Body<'a> {
    None,
    Json(Vec<u8>),
    /// Raw bytes (an audit's evidence).
    Bytes(&'a [u8]),
    /// A stage's state, read from its tensors (or file) as it is sent.
    Part(&'a StatePart<'a>),
}

/// The least rate an upload of a stage's state is given time for: its
/// deadline grows with its size beyond the client's usual 30 s.
const PART_BYTES_PER_SECOND: u64 = 20 << 20;

impl Client {
    /// A client of the coordinator at `url` (`http://host:port`).
    pub fn new(url: &str, token: &str, patience: Duration) -> Self {
        let config = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        Client {
            base: url.trim_end_matches('/').to_string(),
            auth: format!("Bearer {token}"),
            agent: Agent::new_with_config(config),
            patience,
        }
    }

    /// The coordinator's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn send(
        &self,
        what: &'static str,
        method: &str,
        path: &str,
        body: Body<'_>,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let url = format!("{}{path}", self.base);
        let start = Instant::now();
        loop {
            let result = match (&body, method) {
                (Body::None, "POST") => self
                    .agent
                    .post(&url)
                    .header("Authorization", &self.auth)
                    .send_empty(),
                (Body::None, _) => self
                    .agent
                    .get(&url)
                    .header("Authorization", &self.auth)
                    .call(),
                (Body::Json(b), _) => self
                    .agent
                    .post(&url)
                    .header("Authorization", &self.auth)
                    .header("Content-Type", "application/json")
                    .send(b.as_slice()),
                (Body::Bytes(b), "PUT") => self
                    .agent
                    .put(&url)
                    .header("Authorization", &self.auth)
                    .send(*b),
                (Body::Bytes(b), _) => self
                    .agent
                    .post(&url)
                    .header("Authorization", &self.auth)
                    .send(*b),
                (Body::Part(p), _) => match p.open() {
                    Ok(mut reader) => {
                        let seconds = 30 + p.len() / PART_BYTES_PER_SECOND;
                        self.agent
                            .put(&url)
                            .config()
                            .timeout_global(Some(Duration::from_secs(seconds)))
                            .build()
                            .header("Authorization", &self.auth)
                            .header("Content-Length", p.len().to_string())
                            .send(ureq::SendBody::from_reader(&mut reader))
                    }
                    Err(e) => {
                        return Err(ClientError::Malformed {
                            what,
                            message: format!("reading the state to send: {e}"),
                        })
                    }
                },
            };
            let mut resp = match result {
                Ok(r) => r,
                Err(e) => {
                    if start.elapsed() > self.patience {
                        return Err(ClientError::Unreachable {
                            url: self.base.clone(),
                            seconds: self.patience.as_secs(),
                            last: e.to_string(),
                        });
                    }
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let code = resp.status().as_u16();
            let bytes = resp
                .body_mut()
                .with_config()
                .limit(u64::MAX)
                .read_to_vec()
                .map_err(|e| ClientError::Malformed {
                    what,
                    message: e.to_string(),
                })?;
            return match code {
                200 => Ok(Some(bytes)),
                204 => Ok(None),
                404 if path.starts_with("/v1/") && !bytes.starts_with(b"no such endpoint") => {
                    Err(ClientError::Unknown)
                }
                410 => Err(ClientError::Finished),
                _ => Err(ClientError::Refused {
                    what,
                    code,
                    message: String::from_utf8_lossy(&bytes).into_owned(),
                }),
            };
        }
    }

    fn call<R: DeserializeOwned>(
        &self,
        what: &'static str,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Option<R>, ClientError> {
        let body = match body {
            Some(b) => Body::Json(serde_json::to_vec(b).map_err(|e| ClientError::Malformed {
                what,
                message: e.to_string(),
            })?),
            None => Body::None,
        };
        match self.send(what, method, path, body)? {
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| ClientError::Malformed {
                        what,
                        message: e.to_string(),
                    })
            }
            None => Ok(None),
        }
    }

    /// The run's status (`GET /status`).
    pub fn status(&self) -> Result<super::Status, ClientError> {
        self.call::<super::Status>("status", "GET", "/status", None::<&()>)?
            .ok_or(ClientError::Malformed {
                what: "status",
                message: "empty answer".into(),
            })
    }

    /// The run's manifest.
    pub fn manifest(&self) -> Result<pipewright_spec::TrainingRun, ClientError> {
        self.call::<pipewright_spec::TrainingRun>("manifest", "GET", "/v1/manifest", None::<&()>)?
            .ok_or(ClientError::Malformed {
                what: "manifest",
                message: "empty answer".into(),
            })
    }

    /// A fresh challenge to sign when registering.
    pub fn challenge(&self) -> Result<String, ClientError> {
        self.call::<super::api::Challenge>("challenge", "POST", "/v1/challenge", None::<&()>)?
            .map(|c| c.nonce)
            .ok_or(ClientError::Malformed {
                what: "challenge",
                message: "empty answer".into(),
            })
    }

    /// Registers as `identity`: asks for a challenge, signs it and sends
    /// the proof with `r`. Returns the worker's id, shard and the run's
    /// secrets.
    pub fn register_as(
        &self,
        r: &Register,
        identity: &crate::identity::Identity,
        run_id: &str,
    ) -> Result<Registered, ClientError> {
        let nonce = self.challenge()?;
        let public_key = identity.public_hex();
        let message = super::api::register_message(run_id, &nonce, &public_key);
        let mut r = r.clone();
        r.identity = Some(super::api::IdentityProof {
            signature: identity.sign(crate::identity::REGISTER_DOMAIN, &message),
            public_key,
            nonce,
        });
        self.register(&r)
    }

    /// Registers, returning the worker's id, shard and the run's secrets.
    pub fn register(&self, r: &Register) -> Result<Registered, ClientError> {
        self.call("register", "POST", "/v1/register", Some(r))?
            .ok_or(ClientError::Malformed {
                what: "register",
                message: "empty answer".into(),
            })
    }

    /// Renews the lease; returns the current epoch.
    pub fn heartbeat(&self, worker: u64) -> Result<u64, ClientError> {
        let r: Option<HeartbeatReply> = self.call(
            "heartbeat",
            "POST",
            "/v1/heartbeat",
            Some(&Heartbeat { worker }),
        )?;
        Ok(r.map_or(0, |r| r.epoch))
    }

    /// Waits for the wiring of the first epoch after `after`.
    pub fn wiring(&self, worker: u64, after: u64) -> Result<Wiring, ClientError> {
        let path = format!("/v1/wiring?worker={worker}&after={after}");
        loop {
            if let Some(w) = self.call("wiring", "GET", &path, None::<&()>)? {
                return Ok(w);
            }
        }
    }

    /// Reports a completed step and waits at the barrier.
    pub fn step(&self, d: &StepDone) -> Result<Barrier, ClientError> {
        loop {
            if let Some(b) = self.call("step", "POST", "/v1/step", Some(d))? {
                return Ok(b);
            }
        }
    }

    /// Uploads the evidence of audit `audit` (a safetensors file of the
    /// payloads the audited micro-batch received).
    pub fn put_evidence(&self, audit: u64, worker: u64, bytes: &[u8]) -> Result<(), ClientError> {
        let path = format!("/v1/audit/{audit}/evidence?worker={worker}");
        self.send("evidence upload", "PUT", &path, Body::Bytes(bytes))
            .map(|_| ())
    }

    /// Uploads the stage's parameters of before the audited step for audit
    /// `audit` (`StageWorker::encode_weights`); answered once the
    /// coordinator has recomputed the disputed micro-batch.
    pub fn put_weights(&self, audit: u64, worker: u64, bytes: &[u8]) -> Result<(), ClientError> {
        let path = format!("/v1/audit/{audit}/weights?worker={worker}");
        self.send("weights upload", "PUT", &path, Body::Bytes(bytes))
            .map(|_| ())
    }

    /// Uploads, for contribution audit `audit`, the proof of what the
    /// audited replica sent this worker (`sync::receipt`), with its
    /// identity's `signature` over `api::receipt_message`.
    pub fn put_receipt(
        &self,
        audit: u64,
        worker: u64,
        bytes: &[u8],
        signature: &str,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/audit/{audit}/receipt?worker={worker}&signature={signature}");
        self.send("receipt upload", "PUT", &path, Body::Bytes(bytes))
            .map(|_| ())
    }

    /// Shows the coordinator a pipeline frame `worker` refused in `epoch`
    /// (`frame`: the frame encoded as it arrived, with its author's
    /// signature); the coordinator's verdict as text.
    pub fn complain(&self, worker: u64, epoch: u64, frame: &[u8]) -> Result<String, ClientError> {
        let path = format!("/v1/complaint?worker={worker}&epoch={epoch}");
        self.send("complaint", "POST", &path, Body::Bytes(frame))
            .map(|b| String::from_utf8_lossy(&b.unwrap_or_default()).into_owned())
    }

    /// Reports a broken step's signed frame headers and suspects; the
    /// coordinator's answer as text.
    pub fn broken(&self, b: &super::complaint_api::BrokenStep) -> Result<String, ClientError> {
        let body = serde_json::to_vec(b).map_err(|e| ClientError::Malformed {
            what: "broken step report",
            message: e.to_string(),
        })?;
        self.send("broken step report", "POST", "/v1/broken", Body::Json(body))
            .map(|b| String::from_utf8_lossy(&b.unwrap_or_default()).into_owned())
    }

    /// Reports a validator's verdict on a recheck.
    pub fn recheck(&self, r: &super::complaint_api::RecheckReport) -> Result<(), ClientError> {
        let body = serde_json::to_vec(r).map_err(|e| ClientError::Malformed {
            what: "recheck report",
            message: e.to_string(),
        })?;
        self.send("recheck report", "POST", "/v1/recheck", Body::Json(body))
            .map(|_| ())
    }

    /// Waits for the evidence of audit `audit`, for its validator `worker`.
    pub fn get_evidence(&self, audit: u64, worker: u64) -> Result<Vec<u8>, ClientError> {
        let path = format!("/v1/audit/{audit}/evidence?worker={worker}");
        loop {
            if let Some(b) = self.send("evidence download", "GET", &path, Body::None)? {
                return Ok(b);
            }
        }
    }

    /// Reports an audit order carried out and waits for the answer of the
    /// step's barrier once its audits are decided.
    pub fn audit(&self, r: &AuditReport) -> Result<Barrier, ClientError> {
        loop {
            if let Some(b) = self.call("audit", "POST", "/v1/audit", Some(r))? {
                return Ok(b);
            }
        }
    }

    /// Delivers this stage's part of the checkpoint at `step` (the stage's
    /// safetensors file) to the coordinator, which writes it into the run
    /// directory.
    pub fn put_checkpoint(
        &self,
        worker: u64,
        stage: usize,
        step: u64,
        part: &StatePart<'_>,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/checkpoint/{stage}?step={step}&worker={worker}");
        self.send("checkpoint upload", "PUT", &path, Body::Part(part))
            .map(|_| ())
    }

    /// Fetches `stage`'s file of the committed checkpoint at `step`.
    pub fn get_checkpoint(&self, stage: usize, step: u64) -> Result<Vec<u8>, ClientError> {
        let path = format!("/v1/checkpoint/{stage}?step={step}");
        self.send("checkpoint download", "GET", &path, Body::None)?
            .ok_or(ClientError::Malformed {
                what: "checkpoint download",
                message: "empty answer".into(),
            })
    }

    /// Reports a failed step.
    pub fn fail(&self, f: &Failure) -> Result<(), ClientError> {
        self.call::<serde_json::Value>("fail", "POST", "/v1/fail", Some(f))
            .map(|_| ())
    }

    /// Hands this stage's state to a new replica.
    pub fn put_state(
        &self,
        stage: usize,
        epoch: u64,
        part: &StatePart<'_>,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/state/{stage}?epoch={epoch}");
        self.send("state upload", "PUT", &path, Body::Part(part))
            .map(|_| ())
    }

    /// Waits for the state a live replica of `stage` hands over in `epoch`.
    pub fn get_state(&self, stage: usize, epoch: u64) -> Result<Vec<u8>, ClientError> {
        let path = format!("/v1/state/{stage}?epoch={epoch}");
        loop {
            if let Some(b) = self.send("state download", "GET", &path, Body::None)? {
                return Ok(b);
            }
        }
    }
}
