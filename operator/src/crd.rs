//! The `TrainingRun` CustomResourceDefinition: the schema derived from the
//! spec crate's types plus the spec crate's semantic rules as CEL
//! `x-kubernetes-validations`, so the API server refuses the same manifests
//! that local mode refuses, with the same field names in its messages.
//!
//! The rule table [`pipewright_spec::validate::RULES`] holds each rule's field
//! and requirement in words; [`CEL_RULES`] holds the CEL expression of each
//! one, keyed by that (field, requirement) pair. Messages are taken from the
//! spec's table, never written here, and the tests fail when the two tables
//! stop matching, so a rule added to the spec cannot silently miss the CRD.
//! [`CEL_COST_BOUNDS`] adds the few size limits the API server needs to
//! accept those rules.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use pipewright_spec::validate::RULES;
use pipewright_spec::TrainingRunResource;
use serde_json::{json, Value};

/// Where the generated CRD is committed, relative to the repository root.
pub const CRD_FILE: &str = "crds/trainingruns.pipewright.dev.yaml";

/// Failures while building the CRD; each is a defect of this crate or of the
/// spec crate, never of user input, but they are reported, not panicked on.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// A CEL rule names a spec rule that is not in the spec's table.
    #[error("CEL rule for {field:?} ({requirement:?}) matches no rule of the spec")]
    UnknownRule {
        /// Field of the orphaned CEL rule.
        field: &'static str,
        /// Requirement of the orphaned CEL rule.
        requirement: &'static str,
    },
    /// A CEL rule is attached at a schema path that does not exist.
    #[error("no object schema at {0:?} to attach a CEL rule to")]
    NoSchemaAt(&'static str),
    /// The derived CRD did not round-trip through JSON.
    #[error("CRD (de)serialisation: {0}")]
    Json(#[from] serde_json::Error),
    /// YAML rendering failed.
    #[error("CRD YAML rendering: {0}")]
    Yaml(String),
}

/// The CEL form of one rule of the spec.
#[derive(Debug)]
pub struct CelRule {
    /// Field of the spec rule this implements (as in `RULES`).
    pub field: &'static str,
    /// Requirement of the spec rule this implements (as in `RULES`).
    pub requirement: &'static str,
    /// Dotted path of the object schema the rule is attached to (`""` is the
    /// root); `self` in `rule` is that object.
    pub at: &'static str,
    /// The CEL expression; true means valid.
    pub rule: &'static str,
    /// Path of the offending field relative to `at`, reported by the API
    /// server with the message; `None` when the rule is about `at` itself or
    /// about metadata, which CRD schemas do not describe.
    pub field_path: Option<&'static str>,
}

/// Rules of the spec deliberately not expressed in CEL, with the reason.
pub static NOT_IN_CEL: &[(&str, &str, &str)] = &[
    (
        "apiVersion",
        "must be pipewright.dev/v1alpha1",
        "the API server routes requests by group and version",
    ),
    (
        "kind",
        "must be TrainingRun",
        "the API server routes requests by kind",
    ),
];

// Fields with a serde default may be absent in stored objects when the
// schema's default was not applied (older objects, or a default schemars
// could not render), so every rule reads them through `has(...) ? ... : d`
// with the same default the Rust types use.
macro_rules! cel {
    ($field:literal, $req:literal, at $at:literal, $path:expr, $rule:literal) => {
        CelRule {
            field: $field,
            requirement: $req,
            at: $at,
            rule: $rule,
            field_path: $path,
        }
    };
}

/// The CEL expression of every rule in `RULES` except [`NOT_IN_CEL`].
pub static CEL_RULES: &[CelRule] = &[
    cel!("metadata.name", "must be a DNS-1123 label: at most 63 lowercase letters, digits and '-', \
          starting and ending with a letter or digit", at "", None,
        "size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')"),
    // --- spec.model
    cel!("spec.model.dim", "must be at least 1", at "spec.model", Some(".dim"), "self.dim >= 1"),
    cel!("spec.model.dim", "must be at most 65536", at "spec.model",
        Some(".dim"), "self.dim <= 65536"),
    cel!("spec.model.layers", "must be at least 1", at "spec.model", Some(".layers"), "self.layers >= 1"),
    cel!("spec.model.layers", "must be at most 1024", at "spec.model",
        Some(".layers"), "self.layers <= 1024"),
    cel!("spec.model.heads", "must be at least 1", at "spec.model", Some(".heads"), "self.heads >= 1"),
    cel!("spec.model.heads", "must be at most 1024", at "spec.model",
        Some(".heads"), "self.heads <= 1024"),
    cel!("spec.model.heads", "must divide spec.model.dim", at "spec.model", Some(".heads"),
        "self.heads == 0 || self.dim % self.heads == 0"),
    cel!("spec.model.heads", "must leave an even head dimension (spec.model.dim / spec.model.heads), \
          since rotary position embedding rotates pairs of dimensions", at "spec.model", Some(".heads"),
        "self.heads == 0 || self.dim % self.heads != 0 || (self.dim / self.heads) % 2 == 0"),
    cel!("spec.model.kvHeads", "must be at least 1 when set", at "spec.model", Some(".kvHeads"),
        "!has(self.kvHeads) || self.kvHeads >= 1"),
    cel!("spec.model.kvHeads", "must divide spec.model.heads", at "spec.model", Some(".kvHeads"),
        "!has(self.kvHeads) || self.kvHeads == 0 || self.heads == 0 || self.heads % self.kvHeads == 0"),
    cel!("spec.model.ffnDim", "must be at least 1", at "spec.model", Some(".ffnDim"), "self.ffnDim >= 1"),
    cel!("spec.model.ffnDim", "must be at most 262144", at "spec.model",
        Some(".ffnDim"), "self.ffnDim <= 262144"),
    cel!("spec.model.seqLen", "must be at least 1", at "spec.model", Some(".seqLen"), "self.seqLen >= 1"),
    cel!("spec.model.seqLen", "must be at most 131072", at "spec.model",
        Some(".seqLen"), "self.seqLen <= 131072"),
    cel!("spec.model.ropeTheta", "must be a finite number > 0", at "spec.model", Some(".ropeTheta"),
        "!has(self.ropeTheta) || self.ropeTheta > 0.0"),
    cel!("spec.model.normEps", "must be a finite number > 0", at "spec.model", Some(".normEps"),
        "!has(self.normEps) || self.normEps > 0.0"),
    cel!("spec.model.initStd", "must be a finite number > 0", at "spec.model", Some(".initStd"),
        "!has(self.initStd) || self.initStd > 0.0"),
    // --- spec.data
    cel!("spec.data.sources", "must list at least one file, directory or glob", at "spec.data",
        Some(".sources"), "size(self.sources) >= 1"),
    cel!("spec.data.sources", "must not contain empty entries", at "spec.data", Some(".sources"),
        "self.sources.all(s, s.trim() != '')"),
    cel!("spec.data.validationFraction", "must be in (0, 0.5]", at "spec.data", Some(".validationFraction"),
        "!has(self.validationFraction) || (self.validationFraction > 0.0 && self.validationFraction <= 0.5)"),
    cel!("spec.data.textField", "must not be empty when set", at "spec.data", Some(".textField"),
        "!has(self.textField) || self.textField.trim() != ''"),
    cel!("spec.data.textField", "does not apply to format text", at "spec.data", Some(".textField"),
        "!has(self.textField) || !has(self.format) || self.format != 'text'"),
    cel!("spec.data.cacheDir", "must not be empty when set", at "spec.data", Some(".cacheDir"),
        "!has(self.cacheDir) || self.cacheDir.trim() != ''"),
    cel!("spec.data.tokenizer", "kind bpe needs path or vocabSize", at "spec.data.tokenizer", None,
        "(has(self.kind) ? self.kind : 'byte') != 'bpe' || has(self.path) || has(self.vocabSize)"),
    cel!("spec.data.tokenizer.path", "must not be empty when set", at "spec.data.tokenizer", Some(".path"),
        "!has(self.path) || self.path.trim() != ''"),
    cel!("spec.data.tokenizer.path", "only applies to kind bpe", at "spec.data.tokenizer", Some(".path"),
        "!has(self.path) || (has(self.kind) ? self.kind : 'byte') == 'bpe'"),
    cel!("spec.data.tokenizer.vocabSize", "only applies to kind bpe", at "spec.data.tokenizer",
        Some(".vocabSize"), "!has(self.vocabSize) || (has(self.kind) ? self.kind : 'byte') == 'bpe'"),
    cel!("spec.data.tokenizer.vocabSize", "cannot be set together with path", at "spec.data.tokenizer",
        Some(".vocabSize"),
        "(has(self.kind) ? self.kind : 'byte') != 'bpe' || !has(self.path) || !has(self.vocabSize)"),
    cel!("spec.data.tokenizer.vocabSize", "must be in [257, 1000000] for kind bpe", at "spec.data.tokenizer",
        Some(".vocabSize"),
        "(has(self.kind) ? self.kind : 'byte') != 'bpe' || !has(self.vocabSize) \
         || (self.vocabSize >= 257 && self.vocabSize <= 1000000)"),
    // --- spec.training
    cel!("spec.training.steps", "must be at least 1", at "spec.training", Some(".steps"), "self.steps >= 1"),
    cel!("spec.training.microBatchSize", "must be at least 1", at "spec.training", Some(".microBatchSize"),
        "self.microBatchSize >= 1"),
    cel!("spec.training.microBatchSize", "must be at most 4096", at "spec.training",
        Some(".microBatchSize"), "self.microBatchSize <= 4096"),
    cel!("spec.training.microBatches", "must be at least 1", at "spec.training", Some(".microBatches"),
        "!has(self.microBatches) || self.microBatches >= 1"),
    cel!("spec.training.microBatches", "must be at most 4096", at "spec.training",
        Some(".microBatches"), "!has(self.microBatches) || self.microBatches <= 4096"),
    cel!("spec.training.learningRate", "must be a finite number > 0", at "spec.training",
        Some(".learningRate"), "self.learningRate > 0.0"),
    cel!("spec.training.warmupSteps", "must not exceed spec.training.steps", at "spec.training",
        Some(".warmupSteps"), "!has(self.warmupSteps) || self.warmupSteps <= self.steps"),
    cel!("spec.training.minLrRatio", "must be in [0, 1]", at "spec.training", Some(".minLrRatio"),
        "!has(self.minLrRatio) || (self.minLrRatio >= 0.0 && self.minLrRatio <= 1.0)"),
    cel!("spec.training.weightDecay", "must be a finite number >= 0", at "spec.training",
        Some(".weightDecay"), "!has(self.weightDecay) || self.weightDecay >= 0.0"),
    cel!("spec.training.beta1", "must be in [0, 1)", at "spec.training", Some(".beta1"),
        "!has(self.beta1) || (self.beta1 >= 0.0 && self.beta1 < 1.0)"),
    cel!("spec.training.beta2", "must be in [0, 1)", at "spec.training", Some(".beta2"),
        "!has(self.beta2) || (self.beta2 >= 0.0 && self.beta2 < 1.0)"),
    cel!("spec.training.eps", "must be a finite number > 0", at "spec.training", Some(".eps"),
        "!has(self.eps) || self.eps > 0.0"),
    cel!("spec.training.gradClip", "must be a finite number >= 0 (0 disables clipping)", at "spec.training",
        Some(".gradClip"), "!has(self.gradClip) || self.gradClip >= 0.0"),
    cel!("spec.training.evalBatches", "must be at least 1", at "spec.training", Some(".evalBatches"),
        "!has(self.evalBatches) || self.evalBatches >= 1"),
    cel!("spec.training.evalBatches", "must be at most 100000", at "spec.training",
        Some(".evalBatches"), "!has(self.evalBatches) || self.evalBatches <= 100000"),
    // --- spec.pipeline
    cel!("spec.pipeline.stages", "must be at least 1", at "spec.pipeline", Some(".stages"),
        "!has(self.stages) || self.stages >= 1"),
    cel!("spec.pipeline.stages", "must not exceed spec.model.layers", at "spec", Some(".pipeline.stages"),
        "!has(self.pipeline) || !has(self.pipeline.stages) || self.model.layers == 0 \
         || self.pipeline.stages <= self.model.layers"),
    cel!("spec.pipeline.replicas", "must be at least 1", at "spec.pipeline", Some(".replicas"),
        "!has(self.replicas) || self.replicas >= 1"),
    cel!("spec.pipeline.replicas", "must be at most 4096", at "spec.pipeline",
        Some(".replicas"), "!has(self.replicas) || self.replicas <= 4096"),
    cel!("spec.pipeline.aggregation", "median, trimmedMean and centeredClip need spec.pipeline.replicas >= 3",
        at "spec.pipeline", Some(".aggregation"),
        "(has(self.aggregation) ? self.aggregation : 'mean') == 'mean' || (has(self.replicas) ? self.replicas : 1) >= 3"),
    cel!("spec.pipeline.aggregation", "median, trimmedMean and centeredClip need routing: lanes",
        at "spec.pipeline", Some(".aggregation"),
        "(has(self.aggregation) ? self.aggregation : 'mean') == 'mean' || (has(self.routing) ? self.routing : 'lanes') == 'lanes'"),
    cel!("spec.pipeline.codec", "lowrank needs spec.pipeline.stages >= 2", at "spec.pipeline", Some(".codec"),
        "(has(self.codec) ? self.codec : 'f32') != 'lowrank' || (has(self.stages) ? self.stages : 1) >= 2"),
    cel!("spec.pipeline.lowrank", "only applies to codec lowrank", at "spec.pipeline", Some(".lowrank"),
        "!has(self.lowrank) || (has(self.codec) ? self.codec : 'f32') == 'lowrank'"),
    cel!("spec.pipeline.lowrank.rank", "must be at least 1", at "spec.pipeline.lowrank", Some(".rank"),
        "self.rank >= 1"),
    cel!("spec.pipeline.lowrank.rank", "must be less than spec.model.dim (default: spec.model.dim / 8)",
        at "spec", Some(".pipeline.lowrank.rank"),
        "!has(self.pipeline) || (has(self.pipeline.codec) ? self.pipeline.codec : 'f32') != 'lowrank' \
         || self.model.dim == 0 || (has(self.pipeline.lowrank) \
         ? (self.pipeline.lowrank.rank == 0 || self.pipeline.lowrank.rank < self.model.dim) \
         : ((self.model.dim / 8 >= 1 ? self.model.dim / 8 : 1) < self.model.dim))"),
    cel!("spec.pipeline.maxSendMegabytesPerSecond", "must be at least 1 when set", at "spec.pipeline",
        Some(".maxSendMegabytesPerSecond"),
        "!has(self.maxSendMegabytesPerSecond) || self.maxSendMegabytesPerSecond >= 1"),
    // --- spec.checkpoint
    cel!("spec.checkpoint.dir", "must not be empty when set", at "spec.checkpoint", Some(".dir"),
        "!has(self.dir) || self.dir.trim() != ''"),
    cel!("spec.checkpoint.every", "must not exceed spec.training.steps (0: only at the end)", at "spec",
        Some(".checkpoint.every"),
        "!has(self.checkpoint) || !has(self.checkpoint.every) || self.checkpoint.every <= self.training.steps"),
    // --- spec.placement
    cel!("spec.placement.memoryPerWorker", "must be a quantity of bytes such as 24Gi, 512Mi or 1G",
        at "spec.placement", Some(".memoryPerWorker"),
        "!has(self.memoryPerWorker) \
         || self.memoryPerWorker.matches('^[0-9]*[1-9][0-9]*(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$')"),
    cel!("spec.placement.cpuPerWorker", "must be a CPU quantity such as 4, 0.5 or 500m",
        at "spec.placement", Some(".cpuPerWorker"),
        "!has(self.cpuPerWorker) || (self.cpuPerWorker.matches('^([0-9]+m|[0-9]+([.][0-9]{1,3})?)$') \
         && self.cpuPerWorker.matches('[1-9]'))"),
    cel!("spec.placement.topologyKey", "must not be empty", at "spec.placement", Some(".topologyKey"),
        "!has(self.topologyKey) || self.topologyKey.trim() != ''"),
    cel!("spec.placement.minReplicas", "must be at least 1 when set", at "spec.placement",
        Some(".minReplicas"), "!has(self.minReplicas) || self.minReplicas >= 1"),
    cel!("spec.placement.minReplicas", "must not exceed spec.pipeline.replicas", at "spec",
        Some(".placement.minReplicas"),
        "!has(self.placement) || !has(self.placement.minReplicas) || self.placement.minReplicas <= \
         (has(self.pipeline) && has(self.pipeline.replicas) ? self.pipeline.replicas : 1)"),
    cel!("spec.placement.scheduleTimeoutSeconds", "must be at least 1", at "spec.placement",
        Some(".scheduleTimeoutSeconds"),
        "!has(self.scheduleTimeoutSeconds) || self.scheduleTimeoutSeconds >= 1"),
    cel!("spec.placement.tolerations", "an entry with operator Exists must not set value",
        at "spec.placement.tolerations.[]", Some(".value"),
        "(has(self.operator) ? self.operator : 'Equal') != 'Exists' || !has(self.value)"),
    cel!("spec.placement.tolerations", "an entry without key must use operator Exists",
        at "spec.placement.tolerations.[]", Some(".operator"),
        "(has(self.key) && self.key != '') || (has(self.operator) ? self.operator : 'Equal') == 'Exists'"),
    cel!("spec.placement.tolerations", "tolerationSeconds needs effect NoExecute",
        at "spec.placement.tolerations.[]", Some(".tolerationSeconds"),
        "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')"),
    // --- spec.storage
    cel!("spec.storage.size", "must be a quantity of bytes such as 10Gi, 500Mi or 1T", at "spec.storage",
        Some(".size"),
        "!has(self.size) || self.size.matches('^[0-9]*[1-9][0-9]*(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$')"),
    cel!("spec.storage.storageClassName", "must not be empty when set", at "spec.storage",
        Some(".storageClassName"),
        "!has(self.storageClassName) || self.storageClassName.trim() != ''"),
    // --- spec.rewards (JSON has no NaN or infinity, so a number in range is finite)
    cel!("spec.rewards.windowSteps", "must be at most 1000000000", at "spec.rewards",
        Some(".windowSteps"), "!has(self.windowSteps) || self.windowSteps <= 1000000000"),
    cel!("spec.rewards.weights", "at least one of forward, inputGradient, weightGradient and validation \
          must be > 0", at "spec.rewards.weights", None,
        "(has(self.forward) ? self.forward : 1.0) > 0.0 \
         || (has(self.inputGradient) ? self.inputGradient : 1.0) > 0.0 \
         || (has(self.weightGradient) ? self.weightGradient : 1.0) > 0.0 \
         || (has(self.validation) ? self.validation : 1.0) > 0.0"),
    cel!("spec.rewards.weights.forward", "must be a finite number in [0, 1000000]", at "spec.rewards.weights",
        Some(".forward"), "!has(self.forward) || (self.forward >= 0.0 && self.forward <= 1000000.0)"),
    cel!("spec.rewards.weights.inputGradient", "must be a finite number in [0, 1000000]",
        at "spec.rewards.weights", Some(".inputGradient"),
        "!has(self.inputGradient) || (self.inputGradient >= 0.0 && self.inputGradient <= 1000000.0)"),
    cel!("spec.rewards.weights.weightGradient", "must be a finite number in [0, 1000000]",
        at "spec.rewards.weights", Some(".weightGradient"),
        "!has(self.weightGradient) || (self.weightGradient >= 0.0 && self.weightGradient <= 1000000.0)"),
    cel!("spec.rewards.weights.validation", "must be a finite number in [0, 1000000]",
        at "spec.rewards.weights", Some(".validation"),
        "!has(self.validation) || (self.validation >= 0.0 && self.validation <= 1000000.0)"),
    cel!("spec.rewards.weights.allReducePerByte", "must be a finite number in [0, 1000000]",
        at "spec.rewards.weights", Some(".allReducePerByte"),
        "!has(self.allReducePerByte) || (self.allReducePerByte >= 0.0 && self.allReducePerByte <= 1000000.0)"),
    cel!("spec.rewards.minParticipation", "must be a finite number in [0, 1]", at "spec.rewards",
        Some(".minParticipation"),
        "!has(self.minParticipation) || (self.minParticipation >= 0.0 && self.minParticipation <= 1.0)"),
    // --- spec.validation
    cel!("spec.validation.auditRate", "must be a finite number in [0, 1]", at "spec.validation",
        Some(".auditRate"),
        "!has(self.auditRate) || (self.auditRate >= 0.0 && self.auditRate <= 1.0)"),
    cel!("spec.validation.contributionAuditRate", "must be a finite number in [0, 1]",
        at "spec.validation", Some(".contributionAuditRate"),
        "!has(self.contributionAuditRate) || (self.contributionAuditRate >= 0.0 && self.contributionAuditRate <= 1.0)"),
    cel!("spec.validation.contributionAuditRate",
        "must be 0 or unset when spec.pipeline.aggregation is mean (the ring mixes contributions, none can be attributed)",
        at "spec", Some(".validation.contributionAuditRate"),
        "!has(self.validation) || !has(self.validation.contributionAuditRate) \
         || self.validation.contributionAuditRate <= 0.0 \
         || (has(self.pipeline) && has(self.pipeline.aggregation) && self.pipeline.aggregation != 'mean')"),
];

/// The CRD: schema from the spec's types, CEL rules from [`CEL_RULES`] with
/// messages `"<field>: <requirement>"` from the spec's rule table.
///
/// # Errors
/// [`CrdError`] when [`CEL_RULES`] and the spec's table disagree or a rule
/// is attached where the schema has no object.
pub fn training_run_crd() -> Result<CustomResourceDefinition, CrdError> {
    let mut crd = serde_json::to_value(TrainingRunResource::crd())?;
    let versions = crd
        .pointer_mut("/spec/versions")
        .and_then(Value::as_array_mut)
        .ok_or(CrdError::NoSchemaAt(""))?;
    for version in versions {
        let root = version
            .pointer_mut("/schema/openAPIV3Schema")
            .ok_or(CrdError::NoSchemaAt(""))?;
        for cel in CEL_RULES {
            let spec_rule = RULES
                .iter()
                .find(|r| r.field == cel.field && r.requirement == cel.requirement)
                .ok_or(CrdError::UnknownRule {
                    field: cel.field,
                    requirement: cel.requirement,
                })?;
            let mut entry = json!({
                "rule": cel.rule,
                "message": format!("{}: {}", spec_rule.field, spec_rule.requirement),
            });
            if let Some(path) = cel.field_path {
                entry["fieldPath"] = json!(path);
                entry["reason"] = json!("FieldValueInvalid");
            }
            let node = object_schema_at(root, cel.at).ok_or(CrdError::NoSchemaAt(cel.at))?;
            let list = node
                .as_object_mut()
                .ok_or(CrdError::NoSchemaAt(cel.at))?
                .entry("x-kubernetes-validations")
                .or_insert_with(|| json!([]));
            if let Some(list) = list.as_array_mut() {
                list.push(entry);
            }
        }
        for bound in CEL_COST_BOUNDS {
            let node = schema_at(root, bound.at).ok_or(CrdError::NoSchemaAt(bound.at))?;
            let node = node.as_object_mut().ok_or(CrdError::NoSchemaAt(bound.at))?;
            node.insert(bound.keyword.to_owned(), json!(bound.value));
        }
    }
    Ok(serde_json::from_value(crd)?)
}

/// The schema object at the dotted property path `at` below `root`.
fn object_schema_at<'a>(root: &'a mut Value, at: &str) -> Option<&'a mut Value> {
    let node = schema_at(root, at)?;
    (node.get("type")? == "object").then_some(node)
}

/// The schema at the dotted property path `at` below `root`; a segment `[]`
/// steps into the items of an array.
fn schema_at<'a>(root: &'a mut Value, at: &str) -> Option<&'a mut Value> {
    let mut node = root;
    for part in at.split('.').filter(|p| !p.is_empty()) {
        node = if part == "[]" {
            node.get_mut("items")?
        } else {
            node.get_mut("properties")?.get_mut(part)?
        };
    }
    Some(node)
}

/// A size limit added to the schema so the API server can bound the cost of
/// a CEL rule.
#[derive(Debug)]
pub struct CostBound {
    /// Dotted schema path (`[]` for array items).
    pub at: &'static str,
    /// `maxItems` or `maxLength`.
    pub keyword: &'static str,
    /// The limit.
    pub value: u64,
}

/// Limits without which the API server would refuse the CRD: it estimates
/// each rule's worst case from the largest object a request can carry, and
/// `sources.all(s, s.trim() != '')` over an unbounded list of unbounded
/// strings exceeds its budget by orders of magnitude (a rule on one unbounded
/// string, such as `tokenizer.path`, stays well inside it). The limits are
/// far beyond any real manifest: a source is a path or a glob.
///
/// They are the one place the CRD is stricter than local mode: the spec's
/// rule table has no size limits yet, and these should move there.
pub static CEL_COST_BOUNDS: &[CostBound] = &[
    CostBound {
        at: "spec.data.sources",
        keyword: "maxItems",
        value: 1024,
    },
    CostBound {
        at: "spec.data.sources.[]",
        keyword: "maxLength",
        value: 4096,
    },
];

/// The CRD as the YAML document committed at [`CRD_FILE`].
///
/// # Errors
/// As [`training_run_crd`], or when YAML rendering fails.
pub fn crd_yaml() -> Result<String, CrdError> {
    let crd = training_run_crd()?;
    let body = serde_saphyr::to_string(&crd).map_err(|e| CrdError::Yaml(e.to_string()))?;
    Ok(format!(
        "# Generated by `pipewright-operator crd` from the spec crate; do not edit.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_rule_is_in_cel_or_explained() {
        for rule in RULES {
            let in_cel = CEL_RULES
                .iter()
                .filter(|c| c.field == rule.field && c.requirement == rule.requirement)
                .count();
            let excused = NOT_IN_CEL
                .iter()
                .filter(|(f, r, _)| *f == rule.field && *r == rule.requirement)
                .count();
            assert_eq!(
                in_cel + excused,
                1,
                "spec rule {:?} ({:?}) needs exactly one CEL rule in operator/src/crd.rs \
                 or an entry in NOT_IN_CEL",
                rule.field,
                rule.requirement
            );
        }
    }

    #[test]
    fn every_cel_rule_names_a_spec_rule() {
        // training_run_crd refuses orphans; building it proves there are none.
        training_run_crd().expect("CRD builds");
    }

    /// The rule list attached at `at`, as (message, fieldPath) pairs.
    fn rules_at(crd: &Value, at: &str) -> Vec<(String, Option<String>)> {
        let mut node = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        for part in at.split('.').filter(|p| !p.is_empty()) {
            node = &node["properties"][part];
        }
        node["x-kubernetes-validations"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|r| {
                        (
                            r["message"].as_str().unwrap_or_default().to_owned(),
                            r["fieldPath"].as_str().map(str::to_owned),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn brief_rules_are_attached_with_field_names() {
        let crd = serde_json::to_value(training_run_crd().expect("CRD builds")).expect("json");
        let model = rules_at(&crd, "spec.model");
        for (message, path) in [
            ("spec.model.dim: must be at least 1", ".dim"),
            ("spec.model.heads: must divide spec.model.dim", ".heads"),
            (
                "spec.model.kvHeads: must divide spec.model.heads",
                ".kvHeads",
            ),
        ] {
            assert!(
                model.contains(&(message.to_owned(), Some(path.to_owned()))),
                "{message} missing from {model:?}"
            );
        }
        let spec = rules_at(&crd, "spec");
        assert!(spec.contains(&(
            "spec.pipeline.stages: must not exceed spec.model.layers".to_owned(),
            Some(".pipeline.stages".to_owned())
        )));
        let pipeline = rules_at(&crd, "spec.pipeline");
        assert!(pipeline.contains(&(
            "spec.pipeline.replicas: must be at least 1".to_owned(),
            Some(".replicas".to_owned())
        )));
    }

    #[test]
    fn crd_names_printer_columns_and_status() {
        let crd = training_run_crd().expect("CRD builds");
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("trainingruns.pipewright.dev")
        );
        assert_eq!(crd.spec.names.kind, "TrainingRun");
        assert_eq!(crd.spec.names.short_names, Some(vec!["tr".to_owned()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some());
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Phase", "Stages", "Replicas", "Ready", "Step", "Loss", "Tokens/s", "Age"]
        );
    }

    #[test]
    fn enums_are_schema_enums() {
        let crd = serde_json::to_value(training_run_crd().expect("CRD builds")).expect("json");
        let pipeline = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["spec"]["properties"]["pipeline"]["properties"];
        assert_eq!(
            pipeline["schedule"]["enum"],
            json!(["gpipe", "1f1b", "zb-h1"])
        );
        assert_eq!(
            pipeline["codec"]["enum"],
            json!(["f32", "f16", "bf16", "int8", "lowrank"])
        );
    }

    #[test]
    fn source_list_is_bounded_for_the_cel_cost_budget() {
        let crd = serde_json::to_value(training_run_crd().expect("CRD builds")).expect("json");
        let sources = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["spec"]["properties"]["data"]["properties"]["sources"];
        assert_eq!(sources["maxItems"], 1024);
        assert_eq!(sources["items"]["maxLength"], 4096);
    }

    #[test]
    fn committed_crd_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CRD_FILE);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let fresh = crd_yaml().expect("CRD renders");
        assert!(
            committed == fresh,
            "{CRD_FILE} is stale or missing; regenerate it with \
             `cargo run -p pipewright-operator -- crd > {CRD_FILE}`"
        );
    }
}
