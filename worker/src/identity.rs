//! A worker's long-lived identity: an Ed25519 key pair kept in a file.
//!
//! The public key names the worker in the coordinator's ledger, `/status`
//! and metrics; a short fingerprint of it is what people read. What the
//! ledger credits a worker for carries its signature, so holding the run's
//! join token or link key is not enough to claim another worker's work.
//!
//! Every signed message starts with a domain string and a zero byte, so a
//! signature made for one purpose (registering, reporting a step) can never
//! be presented as another.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// First line of an identity file.
const HEADER: &str = "pipewright identity v1";

/// Domain of the registration proof: the coordinator's challenge, signed.
pub const REGISTER_DOMAIN: &str = "pipewright register v1";
/// Domain of a step's commitment, sent with the step report.
pub const STEP_DOMAIN: &str = "pipewright step v1";
/// Domain of a validator's verdict on an audit.
pub const AUDIT_DOMAIN: &str = "pipewright audit v1";
/// Domain of a pipeline frame's author signature (`link::sign`).
pub const FRAME_DOMAIN: &str = "pipewright frame v1";
/// Domain of a validator's verdict on a recheck of a broken step.
pub const RECHECK_DOMAIN: &str = "pipewright recheck v1";
/// Domain of a gradient ring frame's author signature (`link::sign`).
pub const RING_DOMAIN: &str = "pipewright ring v1";

/// Why an identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the file failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not an identity file.
    #[error(
        "{0} is not a pipewright identity file (expected '{HEADER}' and a 64-hex-digit secret)"
    )]
    Malformed(PathBuf),
    /// Others may read the secret key.
    #[error(
        "identity file {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// No place for the default identity file.
    #[error("no configuration directory for the default identity file; pass --identity PATH")]
    NoConfigDir,
}

/// A worker's key pair.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.fingerprint())
    }
}

/// Where `pipewright worker` and `join` keep the identity by default:
/// `$XDG_CONFIG_HOME/pipewright/identity` (`~/.config/...`).
pub fn default_path() -> Result<PathBuf, IdentityError> {
    dirs::config_dir()
        .map(|d| d.join("pipewright").join("identity"))
        .ok_or(IdentityError::NoConfigDir)
}

/// The short form of a public key people read: the first 8 bytes of its
/// BLAKE3 hash, in hex.
pub fn fingerprint(public_key: &[u8; 32]) -> String {
    hex::encode(&blake3::hash(public_key).as_bytes()[..8])
}

/// The fingerprint of a public key given in hex (as the ledger stores it);
/// the input itself when it is not 64 hex digits.
pub fn fingerprint_hex(public_key: &str) -> String {
    let mut k = [0u8; 32];
    match hex::decode_to_slice(public_key, &mut k) {
        Ok(()) => fingerprint(&k),
        Err(_) => public_key.to_string(),
    }
}

/// `domain`, a zero byte, then `message`: what is actually signed.
fn framed(domain: &str, message: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + 1 + message.len());
    m.extend_from_slice(domain.as_bytes());
    m.push(0);
    m.extend_from_slice(message);
    m
}

/// Whether `signature` (hex) is `public_key`'s (hex) over `message` in
/// `domain`. Malformed keys or signatures are simply not valid.
pub fn verify(public_key: &str, domain: &str, message: &[u8], signature: &str) -> bool {
    let (mut k, mut s) = ([0u8; 32], [0u8; 64]);
    if hex::decode_to_slice(public_key, &mut k).is_err()
        || hex::decode_to_slice(signature, &mut s).is_err()
    {
        return false;
    }
    let Ok(key) = VerifyingKey::from_bytes(&k) else {
        return false;
    };
    key.verify_strict(&framed(domain, message), &Signature::from_bytes(&s))
        .is_ok()
}

impl Identity {
    /// A new identity from the operating system's randomness.
    pub fn generate() -> Self {
        Self::from_secret(rand::random())
    }

    /// The identity with this 32-byte secret.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Identity {
            key: SigningKey::from_bytes(&secret),
        }
    }

    /// Loads the identity in `path`, creating it (mode 0600, its directory
    /// too) when the file does not exist. Refuses a file others can read.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                check_private(path)?;
                parse(&text).ok_or_else(|| IdentityError::Malformed(path.to_path_buf()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let id = Identity::generate();
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                match options.open(path) {
                    Ok(mut f) => {
                        let text = format!("{HEADER}\n{}\n", hex::encode(id.key.to_bytes()));
                        f.write_all(text.as_bytes()).map_err(io)?;
                        f.sync_all().map_err(io)?;
                        Ok(id)
                    }
                    // Another process created it first: use that one.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_create(path)
                    }
                    Err(e) => Err(io(e)),
                }
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The public key in hex, as the coordinator and the ledger name it.
    pub fn public_hex(&self) -> String {
        hex::encode(self.public_key())
    }

    /// The short fingerprint of the public key.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public_key())
    }

    /// Signs `message` in `domain`; the signature in hex.
    pub fn sign(&self, domain: &str, message: &[u8]) -> String {
        hex::encode(self.sign_bytes(domain, message))
    }

    /// Signs `message` in `domain`; the signature's 64 bytes.
    pub fn sign_bytes(&self, domain: &str, message: &[u8]) -> [u8; 64] {
        self.key.sign(&framed(domain, message)).to_bytes()
    }
}

/// A public key given in hex, when it is 64 hex digits naming a valid
/// Ed25519 point.
pub fn public_key_from_hex(public_key: &str) -> Option<VerifyingKey> {
    let mut k = [0u8; 32];
    hex::decode_to_slice(public_key, &mut k).ok()?;
    VerifyingKey::from_bytes(&k).ok()
}

/// Whether `signature` is `key`'s over `message` in `domain` (strict
/// verification, as [`verify`]).
pub fn verify_bytes(
    key: &VerifyingKey,
    domain: &str,
    message: &[u8],
    signature: &[u8; 64],
) -> bool {
    key.verify_strict(&framed(domain, message), &Signature::from_bytes(signature))
        .is_ok()
}

fn parse(text: &str) -> Option<Identity> {
    let mut lines = text.lines().map(str::trim);
    if lines.next()? != HEADER {
        return None;
    }
    let mut secret = [0u8; 32];
    hex::decode_to_slice(lines.next()?, &mut secret).ok()?;
    Some(Identity::from_secret(secret))
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(IdentityError::Exposed {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_: &Path) -> Result<(), IdentityError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/identity");
        let a = Identity::load_or_create(&path).unwrap();
        let b = Identity::load_or_create(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(a.fingerprint().len(), 16);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity");
        Identity::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Identity::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn a_malformed_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity");
        std::fs::write(&path, "not a key\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let e = Identity::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("not a pipewright identity file"), "{e}");
    }

    #[test]
    fn signatures_bind_key_domain_and_message() {
        let a = Identity::from_secret([1; 32]);
        let b = Identity::from_secret([2; 32]);
        let sig = a.sign(STEP_DOMAIN, b"step 3");
        assert!(verify(&a.public_hex(), STEP_DOMAIN, b"step 3", &sig));
        assert!(!verify(&b.public_hex(), STEP_DOMAIN, b"step 3", &sig));
        assert!(!verify(&a.public_hex(), REGISTER_DOMAIN, b"step 3", &sig));
        assert!(!verify(&a.public_hex(), STEP_DOMAIN, b"step 4", &sig));
        assert!(!verify(&a.public_hex(), STEP_DOMAIN, b"step 3", "zz"));
        assert!(!verify("nonsense", STEP_DOMAIN, b"step 3", &sig));
    }
}
