//! A cap on the bytes per second a socket sends, enforced by the kernel's
//! TCP pacing (`SO_MAX_PACING_RATE`): segments leave evenly spaced at no
//! more than the rate, with no extra thread and no sleeping in user space.
//!
//! A worker on a shared uplink uses it to leave room for other traffic
//! (`pipewright worker --max-send-rate`), and the link and all-reduce
//! benchmarks use it to emulate a network slower than loopback, where the
//! wire rather than the CPU bounds what a link can carry.

use std::io;
use std::net::TcpStream;

/// Caps what `stream` sends at `bytes_per_second`. Linux only: elsewhere
/// this is an error of kind [`io::ErrorKind::Unsupported`].
pub fn cap_send_rate(stream: &TcpStream, bytes_per_second: u64) -> io::Result<()> {
    if bytes_per_second == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a send rate cap must be above 0 bytes/s",
        ));
    }
    imp::set(stream, bytes_per_second)
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "x86")
))]
mod imp {
    use std::io;
    use std::net::TcpStream;
    use std::os::fd::AsRawFd;

    /// `SO_MAX_PACING_RATE` from the generic Linux socket options (the value
    /// differs only on a few architectures excluded above).
    const SO_MAX_PACING_RATE: libc::c_int = 47;

    pub fn set(stream: &TcpStream, rate: u64) -> io::Result<()> {
        // The kernel takes a 64-bit rate (or a 32-bit one, on kernels before
        // 4.19; one beyond u32 is then reported as an error).
        let value: u64 = rate;
        // SAFETY: the descriptor is open for the lifetime of `stream`, and
        // the option value points at a live u64 of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_MAX_PACING_RATE,
                (&value as *const u64).cast(),
                std::mem::size_of::<u64>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "x86")
)))]
mod imp {
    use std::io;
    use std::net::TcpStream;

    pub fn set(_: &TcpStream, _: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "capping a link's send rate needs Linux TCP pacing",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::thread;
    use std::time::Instant;

    /// Seconds to move `bytes` through a loopback socket, capped at `cap`.
    fn seconds_to_send(bytes: usize, cap: Option<u64>) -> f64 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let reader = thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).expect("read");
            sink.len()
        });
        let mut s = TcpStream::connect(addr).expect("connect");
        if let Some(rate) = cap {
            cap_send_rate(&s, rate).expect("cap");
        }
        let start = Instant::now();
        s.write_all(&vec![5u8; bytes]).expect("write");
        drop(s);
        assert_eq!(reader.join().expect("reader"), bytes);
        start.elapsed().as_secs_f64()
    }

    #[test]
    fn a_capped_socket_sends_no_faster_than_its_cap() {
        // 8 MiB at 16 MiB/s takes half a second; allow for the first
        // window leaving at once.
        let capped = seconds_to_send(8 << 20, Some(16 << 20));
        assert!(capped >= 0.35, "8 MiB at 16 MiB/s took only {capped:.3} s");
        let free = seconds_to_send(8 << 20, None);
        assert!(
            free < capped,
            "uncapped {free:.3} s vs capped {capped:.3} s"
        );
    }

    #[test]
    fn a_zero_cap_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let err = cap_send_rate(&s, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
