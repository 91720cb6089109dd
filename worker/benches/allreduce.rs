//! Bus bandwidth of the ring all-reduce with 2, 3 and 4 ranks in one process
//! on loopback, against the bound a ring can reach over a loopback TCP
//! bandwidth B: time ≥ 2(n−1)/n · S / B, i.e. bus bandwidth ≤ B.
//!
//! All ranks share this machine's cores, so the single-stream bound
//! overstates what n ranks can reach together; the table therefore also
//! shows a plain-TCP ring: n concurrent bare sockets, each carrying the
//! 2(n−1)/n · S bytes a perfect ring moves per rank, with no hashing,
//! framing or reduction.
//!
//! Run with `cargo bench -p pipewright --bench allreduce`. Set
//! `ALLREDUCE_BENCH_MIB` to change the buffer size (default 64 MiB).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use pipewright::link::{RunId, RunKey, WorkerId};
use pipewright::sync::{RingConfig, RingMember};

fn main() {
    let mib: usize = std::env::var("ALLREDUCE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let b = (0..3).map(|_| plain_tcp(mib << 20)).fold(0.0, f64::max);
    println!("ring all-reduce of {mib} MiB (f32), ranks in one process, loopback");
    println!("plain loopback TCP bandwidth B = {b:.0} MiB/s");
    println!("| ranks | time ms | bus bw MiB/s | bound ms (2(n-1)/n·S/B) | busbw / B | plain-TCP ring ms | time vs plain ring |");
    println!("|---|---|---|---|---|---|---|");
    for world in [2, 3, 4] {
        let t = ring_time(world, mib << 20).as_secs_f64();
        let factor = 2.0 * (world - 1) as f64 / world as f64;
        let busbw = factor * mib as f64 / t;
        let bound = factor * mib as f64 / b;
        let per_rank = (factor * (mib << 20) as f64) as usize;
        let plain = (0..3)
            .map(|_| plain_ring(world, per_rank).as_secs_f64())
            .fold(f64::INFINITY, f64::min);
        println!(
            "| {world} | {:.1} | {busbw:.0} | {:.1} | {:.0}% | {:.1} | {:.0}% |",
            t * 1e3,
            bound * 1e3,
            100.0 * busbw / b,
            plain * 1e3,
            100.0 * plain / t
        );
    }
}

/// Loopback bandwidth of one TCP stream moving `bytes` in 4 MiB writes.
fn plain_tcp(bytes: usize) -> f64 {
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
    let data = vec![1u8; chunk];
    let start = Instant::now();
    for _ in 0..bytes / chunk {
        s.write_all(&data).expect("write");
    }
    reader.join().expect("reader");
    bytes as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

/// Time for `world` bare sockets in a ring to each move `bytes` at once.
fn plain_ring(world: usize, bytes: usize) -> Duration {
    let chunk = 1 << 20;
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
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

/// Best wall time of an all-reduce of `bytes` over `world` ranks.
fn ring_time(world: usize, bytes: usize) -> Duration {
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let times: Vec<Vec<Duration>> = thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let addrs = &addrs;
                s.spawn(move || {
                    let config = RingConfig::new(
                        rank,
                        world,
                        RunId([3; 16]),
                        RunKey([4; 32]),
                        WorkerId([rank as u8; 16]),
                    );
                    let mut member = RingMember::connect(
                        config,
                        listener,
                        &addrs[(rank + 1) % world].to_string(),
                    )
                    .expect("connect");
                    let mut buf = vec![rank as f32; bytes / 4];
                    (0..4)
                        .map(|_| {
                            let start = Instant::now();
                            member.allreduce_mean(&mut buf).expect("allreduce");
                            start.elapsed()
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    });
    // An operation ends when its slowest rank does; take the best operation.
    (0..times[0].len())
        .map(|i| times.iter().map(|t| t[i]).max().unwrap_or_default())
        .min()
        .unwrap_or_default()
}
