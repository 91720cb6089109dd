//! Bus bandwidth of the ring all-reduce with 2, 3 and 4 ranks in one process
//! on loopback, against the bound a ring can reach over loopback TCP.
//!
//! An all-reduce of S bytes over n ranks moves 2(n−1)/n · S bytes over each
//! rank's outgoing link, all n links at once, so its time is at least
//! 2(n−1)/n · S / B where B is what one TCP flow carries while n such flows
//! run together on this machine (bus bandwidth ≤ B). B is measured that way,
//! not with a lone stream: a plain-TCP ring of n bare sockets, each carrying
//! those 2(n−1)/n · S bytes, with no hashing, framing or reduction. Its time
//! is exactly the bound. Ring and plain ring run alternately in one process
//! (ring, plain, plain, ring, …), and the table gives medians over the
//! rounds; the bandwidth of a lone stream is shown for comparison.
//!
//! Two tables: first over bare loopback, where the two cores, not a wire,
//! bound every flow; then with every rank's outgoing socket (the plain
//! ring's too) capped by kernel pacing at `ALLREDUCE_BENCH_RATE_MBPS`
//! megabytes per second (default 300, a 2.5 Gbit/s NIC per rank), where the
//! wire does, as between machines. `ALLREDUCE_BENCH_RATE_MBPS=0` skips the
//! second table.
//!
//! Run with `cargo bench -p pipewright --bench allreduce`. Set
//! `ALLREDUCE_BENCH_MIB` to change the buffer size (default 64 MiB; a
//! quarter of it when paced) and `ALLREDUCE_BENCH_ROUNDS` the number of
//! rounds (default 5).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use pipewright::link::{cap_send_rate, RunId, RunKey, WorkerId};
use pipewright::sync::{loopback_listeners, on_loopback_ring, RingConfig};

// The allocator the pipewright binary runs with, so allocation costs are
// the ones a worker pays.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod support;
use support::{bare_then_paced, median, range, setting, with_cpu};

const MIB: f64 = (1 << 20) as f64;

fn main() {
    bare_then_paced("ALLREDUCE_BENCH", 64, table);
}

/// One table for 2, 3 and 4 ranks: `rounds` alternating rounds of an
/// all-reduce of `mib` MiB, every sending socket capped at `rate` bytes/s
/// when given.
fn table(mib: usize, rounds: usize, rate: Option<u64>) {
    let bytes = mib << 20;
    println!(
        "\nring all-reduce of {mib} MiB (f32), ranks in one process, {}, {rounds} rounds",
        setting(rate)
    );
    let lone = median((0..3).map(|_| plain_tcp(bytes, rate)));
    println!("one lone loopback TCP stream: {lone:.0} MiB/s");
    println!(
        "| ranks | all-reduce ms | bus bw MiB/s | bound ms = plain-TCP ring | B per flow (n flows) MiB/s | busbw / B (median, min–max) | CPU cores ring / plain |"
    );
    println!("|---|---|---|---|---|---|---|");
    for world in [2, 3, 4] {
        let factor = 2.0 * (world - 1) as f64 / world as f64;
        let per_flow = (factor * bytes as f64) as usize;
        let mut ring = Vec::new();
        let mut plain = Vec::new();
        for round in 0..rounds {
            // Alternate which goes first so neither always runs warm.
            if round % 2 == 0 {
                ring.push(with_cpu(|| ring_time(world, bytes, rate)));
                plain.push(with_cpu(|| plain_ring(world, per_flow, rate)));
            } else {
                plain.push(with_cpu(|| plain_ring(world, per_flow, rate)));
                ring.push(with_cpu(|| ring_time(world, bytes, rate)));
            }
        }
        let secs = |v: &[(Duration, f64)]| -> Vec<f64> {
            v.iter().map(|(d, _)| d.as_secs_f64()).collect()
        };
        let (ring_s, plain_s) = (secs(&ring), secs(&plain));
        // Per round: bus bandwidth over B = bound time over ring time.
        let ratios: Vec<f64> = plain_s.iter().zip(&ring_s).map(|(p, r)| p / r).collect();
        let (lo, hi) = range(ratios.iter().copied());
        let t = median(ring_s.iter().copied());
        let bound = median(plain_s.iter().copied());
        println!(
            "| {world} | {:.1} | {:.0} | {:.1} | {:.0} | {:.0}% ({:.0}–{:.0}%) | {:.2} / {:.2} |",
            t * 1e3,
            factor * bytes as f64 / MIB / t,
            bound * 1e3,
            per_flow as f64 / MIB / bound,
            100.0 * median(ratios.iter().copied()),
            100.0 * lo,
            100.0 * hi,
            median(ring.iter().map(|r| r.1)),
            median(plain.iter().map(|r| r.1)),
        );
    }
}

/// Loopback bandwidth (MiB/s) of one lone TCP stream moving `bytes` in
/// 4 MiB writes.
fn plain_tcp(bytes: usize, rate: Option<u64>) -> f64 {
    let chunk = 4 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let reader = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; chunk];
        for _ in 0..bytes / chunk {
            s.read_exact(&mut buf).expect("read");
        }
    });
    let mut s = TcpStream::connect(addr).expect("connect");
    if let Some(r) = rate {
        cap_send_rate(&s, r).expect("pace");
    }
    let data = vec![1u8; chunk];
    let start = Instant::now();
    for _ in 0..bytes / chunk {
        s.write_all(&data).expect("write");
    }
    reader.join().expect("reader");
    bytes as f64 / MIB / start.elapsed().as_secs_f64()
}

/// Time for `world` bare sockets in a ring to each move `bytes` at once,
/// in 1 MiB writes and reads.
fn plain_ring(world: usize, bytes: usize, rate: Option<u64>) -> Duration {
    let chunk = 1 << 20;
    let (listeners, addrs) = loopback_listeners(world).expect("bind");
    let start = Instant::now();
    thread::scope(|s| {
        for (rank, listener) in listeners.into_iter().enumerate() {
            let next = addrs[(rank + 1) % world];
            s.spawn(move || {
                let (mut inbound, _) = listener.accept().expect("accept");
                let mut buf = vec![0u8; chunk];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk);
                    inbound.read_exact(&mut buf[..n]).expect("read");
                    left -= n;
                }
            });
            s.spawn(move || {
                let mut out = TcpStream::connect(next).expect("connect");
                if let Some(r) = rate {
                    cap_send_rate(&out, r).expect("pace");
                }
                let data = vec![1u8; chunk];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk);
                    out.write_all(&data[..n]).expect("write");
                    left -= n;
                }
            });
        }
    });
    start.elapsed()
}

/// Median time of three all-reduces of `bytes` over `world` ranks, after a
/// first one that warms up the links. An operation ends when its slowest
/// rank does.
fn ring_time(world: usize, bytes: usize, rate: Option<u64>) -> Duration {
    let config = |rank: usize| {
        let mut c = RingConfig::new(
            rank,
            world,
            RunId([3; 16]),
            RunKey([4; 32]),
            WorkerId([rank as u8; 16]),
        );
        c.max_send_rate = rate;
        c
    };
    let times: Vec<Vec<Duration>> = on_loopback_ring(world, config, |mut member| {
        let mut buf = vec![member.rank() as f32; bytes / 4];
        (0..4)
            .map(|_| {
                let start = Instant::now();
                member.allreduce_mean(&mut buf).expect("allreduce");
                start.elapsed()
            })
            .collect()
    });
    let ops: Vec<f64> = (1..times[0].len())
        .map(|i| times.iter().map(|t| t[i].as_secs_f64()).fold(0.0, f64::max))
        .collect();
    Duration::from_secs_f64(median(ops.into_iter()))
}
