//! Mutual authentication when a link opens.
//!
//! Both sides send a hello (run id, worker id, fresh random nonce), then each
//! proves it holds the run key by sending a keyed hash over both hellos and
//! its own role. Fresh nonces on both sides mean a recorded proof is useless
//! in any other connection; the role byte means a proof cannot be reflected
//! back to the side that made it. Details in `docs/protocol.md`.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use thiserror::Error;

use super::frame::{RunId, RunKey, WorkerId};

/// First four bytes of a hello.
const HELLO_MAGIC: [u8; 4] = *b"PWHS";
/// Handshake version this build speaks.
const HELLO_VERSION: u8 = 1;
/// Length of a hello message.
pub(crate) const HELLO_LEN: usize = 72;
/// Domain separation for the proof, so a handshake proof can never be
/// mistaken for a frame tag made with the same key.
const PROOF_CONTEXT: &[u8] = b"pipewright/link/handshake/v1";

/// Which end of the TCP connection a side is; the two must differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The side that called `connect`.
    Initiator = 0,
    /// The side that called `accept`.
    Acceptor = 1,
}

/// Why a handshake failed.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// The peer is not speaking this protocol (bad magic or version).
    #[error("peer is not a pipewright link (magic {magic:02x?}, version {version})")]
    NotPipewright {
        /// Magic bytes received.
        magic: [u8; 4],
        /// Version byte received.
        version: u8,
    },
    /// Both sides claimed the same role.
    #[error("both sides claim the same role")]
    RoleConflict,
    /// The peer belongs to another run.
    #[error("peer belongs to another run")]
    WrongRun,
    /// The peer's proof does not verify: it does not hold the run key.
    #[error("peer failed to prove it holds the run key")]
    BadProof,
    /// The peer did not answer within the handshake timeout.
    #[error("handshake timed out")]
    Timeout,
    /// The connection failed.
    #[error("i/o error during handshake: {0}")]
    Io(#[source] io::Error),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        // Blocking sockets report an expired read timeout as WouldBlock on
        // Unix and TimedOut on Windows.
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandshakeError::Timeout,
            _ => HandshakeError::Io(e),
        }
    }
}

fn hello(role: Role, run_id: &RunId, me: &WorkerId, nonce: &[u8; 32]) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..4].copy_from_slice(&HELLO_MAGIC);
    h[4] = HELLO_VERSION;
    h[5] = role as u8;
    h[8..24].copy_from_slice(&run_id.0);
    h[24..40].copy_from_slice(&me.0);
    h[40..72].copy_from_slice(nonce);
    h
}

/// The proof `prover` sends: a keyed hash over the whole transcript.
pub(crate) fn proof(
    key: &RunKey,
    prover: Role,
    initiator_hello: &[u8],
    acceptor_hello: &[u8],
) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(PROOF_CONTEXT);
    h.update(&[prover as u8]);
    h.update(initiator_hello);
    h.update(acceptor_hello);
    h.finalize()
}

/// Runs the handshake on `stream` and returns the peer's worker id.
///
/// The stream's read and write timeouts are set to `timeout` for the
/// duration and cleared afterwards.
pub fn handshake(
    stream: &mut TcpStream,
    role: Role,
    key: &RunKey,
    run_id: &RunId,
    me: &WorkerId,
    timeout: Duration,
) -> Result<WorkerId, HandshakeError> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let result = exchange(stream, role, key, run_id, me);
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    result
}

fn exchange<S: Read + Write>(
    stream: &mut S,
    role: Role,
    key: &RunKey,
    run_id: &RunId,
    me: &WorkerId,
) -> Result<WorkerId, HandshakeError> {
    let nonce: [u8; 32] = rand::random();
    let mine = hello(role, run_id, me, &nonce);
    stream.write_all(&mine)?;
    stream.flush()?;
    let mut theirs = [0u8; HELLO_LEN];
    stream.read_exact(&mut theirs)?;
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&theirs[..4]);
    if magic != HELLO_MAGIC || theirs[4] != HELLO_VERSION || theirs[6..8] != [0, 0] {
        return Err(HandshakeError::NotPipewright {
            magic,
            version: theirs[4],
        });
    }
    let their_role = match theirs[5] {
        0 => Role::Initiator,
        1 => Role::Acceptor,
        _ => {
            return Err(HandshakeError::NotPipewright {
                magic,
                version: theirs[4],
            })
        }
    };
    if their_role == role {
        return Err(HandshakeError::RoleConflict);
    }
    if theirs[8..24] != run_id.0 {
        return Err(HandshakeError::WrongRun);
    }
    let mut peer = WorkerId::default();
    peer.0.copy_from_slice(&theirs[24..40]);

    let (init, acc) = match role {
        Role::Initiator => (&mine, &theirs),
        Role::Acceptor => (&theirs, &mine),
    };
    stream.write_all(proof(key, role, init, acc).as_bytes())?;
    stream.flush()?;
    let mut their_proof = [0u8; 32];
    stream.read_exact(&mut their_proof)?;
    // Constant-time comparison through blake3::Hash equality.
    if proof(key, their_role, init, acc) != their_proof {
        return Err(HandshakeError::BadProof);
    }
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    const T: Duration = Duration::from_secs(5);

    fn pair(
        key_a: RunKey,
        key_b: RunKey,
        run_b: RunId,
    ) -> (
        Result<WorkerId, HandshakeError>,
        Result<WorkerId, HandshakeError>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            handshake(
                &mut s,
                Role::Acceptor,
                &key_b,
                &run_b,
                &WorkerId([2; 16]),
                T,
            )
        });
        let mut s = TcpStream::connect(addr).expect("connect");
        let a = handshake(
            &mut s,
            Role::Initiator,
            &key_a,
            &RunId([1; 16]),
            &WorkerId([1; 16]),
            T,
        );
        drop(s);
        (a, acceptor.join().expect("acceptor thread"))
    }

    #[test]
    fn both_sides_learn_each_others_id_with_the_same_key() {
        let (a, b) = pair(RunKey([4; 32]), RunKey([4; 32]), RunId([1; 16]));
        assert_eq!(a.expect("initiator"), WorkerId([2; 16]));
        assert_eq!(b.expect("acceptor"), WorkerId([1; 16]));
    }

    #[test]
    fn a_side_without_the_key_is_refused_by_both() {
        let (a, b) = pair(RunKey([4; 32]), RunKey([5; 32]), RunId([1; 16]));
        assert!(matches!(a, Err(HandshakeError::BadProof)), "{a:?}");
        assert!(matches!(b, Err(HandshakeError::BadProof)), "{b:?}");
    }

    #[test]
    fn another_run_is_refused() {
        let (a, _) = pair(RunKey([4; 32]), RunKey([4; 32]), RunId([9; 16]));
        assert!(matches!(a, Err(HandshakeError::WrongRun)), "{a:?}");
    }

    #[test]
    fn silent_peer_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut s = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let r = handshake(
            &mut s,
            Role::Initiator,
            &RunKey([0; 32]),
            &RunId([0; 16]),
            &WorkerId([0; 16]),
            Duration::from_millis(200),
        );
        assert!(matches!(r, Err(HandshakeError::Timeout)), "{r:?}");
    }

    #[test]
    fn proofs_differ_by_role() {
        let key = RunKey([1; 32]);
        let (i, a) = ([1u8; HELLO_LEN], [2u8; HELLO_LEN]);
        assert_ne!(
            proof(&key, Role::Initiator, &i, &a),
            proof(&key, Role::Acceptor, &i, &a)
        );
    }
}
