//! Throughput of activation frames over a `Link` on loopback, against a
//! plain loopback TCP copy of the same bytes.
//!
//! Both are measured side by side in one run, alternating (TCP, link, link,
//! TCP, …) so that load from other processes hits both alike; the table
//! gives medians over the rounds and the median of the per-round ratios,
//! and the CPU the process used (in cores) for each.
//!
//! Two tables: first over bare loopback, where the two cores, not a wire,
//! set the pace; then with both sockets capped by kernel pacing at
//! `LINK_BENCH_RATE_MBPS` megabytes per second (default 300, a 2.5 Gbit/s
//! NIC), where the wire does, as between machines. `LINK_BENCH_RATE_MBPS=0`
//! skips the second table.
//!
//! Run with `cargo bench -p pipewright --bench link`. Set `LINK_BENCH_MIB`
//! to change the volume per payload size and run (default 256 MiB; a
//! quarter of it when paced) and `LINK_BENCH_ROUNDS` the number of rounds
//! (default 5). For profiling one side alone, `LINK_BENCH_ONLY=link` (or
//! `tcp`) skips the other; the ratio column is then meaningless.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use pipewright::link::frame::{Frame, FrameHeader, FrameLimits};
use pipewright::link::{
    cap_send_rate, Codec, DType, FrameKind, Link, LinkConfig, RunId, RunKey, Shape, WorkerId,
};

// The allocator the pipewright binary runs with, so allocation costs are
// the ones a worker pays.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod support;
use support::{bare_then_paced, median, setting, with_cpu};

const RUN: RunId = RunId([1; 16]);
const KEY: RunKey = RunKey([2; 32]);

fn main() {
    bare_then_paced("LINK_BENCH", 256, table);
}

/// One table: every payload size, `rounds` alternating rounds of `mib` MiB,
/// both sides capped at `rate` bytes/s when given.
fn table(mib: usize, rounds: usize, rate: Option<u64>) {
    println!(
        "\nlink throughput, {mib} MiB per payload size and run, {rounds} rounds, {}",
        setting(rate)
    );
    println!(
        "| payload | plain TCP MiB/s | Link MiB/s | Link / TCP (median, min–max) | CPU cores TCP / Link |"
    );
    println!("|---|---|---|---|---|");
    for payload in [64 << 10, 256 << 10, 1 << 20, 4 << 20] {
        let frames = ((mib << 20) / payload).max(1);
        let only = std::env::var("LINK_BENCH_ONLY").unwrap_or_default();
        let tcp_run = || match only.as_str() {
            "link" => (f64::NAN, f64::NAN),
            _ => measure(payload * frames, || plain_tcp(payload, frames, rate)),
        };
        let link_run = || match only.as_str() {
            "tcp" => (f64::NAN, f64::NAN),
            _ => measure(payload * frames, || over_link(payload, frames, rate)),
        };
        let mut tcp = Vec::new();
        let mut link = Vec::new();
        for round in 0..rounds {
            // Alternate which goes first so neither always runs warm.
            if round % 2 == 0 {
                tcp.push(tcp_run());
                link.push(link_run());
            } else {
                link.push(link_run());
                tcp.push(tcp_run());
            }
        }
        let mut ratios: Vec<f64> = tcp.iter().zip(&link).map(|(t, l)| l.0 / t.0).collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "| {} KiB | {:.0} | {:.0} | {:.0}% ({:.0}–{:.0}%) | {:.2} / {:.2} |",
            payload >> 10,
            median(tcp.iter().map(|r| r.0)),
            median(link.iter().map(|r| r.0)),
            100.0 * median(ratios.iter().copied()),
            100.0 * ratios[0],
            100.0 * ratios[ratios.len() - 1],
            median(tcp.iter().map(|r| r.1)),
            median(link.iter().map(|r| r.1)),
        );
    }
}

/// Runs `f`, which moves `bytes` and returns how long moving them took
/// (connecting excluded), and returns (MiB/s, CPU cores the process used).
fn measure(bytes: usize, f: impl FnOnce() -> Duration) -> (f64, f64) {
    let (moving, cores) = with_cpu(f);
    (
        bytes as f64 / (1 << 20) as f64 / moving.as_secs_f64(),
        cores,
    )
}

/// Writes `frames` buffers of `payload` bytes through a bare socket.
fn plain_tcp(payload: usize, frames: usize, rate: Option<u64>) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let reader = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; payload];
        for _ in 0..frames {
            s.read_exact(&mut buf).expect("read");
        }
    });
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    if let Some(r) = rate {
        cap_send_rate(&s, r).expect("pace");
    }
    let data = vec![7u8; payload];
    let start = Instant::now();
    for _ in 0..frames {
        // A fresh buffer per message, as a producer would hand over.
        let msg = data.clone();
        s.write_all(&msg).expect("write");
    }
    reader.join().expect("reader");
    start.elapsed()
}

/// Sends `frames` activation frames of `payload` bytes over a link.
fn over_link(payload: usize, frames: usize, rate: Option<u64>) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut config = LinkConfig::new(RUN, KEY, WorkerId([1; 16]));
    config.limits = FrameLimits {
        max_payload: payload as u64,
    };
    config.max_send_rate = rate;
    let accept_config = LinkConfig {
        worker_id: WorkerId([2; 16]),
        ..config.clone()
    };
    let receiver = thread::spawn(move || {
        let link = Link::accept(&listener, &accept_config).expect("accept");
        for _ in 0..frames {
            link.recv().expect("recv");
        }
    });
    let link = Link::connect(addr, &config).expect("connect");
    let data = vec![7u8; payload];
    let header = FrameHeader {
        run_id: RUN,
        step: 0,
        micro_batch: 0,
        stage: 0,
        replica: 0,
        kind: FrameKind::Activation,
        dtype: DType::F32,
        codec: Codec::F32,
        shape: Shape::matrix(1, (payload / 4) as u32),
        sender: WorkerId([1; 16]),
        input_hash: [0; 32],
        signature: [0; pipewright::link::frame::SIGNATURE_LEN],
    };
    let start = Instant::now();
    for i in 0..frames {
        let mut h = header.clone();
        h.micro_batch = i as u64;
        link.send(Frame::new(h, data.clone())).expect("send");
    }
    receiver.join().expect("receiver");
    start.elapsed()
}
