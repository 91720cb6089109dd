//! Parsing behaviour a user relies on: defaults, round trips, and refusals
//! that list every problem at once.

use std::collections::BTreeMap;

use pipewright_spec::validate::RULES;
use pipewright_spec::{
    parse_manifest, validate, CheckpointSpec, Codec, DataSpec, LowrankSpec, LowrankWire, Metadata,
    ModelSpec, PartitionKind, PipelineSpec, PlacementSpec, RewardWeights, RewardsSpec, Routing,
    ScheduleKind, SpecError, StorageSpec, TaintEffect, TokenizerKind, TokenizerSpec, Toleration,
    TolerationOperator, TrainingRun, TrainingRunSpec, TrainingSpec, ValidationSpec, API_VERSION,
    DEFAULT_AUDIT_RATE, DEFAULT_CONTRIBUTION_AUDIT_RATE, KIND,
};

/// Only the fields that have no default.
const MINIMAL: &str = "
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {name: tiny}
spec:
  model: {dim: 64, layers: 2, heads: 4, ffnDim: 176, seqLen: 32}
  data: {sources: [corpus.txt]}
  training: {steps: 10, microBatchSize: 2, learningRate: 0.001}
";

#[test]
fn defaults_are_filled_in() {
    let run = parse_manifest(MINIMAL).expect("minimal manifest");
    let m = &run.spec.model;
    assert_eq!(m.kv_heads, None);
    assert_eq!(m.kv_heads(), 4, "kvHeads defaults to heads");
    assert!(!m.tied_embeddings);
    assert_eq!(
        (m.rope_theta, m.norm_eps, m.init_std),
        (10000.0, 1e-5, 0.02)
    );

    let d = &run.spec.data;
    assert!(d.exclude.is_empty());
    assert_eq!(d.validation_fraction, 0.05);
    assert_eq!(d.tokenizer, TokenizerSpec::default());
    assert_eq!(d.tokenizer.kind, TokenizerKind::Byte);

    let t = &run.spec.training;
    assert_eq!((t.micro_batches, t.warmup_steps, t.seed), (1, 0, 0));
    assert_eq!((t.min_lr_ratio, t.weight_decay), (0.1, 0.0));
    assert_eq!(
        (t.beta1, t.beta2, t.eps, t.grad_clip),
        (0.9, 0.95, 1e-8, 1.0)
    );
    assert_eq!((t.eval_every, t.eval_batches, t.threads), (0, 8, 0));

    let p = &run.spec.pipeline;
    assert_eq!((p.stages, p.replicas), (1, 1));
    assert_eq!(p.schedule, ScheduleKind::OneFOneB);
    assert_eq!(p.codec, Codec::F32);
    assert_eq!(p.partition, PartitionKind::Balanced);

    let c = &run.spec.checkpoint;
    assert_eq!((&c.dir, c.every, c.keep), (&None, 0, 3));

    let k = &run.spec.placement;
    assert_eq!(*k, PlacementSpec::default());
    assert_eq!(k.topology_key, "topology.kubernetes.io/zone");
    assert_eq!((k.gpus_per_worker, k.min_replicas), (None, None));
    assert_eq!((k.schedule_timeout_seconds, k.max_reassignments), (600, 10));
    assert_eq!(
        run.spec.min_replicas(),
        1,
        "minReplicas defaults to replicas"
    );
    assert!(!run.spec.suspend);
    assert_eq!(run.spec.ttl_seconds_after_finished, None);
    assert_eq!(run.spec.storage, None);

    let r = &run.spec.rewards;
    assert_eq!(*r, RewardsSpec::default());
    assert_eq!((r.window_steps, r.min_participation), (0, 0.0));
    let w = &r.weights;
    assert_eq!(
        (w.forward, w.input_gradient, w.weight_gradient, w.validation),
        (1.0, 1.0, 1.0, 1.0)
    );
    assert_eq!(w.all_reduce_per_byte, 0.0);
}

#[test]
fn kubernetes_only_fields_stay_out_of_a_local_manifest() {
    // A manifest without them serializes without them, so files written by
    // local mode (checkpoint metadata) do not grow Kubernetes settings.
    let run = parse_manifest(MINIMAL).expect("minimal manifest");
    let yaml = serde_saphyr::to_string(&run).expect("serialize");
    for key in ["placement", "suspend", "ttlSecondsAfterFinished", "storage"] {
        assert!(!yaml.contains(key), "{key} in\n{yaml}");
    }
}

#[test]
fn placement_problems_name_the_field_and_the_entry() {
    let yaml = MINIMAL.replace(
        "training: {steps: 10, microBatchSize: 2, learningRate: 0.001}",
        "training: {steps: 10, microBatchSize: 2, learningRate: 0.001}
  pipeline: {replicas: 2}
  placement:
    memoryPerWorker: 1.5Gi
    cpuPerWorker: 0m
    minReplicas: 3
    topologyKey: ' '
    scheduleTimeoutSeconds: 0
    tolerations:
    - {key: gpu, operator: Exists, value: 'yes'}
    - {operator: Equal, value: x}
    - {key: spot, effect: NoSchedule, tolerationSeconds: 30}",
    );
    let SpecError::Invalid(errors) = parse_manifest(&yaml).unwrap_err() else {
        panic!("expected validation errors");
    };
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let expected = [
        "spec.placement.memoryPerWorker: \"1.5Gi\" is not a quantity of bytes",
        "spec.placement.cpuPerWorker: \"0m\" is not a CPU quantity above 0",
        "spec.placement.topologyKey: is empty",
        "spec.placement.minReplicas: 3 exceeds spec.pipeline.replicas (2)",
        "spec.placement.scheduleTimeoutSeconds: must be at least 1, got 0",
        "spec.placement.tolerations: entry [0]: operator Exists matches any value",
        "spec.placement.tolerations: entry [1]: without a key only operator Exists",
        "spec.placement.tolerations: entry [2]: tolerationSeconds applies only to effect NoExecute",
    ];
    assert_eq!(text.len(), expected.len(), "{text:#?}");
    for (got, want) in text.iter().zip(expected) {
        assert!(
            got.starts_with(want),
            "{got:?} does not start with {want:?}"
        );
    }
}

/// A manifest with every optional field set away from its default.
fn everything_set() -> TrainingRun {
    TrainingRun {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        metadata: Metadata {
            name: "full-run-7".into(),
            labels: BTreeMap::from([("team".into(), "lm".into())]),
            annotations: BTreeMap::from([("note".into(), "round trip: yes".into())]),
        },
        spec: TrainingRunSpec {
            model: ModelSpec {
                dim: 512,
                layers: 12,
                heads: 8,
                kv_heads: Some(2),
                ffn_dim: 1376,
                seq_len: 1024,
                tied_embeddings: true,
                rope_theta: 500000.0,
                norm_eps: 1e-6,
                init_std: 0.015,
            },
            data: DataSpec {
                sources: vec!["data/*.txt".into(), "/srv/corpus".into()],
                exclude: vec!["*.bin".into()],
                validation_fraction: 0.1,
                tokenizer: TokenizerSpec {
                    kind: TokenizerKind::Bpe,
                    path: None,
                    vocab_size: Some(8192),
                },
                format: Some(pipewright_spec::DataFormat::Jsonl),
                text_field: Some("content".into()),
                cache_dir: Some("/var/cache/pipewright".into()),
            },
            training: TrainingSpec {
                steps: 5000,
                micro_batch_size: 4,
                micro_batches: 8,
                learning_rate: 3e-4,
                warmup_steps: 200,
                min_lr_ratio: 0.0,
                weight_decay: 0.05,
                beta1: 0.85,
                beta2: 0.99,
                eps: 1e-10,
                grad_clip: 0.0,
                seed: 42,
                eval_every: 250,
                eval_batches: 4,
                threads: 6,
                recompute: pipewright_spec::Recompute::Selective,
                snapshot: pipewright_spec::SnapshotPlace::Disk,
            },
            pipeline: PipelineSpec {
                stages: 4,
                replicas: 3,
                schedule: ScheduleKind::ZbH1,
                codec: Codec::Lowrank,
                partition: PartitionKind::Measured,
                aggregation: pipewright_spec::Aggregation::TrimmedMean,
                // The default: a robust aggregation needs every replica to
                // compute an equal share.
                routing: Routing::Lanes,
                lowrank: Some(LowrankSpec {
                    rank: 64,
                    wire: LowrankWire::Bf16,
                }),
                max_send_megabytes_per_second: Some(125),
            },
            checkpoint: CheckpointSpec {
                dir: Some("/var/lib/pipewright/full".into()),
                every: 500,
                keep: 0,
            },
            placement: PlacementSpec {
                gpus_per_worker: Some(2),
                memory_per_worker: Some("24Gi".into()),
                cpu_per_worker: Some("3500m".into()),
                node_selector: BTreeMap::from([("pool".into(), "a100".into())]),
                tolerations: vec![
                    Toleration {
                        key: Some("dedicated".into()),
                        operator: TolerationOperator::Equal,
                        value: Some("training".into()),
                        effect: Some(TaintEffect::NoSchedule),
                        toleration_seconds: None,
                    },
                    Toleration {
                        key: None,
                        operator: TolerationOperator::Exists,
                        value: None,
                        effect: Some(TaintEffect::NoExecute),
                        toleration_seconds: Some(300),
                    },
                ],
                topology_key: "topology.kubernetes.io/rack".into(),
                min_replicas: Some(2),
                schedule_timeout_seconds: 120,
                max_reassignments: 3,
            },
            suspend: true,
            ttl_seconds_after_finished: Some(3600),
            storage: Some(StorageSpec {
                size: "50Gi".into(),
                storage_class_name: Some("fast-ssd".into()),
            }),
            rewards: RewardsSpec {
                window_steps: 1000,
                weights: RewardWeights {
                    forward: 1.0,
                    input_gradient: 0.5,
                    weight_gradient: 0.25,
                    validation: 2.0,
                    all_reduce_per_byte: 0.125,
                },
                min_participation: 0.5,
            },
            validation: ValidationSpec {
                audit_rate: 0.125,
                contribution_audit_rate: Some(0.0625),
            },
        },
    }
}

#[test]
fn serialized_manifest_parses_back_unchanged() {
    let minimal = parse_manifest(MINIMAL).expect("minimal manifest");
    for run in [everything_set(), minimal] {
        let yaml = serde_saphyr::to_string(&run).expect("serialize");
        let back = parse_manifest(&yaml).unwrap_or_else(|e| panic!("{e}\n---\n{yaml}"));
        assert_eq!(back, run, "\n{yaml}");
    }
}

#[test]
fn wire_names_are_camel_case_and_enums_lowercase() {
    let yaml = serde_saphyr::to_string(&everything_set()).expect("serialize");
    for needle in [
        "apiVersion:",
        "kvHeads: 2",
        "ffnDim:",
        "microBatchSize:",
        "schedule: zb-h1",
        "codec: lowrank",
        "kind: bpe",
        "vocabSize: 8192",
        "windowSteps: 1000",
        "inputGradient: 0.5",
        "weightGradient: 0.25",
        "allReducePerByte: 0.125",
        "minParticipation: 0.5",
        "auditRate: 0.125",
    ] {
        assert!(yaml.contains(needle), "{needle:?} not in\n{yaml}");
    }
}

#[test]
fn all_problems_are_reported_not_just_the_first() {
    let yaml = "
apiVersion: pipewright.dev/v2
kind: TrainingRun
metadata: {name: Bad_Name}
spec:
  model: {dim: 256, layers: 2, heads: 6, ffnDim: 0, seqLen: 128}
  data: {sources: [], validationFraction: 0}
  training: {steps: 10, microBatchSize: 8, learningRate: 0, warmupSteps: 20, beta1: 1}
  pipeline: {stages: 3, codec: lowrank}
  checkpoint: {every: 11}
";
    let Err(SpecError::Invalid(problems)) = parse_manifest(yaml) else {
        panic!("expected Invalid");
    };
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "apiVersion",
            "metadata.name",
            "spec.model.heads",
            "spec.model.ffnDim",
            "spec.data.sources",
            "spec.data.validationFraction",
            "spec.training.learningRate",
            "spec.training.warmupSteps",
            "spec.training.beta1",
            "spec.pipeline.stages",
            "spec.checkpoint.every",
        ]
    );
    // Each problem on its own line of the error text.
    let text = SpecError::Invalid(problems.clone()).to_string();
    assert_eq!(text.lines().count(), problems.len() + 1, "{text}");
    for p in &problems {
        assert!(text.lines().any(|l| l.trim() == p.to_string()), "{text}");
    }
}

#[test]
fn validate_accepts_a_valid_run_built_in_code() {
    assert_eq!(validate(&everything_set()), Ok(()));
}

#[test]
fn validate_refuses_non_finite_numbers_built_in_code() {
    let mut run = everything_set();
    run.spec.training.learning_rate = f64::NAN;
    run.spec.model.rope_theta = f64::INFINITY;
    run.spec.training.weight_decay = f64::NAN;
    let fields: Vec<String> = validate(&run)
        .unwrap_err()
        .into_iter()
        .map(|e| e.field)
        .collect();
    assert_eq!(
        fields,
        [
            "spec.model.ropeTheta",
            "spec.training.learningRate",
            "spec.training.weightDecay"
        ]
    );
}

#[test]
fn bpe_with_both_path_and_vocab_size_is_refused() {
    let yaml = MINIMAL.replace(
        "{sources: [corpus.txt]}",
        "{sources: [corpus.txt], tokenizer: {kind: bpe, path: tok.json, vocabSize: 4096}}",
    );
    let err = parse_manifest(&yaml).unwrap_err().to_string();
    assert!(err.contains("spec.data.tokenizer.vocabSize"), "{err}");
    assert!(err.contains("together with path"), "{err}");
}

#[test]
fn bpe_with_only_a_path_is_accepted() {
    let yaml = MINIMAL.replace(
        "{sources: [corpus.txt]}",
        "{sources: [corpus.txt], tokenizer: {kind: bpe, path: tok.json}}",
    );
    let run = parse_manifest(&yaml).expect("bpe with path");
    assert_eq!(run.spec.data.tokenizer.path.as_deref(), Some("tok.json"));
}

/// Rules are meant to be turned into CEL rules on the CRD, which address
/// fields by their wire names: every rule's field must exist in a manifest.
#[test]
fn every_rule_names_a_real_field() {
    let mut run = everything_set();
    run.spec.data.tokenizer.path = Some("tok.json".into());
    let tree = serde_json::to_value(&run).expect("to json");
    for rule in RULES {
        let mut node = &tree;
        for key in rule.field.split('.') {
            node = node
                .get(key)
                .unwrap_or_else(|| panic!("rule field {} does not exist", rule.field));
        }
        assert!(!rule.requirement.is_empty(), "{}", rule.field);
    }
}

#[test]
fn type_error_in_a_list_names_the_entry() {
    let yaml = MINIMAL.replace("[corpus.txt]", "[corpus.txt, 7]");
    let err = parse_manifest(&yaml).unwrap_err();
    assert!(matches!(err, SpecError::Parse { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("spec.data.sources[1]: invalid type"),
        "{text}"
    );
}

#[test]
fn a_document_that_is_not_a_mapping_is_refused_plainly() {
    let err = parse_manifest("- apiVersion\n- kind\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("must be a YAML mapping"), "{err}");
}

#[test]
fn several_documents_in_one_file_are_refused() {
    let two = format!("{MINIMAL}---\n{MINIMAL}");
    let err = parse_manifest(&two).unwrap_err().to_string();
    assert!(err.contains("YAML error") && err.contains("line"), "{err}");
}

#[test]
fn storage_defaults_its_size_and_checks_it() {
    let with = |storage: &str| {
        MINIMAL.replace(
            "training: {steps: 10, microBatchSize: 2, learningRate: 0.001}",
            &format!("training: {{steps: 10, microBatchSize: 2, learningRate: 0.001}}\n  storage: {storage}"),
        )
    };
    let run = parse_manifest(&with("{}")).expect("empty storage");
    assert_eq!(run.spec.storage, Some(StorageSpec::default()));
    assert_eq!(StorageSpec::default().size, "10Gi");
    for good in ["10Gi", "500Mi", "1T", "1073741824", "2k"] {
        parse_manifest(&with(&format!("{{size: '{good}'}}")))
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in ["", "10GB", "1.5Gi", "-1Gi", "0", "0Gi", "Gi", "10 Gi"] {
        let SpecError::Invalid(errors) =
            parse_manifest(&with(&format!("{{size: '{bad}'}}"))).unwrap_err()
        else {
            panic!("{bad:?}: expected validation errors");
        };
        assert!(
            errors[0].to_string().starts_with("spec.storage.size: "),
            "{bad:?}: {}",
            errors[0]
        );
    }
    let SpecError::Invalid(errors) = parse_manifest(&with("{storageClassName: ' '}")).unwrap_err()
    else {
        panic!("expected validation errors");
    };
    assert!(errors[0]
        .to_string()
        .starts_with("spec.storage.storageClassName: is empty"));
}

/// `MINIMAL` with a pipeline section.
fn with_pipeline(pipeline: &str) -> String {
    format!("{MINIMAL}  pipeline: {pipeline}\n")
}

#[test]
fn lowrank_rank_defaults_to_an_eighth_of_dim_and_wire_to_f32() {
    let run = parse_manifest(&with_pipeline("{stages: 2, codec: lowrank}")).expect("valid");
    assert_eq!(run.spec.pipeline.lowrank, None);
    assert_eq!(run.spec.pipeline.lowrank_rank(64), Some(8));
    assert_eq!(run.spec.pipeline.lowrank_wire(), LowrankWire::F32);
    let run = parse_manifest(&with_pipeline(
        "{stages: 2, codec: lowrank, lowrank: {rank: 4, wire: f16}}",
    ))
    .expect("valid");
    assert_eq!(run.spec.pipeline.lowrank_rank(64), Some(4));
    assert_eq!(run.spec.pipeline.lowrank_wire(), LowrankWire::F16);
    // Other codecs have no bottleneck.
    let run = parse_manifest(&with_pipeline("{stages: 2, codec: f16}")).expect("valid");
    assert_eq!(run.spec.pipeline.lowrank_rank(64), None);
}

#[test]
fn bad_lowrank_settings_are_refused_naming_the_field() {
    for (pipeline, field, words) in [
        (
            "{stages: 2, codec: lowrank, lowrank: {rank: 0}}",
            "spec.pipeline.lowrank.rank",
            "at least 1",
        ),
        (
            "{stages: 2, codec: lowrank, lowrank: {rank: 64}}",
            "spec.pipeline.lowrank.rank",
            "64 is not less than spec.model.dim (64)",
        ),
        (
            "{stages: 2, codec: f16, lowrank: {rank: 8}}",
            "spec.pipeline.lowrank",
            "only under codec lowrank",
        ),
        (
            "{stages: 2, maxSendMegabytesPerSecond: 0}",
            "spec.pipeline.maxSendMegabytesPerSecond",
            "at least 1",
        ),
    ] {
        let Err(SpecError::Invalid(problems)) = parse_manifest(&with_pipeline(pipeline)) else {
            panic!("{pipeline} accepted");
        };
        assert_eq!(problems.len(), 1, "{pipeline}: {problems:?}");
        assert_eq!(problems[0].field, field, "{pipeline}");
        assert!(
            problems[0].to_string().contains(words),
            "{pipeline}: {}",
            problems[0]
        );
    }
    let err = parse_manifest(&with_pipeline(
        "{stages: 2, codec: lowrank, lowrank: {rank: 8, wire: int8}}",
    ))
    .expect_err("int8 is not a bottleneck wire type");
    assert!(
        err.to_string().contains("spec.pipeline.lowrank.wire"),
        "{err}"
    );
}

/// `MINIMAL` with a rewards section.
fn with_rewards(rewards: &str) -> String {
    format!("{MINIMAL}  rewards: {rewards}\n")
}

#[test]
fn a_partial_rewards_section_keeps_the_other_defaults() {
    let run = parse_manifest(&with_rewards("{windowSteps: 100}")).expect("valid");
    let r = &run.spec.rewards;
    assert_eq!(r.window_steps, 100);
    assert_eq!(r.weights, RewardWeights::default());
    assert_eq!(r.min_participation, 0.0);

    let run = parse_manifest(&with_rewards(
        "{minParticipation: 0.25, weights: {validation: 3, allReducePerByte: 0.5}}",
    ))
    .expect("valid");
    let r = &run.spec.rewards;
    assert_eq!((r.window_steps, r.min_participation), (0, 0.25));
    assert_eq!(
        r.weights,
        RewardWeights {
            validation: 3.0,
            all_reduce_per_byte: 0.5,
            ..RewardWeights::default()
        }
    );

    // Only one kind of work earning credit is enough.
    let run = parse_manifest(&with_rewards(
        "{weights: {forward: 0, inputGradient: 0, weightGradient: 0}}",
    ))
    .expect("validation alone earns credit");
    assert_eq!(run.spec.rewards.weights.validation, 1.0);

    // An empty section is the default, and a default section is not written.
    let run = parse_manifest(&with_rewards("{}")).expect("valid");
    assert!(run.spec.rewards.is_default());
    let yaml = serde_saphyr::to_string(&run).expect("serialize");
    assert!(!yaml.contains("rewards"), "{yaml}");

    let err = parse_manifest(&with_rewards("{weights: {backward: 1}}")).unwrap_err();
    assert!(matches!(err, SpecError::Parse { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("spec.rewards.weights") && text.contains("backward"),
        "{text}"
    );
}

#[test]
fn bad_rewards_settings_are_refused_naming_the_field() {
    for (rewards, field, words) in [
        (
            "{windowSteps: 1000000001}",
            "spec.rewards.windowSteps",
            "at most 1000000000, got 1000000001",
        ),
        (
            "{weights: {forward: 0, inputGradient: 0, weightGradient: 0, validation: 0}}",
            "spec.rewards.weights",
            "no share can be computed",
        ),
        (
            "{weights: {forward: -0.5}}",
            "spec.rewards.weights.forward",
            "[0, 1000000], got -0.5",
        ),
        (
            "{weights: {inputGradient: 1000001}}",
            "spec.rewards.weights.inputGradient",
            "[0, 1000000], got 1000001",
        ),
        (
            "{weights: {weightGradient: -1}}",
            "spec.rewards.weights.weightGradient",
            "[0, 1000000], got -1",
        ),
        (
            "{weights: {validation: 1e7}}",
            "spec.rewards.weights.validation",
            "[0, 1000000], got 10000000",
        ),
        (
            "{weights: {allReducePerByte: -0.001}}",
            "spec.rewards.weights.allReducePerByte",
            "[0, 1000000], got -0.001",
        ),
        (
            "{minParticipation: -0.1}",
            "spec.rewards.minParticipation",
            "[0, 1], got -0.1",
        ),
        (
            "{minParticipation: 1.01}",
            "spec.rewards.minParticipation",
            "[0, 1], got 1.01",
        ),
    ] {
        let Err(SpecError::Invalid(problems)) = parse_manifest(&with_rewards(rewards)) else {
            panic!("{rewards} accepted");
        };
        assert_eq!(problems.len(), 1, "{rewards}: {problems:?}");
        assert_eq!(problems[0].field, field, "{rewards}");
        assert!(
            problems[0].to_string().contains(words),
            "{rewards}: {}",
            problems[0]
        );
    }
    // The bounds themselves are accepted.
    parse_manifest(&with_rewards(
        "{windowSteps: 1000000000, minParticipation: 1, \
         weights: {forward: 1000000, allReducePerByte: 1000000}}",
    ))
    .expect("bounds are inclusive");
}

#[test]
fn non_finite_reward_weights_are_refused_built_in_code() {
    let mut run = everything_set();
    run.spec.rewards.weights.forward = f64::NAN;
    run.spec.rewards.weights.all_reduce_per_byte = f64::INFINITY;
    run.spec.rewards.min_participation = f64::NAN;
    let fields: Vec<String> = validate(&run)
        .unwrap_err()
        .into_iter()
        .map(|e| e.field)
        .collect();
    assert_eq!(
        fields,
        [
            "spec.rewards.weights.forward",
            "spec.rewards.weights.allReducePerByte",
            "spec.rewards.minParticipation",
        ]
    );
}

#[test]
fn data_format_fields_parse_and_are_checked() {
    let run = |data: &str| {
        parse_manifest(&format!(
            "
apiVersion: pipewright.dev/v1alpha1
kind: TrainingRun
metadata: {{name: formats}}
spec:
  model: {{dim: 64, layers: 2, heads: 4, ffnDim: 128, seqLen: 32}}
  data: {data}
  training: {{steps: 10, microBatchSize: 2, learningRate: 0.001}}
"
        ))
    };
    let ok = run("{sources: [d.jsonl], format: jsonl, textField: body, cacheDir: /c}").unwrap();
    assert_eq!(
        ok.spec.data.format,
        Some(pipewright_spec::DataFormat::Jsonl)
    );
    assert_eq!(ok.spec.data.text_field.as_deref(), Some("body"));
    assert_eq!(ok.spec.data.cache_dir.as_deref(), Some("/c"));
    for (data, field) in [
        ("{sources: [a], textField: ' '}", "spec.data.textField"),
        (
            "{sources: [a], format: text, textField: body}",
            "spec.data.textField",
        ),
        ("{sources: [a], cacheDir: ''}", "spec.data.cacheDir"),
    ] {
        let Err(SpecError::Invalid(problems)) = run(data) else {
            panic!("{data} should be refused");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, field);
    }
    assert!(run("{sources: [a], format: csv}").is_err());
}

/// `MINIMAL` with a validation section.
fn with_validation(validation: &str) -> String {
    format!("{MINIMAL}  validation: {validation}\n")
}

#[test]
fn audit_rate_defaults_to_a_quarter_and_must_be_a_probability() {
    let run = parse_manifest(MINIMAL).expect("valid");
    assert_eq!(run.spec.validation.audit_rate, DEFAULT_AUDIT_RATE);
    assert_eq!(DEFAULT_AUDIT_RATE, 0.25);
    let run = parse_manifest(&with_validation("{}")).expect("valid");
    assert_eq!(run.spec.validation, ValidationSpec::default());
    for rate in ["0", "1", "0.5"] {
        let run = parse_manifest(&with_validation(&format!("{{auditRate: {rate}}}")))
            .unwrap_or_else(|e| panic!("auditRate {rate}: {e}"));
        assert_eq!(run.spec.validation.audit_rate, rate.parse::<f64>().unwrap());
    }
    for (rate, words) in [("-0.01", "got -0.01"), ("1.5", "got 1.5")] {
        let Err(SpecError::Invalid(problems)) =
            parse_manifest(&with_validation(&format!("{{auditRate: {rate}}}")))
        else {
            panic!("auditRate {rate} accepted");
        };
        assert_eq!(problems.len(), 1, "{rate}: {problems:?}");
        assert_eq!(problems[0].field, "spec.validation.auditRate");
        assert!(problems[0].to_string().contains(words), "{}", problems[0]);
    }
    assert!(
        parse_manifest(&with_validation("{auditRate: .nan}")).is_err(),
        "NaN accepted"
    );
    assert!(
        parse_manifest(&with_validation("{rate: 0.5}")).is_err(),
        "an unknown field accepted"
    );
}

/// `MINIMAL` under `aggregation` (three replicas) with a validation section.
fn robust_with_validation(aggregation: &str, validation: &str) -> String {
    format!(
        "{MINIMAL}  pipeline: {{replicas: 3, aggregation: {aggregation}}}\n  validation: {validation}\n"
    )
}

#[test]
fn contribution_audit_rate_defaults_by_the_aggregation_and_must_be_a_probability() {
    assert_eq!(DEFAULT_CONTRIBUTION_AUDIT_RATE, 0.05);
    // Unset: 0 under mean, 0.05 under every robust rule.
    let run = parse_manifest(MINIMAL).expect("valid");
    assert_eq!(run.spec.validation.contribution_audit_rate, None);
    let v = &run.spec.validation;
    assert_eq!(
        v.effective_contribution_audit_rate(run.spec.pipeline.aggregation),
        0.0
    );
    for rule in ["median", "trimmedMean", "centeredClip"] {
        let run = parse_manifest(&robust_with_validation(rule, "{}")).expect("valid");
        let v = &run.spec.validation;
        assert_eq!(
            v.effective_contribution_audit_rate(run.spec.pipeline.aggregation),
            DEFAULT_CONTRIBUTION_AUDIT_RATE,
            "{rule}"
        );
    }
    // Set: taken as it is under a robust rule.
    for rate in ["0", "1", "0.5"] {
        let m = robust_with_validation("median", &format!("{{contributionAuditRate: {rate}}}"));
        let run = parse_manifest(&m).unwrap_or_else(|e| panic!("rate {rate}: {e}"));
        let want = rate.parse::<f64>().unwrap();
        assert_eq!(run.spec.validation.contribution_audit_rate, Some(want));
        let v = &run.spec.validation;
        assert_eq!(
            v.effective_contribution_audit_rate(run.spec.pipeline.aggregation),
            want
        );
        // The other rate keeps its default.
        assert_eq!(run.spec.validation.audit_rate, DEFAULT_AUDIT_RATE);
    }
    for (rate, words) in [("-0.01", "got -0.01"), ("1.5", "got 1.5")] {
        let m = robust_with_validation("median", &format!("{{contributionAuditRate: {rate}}}"));
        let Err(SpecError::Invalid(problems)) = parse_manifest(&m) else {
            panic!("contributionAuditRate {rate} accepted");
        };
        assert_eq!(problems.len(), 1, "{rate}: {problems:?}");
        assert_eq!(problems[0].field, "spec.validation.contributionAuditRate");
        assert!(problems[0].to_string().contains(words), "{}", problems[0]);
    }
    assert!(
        parse_manifest(&robust_with_validation(
            "median",
            "{contributionAuditRate: .nan}"
        ))
        .is_err(),
        "NaN accepted"
    );
}

#[test]
fn a_contribution_audit_rate_under_mean_is_refused_naming_both_fields() {
    // 0 is allowed under mean (it asks for nothing).
    let run = parse_manifest(&with_validation("{contributionAuditRate: 0}")).expect("valid");
    assert_eq!(run.spec.validation.contribution_audit_rate, Some(0.0));
    for m in [
        with_validation("{contributionAuditRate: 0.1}"),
        format!(
            "{MINIMAL}  pipeline: {{replicas: 3, aggregation: mean}}\n  \
             validation: {{contributionAuditRate: 1}}\n"
        ),
    ] {
        let Err(SpecError::Invalid(problems)) = parse_manifest(&m) else {
            panic!("a contribution audit rate under mean accepted: {m}");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "spec.validation.contributionAuditRate");
        let text = problems[0].to_string();
        assert!(text.contains("spec.pipeline.aggregation"), "{text}");
        assert!(text.contains("mixes"), "{text}");
    }
}
