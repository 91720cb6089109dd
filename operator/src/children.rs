//! The Kubernetes objects a `TrainingRun` consists of, computed from the run
//! alone so that reconciling is "compute, then apply" and the computation is
//! tested without an API server.
//!
//! Per run:
//! - a ConfigMap holding the manifest in its local-mode form, so every
//!   process reads the same file through the same loader as `pipewright train`;
//! - the coordinator: one Pod and a Service in front of it;
//! - a headless Service giving every shard pod a stable DNS name
//!   (`<pod>.<run>-shards.<namespace>.svc`) that exists before the pod is
//!   ready, because neighbours connect to each other while starting;
//! - one Pod per shard (stage × replica).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    Pod, PodAffinity, PodAffinityTerm, PodAntiAffinity, PodSpec, ResourceRequirements, Secret,
    SecretKeySelector, Service, ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
    WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use kube::{Resource, ResourceExt};
use pipewright_spec::{Metadata, TrainingRun, TrainingRunResource, API_VERSION, KIND};

/// Label naming the run an object belongs to.
pub const LABEL_RUN: &str = "pipewright.dev/run";
/// Label naming the role of a pod: [`ROLE_COORDINATOR`] or [`ROLE_SHARD`].
pub const LABEL_ROLE: &str = "pipewright.dev/role";
/// Label holding a shard pod's pipeline stage.
pub const LABEL_STAGE: &str = "pipewright.dev/stage";
/// Label holding a shard pod's replica within its stage.
pub const LABEL_REPLICA: &str = "pipewright.dev/replica";
/// Role of the coordinator pod.
pub const ROLE_COORDINATOR: &str = "coordinator";
/// Role of a shard pod.
pub const ROLE_SHARD: &str = "shard";

/// Port the coordinator serves workers on.
pub const COORDINATOR_PORT: i32 = 7400;
/// Port a shard accepts its previous stage's link on.
pub const LINK_PORT: i32 = 7401;
/// Port a shard accepts its previous ring neighbour (same stage) on.
pub const RING_PORT: i32 = 7402;
/// Directory the manifest ConfigMap is mounted at.
pub const MANIFEST_DIR: &str = "/etc/pipewright";
/// File name of the manifest inside [`MANIFEST_DIR`].
pub const MANIFEST_FILE: &str = "run.yaml";
/// Key of the run key inside the run's Secret.
pub const RUN_KEY_FIELD: &str = "runKey";
/// Environment variable the worker reads the run key from (64 hex digits).
pub const RUN_KEY_ENV: &str = "PIPEWRIGHT_RUN_KEY";
/// Extended resource requested for GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Operator-wide settings that shape the children but are not part of a run's
/// spec (they describe the cluster, not the training).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Container image holding the `pipewright` binary.
    pub image: String,
    /// GPUs each shard pod requests; 0 runs shards on CPU.
    pub gpus_per_shard: u32,
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

/// All children of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    /// The manifest, mounted into every pod.
    pub manifest: ConfigMap,
    /// Headless Service that gives shard pods their DNS names.
    pub shard_service: Service,
    /// Service in front of the coordinator pod.
    pub coordinator_service: Service,
    /// The coordinator pod.
    pub coordinator: Pod,
    /// One pod per shard, stage-major (stage 0 replicas first).
    pub shards: Vec<Pod>,
}

/// Name of the ConfigMap holding a run's manifest.
pub fn manifest_name(run: &str) -> String {
    format!("{run}-manifest")
}
/// Name of the Secret holding a run's link-authentication key.
pub fn run_key_name(run: &str) -> String {
    format!("{run}-key")
}
/// Name of a run's headless shard Service.
pub fn shard_service_name(run: &str) -> String {
    format!("{run}-shards")
}
/// Name of a run's coordinator pod and Service.
pub fn coordinator_name(run: &str) -> String {
    format!("{run}-coordinator")
}
/// Name (and host name) of the pod of shard (`stage`, `replica`).
pub fn shard_pod_name(run: &str, stage: usize, replica: usize) -> String {
    format!("{run}-s{stage}-r{replica}")
}

/// Per-run names and addresses shared by every child.
struct Names<'a> {
    run: &'a str,
    namespace: &'a str,
}

impl Names<'_> {
    /// DNS name and link port of shard (`stage`, `replica`).
    fn shard_address(&self, stage: usize, replica: usize, port: i32) -> String {
        format!(
            "{}.{}.{}.svc:{port}",
            shard_pod_name(self.run, stage, replica),
            shard_service_name(self.run),
            self.namespace
        )
    }
    fn coordinator_address(&self) -> String {
        format!(
            "{}.{}.svc:{COORDINATOR_PORT}",
            coordinator_name(self.run),
            self.namespace
        )
    }
}

/// The children `run` should have, given the operator's `settings`.
///
/// # Errors
/// [`ChildrenError`] when the run lacks a namespace or uid, when a child
/// name would be too long, or when the manifest cannot be rendered.
pub fn desired_children(
    run: &TrainingRunResource,
    settings: &Settings,
) -> Result<Children, ChildrenError> {
    let name = run.name_any();
    let namespace = run
        .namespace()
        .ok_or_else(|| ChildrenError::NoNamespace(name.clone()))?;
    let owner = run
        .controller_owner_ref(&())
        .ok_or_else(|| ChildrenError::NotStored(name.clone()))?;
    let names = Names {
        run: &name,
        namespace: &namespace,
    };
    let stages = run.spec.pipeline.stages;
    let replicas = run.spec.pipeline.replicas;
    for child in [
        shard_service_name(&name),
        coordinator_name(&name),
        shard_pod_name(&name, stages.saturating_sub(1), replicas.saturating_sub(1)),
    ] {
        if child.len() > 63 {
            return Err(ChildrenError::NameTooLong {
                run: name.clone(),
                name: child,
            });
        }
    }

    let mut shards = Vec::with_capacity(stages * replicas);
    for stage in 0..stages {
        for replica in 0..replicas {
            shards.push(shard_pod(&names, &owner, run, settings, stage, replica));
        }
    }
    Ok(Children {
        manifest: manifest_config_map(&names, &owner, run)?,
        shard_service: shard_service(&names, &owner),
        coordinator_service: coordinator_service(&names, &owner),
        coordinator: coordinator_pod(&names, &owner, settings),
        shards,
    })
}

fn labels(run: &str, extra: &[(&str, String)]) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(LABEL_RUN.to_owned(), run.to_owned())]);
    labels.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    labels
}

fn meta(
    names: &Names,
    owner: &OwnerReference,
    name: String,
    labels: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.to_owned()),
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn manifest_config_map(
    names: &Names,
    owner: &OwnerReference,
    run: &TrainingRunResource,
) -> Result<ConfigMap, ChildrenError> {
    // The local-mode envelope, so pods load it with the same loader (and the
    // same validation) as `pipewright train`.
    let manifest = TrainingRun {
        api_version: API_VERSION.to_owned(),
        kind: KIND.to_owned(),
        metadata: Metadata {
            name: names.run.to_owned(),
            labels: run.labels().clone(),
            annotations: BTreeMap::new(),
        },
        spec: run.spec.clone(),
    };
    let yaml = serde_saphyr::to_string(&manifest).map_err(|e| ChildrenError::Manifest {
        run: names.run.to_owned(),
        message: e.to_string(),
    })?;
    Ok(ConfigMap {
        metadata: meta(
            names,
            owner,
            manifest_name(names.run),
            labels(names.run, &[]),
        ),
        data: Some(BTreeMap::from([(MANIFEST_FILE.to_owned(), yaml)])),
        ..ConfigMap::default()
    })
}

fn shard_service(names: &Names, owner: &OwnerReference) -> Service {
    Service {
        metadata: meta(
            names,
            owner,
            shard_service_name(names.run),
            labels(names.run, &[]),
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            // Neighbours dial each other while starting up, before any of
            // them is ready; DNS records must exist from the start.
            publish_not_ready_addresses: Some(true),
            selector: Some(labels(names.run, &[(LABEL_ROLE, ROLE_SHARD.to_owned())])),
            ports: Some(vec![
                service_port("link", LINK_PORT),
                service_port("ring", RING_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn coordinator_service(names: &Names, owner: &OwnerReference) -> Service {
    Service {
        metadata: meta(
            names,
            owner,
            coordinator_name(names.run),
            labels(names.run, &[]),
        ),
        spec: Some(ServiceSpec {
            selector: Some(labels(
                names.run,
                &[(LABEL_ROLE, ROLE_COORDINATOR.to_owned())],
            )),
            ports: Some(vec![service_port("coordinator", COORDINATOR_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        ..ServicePort::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// The run key, read from the run's Secret so it never appears in a pod spec.
fn run_key_env(names: &Names) -> EnvVar {
    EnvVar {
        name: RUN_KEY_ENV.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: run_key_name(names.run),
                key: RUN_KEY_FIELD.to_owned(),
                ..SecretKeySelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The Secret holding a run's key (`key_hex`: 64 hex digits). Not part of
/// [`Children`]: it is created once and never re-applied, since a new key
/// would cut every running link.
pub fn run_key_secret(run: &TrainingRunResource, key_hex: String) -> Result<Secret, ChildrenError> {
    let name = run.name_any();
    let namespace = run
        .namespace()
        .ok_or_else(|| ChildrenError::NoNamespace(name.clone()))?;
    let owner = run
        .controller_owner_ref(&())
        .ok_or_else(|| ChildrenError::NotStored(name.clone()))?;
    let names = Names {
        run: &name,
        namespace: &namespace,
    };
    Ok(Secret {
        metadata: meta(&names, &owner, run_key_name(&name), labels(&name, &[])),
        string_data: Some(BTreeMap::from([(RUN_KEY_FIELD.to_owned(), key_hex)])),
        ..Secret::default()
    })
}

fn manifest_volume(names: &Names) -> (Volume, VolumeMount) {
    (
        Volume {
            name: "manifest".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: manifest_name(names.run),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: "manifest".to_owned(),
            mount_path: MANIFEST_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    )
}

fn manifest_path() -> String {
    format!("{MANIFEST_DIR}/{MANIFEST_FILE}")
}

fn coordinator_pod(names: &Names, owner: &OwnerReference, settings: &Settings) -> Pod {
    let (volume, mount) = manifest_volume(names);
    Pod {
        metadata: meta(
            names,
            owner,
            coordinator_name(names.run),
            labels(names.run, &[(LABEL_ROLE, ROLE_COORDINATOR.to_owned())]),
        ),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "coordinator".to_owned(),
                image: Some(settings.image.clone()),
                args: Some(vec!["coordinator".to_owned(), manifest_path()]),
                env: Some(vec![env("PIPEWRIGHT_RUN", names.run), run_key_env(names)]),
                ports: Some(vec![container_port("coordinator", COORDINATOR_PORT)]),
                volume_mounts: Some(vec![mount]),
                ..Container::default()
            }],
            volumes: Some(vec![volume]),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        ..ContainerPort::default()
    }
}

/// Comma-separated link addresses of every replica of `stage`: a micro-batch
/// may go to any live replica of the next stage.
fn stage_addresses(names: &Names, stage: usize, replicas: usize) -> String {
    (0..replicas)
        .map(|r| names.shard_address(stage, r, LINK_PORT))
        .collect::<Vec<_>>()
        .join(",")
}

fn shard_pod(
    names: &Names,
    owner: &OwnerReference,
    run: &TrainingRunResource,
    settings: &Settings,
    stage: usize,
    replica: usize,
) -> Pod {
    let stages = run.spec.pipeline.stages;
    let replicas = run.spec.pipeline.replicas;
    let pod_name = shard_pod_name(names.run, stage, replica);
    let mut env_vars = vec![
        env("PIPEWRIGHT_RUN", names.run),
        env("PIPEWRIGHT_STAGE", stage.to_string()),
        env("PIPEWRIGHT_REPLICA", replica.to_string()),
        env("PIPEWRIGHT_COORDINATOR", names.coordinator_address()),
        env("PIPEWRIGHT_LISTEN", format!("0.0.0.0:{LINK_PORT}")),
        run_key_env(names),
    ];
    if stage > 0 {
        env_vars.push(env(
            "PIPEWRIGHT_PREV_STAGE",
            stage_addresses(names, stage - 1, replicas),
        ));
    }
    if stage + 1 < stages {
        env_vars.push(env(
            "PIPEWRIGHT_NEXT_STAGE",
            stage_addresses(names, stage + 1, replicas),
        ));
    }
    if replicas > 1 {
        env_vars.push(env(
            "PIPEWRIGHT_RING_LISTEN",
            format!("0.0.0.0:{RING_PORT}"),
        ));
        env_vars.push(env(
            "PIPEWRIGHT_RING_NEXT",
            names.shard_address(stage, (replica + 1) % replicas, RING_PORT),
        ));
    }

    let (resources, tolerations) = if settings.gpus_per_shard > 0 {
        let gpus = BTreeMap::from([(
            GPU_RESOURCE.to_owned(),
            Quantity(settings.gpus_per_shard.to_string()),
        )]);
        (
            Some(ResourceRequirements {
                requests: Some(gpus.clone()),
                limits: Some(gpus),
                ..ResourceRequirements::default()
            }),
            // GPU node pools are commonly tainted so that only pods asking
            // for GPUs land there.
            Some(vec![Toleration {
                key: Some(GPU_RESOURCE.to_owned()),
                operator: Some("Exists".to_owned()),
                effect: Some("NoSchedule".to_owned()),
                ..Toleration::default()
            }]),
        )
    } else {
        (None, None)
    };

    let (volume, mount) = manifest_volume(names);
    Pod {
        metadata: meta(
            names,
            owner,
            pod_name.clone(),
            labels(
                names.run,
                &[
                    (LABEL_ROLE, ROLE_SHARD.to_owned()),
                    (LABEL_STAGE, stage.to_string()),
                    (LABEL_REPLICA, replica.to_string()),
                ],
            ),
        ),
        spec: Some(PodSpec {
            hostname: Some(pod_name),
            subdomain: Some(shard_service_name(names.run)),
            // A failed shard is replaced by the operator with a new pod,
            // possibly on another node, rather than restarted in place.
            restart_policy: Some("Never".to_owned()),
            affinity: Some(shard_affinity(names.run, stage, stages)),
            tolerations,
            containers: vec![Container {
                name: "shard".to_owned(),
                image: Some(settings.image.clone()),
                args: Some(vec![
                    "stage-worker".to_owned(),
                    manifest_path(),
                    "--stage".to_owned(),
                    stage.to_string(),
                    "--replica".to_owned(),
                    replica.to_string(),
                ]),
                env: Some(env_vars),
                ports: Some(vec![
                    container_port("link", LINK_PORT),
                    container_port("ring", RING_PORT),
                ]),
                resources,
                volume_mounts: Some(vec![mount]),
                ..Container::default()
            }],
            volumes: Some(vec![volume]),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// Spread the replicas of one stage over nodes (a node failure then costs a
/// stage at most one replica) and keep adjacent stages in one zone (their
/// links carry every activation). Both are preferences, so a run still
/// schedules on a cluster with fewer nodes than replicas.
fn shard_affinity(run: &str, stage: usize, stages: usize) -> Affinity {
    let same_stage = LabelSelector {
        match_labels: Some(labels(run, &[(LABEL_STAGE, stage.to_string())])),
        ..LabelSelector::default()
    };
    let neighbours: Vec<String> = [
        stage.checked_sub(1),
        Some(stage + 1).filter(|s| *s < stages),
    ]
    .into_iter()
    .flatten()
    .map(|s| s.to_string())
    .collect();
    let pod_affinity = (!neighbours.is_empty()).then(|| PodAffinity {
        preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
            weight: 50,
            pod_affinity_term: PodAffinityTerm {
                label_selector: Some(LabelSelector {
                    match_labels: Some(labels(run, &[])),
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: LABEL_STAGE.to_owned(),
                        operator: "In".to_owned(),
                        values: Some(neighbours),
                    }]),
                }),
                topology_key: "topology.kubernetes.io/zone".to_owned(),
                ..PodAffinityTerm::default()
            },
        }]),
        ..PodAffinity::default()
    });
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(same_stage),
                        topology_key: "kubernetes.io/hostname".to_owned(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        pod_affinity,
        ..Affinity::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipewright_spec::parse_manifest;

    const MANIFEST: &str = "\
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata:
  name: demo
spec:
  model: {dim: 64, layers: 4, heads: 4, ffnDim: 176, seqLen: 64}
  data: {sources: [corpus/]}
  training: {steps: 10, microBatchSize: 4, learningRate: 0.001}
  pipeline: {stages: 3, replicas: 2}
";

    fn run() -> TrainingRunResource {
        let manifest = parse_manifest(MANIFEST).expect("test manifest is valid");
        let mut run = TrainingRunResource::new("demo", manifest.spec);
        run.metadata.namespace = Some("ml".to_owned());
        run.metadata.uid = Some("0b6c-uid".to_owned());
        run
    }

    fn settings(gpus: u32) -> Settings {
        Settings {
            image: "ghcr.io/pipewright/pipewright:test".to_owned(),
            gpus_per_shard: gpus,
        }
    }

    fn env_of(pod: &Pod) -> BTreeMap<String, String> {
        pod.spec.as_ref().expect("spec").containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    fn shard(children: &Children, stage: usize, replica: usize) -> &Pod {
        let name = shard_pod_name("demo", stage, replica);
        children
            .shards
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    #[test]
    fn one_pod_per_shard_with_shard_labels() {
        let children = desired_children(&run(), &settings(0)).expect("children");
        let names: Vec<&str> = children
            .shards
            .iter()
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        assert_eq!(
            names,
            [
                "demo-s0-r0",
                "demo-s0-r1",
                "demo-s1-r0",
                "demo-s1-r1",
                "demo-s2-r0",
                "demo-s2-r1"
            ]
        );
        let labels = shard(&children, 2, 1)
            .metadata
            .labels
            .clone()
            .expect("labels");
        assert_eq!(labels[LABEL_RUN], "demo");
        assert_eq!(labels[LABEL_ROLE], ROLE_SHARD);
        assert_eq!(labels[LABEL_STAGE], "2");
        assert_eq!(labels[LABEL_REPLICA], "1");
    }

    #[test]
    fn every_child_is_owned_by_the_run() {
        let children = desired_children(&run(), &settings(0)).expect("children");
        let mut metas = vec![
            &children.manifest.metadata,
            &children.shard_service.metadata,
            &children.coordinator_service.metadata,
            &children.coordinator.metadata,
        ];
        metas.extend(children.shards.iter().map(|p| &p.metadata));
        for meta in metas {
            let owners = meta.owner_references.as_ref().expect("owner references");
            assert_eq!(owners.len(), 1, "{:?}", meta.name);
            let owner = &owners[0];
            assert_eq!(owner.api_version, "pipewright.dev/v1alpha1");
            assert_eq!(owner.kind, "TrainingRun");
            assert_eq!(owner.name, "demo");
            assert_eq!(owner.uid, "0b6c-uid");
            assert_eq!(owner.controller, Some(true));
            assert_eq!(meta.namespace.as_deref(), Some("ml"));
        }
    }

    #[test]
    fn shards_know_coordinator_and_neighbours_by_dns_name() {
        let children = desired_children(&run(), &settings(0)).expect("children");
        let middle = env_of(shard(&children, 1, 0));
        assert_eq!(middle["PIPEWRIGHT_STAGE"], "1");
        assert_eq!(middle["PIPEWRIGHT_REPLICA"], "0");
        assert_eq!(
            middle["PIPEWRIGHT_COORDINATOR"],
            "demo-coordinator.ml.svc:7400"
        );
        assert_eq!(
            middle["PIPEWRIGHT_PREV_STAGE"],
            "demo-s0-r0.demo-shards.ml.svc:7401,demo-s0-r1.demo-shards.ml.svc:7401"
        );
        assert_eq!(
            middle["PIPEWRIGHT_NEXT_STAGE"],
            "demo-s2-r0.demo-shards.ml.svc:7401,demo-s2-r1.demo-shards.ml.svc:7401"
        );
        assert_eq!(
            middle["PIPEWRIGHT_RING_NEXT"],
            "demo-s1-r1.demo-shards.ml.svc:7402"
        );
        // The ring closes: the last replica sends to the first.
        assert_eq!(
            env_of(shard(&children, 1, 1))["PIPEWRIGHT_RING_NEXT"],
            "demo-s1-r0.demo-shards.ml.svc:7402"
        );
        let first = env_of(shard(&children, 0, 0));
        assert!(!first.contains_key("PIPEWRIGHT_PREV_STAGE"));
        let last = env_of(shard(&children, 2, 0));
        assert!(!last.contains_key("PIPEWRIGHT_NEXT_STAGE"));
        // Those names resolve only if the pod's host name and subdomain match
        // the headless Service.
        let spec = shard(&children, 1, 0).spec.clone().expect("spec");
        assert_eq!(spec.hostname.as_deref(), Some("demo-s1-r0"));
        assert_eq!(spec.subdomain.as_deref(), Some("demo-shards"));
        let service = children.shard_service.spec.clone().expect("service spec");
        assert_eq!(service.cluster_ip.as_deref(), Some("None"));
        assert_eq!(service.publish_not_ready_addresses, Some(true));
        assert_eq!(
            children.shard_service.metadata.name.as_deref(),
            Some("demo-shards")
        );
    }

    #[test]
    fn run_key_comes_from_the_runs_secret() {
        let children = desired_children(&run(), &settings(0)).expect("children");
        for pod in children.shards.iter().chain([&children.coordinator]) {
            let env = pod.spec.as_ref().expect("spec").containers[0]
                .env
                .clone()
                .unwrap_or_default();
            let key = env
                .iter()
                .find(|e| e.name == RUN_KEY_ENV)
                .expect("run key variable");
            assert_eq!(key.value, None, "the key must not be inlined");
            let secret = key
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .expect("secret reference");
            assert_eq!(
                (secret.name.as_str(), secret.key.as_str()),
                ("demo-key", RUN_KEY_FIELD)
            );
        }
        let secret = run_key_secret(&run(), "ab".repeat(32)).expect("secret");
        assert_eq!(secret.metadata.name.as_deref(), Some("demo-key"));
        assert_eq!(
            secret
                .metadata
                .owner_references
                .as_ref()
                .map(|o| o[0].uid.as_str()),
            Some("0b6c-uid")
        );
    }

    #[test]
    fn single_replica_has_no_ring() {
        let mut run = run();
        run.spec.pipeline.replicas = 1;
        let children = desired_children(&run, &settings(0)).expect("children");
        let env = env_of(&children.shards[0]);
        assert!(!env.contains_key("PIPEWRIGHT_RING_NEXT"));
    }

    #[test]
    fn replicas_of_a_stage_repel_and_neighbour_stages_attract() {
        let children = desired_children(&run(), &settings(0)).expect("children");
        let affinity = shard(&children, 1, 0)
            .spec
            .clone()
            .and_then(|s| s.affinity)
            .expect("affinity");
        let anti = affinity
            .pod_anti_affinity
            .and_then(|a| a.preferred_during_scheduling_ignored_during_execution)
            .expect("anti-affinity");
        let term = &anti[0].pod_affinity_term;
        assert_eq!(term.topology_key, "kubernetes.io/hostname");
        let selector = term.label_selector.clone().and_then(|s| s.match_labels);
        assert_eq!(
            selector,
            Some(BTreeMap::from([
                (LABEL_RUN.to_owned(), "demo".to_owned()),
                (LABEL_STAGE.to_owned(), "1".to_owned()),
            ]))
        );
        let near = affinity
            .pod_affinity
            .and_then(|a| a.preferred_during_scheduling_ignored_during_execution)
            .expect("affinity to neighbours");
        let expr = near[0]
            .pod_affinity_term
            .label_selector
            .clone()
            .and_then(|s| s.match_expressions)
            .expect("expressions");
        assert_eq!(expr[0].values, Some(vec!["0".to_owned(), "2".to_owned()]));
    }

    #[test]
    fn gpus_are_requested_only_when_configured() {
        let gpu = desired_children(&run(), &settings(2)).expect("children");
        let resources = gpu.shards[0].spec.clone().expect("spec").containers[0]
            .resources
            .clone()
            .expect("resources");
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
        let cpu = desired_children(&run(), &settings(0)).expect("children");
        assert!(cpu.shards[0].spec.clone().expect("spec").containers[0]
            .resources
            .is_none());
    }

    #[test]
    fn manifest_round_trips_through_the_local_loader() {
        let children = desired_children(&run(), &settings(0)).expect("children");
        let yaml = &children.manifest.data.as_ref().expect("data")[MANIFEST_FILE];
        let loaded = parse_manifest(yaml).expect("the mounted manifest loads");
        assert_eq!(loaded.metadata.name, "demo");
        assert_eq!(loaded.spec, run().spec);
    }

    #[test]
    fn unstored_or_unplaced_runs_are_refused() {
        let mut no_uid = run();
        no_uid.metadata.uid = None;
        assert_eq!(
            desired_children(&no_uid, &settings(0)),
            Err(ChildrenError::NotStored("demo".to_owned()))
        );
        let mut no_ns = run();
        no_ns.metadata.namespace = None;
        assert_eq!(
            desired_children(&no_ns, &settings(0)),
            Err(ChildrenError::NoNamespace("demo".to_owned()))
        );
    }

    #[test]
    fn long_run_names_are_refused_not_truncated() {
        let mut long = run();
        long.metadata.name = Some("a".repeat(60));
        assert!(matches!(
            desired_children(&long, &settings(0)),
            Err(ChildrenError::NameTooLong { .. })
        ));
    }
}
