//! The CRD's CEL rules refuse exactly the manifests that local mode refuses.
//!
//! Each case changes one field of a valid manifest; the API server (modelled
//! by a client-side CEL evaluator, schema defaults applied first as the API
//! server does) and `pipewright_spec::parse_manifest` must then report the
//! same set of fields.

use std::collections::BTreeSet;

use kube_cel::{compile_schema, estimate_rule_cost, Validator, WarningKind};
use pipewright_operator::crd::training_run_crd;
use pipewright_spec::{parse_manifest, SpecError};
use serde_json::{json, Value};

fn base() -> Value {
    json!({
        "apiVersion": "pipewright.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "quickstart"},
        "spec": {
            "model": {"dim": 64, "layers": 4, "heads": 4, "ffnDim": 176, "seqLen": 64},
            "data": {"sources": ["corpus/"]},
            "training": {"steps": 100, "microBatchSize": 8, "learningRate": 0.001},
        }
    })
}

/// `base()` with the JSON value at each pointer replaced (or removed for
/// `Value::Null`).
fn with(changes: &[(&str, Value)]) -> Value {
    let mut run = base();
    for (pointer, value) in changes {
        let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
        let mut node = &mut run;
        for part in parent.split('/').filter(|p| !p.is_empty()) {
            node = node
                .as_object_mut()
                .expect("object")
                .entry(part)
                .or_insert_with(|| json!({}));
        }
        let object = node.as_object_mut().expect("object");
        if value.is_null() {
            object.remove(key);
        } else {
            object.insert(key.to_owned(), value.clone());
        }
    }
    run
}

fn schema() -> Value {
    let crd = serde_json::to_value(training_run_crd().expect("CRD builds")).expect("json");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Fields the local validator reports for `run` (empty when it is valid).
fn local_fields(run: &Value) -> BTreeSet<String> {
    match parse_manifest(&run.to_string()) {
        Ok(_) => BTreeSet::new(),
        Err(SpecError::Invalid(errors)) => errors.into_iter().map(|e| e.field).collect(),
        Err(other) => panic!("case does not even parse locally: {other}"),
    }
}

/// Fields the CRD's CEL rules report for `run`, read from the message prefix.
fn cel_fields(validator: &Validator, schema: &Value, run: &Value) -> BTreeSet<String> {
    match validator.validate(schema, run, None) {
        Ok(()) => BTreeSet::new(),
        Err(errors) => errors
            .iter()
            .map(|e| {
                let (field, _) = e
                    .message
                    .split_once(": ")
                    .unwrap_or_else(|| panic!("CEL failure that is not a rule message: {e:?}"));
                field.to_owned()
            })
            .collect(),
    }
}

fn cases() -> Vec<(&'static str, Value)> {
    vec![
        ("valid", base()),
        ("dim 0", with(&[("/spec/model/dim", json!(0))])),
        ("layers 0", with(&[("/spec/model/layers", json!(0))])),
        ("heads 0", with(&[("/spec/model/heads", json!(0))])),
        (
            "heads do not divide dim",
            with(&[("/spec/model/heads", json!(5))]),
        ),
        ("odd head dim", with(&[("/spec/model/heads", json!(64))])),
        ("kvHeads 0", with(&[("/spec/model/kvHeads", json!(0))])),
        ("kvHeads 3", with(&[("/spec/model/kvHeads", json!(3))])),
        ("kvHeads 2", with(&[("/spec/model/kvHeads", json!(2))])),
        ("ffnDim 0", with(&[("/spec/model/ffnDim", json!(0))])),
        ("seqLen 0", with(&[("/spec/model/seqLen", json!(0))])),
        (
            "ropeTheta 0",
            with(&[("/spec/model/ropeTheta", json!(0.0))]),
        ),
        (
            "normEps < 0",
            with(&[("/spec/model/normEps", json!(-1e-5))]),
        ),
        ("initStd 0", with(&[("/spec/model/initStd", json!(0))])),
        ("no sources", with(&[("/spec/data/sources", json!([]))])),
        (
            "blank source",
            with(&[("/spec/data/sources", json!(["a", "  "]))]),
        ),
        (
            "validation 0",
            with(&[("/spec/data/validationFraction", json!(0.0))]),
        ),
        (
            "validation 0.6",
            with(&[("/spec/data/validationFraction", json!(0.6))]),
        ),
        (
            "validation 0.5",
            with(&[("/spec/data/validationFraction", json!(0.5))]),
        ),
        (
            "bpe alone",
            with(&[("/spec/data/tokenizer/kind", json!("bpe"))]),
        ),
        (
            "bpe vocab 300",
            with(&[
                ("/spec/data/tokenizer/kind", json!("bpe")),
                ("/spec/data/tokenizer/vocabSize", json!(300)),
            ]),
        ),
        (
            "bpe vocab 100",
            with(&[
                ("/spec/data/tokenizer/kind", json!("bpe")),
                ("/spec/data/tokenizer/vocabSize", json!(100)),
            ]),
        ),
        (
            "bpe blank path",
            with(&[
                ("/spec/data/tokenizer/kind", json!("bpe")),
                ("/spec/data/tokenizer/path", json!(" ")),
            ]),
        ),
        (
            "bpe path and vocab",
            with(&[
                ("/spec/data/tokenizer/kind", json!("bpe")),
                ("/spec/data/tokenizer/path", json!("tok.json")),
                ("/spec/data/tokenizer/vocabSize", json!(300)),
            ]),
        ),
        (
            "byte with path",
            with(&[("/spec/data/tokenizer/path", json!("t.json"))]),
        ),
        (
            "byte with vocab",
            with(&[("/spec/data/tokenizer/vocabSize", json!(300))]),
        ),
        ("steps 0", with(&[("/spec/training/steps", json!(0))])),
        (
            "microBatchSize 0",
            with(&[("/spec/training/microBatchSize", json!(0))]),
        ),
        (
            "microBatches 0",
            with(&[("/spec/training/microBatches", json!(0))]),
        ),
        (
            "learningRate 0",
            with(&[("/spec/training/learningRate", json!(0))]),
        ),
        (
            "warmup > steps",
            with(&[("/spec/training/warmupSteps", json!(101))]),
        ),
        (
            "minLrRatio 1.5",
            with(&[("/spec/training/minLrRatio", json!(1.5))]),
        ),
        (
            "weightDecay < 0",
            with(&[("/spec/training/weightDecay", json!(-0.1))]),
        ),
        ("beta1 1", with(&[("/spec/training/beta1", json!(1.0))])),
        ("beta2 < 0", with(&[("/spec/training/beta2", json!(-0.5))])),
        ("eps 0", with(&[("/spec/training/eps", json!(0.0))])),
        (
            "gradClip < 0",
            with(&[("/spec/training/gradClip", json!(-1.0))]),
        ),
        (
            "evalBatches 0",
            with(&[("/spec/training/evalBatches", json!(0))]),
        ),
        ("stages 0", with(&[("/spec/pipeline/stages", json!(0))])),
        (
            "stages > layers",
            with(&[("/spec/pipeline/stages", json!(5))]),
        ),
        (
            "stages = layers",
            with(&[("/spec/pipeline/stages", json!(4))]),
        ),
        ("replicas 0", with(&[("/spec/pipeline/replicas", json!(0))])),
        (
            "lowrank, one stage",
            with(&[("/spec/pipeline/codec", json!("lowrank"))]),
        ),
        (
            "lowrank, two stages",
            with(&[
                ("/spec/pipeline/codec", json!("lowrank")),
                ("/spec/pipeline/stages", json!(2)),
            ]),
        ),
        (
            "trimmedMean, two replicas",
            with(&[
                ("/spec/pipeline/aggregation", json!("trimmedMean")),
                ("/spec/pipeline/replicas", json!(2)),
            ]),
        ),
        (
            "median, three replicas",
            with(&[
                ("/spec/pipeline/aggregation", json!("median")),
                ("/spec/pipeline/replicas", json!(3)),
            ]),
        ),
        (
            "median, throughput routing",
            with(&[
                ("/spec/pipeline/aggregation", json!("median")),
                ("/spec/pipeline/replicas", json!(3)),
                ("/spec/pipeline/routing", json!("throughput")),
            ]),
        ),
        (
            "centeredClip, one replica",
            with(&[("/spec/pipeline/aggregation", json!("centeredClip"))]),
        ),
        (
            "blank checkpoint dir",
            with(&[("/spec/checkpoint/dir", json!(""))]),
        ),
        (
            "checkpoint every > steps",
            with(&[("/spec/checkpoint/every", json!(200))]),
        ),
        (
            "topologyKey blank",
            with(&[("/spec/placement/topologyKey", json!(" "))]),
        ),
        (
            "minReplicas 0",
            with(&[("/spec/placement/minReplicas", json!(0))]),
        ),
        (
            "minReplicas > replicas",
            with(&[("/spec/placement/minReplicas", json!(2))]),
        ),
        (
            "minReplicas = replicas",
            with(&[
                ("/spec/placement/minReplicas", json!(2)),
                ("/spec/pipeline/replicas", json!(3)),
            ]),
        ),
        (
            "scheduleTimeoutSeconds 0",
            with(&[("/spec/placement/scheduleTimeoutSeconds", json!(0))]),
        ),
        (
            "toleration Exists with value",
            with(&[(
                "/spec/placement/tolerations",
                json!([{"key": "gpu", "operator": "Exists", "value": "x"}]),
            )]),
        ),
        (
            "toleration without key",
            with(&[(
                "/spec/placement/tolerations",
                json!([{"value": "x", "effect": "NoSchedule"}]),
            )]),
        ),
        (
            "toleration seconds without NoExecute",
            with(&[(
                "/spec/placement/tolerations",
                json!([{"key": "spot", "tolerationSeconds": 30}]),
            )]),
        ),
        (
            "tolerations valid",
            with(&[
                (
                    "/spec/placement/tolerations",
                    json!([
                        {"operator": "Exists"},
                        {"key": "spot", "value": "yes", "effect": "NoExecute", "tolerationSeconds": 30},
                    ]),
                ),
                ("/spec/placement/nodeSelector", json!({"pool": "gpu"})),
                ("/spec/suspend", json!(true)),
                ("/spec/ttlSecondsAfterFinished", json!(60)),
            ]),
        ),
        (
            "memoryPerWorker in millibytes",
            with(&[("/spec/placement/memoryPerWorker", json!("512m"))]),
        ),
        (
            "memoryPerWorker fraction",
            with(&[("/spec/placement/memoryPerWorker", json!("1.5Gi"))]),
        ),
        (
            "memoryPerWorker zero",
            with(&[("/spec/placement/memoryPerWorker", json!("0Mi"))]),
        ),
        (
            "cpuPerWorker word",
            with(&[("/spec/placement/cpuPerWorker", json!("two"))]),
        ),
        (
            "cpuPerWorker zero",
            with(&[("/spec/placement/cpuPerWorker", json!("0.000"))]),
        ),
        (
            "cpuPerWorker four decimals",
            with(&[("/spec/placement/cpuPerWorker", json!("0.0005"))]),
        ),
        (
            "cpuPerWorker bytes",
            with(&[("/spec/placement/cpuPerWorker", json!("2Gi"))]),
        ),
        (
            "resources valid",
            with(&[
                ("/spec/placement/memoryPerWorker", json!("24Gi")),
                ("/spec/placement/cpuPerWorker", json!("500m")),
            ]),
        ),
        (
            "resources valid, decimal cores and plain bytes",
            with(&[
                ("/spec/placement/memoryPerWorker", json!("1073741824")),
                ("/spec/placement/cpuPerWorker", json!("0.25")),
            ]),
        ),
        (
            "storage size bad",
            with(&[("/spec/storage/size", json!("10GB"))]),
        ),
        (
            "storage size zero",
            with(&[("/spec/storage/size", json!("0Gi"))]),
        ),
        (
            "storage size fraction",
            with(&[("/spec/storage/size", json!("1.5Gi"))]),
        ),
        (
            "storage class empty",
            with(&[("/spec/storage/storageClassName", json!(" "))]),
        ),
        (
            "storage valid",
            with(&[
                ("/spec/storage/size", json!("500Mi")),
                ("/spec/storage/storageClassName", json!("fast-ssd")),
            ]),
        ),
        ("storage defaulted", with(&[("/spec/storage", json!({}))])),
        (
            "rewards windowSteps absurd",
            with(&[("/spec/rewards/windowSteps", json!(1_000_000_001u64))]),
        ),
        (
            "rewards no work weighed",
            with(&[(
                "/spec/rewards/weights",
                json!({"forward": 0, "inputGradient": 0, "weightGradient": 0.0, "validation": 0,
                       "allReducePerByte": 1}),
            )]),
        ),
        (
            "rewards forward < 0",
            with(&[("/spec/rewards/weights/forward", json!(-1))]),
        ),
        (
            "rewards inputGradient too large",
            with(&[("/spec/rewards/weights/inputGradient", json!(1e6 + 1.0))]),
        ),
        (
            "rewards weightGradient < 0",
            with(&[("/spec/rewards/weights/weightGradient", json!(-0.5))]),
        ),
        (
            "rewards validation too large",
            with(&[("/spec/rewards/weights/validation", json!(2_000_000))]),
        ),
        (
            "rewards allReducePerByte < 0",
            with(&[("/spec/rewards/weights/allReducePerByte", json!(-0.001))]),
        ),
        (
            "rewards minParticipation < 0",
            with(&[("/spec/rewards/minParticipation", json!(-0.1))]),
        ),
        (
            "rewards minParticipation > 1",
            with(&[("/spec/rewards/minParticipation", json!(1.5))]),
        ),
        (
            "rewards partial",
            with(&[("/spec/rewards/windowSteps", json!(100))]),
        ),
        (
            "rewards at the bounds",
            with(&[
                ("/spec/rewards/windowSteps", json!(1_000_000_000u64)),
                ("/spec/rewards/minParticipation", json!(1)),
                (
                    "/spec/rewards/weights",
                    json!({"forward": 0, "inputGradient": 0, "weightGradient": 0,
                           "validation": 1_000_000, "allReducePerByte": 1e6}),
                ),
            ]),
        ),
        ("rewards defaulted", with(&[("/spec/rewards", json!({}))])),
        (
            "validation auditRate < 0",
            with(&[("/spec/validation", json!({"auditRate": -0.01}))]),
        ),
        (
            "validation auditRate > 1",
            with(&[("/spec/validation", json!({"auditRate": 1.01}))]),
        ),
        (
            "validation auditRate at the bounds",
            with(&[("/spec/validation", json!({"auditRate": 0}))]),
        ),
        (
            "validation auditRate one",
            with(&[("/spec/validation", json!({"auditRate": 1}))]),
        ),
        (
            "validation defaulted",
            with(&[("/spec/validation", json!({}))]),
        ),
        (
            "validation contributionAuditRate < 0",
            with(&[
                (
                    "/spec/pipeline",
                    json!({"replicas": 3, "aggregation": "median"}),
                ),
                ("/spec/validation", json!({"contributionAuditRate": -0.01})),
            ]),
        ),
        (
            "validation contributionAuditRate > 1",
            with(&[
                (
                    "/spec/pipeline",
                    json!({"replicas": 3, "aggregation": "median"}),
                ),
                ("/spec/validation", json!({"contributionAuditRate": 1.5})),
            ]),
        ),
        (
            "validation contributionAuditRate at the bounds, median",
            with(&[
                (
                    "/spec/pipeline",
                    json!({"replicas": 3, "aggregation": "median"}),
                ),
                (
                    "/spec/validation",
                    json!({"contributionAuditRate": 1, "auditRate": 0}),
                ),
            ]),
        ),
        (
            "validation contributionAuditRate 0 under mean",
            with(&[("/spec/validation", json!({"contributionAuditRate": 0}))]),
        ),
        (
            "validation contributionAuditRate under mean by default",
            with(&[("/spec/validation", json!({"contributionAuditRate": 0.05}))]),
        ),
        (
            "validation contributionAuditRate under mean named",
            with(&[
                (
                    "/spec/pipeline",
                    json!({"replicas": 3, "aggregation": "mean"}),
                ),
                ("/spec/validation", json!({"contributionAuditRate": 1})),
            ]),
        ),
        (
            "validation contributionAuditRate under trimmedMean",
            with(&[
                (
                    "/spec/pipeline",
                    json!({"replicas": 4, "aggregation": "trimmedMean"}),
                ),
                ("/spec/validation", json!({"contributionAuditRate": 0.25})),
            ]),
        ),
        (
            "name not a label",
            with(&[("/metadata/name", json!("Quick_Start"))]),
        ),
        (
            "name too long",
            with(&[("/metadata/name", json!("a".repeat(64)))]),
        ),
    ]
}

#[test]
fn cel_and_local_validation_agree() {
    let schema = schema();
    let validator = Validator::new();
    let mut disagreements = Vec::new();
    for (name, run) in cases() {
        let local = local_fields(&run);
        let cel = cel_fields(&validator, &schema, &run);
        if local != cel {
            disagreements.push(format!("{name}: local {local:?}, CEL {cel:?}"));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

#[test]
fn every_case_but_the_valid_ones_is_refused() {
    // Guards the agreement test against agreeing only because nothing fires.
    let valid: BTreeSet<&str> = [
        "valid",
        "kvHeads 2",
        "validation 0.5",
        "bpe vocab 300",
        "stages = layers",
        "lowrank, two stages",
        "median, three replicas",
        "minReplicas = replicas",
        "tolerations valid",
        "resources valid",
        "resources valid, decimal cores and plain bytes",
        "storage valid",
        "storage defaulted",
        "rewards partial",
        "rewards at the bounds",
        "rewards defaulted",
        "validation auditRate at the bounds",
        "validation auditRate one",
        "validation defaulted",
        "validation contributionAuditRate at the bounds, median",
        "validation contributionAuditRate 0 under mean",
        "validation contributionAuditRate under trimmedMean",
    ]
    .into();
    for (name, run) in cases() {
        assert_eq!(
            local_fields(&run).is_empty(),
            valid.contains(name),
            "case {name}"
        );
    }
}

/// Every rule compiles and stays inside the API server's cost budget, which
/// refuses a CRD whose rules are estimated too expensive.
#[test]
fn rules_compile_within_cost_budget() {
    let compiled = compile_schema(&schema());
    assert!(
        !compiled.has_errors(),
        "{:?}",
        compiled.compilation_errors()
    );
    let mut over = Vec::new();
    visit(&compiled, &mut |node| {
        for rule in node.validations.iter().flatten() {
            for warning in estimate_rule_cost(&rule.rule.rule, node) {
                if warning.kind == WarningKind::CostExceeded {
                    over.push(warning.message);
                }
            }
        }
    });
    assert!(over.is_empty(), "{over:?}");
}

fn visit(node: &kube_cel::CompiledSchema, f: &mut dyn FnMut(&kube_cel::CompiledSchema)) {
    f(node);
    for child in node.properties.values() {
        visit(child, f);
    }
    if let Some(items) = &node.items {
        visit(items, f);
    }
}
