//! Throughput of activation frames over a `Link` on loopback, against a
//! plain loopback TCP copy of the same bytes.
//!
//! Run with `cargo bench -p pipewright --bench link`. Set `LINK_BENCH_MIB`
//! to change the volume per payload size (default 256 MiB).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use pipewright::link::frame::{Frame, FrameHeader, FrameLimits};
use pipewright::link::{Codec, DType, FrameKind, Link, LinkConfig, RunId, RunKey, Shape, WorkerId};

const RUN: RunId = RunId([1; 16]);
const KEY: RunKey = RunKey([2; 32]);

fn main() {
    let mib: usize = std::env::var("LINK_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    println!("link throughput, {mib} MiB per payload size, loopback");
    println!("| payload | plain TCP MiB/s | Link MiB/s | Link / TCP |");
    println!("|---|---|---|---|");
    for payload in [64 << 10, 256 << 10, 1 << 20, 4 << 20] {
        let frames = (mib << 20) / payload;
        // Best of three: loopback numbers on a shared machine are noisy.
        let tcp = (0..3)
            .map(|_| plain_tcp(payload, frames))
            .fold(0.0, f64::max);
        let link = (0..3)
            .map(|_| over_link(payload, frames))
            .fold(0.0, f64::max);
        println!(
            "| {} KiB | {tcp:.0} | {link:.0} | {:.0}% |",
            payload >> 10,
            100.0 * link / tcp
        );
    }
}

fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

/// Writes `frames` buffers of `payload` bytes through a bare socket.
fn plain_tcp(payload: usize, frames: usize) -> f64 {
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
    let data = vec![7u8; payload];
    let start = Instant::now();
    for _ in 0..frames {
        // A fresh buffer per message, as a producer would hand over.
        let msg = data.clone();
        s.write_all(&msg).expect("write");
    }
    reader.join().expect("reader");
    mib_per_s(payload * frames, start.elapsed())
}

/// Sends `frames` activation frames of `payload` bytes over a link.
fn over_link(payload: usize, frames: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut config = LinkConfig::new(RUN, KEY, WorkerId([1; 16]));
    config.limits = FrameLimits {
        max_payload: payload as u64,
    };
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
    };
    let start = Instant::now();
    for i in 0..frames {
        let mut h = header.clone();
        h.micro_batch = i as u64;
        link.send(Frame {
            header: h,
            payload: data.clone(),
            verified_hash: None,
        })
        .expect("send");
    }
    receiver.join().expect("receiver");
    mib_per_s(payload * frames, start.elapsed())
}
