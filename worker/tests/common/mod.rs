//! What the command-line tests share: the binary under test and a small
//! generated corpus (tests commit no text).

use std::path::Path;
use std::process::Command;

/// The `pipewright` binary built for these tests.
pub fn pipewright() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pipewright"))
}

/// Writes `corpus.txt` into `dir`: 3,000 structured sentences.
pub fn write_corpus(dir: &Path) {
    let names = ["ada", "bo", "cy", "di", "ed"];
    let mut text = String::new();
    for i in 0..3000usize {
        let a = names[i % names.len()];
        let b = names[(i * 3 + 1) % names.len()];
        text.push_str(&format!("{a} waves at {b} {} times.\n", i % 7 + 1));
    }
    std::fs::write(dir.join("corpus.txt"), text).expect("write corpus");
}

/// The `losses` array of a JSON file (a run's summary or a checkpoint's
/// metadata).
#[allow(dead_code)]
pub fn losses_in(path: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

/// The per-step losses in the checkpoint of `step` under `root`.
#[allow(dead_code)]
pub fn checkpoint_losses(root: &Path, step: u64) -> Vec<f64> {
    losses_in(&root.join(format!("step-{step:08}/meta.json")))
}
