//! The Kubernetes objects a `TrainingRun` consists of, computed from the run
//! (and, for shard pods, from what its status remembers) so that reconciling
//! is "compute, then apply" and the computation is tested without an API
//! server.
//!
//! Per run:
//! - a ConfigMap holding the manifest in its local-mode form, so every
//!   process reads the same file through the same loader as `pipewright train`;
//! - a Secret with the run key and the join token (created once, never
//!   re-applied);
//! - the coordinator: one Pod (`pipewright coordinator`) and a Service in
//!   front of it; its state and the run directory (checkpoints, which the
//!   workers upload to it) live under `/var/lib/pipewright`, on a
//!   PersistentVolumeClaim when the run sets `spec.storage`, else on an
//!   `emptyDir` (a replaced coordinator pod then starts the run over);
//! - a headless Service giving every shard pod a DNS name
//!   (`<pod>.<run>-shards.<namespace>.svc`) that it advertises to the
//!   coordinator, which wires the workers to each other;
//! - one Pod per shard (stage × replica, `pipewright worker`), named
//!   `<run>-s<stage>-r<replica>` and, after the shard moved `n` times,
//!   `<run>-s<stage>-r<replica>-a<n>`;
//! - one PodDisruptionBudget per stage with two or more replicas.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, NodeAffinity, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodAffinity, PodAffinityTerm, PodAntiAffinity, PodSpec,
    Probe, ResourceRequirements, Secret, SecretKeySelector, Service, ServicePort, ServiceSpec,
    Toleration, Volume, VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use pipewright_spec::{
    sizing, validate, Metadata, PlacementSpec, TrainingRun, TrainingRunResource, TrainingRunSpec,
    API_VERSION, KIND,
};

use crate::quantity;

/// Label naming the run an object belongs to.
pub const LABEL_RUN: &str = "pipewright.dev/run";
/// Label naming the role of a pod: [`ROLE_COORDINATOR`] or [`ROLE_SHARD`].
pub const LABEL_ROLE: &str = "pipewright.dev/role";
/// Label holding a shard pod's pipeline stage.
pub const LABEL_STAGE: &str = "pipewright.dev/stage";
/// Label holding a shard pod's replica within its stage.
pub const LABEL_REPLICA: &str = "pipewright.dev/replica";
/// Label holding how many times a shard had moved when its pod was made.
pub const LABEL_ATTEMPT: &str = "pipewright.dev/attempt";
/// Role of the coordinator pod.
pub const ROLE_COORDINATOR: &str = "coordinator";
/// Role of a shard pod.
pub const ROLE_SHARD: &str = "shard";

/// Port the coordinator serves workers and `/status` on.
pub const COORDINATOR_PORT: i32 = 7070;
/// Port a shard accepts pipeline links (from its neighbour stages) on.
pub const LINK_PORT: i32 = 7071;
/// Port a shard accepts its ring neighbour (same stage) on.
pub const RING_PORT: i32 = 7072;
/// Port the coordinator and every shard serve Prometheus metrics on, named
/// `metrics` in their pods (what the chart's PodMonitor scrapes).
pub const METRICS_PORT: i32 = 7073;
/// Name of the metrics port in pods and the coordinator's Service.
pub const METRICS_PORT_NAME: &str = "metrics";
/// Directory the manifest ConfigMap is mounted at.
pub const MANIFEST_DIR: &str = "/etc/pipewright";
/// File name of the manifest inside [`MANIFEST_DIR`].
pub const MANIFEST_FILE: &str = "run.yaml";
/// Mount point of the coordinator's volume (`spec.storage`, else an
/// `emptyDir`).
pub const STATE_DIR: &str = "/var/lib/pipewright";
/// Where a shard pod keeps its worker's identity (an `emptyDir`).
pub const IDENTITY_DIR: &str = "/var/lib/pipewright-identity";
/// The coordinator's durable state (ledger, registrations), on its volume.
pub const COORDINATOR_STATE_DIR: &str = "/var/lib/pipewright/state";
/// The run directory (checkpoints), on the coordinator's volume.
pub const RUN_DIR: &str = "/var/lib/pipewright/run";
/// Key of the run key inside the run's Secret.
pub const RUN_KEY_FIELD: &str = "runKey";
/// Key of the join token inside the run's Secret.
pub const JOIN_TOKEN_FIELD: &str = "joinToken";
/// Environment variable the coordinator reads the run key from (64 hex digits).
pub const RUN_KEY_ENV: &str = "PIPEWRIGHT_RUN_KEY";
/// Environment variable coordinator and workers read the join token from.
pub const JOIN_TOKEN_ENV: &str = "PIPEWRIGHT_JOIN_TOKEN";
/// Extended resource requested for GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Resource a shard pod requests its memory as.
pub const MEMORY_RESOURCE: &str = "memory";
/// Resource a shard pod requests its cores as.
pub const CPU_RESOURCE: &str = "cpu";
/// Node label that tells nodes apart: replicas of one stage never share one.
pub const HOSTNAME_KEY: &str = "kubernetes.io/hostname";
/// Longest name a pod host name or a Service may have.
const MAX_LABEL: usize = 63;

/// Operator-wide settings that shape the children but are not part of a run's
/// spec (they describe the cluster, not the training).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Container image holding the `pipewright` binary (its entry point).
    pub image: String,
    /// GPUs each shard pod requests when the run does not say
    /// (`spec.placement.gpusPerWorker`); 0 runs shards on CPU.
    pub gpus_per_shard: u32,
    /// Variables every pod gets as they are (the operator's own
    /// `OTEL_EXPORTER_OTLP_*ENDPOINT`, so that its pods send spans where it
    /// does).
    pub pass_env: Vec<(String, String)>,
}

/// Why the children of a run cannot be computed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChildrenError {
    /// The run has no namespace (the CRD is namespaced, so only a run not read
    /// from the API server lacks one).
    #[error("run {0:?} has no namespace")]
    NoNamespace(String),
    /// The run has no UID yet, so children cannot name it as their owner.
    #[error("run {0:?} has no uid; it has not been stored by the API server")]
    NotStored(String),
    /// The spec breaks a rule of the manifest (the CRD's rules normally stop
    /// such a run at the API server; an older CRD may not have).
    #[error("invalid spec: {0}")]
    Invalid(String),
    /// A child's name would not be a valid DNS label (pod host names and
    /// service names are limited to 63 characters).
    #[error(
        "child name {name:?} of run {run:?} is longer than 63 characters; use a shorter run name"
    )]
    NameTooLong {
        /// The run.
        run: String,
        /// The child name that does not fit.
        name: String,
    },
    /// The manifest could not be rendered as YAML.
    #[error("rendering the manifest of run {run:?}: {message}")]
    Manifest {
        /// The run.
        run: String,
        /// The renderer's message.
        message: String,
    },
}

/// The children of a run that do not change while it runs (everything but
/// the shard pods and the Secret).
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    /// The manifest, mounted into every pod.
    pub manifest: ConfigMap,
    /// Headless Service that gives shard pods their DNS names.
    pub shard_service: Service,
    /// Service in front of the coordinator pod.
    pub coordinator_service: Service,
    /// One budget per stage with two or more replicas.
    pub disruption_budgets: Vec<PodDisruptionBudget>,
    /// The coordinator pod.
    pub coordinator: Pod,
    /// The coordinator's volume claim, when the run sets `spec.storage`.
    pub state_claim: Option<PersistentVolumeClaim>,
}

/// Name of the ConfigMap holding a run's manifest.
pub fn manifest_name(run: &str) -> String {
    format!("{run}-manifest")
}
/// Name of the Secret holding a run's key and join token.
pub fn run_key_name(run: &str) -> String {
    format!("{run}-key")
}
/// Name of a run's coordinator volume claim (`spec.storage`).
pub fn state_claim_name(run: &str) -> String {
    format!("{run}-state")
}
/// Name of a run's headless shard Service.
pub fn shard_service_name(run: &str) -> String {
    format!("{run}-shards")
}
/// Name of a run's coordinator pod and Service.
pub fn coordinator_name(run: &str) -> String {
    format!("{run}-coordinator")
}
/// Name of the disruption budget of one stage.
pub fn budget_name(run: &str, stage: usize) -> String {
    format!("{run}-s{stage}")
}
/// Name (and host name) of the pod of shard (`stage`, `replica`) after it
/// moved `attempt` times.
pub fn shard_pod_name(run: &str, stage: usize, replica: usize, attempt: u32) -> String {
    if attempt == 0 {
        format!("{run}-s{stage}-r{replica}")
    } else {
        format!("{run}-s{stage}-r{replica}-a{attempt}")
    }
}
/// Base URL of a run's coordinator, as workers and the operator reach it.
pub fn coordinator_url(run: &str, namespace: &str) -> String {
    format!(
        "http://{}.{namespace}.svc:{COORDINATOR_PORT}",
        coordinator_name(run)
    )
}

/// A run checked for being buildable, with what every child shares.
pub struct Blueprint<'a> {
    run: &'a TrainingRunResource,
    settings: &'a Settings,
    name: String,
    namespace: String,
    owner: OwnerReference,
    /// Bytes a shard process of each stage needs by the memory plan, when
    /// the manifest alone fixes the vocabulary.
    planned_memory: Option<Vec<u64>>,
}

impl<'a> Blueprint<'a> {
    /// Checks that `run` can have children: stored (namespace and uid), a
    /// valid spec, and names that fit even after the last reassignment the
    /// spec allows.
    ///
    /// # Errors
    /// [`ChildrenError`] naming the problem.
    pub fn new(
        run: &'a TrainingRunResource,
        settings: &'a Settings,
    ) -> Result<Self, ChildrenError> {
        let name = run.name_any();
        let namespace = run
            .namespace()
            .ok_or_else(|| ChildrenError::NoNamespace(name.clone()))?;
        let owner = run
            .controller_owner_ref(&())
            .ok_or_else(|| ChildrenError::NotStored(name.clone()))?;
        let mut manifest = local_manifest(&name, run);
        // Checked whole: the Kubernetes-only fields have rules too.
        manifest.spec = run.spec.clone();
        if let Err(errors) = validate(&manifest) {
            let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return Err(ChildrenError::Invalid(text.join("; ")));
        }
        let pipeline = &run.spec.pipeline;
        for child in [
            shard_service_name(&name),
            coordinator_name(&name),
            shard_pod_name(
                &name,
                pipeline.stages.saturating_sub(1),
                pipeline.replicas.saturating_sub(1),
                run.spec.placement.max_reassignments,
            ),
        ] {
            if child.len() > MAX_LABEL {
                return Err(ChildrenError::NameTooLong {
                    run: name.clone(),
                    name: child,
                });
            }
        }
        Ok(Self {
            planned_memory: planned_memory(&manifest),
            run,
            settings,
            name,
            namespace,
            owner,
        })
    }

    /// The run's spec.
    pub fn spec(&self) -> &TrainingRunSpec {
        &self.run.spec
    }

    /// The children other than shard pods and the Secret.
    ///
    /// # Errors
    /// [`ChildrenError::Manifest`] when the manifest cannot be rendered.
    pub fn children(&self) -> Result<Children, ChildrenError> {
        let replicas = self.run.spec.pipeline.replicas;
        let disruption_budgets = if replicas >= 2 {
            (0..self.run.spec.pipeline.stages)
                .map(|stage| self.disruption_budget(stage, replicas))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Children {
            manifest: self.manifest_config_map()?,
            shard_service: self.shard_service(),
            coordinator_service: self.coordinator_service(),
            disruption_budgets,
            coordinator: self.coordinator_pod(),
            state_claim: self.state_claim(),
        })
    }

    /// The claim behind the coordinator's volume: owned by the run, so it
    /// goes when the run is deleted, and kept across coordinator pods.
    fn state_claim(&self) -> Option<PersistentVolumeClaim> {
        let storage = self.run.spec.storage.as_ref()?;
        Some(PersistentVolumeClaim {
            metadata: self.meta(state_claim_name(&self.name), self.labels(&[])),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                storage_class_name: storage.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_owned(),
                        Quantity(storage.size.clone()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        })
    }

    fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    fn labels(&self, extra: &[(&str, String)]) -> BTreeMap<String, String> {
        labels(&self.name, extra)
    }

    fn manifest_config_map(&self) -> Result<ConfigMap, ChildrenError> {
        let yaml = serde_saphyr::to_string(&local_manifest(&self.name, self.run)).map_err(|e| {
            ChildrenError::Manifest {
                run: self.name.clone(),
                message: e.to_string(),
            }
        })?;
        Ok(ConfigMap {
            metadata: self.meta(manifest_name(&self.name), self.labels(&[])),
            data: Some(BTreeMap::from([(MANIFEST_FILE.to_owned(), yaml)])),
            ..ConfigMap::default()
        })
    }

    fn shard_service(&self) -> Service {
        Service {
            metadata: self.meta(shard_service_name(&self.name), self.labels(&[])),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".to_owned()),
                // A worker advertises its DNS name while it starts, before it
                // is ready; the record must exist from the start.
                publish_not_ready_addresses: Some(true),
                selector: Some(self.labels(&[(LABEL_ROLE, ROLE_SHARD.to_owned())])),
                ports: Some(vec![
                    service_port("link", LINK_PORT),
                    service_port("ring", RING_PORT),
                ]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn coordinator_service(&self) -> Service {
        Service {
            metadata: self.meta(coordinator_name(&self.name), self.labels(&[])),
            spec: Some(ServiceSpec {
                selector: Some(self.labels(&[(LABEL_ROLE, ROLE_COORDINATOR.to_owned())])),
                ports: Some(vec![
                    service_port("coordinator", COORDINATOR_PORT),
                    service_port(METRICS_PORT_NAME, METRICS_PORT),
                ]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// At most one replica of a stage may be taken down voluntarily (a node
    /// drain) at a time: `minAvailable` is replicas − 1. Pods without a
    /// scalable controller only allow an integer `minAvailable`. A budget of
    /// all replicas would block drains for the whole run, and a stage with one
    /// replica gets none, since its budget could never allow an eviction; the
    /// operator moves an evicted shard to another node either way. Unhealthy
    /// pods may always be evicted, so a broken shard never blocks a drain.
    fn disruption_budget(&self, stage: usize, replicas: usize) -> PodDisruptionBudget {
        let min_available = i32::try_from(replicas - 1).unwrap_or(i32::MAX);
        PodDisruptionBudget {
            metadata: self.meta(
                budget_name(&self.name, stage),
                self.labels(&[(LABEL_STAGE, stage.to_string())]),
            ),
            spec: Some(PodDisruptionBudgetSpec {
                min_available: Some(IntOrString::Int(min_available)),
                selector: Some(LabelSelector {
                    match_labels: Some(self.shard_selector(stage)),
                    ..LabelSelector::default()
                }),
                unhealthy_pod_eviction_policy: Some("AlwaysAllow".to_owned()),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        }
    }

    fn shard_selector(&self, stage: usize) -> BTreeMap<String, String> {
        self.labels(&[
            (LABEL_ROLE, ROLE_SHARD.to_owned()),
            (LABEL_STAGE, stage.to_string()),
        ])
    }

    /// The Secret holding the run key (`key_hex`: 64 hex digits) and the join
    /// token workers present to the coordinator. Created once and never
    /// re-applied, since new values would cut every running link.
    pub fn secret(&self, key_hex: String, join_token: String) -> Secret {
        Secret {
            metadata: self.meta(run_key_name(&self.name), self.labels(&[])),
            string_data: Some(BTreeMap::from([
                (RUN_KEY_FIELD.to_owned(), key_hex),
                (JOIN_TOKEN_FIELD.to_owned(), join_token),
            ])),
            ..Secret::default()
        }
    }

    fn coordinator_pod(&self) -> Pod {
        let placement = &self.run.spec.placement;
        let mut container = self.container(
            "coordinator",
            vec![
                "coordinator".to_owned(),
                manifest_path(),
                "--listen".to_owned(),
                format!("0.0.0.0:{COORDINATOR_PORT}"),
                "--state".to_owned(),
                COORDINATOR_STATE_DIR.to_owned(),
                "--out".to_owned(),
                RUN_DIR.to_owned(),
                "--metrics-listen".to_owned(),
                format!("0.0.0.0:{METRICS_PORT}"),
            ],
            vec![
                self.secret_env(RUN_KEY_ENV, RUN_KEY_FIELD),
                self.secret_env(JOIN_TOKEN_ENV, JOIN_TOKEN_FIELD),
            ],
            vec![
                container_port("coordinator", COORDINATOR_PORT),
                container_port(METRICS_PORT_NAME, METRICS_PORT),
            ],
        );
        container.readiness_probe = Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".to_owned()),
                port: IntOrString::Int(COORDINATOR_PORT),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            ..Probe::default()
        });
        if let Some(mounts) = container.volume_mounts.as_mut() {
            mounts.push(VolumeMount {
                name: "state".to_owned(),
                mount_path: STATE_DIR.to_owned(),
                ..VolumeMount::default()
            });
        }
        let mut spec = self.pod_spec(container, user_tolerations(placement));
        // Restarted in place on failure, so even an emptyDir survives a
        // crash; only a claim survives the pod.
        spec.restart_policy = Some("OnFailure".to_owned());
        let state = match &self.run.spec.storage {
            Some(_) => Volume {
                name: "state".to_owned(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: state_claim_name(&self.name),
                    read_only: None,
                }),
                ..Volume::default()
            },
            None => Volume {
                name: "state".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
        };
        if let Some(volumes) = spec.volumes.as_mut() {
            volumes.push(state);
        }
        Pod {
            metadata: self.meta(
                coordinator_name(&self.name),
                self.labels(&[(LABEL_ROLE, ROLE_COORDINATOR.to_owned())]),
            ),
            spec: Some(spec),
            ..Pod::default()
        }
    }

    /// GPUs each shard pod requests.
    pub fn gpus_per_worker(&self) -> u32 {
        self.run
            .spec
            .placement
            .gpus_per_worker
            .unwrap_or(self.settings.gpus_per_shard)
    }

    /// The pod of shard (`stage`, `replica`) after `attempt` moves, kept off
    /// the nodes in `avoid` (where shards of this run failed).
    pub fn shard_pod(&self, stage: usize, replica: usize, attempt: u32, avoid: &[String]) -> Pod {
        let pod_name = shard_pod_name(&self.name, stage, replica, attempt);
        let mut container = self.worker_container(stage, replica, &pod_name);
        container.resources = Some(self.shard_resources(stage));
        let mut spec = self.pod_spec(container, self.shard_tolerations());
        // The worker's key, created at its first start: the pod's own, so
        // the ledger books each pod's work to it (beside its pod name).
        if let Some(volumes) = spec.volumes.as_mut() {
            volumes.push(Volume {
                name: "identity".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            });
        }
        spec.hostname = Some(pod_name.clone());
        spec.subdomain = Some(shard_service_name(&self.name));
        // A failed shard is moved by the operator to a new pod on another
        // node rather than restarted in place.
        spec.restart_policy = Some("Never".to_owned());
        spec.affinity = Some(self.shard_affinity(stage, avoid));
        Pod {
            metadata: self.meta(
                pod_name,
                self.labels(&[
                    (LABEL_ROLE, ROLE_SHARD.to_owned()),
                    (LABEL_STAGE, stage.to_string()),
                    (LABEL_REPLICA, replica.to_string()),
                    (LABEL_ATTEMPT, attempt.to_string()),
                ]),
            ),
            spec: Some(spec),
            ..Pod::default()
        }
    }

    /// The `pipewright worker` container of shard (`stage`, `replica`) in
    /// pod `pod_name`: where the coordinator is, what to listen on and
    /// advertise, the join token, and the identity mount.
    fn worker_container(&self, stage: usize, replica: usize, pod_name: &str) -> Container {
        let advertise = format!(
            "{pod_name}.{}.{}.svc",
            shard_service_name(&self.name),
            self.namespace
        );
        let mut container = self.container(
            "worker",
            vec![
                "worker".to_owned(),
                manifest_path(),
                "--identity".to_owned(),
                format!("{IDENTITY_DIR}/identity"),
            ],
            vec![
                env(
                    "PIPEWRIGHT_COORDINATOR",
                    coordinator_url(&self.name, &self.namespace),
                ),
                env("PIPEWRIGHT_STAGE", stage.to_string()),
                env("PIPEWRIGHT_REPLICA", replica.to_string()),
                env("PIPEWRIGHT_LISTEN", format!("0.0.0.0:{LINK_PORT}")),
                env("PIPEWRIGHT_RING_LISTEN", format!("0.0.0.0:{RING_PORT}")),
                env("PIPEWRIGHT_ADVERTISE", advertise),
                env(
                    "PIPEWRIGHT_METRICS_LISTEN",
                    format!("0.0.0.0:{METRICS_PORT}"),
                ),
                // The name the ledger records beside the pod's identity.
                pod_name_env("PIPEWRIGHT_NAME"),
                self.secret_env(JOIN_TOKEN_ENV, JOIN_TOKEN_FIELD),
            ],
            vec![
                container_port("link", LINK_PORT),
                container_port("ring", RING_PORT),
                container_port(METRICS_PORT_NAME, METRICS_PORT),
            ],
        );
        if let Some(mounts) = container.volume_mounts.as_mut() {
            mounts.push(VolumeMount {
                name: "identity".to_owned(),
                mount_path: IDENTITY_DIR.to_owned(),
                ..VolumeMount::default()
            });
        }
        container
    }

    /// What a shard pod of `stage` requests: its memory
    /// ([`Blueprint::shard_memory`]), its CPU (`spec.placement.cpuPerWorker`,
    /// else `spec.training.threads` cores, else 1) and its GPUs, which are
    /// also its limit (a GPU cannot be shared). Memory and CPU have no limit:
    /// the plan sizes the stage, it does not cap it.
    pub fn shard_resources(&self, stage: usize) -> ResourceRequirements {
        let threads = self.run.spec.training.threads;
        let cpu = self
            .run
            .spec
            .placement
            .cpu_per_worker
            .clone()
            .unwrap_or_else(|| if threads > 0 { threads } else { 1 }.to_string());
        let mut requests = BTreeMap::from([(CPU_RESOURCE.to_owned(), Quantity(cpu))]);
        if let Some(memory) = self.shard_memory(stage) {
            requests.insert(MEMORY_RESOURCE.to_owned(), memory);
        }
        let gpus = self.gpus_per_worker();
        let limits = (gpus > 0).then(|| {
            let amount = Quantity(gpus.to_string());
            requests.insert(GPU_RESOURCE.to_owned(), amount.clone());
            BTreeMap::from([(GPU_RESOURCE.to_owned(), amount)])
        });
        ResourceRequirements {
            requests: Some(requests),
            limits,
            ..ResourceRequirements::default()
        }
    }

    /// Memory a shard pod of `stage` requests: `spec.placement.memoryPerWorker`
    /// when set, else what the memory plan gives the stage (its weights,
    /// gradients, Adam moments, activations at the schedule's peak and
    /// allocator slack, plus the process itself), rounded up to a MiB; none
    /// when the vocabulary is in a tokenizer file the operator cannot read.
    pub fn shard_memory(&self, stage: usize) -> Option<Quantity> {
        if let Some(memory) = &self.run.spec.placement.memory_per_worker {
            return Some(Quantity(memory.clone()));
        }
        let bytes = *self.planned_memory.as_ref()?.get(stage)?;
        Some(Quantity(quantity::mebibytes(bytes)))
    }

    /// The run's tolerations, after the GPU taint's when shards ask GPUs:
    /// GPU node pools are commonly tainted so that only pods asking for
    /// GPUs land there.
    fn shard_tolerations(&self) -> Vec<Toleration> {
        let gpu = (self.gpus_per_worker() > 0).then(|| Toleration {
            key: Some(GPU_RESOURCE.to_owned()),
            operator: Some("Exists".to_owned()),
            effect: Some("NoSchedule".to_owned()),
            ..Toleration::default()
        });
        gpu.into_iter()
            .chain(user_tolerations(&self.run.spec.placement))
            .collect()
    }

    /// The one container of a pod: the image, `args`, `env`, `ports` and the
    /// manifest mount.
    fn container(
        &self,
        name: &str,
        args: Vec<String>,
        env: Vec<EnvVar>,
        ports: Vec<ContainerPort>,
    ) -> Container {
        Container {
            name: name.to_owned(),
            image: Some(self.settings.image.clone()),
            args: Some(args),
            env: Some(
                env.into_iter()
                    .chain(self.settings.pass_env.iter().map(|(k, v)| self::env(k, v)))
                    .collect(),
            ),
            ports: Some(ports),
            volume_mounts: Some(vec![VolumeMount {
                name: "manifest".to_owned(),
                mount_path: MANIFEST_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            }]),
            ..Container::default()
        }
    }

    /// A pod spec around `container` with the manifest volume, the run's node
    /// selector and `tolerations`.
    fn pod_spec(&self, container: Container, tolerations: Vec<Toleration>) -> PodSpec {
        let node_selector = &self.run.spec.placement.node_selector;
        PodSpec {
            containers: vec![container],
            volumes: Some(vec![Volume {
                name: "manifest".to_owned(),
                config_map: Some(ConfigMapVolumeSource {
                    name: manifest_name(&self.name),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            }]),
            node_selector: (!node_selector.is_empty()).then(|| node_selector.clone()),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            ..PodSpec::default()
        }
    }

    /// A value read from the run's Secret, so it never appears in a pod spec.
    fn secret_env(&self, name: &str, key: &str) -> EnvVar {
        EnvVar {
            name: name.to_owned(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: run_key_name(&self.name),
                    key: key.to_owned(),
                    ..SecretKeySelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }
    }

    /// Replicas of one stage on distinct nodes (required: a node failure then
    /// costs a stage at most one replica); adjacent stages preferably in one
    /// topology domain (their links carry every activation); never on a node
    /// in `avoid`.
    fn shard_affinity(&self, stage: usize, avoid: &[String]) -> Affinity {
        let stages = self.run.spec.pipeline.stages;
        let neighbours: Vec<String> = [
            stage.checked_sub(1),
            Some(stage + 1).filter(|s| *s < stages),
        ]
        .into_iter()
        .flatten()
        .map(|s| s.to_string())
        .collect();
        let pod_affinity = (!neighbours.is_empty()).then(|| PodAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 50,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(LabelSelector {
                            match_labels: Some(self.labels(&[(LABEL_ROLE, ROLE_SHARD.to_owned())])),
                            match_expressions: Some(vec![LabelSelectorRequirement {
                                key: LABEL_STAGE.to_owned(),
                                operator: "In".to_owned(),
                                values: Some(neighbours),
                            }]),
                        }),
                        topology_key: self.run.spec.placement.topology_key.clone(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAffinity::default()
        });
        // A field requirement on the node name takes exactly one value, so
        // each node is one requirement; the requirements of a term all hold.
        let node_affinity = (!avoid.is_empty()).then(|| NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_fields: Some(
                        avoid
                            .iter()
                            .map(|node| NodeSelectorRequirement {
                                key: "metadata.name".to_owned(),
                                operator: "NotIn".to_owned(),
                                values: Some(vec![node.clone()]),
                            })
                            .collect(),
                    ),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        });
        Affinity {
            pod_anti_affinity: Some(PodAntiAffinity {
                required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                    label_selector: Some(LabelSelector {
                        match_labels: Some(self.shard_selector(stage)),
                        ..LabelSelector::default()
                    }),
                    topology_key: HOSTNAME_KEY.to_owned(),
                    ..PodAffinityTerm::default()
                }]),
                ..PodAntiAffinity::default()
            }),
            pod_affinity,
            node_affinity,
        }
    }
}

/// Bytes a shard process of each stage of `run` needs: the stage's total by
/// the memory plan plus the process overhead; `None` when the vocabulary is
/// known only to a tokenizer file.
fn planned_memory(run: &TrainingRun) -> Option<Vec<u64>> {
    let vocab = sizing::manifest_vocab(run)?;
    let plan = sizing::plan(run, vocab, None);
    let stages = plan.stages.iter();
    Some(
        stages
            .map(|s| s.total_bytes.saturating_add(sizing::PROCESS_OVERHEAD_BYTES))
            .collect(),
    )
}

/// The run as a local-mode manifest. Kubernetes-only settings are left out:
/// the processes do not read them, and suspending or re-placing a run then
/// does not rewrite the file they read.
fn local_manifest(name: &str, run: &TrainingRunResource) -> TrainingRun {
    let mut spec = run.spec.clone();
    spec.placement = PlacementSpec::default();
    spec.suspend = false;
    spec.ttl_seconds_after_finished = None;
    spec.storage = None;
    TrainingRun {
        api_version: API_VERSION.to_owned(),
        kind: KIND.to_owned(),
        metadata: Metadata {
            name: name.to_owned(),
            labels: run.labels().clone(),
            annotations: BTreeMap::new(),
        },
        spec,
    }
}

fn labels(run: &str, extra: &[(&str, String)]) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(LABEL_RUN.to_owned(), run.to_owned())]);
    labels.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    labels
}

fn user_tolerations(placement: &PlacementSpec) -> Vec<Toleration> {
    placement
        .tolerations
        .iter()
        .map(|t| Toleration {
            key: t.key.clone(),
            operator: Some(t.operator.as_str().to_owned()),
            value: t.value.clone(),
            effect: t.effect.map(|e| e.as_str().to_owned()),
            toleration_seconds: t.toleration_seconds,
        })
        .collect()
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        ..ServicePort::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        ..ContainerPort::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// `name` set to the pod's own name (the downward API).
fn pod_name_env(name: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn manifest_path() -> String {
    format!("{MANIFEST_DIR}/{MANIFEST_FILE}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{run, settings};
    use pipewright_spec::{parse_manifest, TaintEffect, TolerationOperator};

    fn env_of(pod: &Pod) -> BTreeMap<String, String> {
        pod.spec.as_ref().expect("spec").containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    fn args_of(pod: &Pod) -> Vec<String> {
        pod.spec.as_ref().expect("spec").containers[0]
            .args
            .clone()
            .unwrap_or_default()
    }

    fn secret_ref(pod: &Pod, var: &str) -> Option<(String, String)> {
        let env = pod.spec.as_ref()?.containers[0].env.clone()?;
        let entry = env.iter().find(|e| e.name == var)?;
        assert_eq!(entry.value, None, "{var} must not be inlined");
        let secret = entry.value_from.as_ref()?.secret_key_ref.as_ref()?;
        Some((secret.name.clone(), secret.key.clone()))
    }

    #[test]
    fn shard_pods_are_named_by_stage_replica_and_attempt() {
        let run = run(3, 2);
        let settings = settings(0);
        let blueprint = Blueprint::new(&run, &settings).expect("buildable");
        let first = blueprint.shard_pod(2, 1, 0, &[]);
        assert_eq!(first.metadata.name.as_deref(), Some("demo-s2-r1"));
        let moved = blueprint.shard_pod(2, 1, 3, &[]);
        assert_eq!(moved.metadata.name.as_deref(), Some("demo-s2-r1-a3"));
        let labels = moved.metadata.labels.clone().expect("labels");
        assert_eq!(labels[LABEL_RUN], "demo");
        assert_eq!(labels[LABEL_ROLE], ROLE_SHARD);
        assert_eq!(labels[LABEL_STAGE], "2");
        assert_eq!(labels[LABEL_REPLICA], "1");
        assert_eq!(labels[LABEL_ATTEMPT], "3");
        let spec = moved.spec.expect("spec");
        assert_eq!(spec.hostname.as_deref(), Some("demo-s2-r1-a3"));
        assert_eq!(spec.subdomain.as_deref(), Some("demo-shards"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    }

    #[test]
    fn every_child_is_owned_by_the_run() {
        let run = run(3, 2);
        let settings = settings(0);
        let blueprint = Blueprint::new(&run, &settings).expect("buildable");
        let children = blueprint.children().expect("children");
        let shard = blueprint.shard_pod(0, 0, 0, &[]);
        let secret = blueprint.secret("ab".repeat(32), "t".to_owned());
        let mut metas = vec![
            &children.manifest.metadata,
            &children.shard_service.metadata,
            &children.coordinator_service.metadata,
            &children.coordinator.metadata,
            &shard.metadata,
            &secret.metadata,
        ];
        metas.extend(children.disruption_budgets.iter().map(|b| &b.metadata));
        for meta in metas {
            let owners = meta.owner_references.as_ref().expect("owner references");
            assert_eq!(owners.len(), 1, "{:?}", meta.name);
            let owner = &owners[0];
            assert_eq!(owner.api_version, "pipewright.dev/v1alpha1");
            assert_eq!(owner.kind, "TrainingRun");
            assert_eq!(owner.name, "demo");
            assert_eq!(owner.uid, "uid-1");
            assert_eq!(owner.controller, Some(true));
            assert_eq!(meta.namespace.as_deref(), Some("ml"));
        }
    }

    #[test]
    fn coordinator_runs_the_coordinator_command_with_key_and_token() {
        let run = run(3, 2);
        let settings = settings(0);
        let children = Blueprint::new(&run, &settings)
            .expect("buildable")
            .children()
            .expect("children");
        let pod = &children.coordinator;
        assert_eq!(
            args_of(pod),
            [
                "coordinator",
                "/etc/pipewright/run.yaml",
                "--listen",
                "0.0.0.0:7070",
                "--state",
                "/var/lib/pipewright/state",
                "--out",
                "/var/lib/pipewright/run",
                "--metrics-listen",
                "0.0.0.0:7073"
            ]
        );
        assert_eq!(
            secret_ref(pod, RUN_KEY_ENV),
            Some(("demo-key".to_owned(), RUN_KEY_FIELD.to_owned()))
        );
        assert_eq!(
            secret_ref(pod, JOIN_TOKEN_ENV),
            Some(("demo-key".to_owned(), JOIN_TOKEN_FIELD.to_owned()))
        );
        let spec = pod.spec.clone().expect("spec");
        assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
        let mounts: Vec<String> = spec.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.clone())
            .collect();
        assert_eq!(mounts, ["/etc/pipewright", "/var/lib/pipewright"]);
        let state = spec.volumes.iter().flatten().find(|v| v.name == "state");
        assert!(
            state.is_some_and(|v| v.empty_dir.is_some()),
            "without spec.storage the state is an emptyDir"
        );
        assert!(children.state_claim.is_none());
        let service = children.coordinator_service.spec.expect("service spec");
        assert_eq!(service.ports.expect("ports")[0].port, 7070);
        assert_eq!(
            service.selector.expect("selector")[LABEL_ROLE],
            ROLE_COORDINATOR
        );
    }

    #[test]
    fn storage_puts_the_coordinator_on_a_claim_the_run_owns() {
        let mut run = run(2, 1);
        run.spec.storage = Some(pipewright_spec::StorageSpec {
            size: "50Gi".to_owned(),
            storage_class_name: Some("fast-ssd".to_owned()),
        });
        let settings = settings(0);
        let children = Blueprint::new(&run, &settings)
            .expect("buildable")
            .children()
            .expect("children");
        let claim = children.state_claim.expect("a claim");
        assert_eq!(claim.metadata.name.as_deref(), Some("demo-state"));
        assert_eq!(
            claim.metadata.owner_references.expect("owner")[0].uid,
            "uid-1"
        );
        let spec = claim.spec.expect("claim spec");
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast-ssd"));
        assert_eq!(spec.access_modes.expect("modes"), ["ReadWriteOnce"]);
        let requests = spec.resources.and_then(|r| r.requests).expect("requests");
        assert_eq!(requests["storage"].0, "50Gi");
        let pod = children.coordinator.spec.expect("pod spec");
        let state = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "state")
            .expect("state volume");
        assert_eq!(
            state
                .persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.as_str()),
            Some("demo-state")
        );
        assert!(state.empty_dir.is_none());
        // The processes never see it: the manifest they read is unchanged.
        let yaml = &children.manifest.data.expect("data")[MANIFEST_FILE];
        assert!(!yaml.contains("storage"), "{yaml}");
    }

    #[test]
    fn workers_find_the_coordinator_and_advertise_their_dns_name() {
        let run = run(3, 2);
        let settings = settings(0);
        let blueprint = Blueprint::new(&run, &settings).expect("buildable");
        let pod = blueprint.shard_pod(1, 0, 2, &[]);
        // Each pod keeps its own signing key for the pod's lifetime: a
        // restarted container keeps its account, a new pod opens its own.
        assert_eq!(
            args_of(&pod),
            [
                "worker",
                "/etc/pipewright/run.yaml",
                "--identity",
                "/var/lib/pipewright-identity/identity"
            ]
        );
        let identity = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .and_then(|v| v.iter().find(|v| v.name == "identity"))
            .expect("identity volume");
        assert!(identity.empty_dir.is_some());
        let env = env_of(&pod);
        let expected = BTreeMap::from([
            (
                "PIPEWRIGHT_COORDINATOR",
                "http://demo-coordinator.ml.svc:7070",
            ),
            ("PIPEWRIGHT_STAGE", "1"),
            ("PIPEWRIGHT_REPLICA", "0"),
            ("PIPEWRIGHT_LISTEN", "0.0.0.0:7071"),
            ("PIPEWRIGHT_RING_LISTEN", "0.0.0.0:7072"),
            ("PIPEWRIGHT_ADVERTISE", "demo-s1-r0-a2.demo-shards.ml.svc"),
            ("PIPEWRIGHT_METRICS_LISTEN", "0.0.0.0:7073"),
            ("PIPEWRIGHT_NAME", ""),
            (JOIN_TOKEN_ENV, ""),
        ]);
        let env: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        // Exactly these: no static neighbour addresses, no run key.
        assert_eq!(env, expected);
        assert_eq!(
            secret_ref(&pod, JOIN_TOKEN_ENV),
            Some(("demo-key".to_owned(), JOIN_TOKEN_FIELD.to_owned()))
        );
        // The ledger records the pod's name beside its identity.
        let name = pod.spec.as_ref().expect("spec").containers[0]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "PIPEWRIGHT_NAME")
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone());
        assert_eq!(name.as_deref(), Some("metadata.name"));
        let service = blueprint
            .children()
            .expect("children")
            .shard_service
            .spec
            .expect("service spec");
        assert_eq!(service.cluster_ip.as_deref(), Some("None"));
        assert_eq!(service.publish_not_ready_addresses, Some(true));
    }

    #[test]
    fn replicas_of_a_stage_never_share_a_node_and_neighbours_attract() {
        let mut run = run(3, 2);
        run.spec.placement.topology_key = "example.com/rack".to_owned();
        let settings = settings(0);
        let blueprint = Blueprint::new(&run, &settings).expect("buildable");
        let affinity = blueprint
            .shard_pod(1, 0, 0, &[])
            .spec
            .and_then(|s| s.affinity)
            .expect("affinity");
        let anti = affinity
            .pod_anti_affinity
            .and_then(|a| a.required_during_scheduling_ignored_during_execution)
            .expect("required anti-affinity");
        assert_eq!(anti[0].topology_key, HOSTNAME_KEY);
        assert_eq!(
            anti[0].label_selector.clone().and_then(|s| s.match_labels),
            Some(BTreeMap::from([
                (LABEL_RUN.to_owned(), "demo".to_owned()),
                (LABEL_ROLE.to_owned(), ROLE_SHARD.to_owned()),
                (LABEL_STAGE.to_owned(), "1".to_owned()),
            ]))
        );
        let near = affinity
            .pod_affinity
            .and_then(|a| a.preferred_during_scheduling_ignored_during_execution)
            .expect("preferred affinity to neighbours");
        assert_eq!(near[0].pod_affinity_term.topology_key, "example.com/rack");
        let expr = near[0]
            .pod_affinity_term
            .label_selector
            .clone()
            .and_then(|s| s.match_expressions)
            .expect("expressions");
        assert_eq!(expr[0].values, Some(vec!["0".to_owned(), "2".to_owned()]));
        assert!(affinity.node_affinity.is_none(), "no failed nodes yet");
        // The first stage has only one neighbour.
        let first = blueprint
            .shard_pod(0, 0, 0, &[])
            .spec
            .and_then(|s| s.affinity);
        let values = first
            .and_then(|a| a.pod_affinity)
            .and_then(|a| a.preferred_during_scheduling_ignored_during_execution)
            .and_then(|p| p[0].pod_affinity_term.label_selector.clone())
            .and_then(|s| s.match_expressions)
            .and_then(|e| e[0].values.clone());
        assert_eq!(values, Some(vec!["1".to_owned()]));
    }

    #[test]
    fn replacement_pods_avoid_nodes_where_shards_failed() {
        let run = run(2, 2);
        let settings = settings(0);
        let blueprint = Blueprint::new(&run, &settings).expect("buildable");
        let avoid = vec!["n1".to_owned(), "n4".to_owned()];
        let required = blueprint
            .shard_pod(0, 1, 1, &avoid)
            .spec
            .and_then(|s| s.affinity)
            .and_then(|a| a.node_affinity)
            .and_then(|n| n.required_during_scheduling_ignored_during_execution)
            .expect("required node affinity");
        assert_eq!(
            required.node_selector_terms.len(),
            1,
            "one term: all must hold"
        );
        let fields = required.node_selector_terms[0]
            .match_fields
            .clone()
            .expect("match fields");
        // The API server takes one value per node-name requirement.
        let excluded: Vec<(&str, &str, Option<Vec<String>>)> = fields
            .iter()
            .map(|f| (f.key.as_str(), f.operator.as_str(), f.values.clone()))
            .collect();
        assert_eq!(
            excluded,
            [
                ("metadata.name", "NotIn", Some(vec!["n1".to_owned()])),
                ("metadata.name", "NotIn", Some(vec!["n4".to_owned()])),
            ]
        );
    }

    #[test]
    fn gpus_node_selector_and_tolerations_come_from_placement() {
        let mut run = run(2, 1);
        run.spec.placement.gpus_per_worker = Some(2);
        run.spec.placement.node_selector = BTreeMap::from([("pool".to_owned(), "h100".to_owned())]);
        run.spec.placement.tolerations = vec![pipewright_spec::Toleration {
            key: Some("spot".to_owned()),
            operator: TolerationOperator::Exists,
            value: None,
            effect: Some(TaintEffect::NoExecute),
            toleration_seconds: Some(30),
        }];
        // The operator's default (0) is overridden by the run.
        let settings = settings(0);
        let blueprint = Blueprint::new(&run, &settings).expect("buildable");
        let spec = blueprint.shard_pod(0, 0, 0, &[]).spec.expect("spec");
        let resources = spec.containers[0].resources.clone().expect("resources");
        let two = Some(&Quantity("2".to_owned()));
        assert_eq!(
            resources
                .requests
                .as_ref()
                .and_then(|r| r.get(GPU_RESOURCE)),
            two
        );
        assert_eq!(
            resources.limits.as_ref().and_then(|r| r.get(GPU_RESOURCE)),
            two
        );
        assert_eq!(
            spec.node_selector.as_ref().map(|s| s["pool"].as_str()),
            Some("h100")
        );
        let tolerations = spec.tolerations.expect("tolerations");
        let keys: Vec<Option<&str>> = tolerations.iter().map(|t| t.key.as_deref()).collect();
        assert_eq!(keys, [Some(GPU_RESOURCE), Some("spot")]);
        assert_eq!(tolerations[1].operator.as_deref(), Some("Exists"));
        assert_eq!(tolerations[1].effect.as_deref(), Some("NoExecute"));
        assert_eq!(tolerations[1].toleration_seconds, Some(30));
        // The coordinator needs no GPU but follows the node selector.
        let coordinator = blueprint.children().expect("children").coordinator;
        let spec = coordinator.spec.expect("spec");
        assert!(spec.containers[0].resources.is_none());
        assert_eq!(spec.tolerations.map(|t| t.len()), Some(1));
        assert!(spec.node_selector.is_some());
        // Without a setting in the run, the operator's default applies.
        let mut cpu = run.clone();
        cpu.spec.placement.gpus_per_worker = None;
        let settings = super::Settings {
            gpus_per_shard: 0,
            ..settings
        };
        let blueprint = Blueprint::new(&cpu, &settings).expect("buildable");
        let spec = blueprint.shard_pod(0, 0, 0, &[]).spec.expect("spec");
        let resources = spec.containers[0].resources.clone().expect("resources");
        let requests = resources.requests.expect("requests");
        assert!(!requests.contains_key(GPU_RESOURCE) && resources.limits.is_none());
        assert!(spec
            .tolerations
            .is_some_and(|t| t.iter().all(|t| t.key.as_deref() != Some(GPU_RESOURCE))));
    }

    /// The requests of the container of shard pod (`stage`, 0, 0).
    fn requests_of(blueprint: &Blueprint<'_>, stage: usize) -> BTreeMap<String, String> {
        let pod = blueprint.shard_pod(stage, 0, 0, &[]);
        let resources = pod.spec.expect("spec").containers[0].resources.clone();
        resources
            .and_then(|r| r.requests)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()
    }

    #[test]
    fn shard_pods_request_the_memory_the_plan_gives_their_stage() {
        let mut run = run(3, 2);
        run.spec.pipeline.schedule = pipewright_spec::ScheduleKind::Gpipe;
        run.spec.training.micro_batches = 6;
        let settings = settings(0);
        let blueprint = Blueprint::new(&run, &settings).expect("buildable");
        let manifest = TrainingRun {
            spec: run.spec.clone(),
            ..local_manifest("demo", &run)
        };
        let plan = sizing::plan(&manifest, sizing::BYTE_VOCAB, None);
        for stage in 0..3 {
            let needs = plan.stages[stage].total_bytes + sizing::PROCESS_OVERHEAD_BYTES;
            let requested = requests_of(&blueprint, stage)[MEMORY_RESOURCE].clone();
            assert_eq!(requested, quantity::mebibytes(needs), "stage {stage}");
            let bytes = quantity::bytes(&requested).expect("a quantity");
            assert!(bytes >= needs && bytes - needs < quantity::MIB);
        }
        // The last stage holds the LM head and its logits: it needs most.
        let last = quantity::bytes(&requests_of(&blueprint, 2)[MEMORY_RESOURCE]);
        let first = quantity::bytes(&requests_of(&blueprint, 0)[MEMORY_RESOURCE]);
        assert!(last > first, "{last:?} vs {first:?}");
        // A tokenizer file hides the vocabulary: no request, unless set.
        let tokenizer = &mut run.spec.data.tokenizer;
        tokenizer.kind = pipewright_spec::TokenizerKind::Bpe;
        tokenizer.path = Some("/data/tokenizer.json".to_owned());
        let blueprint = Blueprint::new(&run, &settings).expect("buildable");
        assert!(!requests_of(&blueprint, 0).contains_key(MEMORY_RESOURCE));
        run.spec.placement.memory_per_worker = Some("2Gi".to_owned());
        let blueprint = Blueprint::new(&run, &settings).expect("buildable");
        assert_eq!(requests_of(&blueprint, 0)[MEMORY_RESOURCE], "2Gi");
    }

    #[test]
    fn shard_pods_request_the_cpu_and_memory_the_run_sets() {
        let mut run = run(2, 1);
        run.spec.placement.memory_per_worker = Some("24Gi".to_owned());
        run.spec.placement.cpu_per_worker = Some("3500m".to_owned());
        run.spec.training.threads = 8;
        let settings = settings(0);
        let blueprint = Blueprint::new(&run, &settings).expect("buildable");
        for stage in 0..2 {
            let requests = requests_of(&blueprint, stage);
            assert_eq!(requests[MEMORY_RESOURCE], "24Gi");
            assert_eq!(requests[CPU_RESOURCE], "3500m");
        }
        // Without cpuPerWorker: the run's kernel threads, else one core.
        run.spec.placement.cpu_per_worker = None;
        let blueprint = Blueprint::new(&run, &settings).expect("buildable");
        assert_eq!(requests_of(&blueprint, 1)[CPU_RESOURCE], "8");
        run.spec.training.threads = 0;
        let blueprint = Blueprint::new(&run, &settings).expect("buildable");
        assert_eq!(requests_of(&blueprint, 1)[CPU_RESOURCE], "1");
        // The coordinator requests nothing.
        let coordinator = blueprint.children().expect("children").coordinator;
        assert!(coordinator.spec.expect("spec").containers[0]
            .resources
            .is_none());
    }

    #[test]
    fn pods_get_the_operators_collector_and_nothing_without_one() {
        let run = run(2, 2);
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4318");
        let traced = Settings {
            pass_env: vec![(endpoint.0.to_owned(), endpoint.1.to_owned())],
            ..settings(0)
        };
        let children = Blueprint::new(&run, &traced)
            .expect("buildable")
            .children()
            .expect("children");
        let shard = Blueprint::new(&run, &traced)
            .expect("buildable")
            .shard_pod(1, 0, 0, &[]);
        for pod in [&children.coordinator, &shard] {
            assert_eq!(
                env_of(pod).get(endpoint.0).map(String::as_str),
                Some(endpoint.1)
            );
        }
        let plain = settings(0);
        let shard = Blueprint::new(&run, &plain)
            .expect("buildable")
            .shard_pod(1, 0, 0, &[]);
        assert!(env_of(&shard).keys().all(|k| !k.starts_with("OTEL_")));
    }

    #[test]
    fn a_budget_per_replicated_stage_allows_one_disruption_at_a_time() {
        let run3 = run(2, 3);
        let settings = settings(0);
        let budgets = Blueprint::new(&run3, &settings)
            .expect("buildable")
            .children()
            .expect("children")
            .disruption_budgets;
        assert_eq!(budgets.len(), 2);
        let spec = budgets[1].spec.clone().expect("spec");
        assert_eq!(budgets[1].metadata.name.as_deref(), Some("demo-s1"));
        assert_eq!(spec.min_available, Some(IntOrString::Int(2)));
        assert_eq!(
            spec.selector.and_then(|s| s.match_labels),
            Some(BTreeMap::from([
                (LABEL_RUN.to_owned(), "demo".to_owned()),
                (LABEL_ROLE.to_owned(), ROLE_SHARD.to_owned()),
                (LABEL_STAGE.to_owned(), "1".to_owned()),
            ]))
        );
        let single = run(2, 1);
        let none = Blueprint::new(&single, &settings)
            .expect("buildable")
            .children()
            .expect("children")
            .disruption_budgets;
        assert!(none.is_empty());
    }

    #[test]
    fn manifest_round_trips_without_kubernetes_settings() {
        let mut run = run(3, 2);
        run.spec.suspend = true;
        run.spec.placement.max_reassignments = 3;
        let settings = settings(0);
        let children = Blueprint::new(&run, &settings)
            .expect("buildable")
            .children()
            .expect("children");
        let yaml = &children.manifest.data.as_ref().expect("data")[MANIFEST_FILE];
        let loaded = parse_manifest(yaml).expect("the mounted manifest loads");
        assert_eq!(loaded.metadata.name, "demo");
        assert_eq!(loaded.spec.pipeline, run.spec.pipeline);
        assert_eq!(loaded.spec.model, run.spec.model);
        assert!(!loaded.spec.suspend);
        assert_eq!(loaded.spec.placement, PlacementSpec::default());
        assert!(
            !yaml.contains("placement") && !yaml.contains("suspend"),
            "{yaml}"
        );
    }

    #[test]
    fn unstored_unplaced_or_invalid_runs_are_refused() {
        let settings = settings(0);
        let mut no_uid = run(2, 1);
        no_uid.metadata.uid = None;
        assert_eq!(
            Blueprint::new(&no_uid, &settings).err(),
            Some(ChildrenError::NotStored("demo".to_owned()))
        );
        let mut no_ns = run(2, 1);
        no_ns.metadata.namespace = None;
        assert_eq!(
            Blueprint::new(&no_ns, &settings).err(),
            Some(ChildrenError::NoNamespace("demo".to_owned()))
        );
        let mut invalid = run(2, 1);
        invalid.spec.placement.min_replicas = Some(4);
        let Some(ChildrenError::Invalid(text)) = Blueprint::new(&invalid, &settings).err() else {
            panic!("an invalid spec must be refused");
        };
        assert!(text.contains("spec.placement.minReplicas"), "{text}");
    }

    #[test]
    fn long_run_names_are_refused_not_truncated() {
        let settings = settings(0);
        let mut long = run(2, 1);
        long.metadata.name = Some("a".repeat(60));
        assert!(matches!(
            Blueprint::new(&long, &settings).err(),
            Some(ChildrenError::NameTooLong { .. })
        ));
        // The attempt suffix counts: 50 characters fit with the default
        // limit of 10 moves (`-s1-r0-a10`), not with 100000.
        let mut name = run(2, 1);
        name.metadata.name = Some("b".repeat(50));
        assert!(Blueprint::new(&name, &settings).is_ok());
        name.spec.placement.max_reassignments = 100_000;
        assert!(matches!(
            Blueprint::new(&name, &settings).err(),
            Some(ChildrenError::NameTooLong { .. })
        ));
    }
}
