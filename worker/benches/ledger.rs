//! What the contribution ledger adds at the step barrier: the time to book
//! one step's entries (one per shard, each with its signed commitment) in
//! the run directory's SQLite file with the settings the coordinator uses
//! (write-ahead log, `synchronous = FULL`, so every booking reaches the
//! disk before the barrier answers), and how large the ledger grows.
//!
//! The barrier waits for this booking before it answers `proceed`, so its
//! p99 is what a step can lose to the ledger. Two references run
//! alternately with it, step by step: the same booking into an in-memory
//! database (SQL and row encoding without the disk), and the floor of any
//! durable commit on that disk: appending as many bytes as a step's
//! entries take to a plain file and `fdatasync`ing it.
//!
//! Run with `cargo bench -p pipewright --bench ledger`. Settings:
//! `LEDGER_BENCH_SHARDS` (default 64: 8 stages × 8 replicas),
//! `LEDGER_BENCH_STEPS` (default 1,000), `LEDGER_BENCH_STEP_MS` (time
//! between two steps' bookings, default 25: a step of a 64-shard run takes
//! far longer, and the ledger's background checkpoint runs in that gap, as
//! it does in a run; 0 books back to back), `LEDGER_BENCH_DIR` (where the
//! file goes; default the system's temporary directory: put it on the
//! disk a run directory would use).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use pipewright::coord::api::{step_message, StepClaim};
use pipewright::identity::{Identity, STEP_DOMAIN};
use pipewright::ledger::{Entry, Ledger, StepBooking};

mod support;
use support::{env_or, loadavg};

const STAGES: usize = 8;
const MICRO_BATCHES: u64 = 8;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One step's booking, signed as the workers sign it.
fn booking(step: u64, ids: &[Identity], run_id: &str) -> StepBooking {
    let shards = ids.len();
    let replicas = shards.div_ceil(STAGES).max(1);
    let entries = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (stage, replica) = (i / replicas, i % replicas);
            let mbs: Vec<u64> = (0..MICRO_BATCHES)
                .map(|k| replica as u64 * MICRO_BATCHES + k)
                .collect();
            let root =
                *blake3::hash(&[step.to_le_bytes(), (i as u64).to_le_bytes()].concat()).as_bytes();
            let loss = (stage + 1 == STAGES).then_some(2.5f32);
            let claim = StepClaim {
                run_id,
                worker: i as u64 + 1,
                epoch: 1,
                completed: step,
                shard: (stage, replica),
                loss,
                micro_batches: &mbs,
                root,
            };
            Entry {
                step,
                stage,
                replica,
                identity: id.public_hex(),
                worker: i as u64 + 1,
                epoch: 1,
                micro_batches: mbs.clone(),
                layers: 4 * stage..4 * (stage + 1),
                tokens: MICRO_BATCHES * 4 * 2048,
                forward_flops: 1.1e13,
                input_grad_flops: 1.1e13,
                weight_grad_flops: 1.1e13,
                allreduce_bytes: 350_000_000,
                validation_flops: 0.0,
                loss,
                commitment: root,
                signature: id.sign(STEP_DOMAIN, &step_message(&claim)),
                reported_seconds: 1.25,
                audits_passed: 0,
                audits_failed: 0,
            }
        })
        .collect();
    StepBooking {
        step,
        epoch: 1,
        loss: Some(2.5),
        entries,
    }
}

fn main() {
    let shards = env_or("LEDGER_BENCH_SHARDS", 64);
    let steps = env_or("LEDGER_BENCH_STEPS", 1000) as u64;
    let gap = std::time::Duration::from_millis(env_or("LEDGER_BENCH_STEP_MS", 25) as u64);
    let dir = std::env::var_os("LEDGER_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(&dir).expect("a directory for the ledger");
    let path = tmp.path().join("ledger.sqlite");
    let run_id = "00112233445566778899aabbccddeeff".to_string();
    let meta = [("run", "bench".to_string()), ("run_id", run_id.clone())];
    let ids: Vec<Identity> = (0..shards).map(|_| Identity::generate()).collect();
    println!(
        "ledger booking: {shards} shards, {steps} steps {} ms apart, file in {} (load {})",
        gap.as_millis(),
        dir.display(),
        loadavg()
    );
    // Signing is the workers' cost, not the barrier's: sign ahead.
    let bookings: Vec<StepBooking> = (1..=steps).map(|s| booking(s, &ids, &run_id)).collect();

    let mut disk = Ledger::open(&path, &meta).expect("open the ledger");
    let mut memory = Ledger::in_memory(&meta).expect("an in-memory ledger");
    let mut plain = std::fs::File::create(tmp.path().join("plain")).expect("a plain file");
    // About what one step's entries take in the ledger.
    let chunk = vec![0x5au8; 440 * shards];
    let (mut on_disk, mut in_memory, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for b in &bookings {
        std::thread::sleep(gap);
        let t = Instant::now();
        assert!(disk.book(b).expect("book"));
        on_disk.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        assert!(memory.book(b).expect("book"));
        in_memory.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        plain.write_all(&chunk).expect("append");
        plain.sync_data().expect("fdatasync");
        floor.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // Booking a step again (a replayed barrier) is refused, and cheap.
    let t = Instant::now();
    assert!(!disk.book(&bookings[0]).expect("book again"));
    let again = t.elapsed().as_secs_f64() * 1e3;
    drop(disk);
    let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());

    println!("| booking one step | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|");
    for (name, v) in [
        ("file (WAL, synchronous=FULL)", &mut on_disk),
        ("in memory (reference)", &mut in_memory),
        ("append + fdatasync, same bytes (disk floor)", &mut floor),
    ] {
        v.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.3} | {:.3} | {:.3} |",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[v.len() - 1]
        );
    }
    println!("booking a step already booked: {again:.3} ms (refused)");
    println!(
        "ledger size: {:.1} MiB for {steps} steps × {shards} shards = {:.2} MiB per 1,000 steps ({:.0} bytes per entry)",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / (1 << 20) as f64 * 1000.0 / steps as f64,
        bytes as f64 / (steps as f64 * shards as f64)
    );
}
