//! Every manifest under `tests/manifests/` is loaded from disk: the good one
//! must load, and each malformed one must be refused with an error that names
//! the offending field and says what is wrong with it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use pipewright_spec::{load_manifest, Codec, ScheduleKind, SpecError, TokenizerKind};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/manifests")
        .join(name)
}

/// How a malformed fixture must be refused.
enum Refusal {
    /// Refused while parsing (syntax, type, unknown or missing field).
    Parse(&'static [&'static str]),
    /// Refused by validation with exactly one problem.
    Invalid(&'static [&'static str]),
}

use Refusal::{Invalid, Parse};

/// Malformed fixture -> how it is refused and the substrings the error text
/// must contain (the field path first, then a word of the problem).
const BAD: &[(&str, Refusal)] = &[
    (
        "bad-api-version.yaml",
        Invalid(&["apiVersion", "pipewright.dev/v1alpha1"]),
    ),
    (
        "bad-kind.yaml",
        Invalid(&["kind", "must be TrainingRun", "TrainingJob"]),
    ),
    (
        "bad-name.yaml",
        Invalid(&["metadata.name", "DNS-1123", "Quick_Start"]),
    ),
    (
        "heads-not-dividing-dim.yaml",
        Invalid(&["spec.model.heads: 6 does not divide spec.model.dim (256)"]),
    ),
    (
        "odd-head-dim.yaml",
        Invalid(&["spec.model.heads", "33", "odd", "rotary"]),
    ),
    (
        "kv-heads-not-dividing.yaml",
        Invalid(&["spec.model.kvHeads: 3 does not divide spec.model.heads (8)"]),
    ),
    (
        "dim-absurd.yaml",
        Invalid(&["spec.model.dim: must be at most 65536, got 1073741824"]),
    ),
    (
        "layers-absurd.yaml",
        Invalid(&["spec.model.layers: must be at most 1024, got 100000000"]),
    ),
    (
        "ffn-dim-absurd.yaml",
        Invalid(&["spec.model.ffnDim: must be at most 262144, got 1000000000"]),
    ),
    (
        "seq-len-absurd.yaml",
        Invalid(&["spec.model.seqLen: must be at most 131072, got 10000000"]),
    ),
    (
        "micro-batch-size-absurd.yaml",
        Invalid(&["spec.training.microBatchSize: must be at most 4096, got 1000000"]),
    ),
    (
        "replicas-absurd.yaml",
        Invalid(&["spec.pipeline.replicas: must be at most 4096, got 100000"]),
    ),
    (
        "heads-as-word.yaml",
        Parse(&["spec.model.heads", "invalid type", "\"eight\"", "usize"]),
    ),
    (
        "unknown-model-field.yaml",
        Parse(&["spec.model", "unknown field", "hiddenSize"]),
    ),
    (
        "missing-steps.yaml",
        Parse(&["spec.training.steps", "missing field"]),
    ),
    (
        "zero-steps.yaml",
        Invalid(&["spec.training.steps", "at least 1"]),
    ),
    ("negative-steps.yaml", Parse(&["spec.training.steps", "-5"])),
    (
        "warmup-past-steps.yaml",
        Invalid(&["spec.training.warmupSteps: 400 exceeds spec.training.steps (300)"]),
    ),
    (
        "negative-learning-rate.yaml",
        Invalid(&["spec.training.learningRate", "> 0", "-0.002"]),
    ),
    (
        "nan-learning-rate.yaml",
        Parse(&["spec.training.learningRate", "nan", "f64"]),
    ),
    (
        "beta2-one.yaml",
        Invalid(&["spec.training.beta2", "[0, 1)"]),
    ),
    (
        "min-lr-ratio-above-one.yaml",
        Invalid(&["spec.training.minLrRatio", "[0, 1]", "1.5"]),
    ),
    (
        "zero-eval-batches.yaml",
        Invalid(&["spec.training.evalBatches", "at least 1"]),
    ),
    ("no-sources.yaml", Invalid(&["spec.data.sources", "empty"])),
    (
        "blank-source.yaml",
        Invalid(&["spec.data.sources", "[1]", "empty"]),
    ),
    (
        "validation-fraction-too-large.yaml",
        Invalid(&["spec.data.validationFraction", "(0, 0.5]", "0.8"]),
    ),
    (
        "bpe-without-size-or-path.yaml",
        Invalid(&["spec.data.tokenizer", "path", "vocabSize"]),
    ),
    (
        "bpe-vocab-too-small.yaml",
        Invalid(&["spec.data.tokenizer.vocabSize", "257", "100"]),
    ),
    (
        "byte-with-vocab-size.yaml",
        Invalid(&["spec.data.tokenizer.vocabSize", "byte tokenizer"]),
    ),
    (
        "more-stages-than-layers.yaml",
        Invalid(&["spec.pipeline.stages", "exceeds spec.model.layers (4)"]),
    ),
    (
        "lowrank-single-stage.yaml",
        Invalid(&["spec.pipeline.codec", "lowrank", "stages >= 2"]),
    ),
    (
        "trimmed-mean-two-replicas.yaml",
        Invalid(&[
            "spec.pipeline.aggregation",
            "trimmedMean needs at least 3 replicas",
            "got spec.pipeline.replicas = 2",
        ]),
    ),
    (
        "lowrank-rank-too-wide.yaml",
        Invalid(&[
            "spec.pipeline.lowrank.rank",
            "256 is not less than spec.model.dim (256)",
        ]),
    ),
    (
        "unknown-schedule.yaml",
        Parse(&["spec.pipeline.schedule", "unknown variant", "pipedream"]),
    ),
    (
        "checkpoint-after-end.yaml",
        Invalid(&[
            "spec.checkpoint.every",
            "500",
            "exceeds spec.training.steps",
        ]),
    ),
    (
        "zero-norm-eps.yaml",
        Invalid(&["spec.model.normEps", "> 0"]),
    ),
    (
        "min-replicas-above-replicas.yaml",
        Invalid(&["spec.placement.minReplicas: 2 exceeds spec.pipeline.replicas (1)"]),
    ),
    (
        "reward-window-absurd.yaml",
        Invalid(&["spec.rewards.windowSteps: must be at most 1000000000, got 2000000000"]),
    ),
    (
        "reward-weights-all-zero.yaml",
        Invalid(&[
            "spec.rewards.weights: ",
            "all 0",
            "no share can be computed",
        ]),
    ),
    (
        "reward-weight-negative.yaml",
        Invalid(&["spec.rewards.weights.forward: must be a finite number in [0, 1000000], got -1"]),
    ),
    (
        "reward-weight-too-large.yaml",
        Invalid(&[
            "spec.rewards.weights.allReducePerByte: must be a finite number in [0, 1000000], \
             got 2000000",
        ]),
    ),
    (
        "reward-weight-infinite.yaml",
        Parse(&[
            "spec.rewards.weights.validation",
            "invalid type",
            ".inf",
            "f64",
        ]),
    ),
    (
        "min-participation-above-one.yaml",
        Invalid(&["spec.rewards.minParticipation: must be a finite number in [0, 1], got 1.5"]),
    ),
    ("syntax-error.yaml", Parse(&["YAML", "line 11", "column"])),
    (
        "duplicate-key.yaml",
        Parse(&["YAML", "line 14", "checkpoint"]),
    ),
    ("empty.yaml", Parse(&["empty"])),
    (
        "memory-per-worker-millibytes.yaml",
        Invalid(&[
            "spec.placement.memoryPerWorker",
            "\"512m\" is not a quantity of bytes",
        ]),
    ),
    (
        "cpu-per-worker-word.yaml",
        Invalid(&[
            "spec.placement.cpuPerWorker",
            "\"two\" is not a CPU quantity",
        ]),
    ),
];

#[test]
fn good_fixture_loads_with_its_values() {
    let run = load_manifest(&fixture("good.yaml")).expect("good.yaml must load");
    assert_eq!(run.metadata.name, "quickstart");
    let m = &run.spec.model;
    assert_eq!((m.dim, m.layers, m.heads, m.kv_heads()), (256, 4, 8, 4));
    assert_eq!((m.ffn_dim, m.seq_len, m.head_dim()), (704, 128, 32));
    assert_eq!(run.spec.data.sources, ["/usr/share/games/fortunes"]);
    assert_eq!(run.spec.data.exclude, ["*.dat", "*.u8"]);
    assert_eq!(run.spec.data.tokenizer.kind, TokenizerKind::Byte);
    let t = &run.spec.training;
    assert_eq!((t.steps, t.micro_batch_size, t.micro_batches), (300, 8, 2));
    assert_eq!((t.learning_rate, t.weight_decay), (0.002, 0.1));
    assert_eq!((t.warmup_steps, t.seed), (30, 1234));
    assert_eq!(
        (run.spec.pipeline.stages, run.spec.pipeline.replicas),
        (2, 1)
    );
    assert_eq!(run.spec.pipeline.schedule, ScheduleKind::OneFOneB);
    assert_eq!(run.spec.pipeline.codec, Codec::F32);
    assert_eq!(run.spec.checkpoint.every, 100);
}

#[test]
fn each_bad_fixture_is_refused_naming_the_field_and_the_problem() {
    let mut failures = Vec::new();
    for (file, refusal) in BAD {
        let result = load_manifest(&fixture(file));
        let (err, expected) = match (result, refusal) {
            (Ok(_), _) => {
                failures.push(format!("{file}: accepted"));
                continue;
            }
            (Err(err @ SpecError::Parse { .. }), Parse(expected)) => (err, expected),
            (Err(SpecError::Invalid(problems)), Invalid(expected)) => {
                // One problem per fixture: each file isolates one rule.
                if problems.len() != 1 {
                    failures.push(format!("{file}: {} problems: {problems:?}", problems.len()));
                }
                (SpecError::Invalid(problems), expected)
            }
            (Err(err), _) => {
                failures.push(format!("{file}: refused by the wrong stage: {err}"));
                continue;
            }
        };
        let text = err.to_string();
        for needle in *expected {
            if !text.contains(needle) {
                failures.push(format!("{file}: {needle:?} missing from error:\n{text}"));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Absurd sizes are refused by arithmetic on the manifest alone, before
/// anything is sized from them: all of them together well under a second.
#[test]
fn absurd_sizes_are_refused_at_once() {
    let start = std::time::Instant::now();
    for (file, _) in BAD.iter().filter(|(f, _)| f.contains("absurd")) {
        assert!(load_manifest(&fixture(file)).is_err(), "{file}");
    }
    let took = start.elapsed();
    assert!(took.as_secs_f64() < 1.0, "took {took:?}");
}

#[test]
fn every_fixture_file_has_an_expectation() {
    let dir = fixture("");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("fixture directory")
        .map(|entry| entry.expect("directory entry").file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    let mut known: BTreeSet<String> = BAD.iter().map(|(f, _)| (*f).to_owned()).collect();
    known.insert("good.yaml".to_owned());
    assert_eq!(on_disk, known);
    assert!(BAD.len() >= 12);
}

#[test]
fn missing_file_error_names_the_file() {
    let path = fixture("no-such-manifest.yaml");
    let err = load_manifest(&path).unwrap_err();
    assert!(matches!(err, SpecError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-manifest.yaml"), "{err}");
}
