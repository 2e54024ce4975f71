//! An in-process ssh-agent for `hoist build --ssh ID=KEYFILE[,KEYFILE]`.
//!
//! When `--ssh` names private key files rather than an agent socket (BuildKit/buildx
//! semantics), the client itself serves an ssh-agent holding those keys, and the builder
//! forwards the `RUN --mount=type=ssh` connections to it. [`KeyAgent::load`] reads the keys;
//! [`KeyAgent::serve`] speaks the agent protocol (draft-miller-ssh-agent) on one connection.
//!
//! The agent is read-only and answers two requests: the list of identities, and a signature
//! with one of them (`rsa-sha2-256`/`rsa-sha2-512` when asked by flag, `ssh-rsa` otherwise,
//! for RSA keys). Everything else — adding, removing, locking, extensions — gets
//! `SSH_AGENT_FAILURE`. The peer is untrusted (it is a build step): a message longer than
//! [`MAX_MESSAGE_LEN`] closes the connection before anything of that size is allocated, and
//! a malformed request gets a failure. Key material is never logged, printed or put in an
//! error. The key file's bytes are wiped once parsed, and ssh-key wipes the keys it holds
//! when the agent is dropped (best effort: buffers inside the PEM/PKCS#8 decoders are theirs).

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use signature::Signer;
use ssh_key::encoding::Encode;
use ssh_key::private::{EcdsaKeypair, Ed25519Keypair, KeypairData, RsaKeypair};
use ssh_key::public::KeyData;
use ssh_key::{HashAlg, PrivateKey, Signature};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

/// The longest message (after its 4-byte length) the agent accepts; a longer one closes the
/// connection. OpenSSH's own agent allows 256 KiB too, which is far more than a signature
/// request needs (the data signed in an SSH login is a few hundred bytes).
pub const MAX_MESSAGE_LEN: usize = 256 * 1024;

/// The largest key file read: key files are a few KiB, and `--ssh id=/dev/zero` must not
/// read forever.
const MAX_KEY_FILE_LEN: u64 = 1 << 20;

const SSH_AGENT_FAILURE: u8 = 5;
const SSH_AGENTC_REQUEST_IDENTITIES: u8 = 11;
const SSH_AGENT_IDENTITIES_ANSWER: u8 = 12;
const SSH_AGENTC_SIGN_REQUEST: u8 = 13;
const SSH_AGENT_SIGN_RESPONSE: u8 = 14;
const SSH_AGENT_RSA_SHA2_256: u32 = 2;
const SSH_AGENT_RSA_SHA2_512: u32 = 4;

/// Errors loading keys.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The file could not be read (missing, unreadable, a directory...).
    #[error("cannot read the ssh key file {}: {source}; check the path given to --ssh", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: io::Error,
    },
    /// The file holds no private key this agent can parse.
    #[error("{} is not a private key: {reason}", path.display())]
    NotAPrivateKey {
        /// The key file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The key is encrypted; the agent has no way to ask for the passphrase.
    #[error(
        "the ssh key {} is protected by a passphrase: load it into ssh-agent with `ssh-add {}` and pass --ssh ID=$SSH_AUTH_SOCK instead of the key file",
        path.display(),
        path.display()
    )]
    Encrypted {
        /// The key file.
        path: PathBuf,
    },
    /// A private key of a type the agent cannot sign with.
    #[error(
        "the ssh key {} is {kind}, which this agent cannot sign with: use an ed25519, ecdsa or rsa key, or load it into ssh-agent and pass --ssh ID=$SSH_AUTH_SOCK",
        path.display()
    )]
    Unsupported {
        /// The key file.
        path: PathBuf,
        /// The key's algorithm.
        kind: String,
    },
}

/// One key: its public blob (what the peer names it by), its comment, and the private half.
struct Identity {
    blob: Vec<u8>,
    comment: String,
    public: KeyData,
    private: KeypairData,
}

/// An ssh-agent holding private keys in memory.
///
/// Cloning is cheap (the keys are shared), so each connection can be served from its own
/// task. `Debug` shows the keys' fingerprints, never the keys.
#[derive(Clone)]
pub struct KeyAgent {
    keys: Arc<[Identity]>,
}

impl fmt::Debug for KeyAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<String> =
            self.keys.iter().map(|k| format!("{} {}", k.public.fingerprint(HashAlg::Sha256), k.public.algorithm())).collect();
        f.debug_struct("KeyAgent").field("keys", &keys).finish()
    }
}

impl KeyAgent {
    /// Load private key files: OpenSSH format (`-----BEGIN OPENSSH PRIVATE KEY-----`, what
    /// `ssh-keygen` writes), and the PEM formats older keys come in: PKCS#1 RSA
    /// (`BEGIN RSA PRIVATE KEY`), SEC1 EC (`BEGIN EC PRIVATE KEY`) and unencrypted PKCS#8
    /// (`BEGIN PRIVATE KEY`: RSA, ECDSA P-256/P-384/P-521, Ed25519).
    ///
    /// Key types: Ed25519, ECDSA (P-256, P-384, P-521), RSA. The comment offered for a key is
    /// its own (OpenSSH format) or, when it has none, the file's path, as `ssh-add` does.
    /// A key given twice is held once. No paths give an agent with no keys.
    ///
    /// Fails on the first file that cannot be used, naming it: unreadable, not a private
    /// key, protected by a passphrase (the agent cannot ask for one), or of another type
    /// (DSA, FIDO security keys).
    pub fn load(paths: &[PathBuf]) -> Result<KeyAgent, AgentError> {
        let mut keys: Vec<Identity> = Vec::with_capacity(paths.len());
        for path in paths {
            let key = load_key(path)?;
            if !keys.iter().any(|k| k.blob == key.blob) {
                keys.push(key);
            }
        }
        Ok(KeyAgent { keys: keys.into() })
    }

    /// Serve the agent protocol on one connection until the peer closes it.
    ///
    /// Returns `Ok` when the peer closes the connection between messages, and an error when
    /// the connection fails or the peer breaks the protocol: a message longer than
    /// [`MAX_MESSAGE_LEN`], an empty one, or a connection closed inside a message. Requests
    /// the agent does not do, or cannot parse, get `SSH_AGENT_FAILURE` and the connection
    /// goes on. Signing runs on tokio's blocking pool (an RSA signature takes milliseconds).
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&self, mut stream: S) -> io::Result<()> {
        loop {
            let Some(request) = read_message(&mut stream).await? else {
                return Ok(());
            };
            let reply = self.answer(&request).await;
            let mut out = Vec::with_capacity(4 + reply.len());
            out.extend_from_slice(&(reply.len() as u32).to_be_bytes());
            out.extend_from_slice(&reply);
            stream.write_all(&out).await?;
            stream.flush().await?;
        }
    }

    /// The reply (without its length) to one request.
    async fn answer(&self, request: &[u8]) -> Vec<u8> {
        match request[0] {
            SSH_AGENTC_REQUEST_IDENTITIES => self.identities(),
            SSH_AGENTC_SIGN_REQUEST => self.sign(&request[1..]).await.unwrap_or_else(|| vec![SSH_AGENT_FAILURE]),
            _ => vec![SSH_AGENT_FAILURE],
        }
    }

    fn identities(&self) -> Vec<u8> {
        let mut out = vec![SSH_AGENT_IDENTITIES_ANSWER];
        out.extend_from_slice(&(self.keys.len() as u32).to_be_bytes());
        for k in self.keys.iter() {
            put_string(&mut out, &k.blob);
            put_string(&mut out, k.comment.as_bytes());
        }
        out
    }

    /// `string key_blob, string data, uint32 flags` → `SSH_AGENT_SIGN_RESPONSE`, or `None`
    /// for a malformed request, a key the agent does not hold, or a failed signature.
    async fn sign(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut r = Fields(body);
        let blob = r.string()?;
        let data = r.string()?;
        let flags = r.u32()?;
        if !r.0.is_empty() {
            return None;
        }
        let index = self.keys.iter().position(|k| k.blob == blob)?;
        let keys = Arc::clone(&self.keys);
        let data = data.to_vec();
        let signature = tokio::task::spawn_blocking(move || sign_with(&keys[index].private, &data, flags)).await.ok()??;
        let mut out = vec![SSH_AGENT_SIGN_RESPONSE];
        put_string(&mut out, &signature);
        Some(out)
    }
}

/// The SSH signature blob (`string algorithm, string signature`) of `data`.
fn sign_with(key: &KeypairData, data: &[u8], flags: u32) -> Option<Vec<u8>> {
    let signature: Signature = match key {
        KeypairData::Ed25519(k) => Signer::<Signature>::try_sign(k, data).ok()?,
        KeypairData::Ecdsa(k) => Signer::<Signature>::try_sign(k, data).ok()?,
        KeypairData::Rsa(k) => {
            // As OpenSSH's agent: SHA-256 wins if both flags are set; no flag is `ssh-rsa`.
            let hash = if flags & SSH_AGENT_RSA_SHA2_256 != 0 {
                Some(HashAlg::Sha256)
            } else if flags & SSH_AGENT_RSA_SHA2_512 != 0 {
                Some(HashAlg::Sha512)
            } else {
                None
            };
            Signer::<Signature>::try_sign(&(k, hash), data).ok()?
        }
        // `load` keeps no other kind.
        _ => return None,
    };
    signature.encode_vec().ok()
}

/// Read one message: `None` when the peer closed the connection before its first byte.
/// The length is checked before the body is read, so a hostile length allocates nothing.
async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        let n = stream.read(&mut len[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the ssh-agent client closed the connection inside a message length"));
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "empty ssh-agent message"));
    }
    if len > MAX_MESSAGE_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("ssh-agent message of {len} bytes is over the {MAX_MESSAGE_LEN}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(Some(body))
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// The fields of a request, read front to back; `None` past its end.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*head))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        if len > self.0.len() {
            return None;
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(s)
    }
}

/// Read and parse one key file.
fn load_key(path: &Path) -> Result<Identity, AgentError> {
    let read_err = |source| AgentError::Read { path: path.to_path_buf(), source };
    let not_key = |reason: &str| AgentError::NotAPrivateKey { path: path.to_path_buf(), reason: reason.to_string() };
    let file = std::fs::File::open(path).map_err(read_err)?;
    // Sized up front so that reading does not grow (and so copy, unwiped) the buffer.
    let size = file.metadata().map_err(read_err)?.len().min(MAX_KEY_FILE_LEN + 1);
    let mut bytes = Zeroizing::new(Vec::with_capacity(size as usize + 1));
    file.take(MAX_KEY_FILE_LEN + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > MAX_KEY_FILE_LEN {
        return Err(not_key("it is larger than 1 MiB"));
    }
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Err(not_key("it is not text (a key file is PEM: `-----BEGIN ... PRIVATE KEY-----`)"));
    };
    let (private, comment) = parse_key(text).map_err(|p| match p {
        Problem::NotKey(reason) => AgentError::NotAPrivateKey { path: path.to_path_buf(), reason },
        Problem::Encrypted => AgentError::Encrypted { path: path.to_path_buf() },
        Problem::Unsupported(kind) => AgentError::Unsupported { path: path.to_path_buf(), kind },
    })?;
    let public = KeyData::try_from(&private).map_err(|e| not_key(&format!("its public key cannot be derived ({e})")))?;
    let blob = public.encode_vec().map_err(|e| not_key(&format!("its public key cannot be encoded ({e})")))?;
    let comment = comment.filter(|c| !c.is_empty()).unwrap_or_else(|| path.display().to_string());
    Ok(Identity { blob, comment, public, private })
}

/// Why a file's text is no usable key.
enum Problem {
    NotKey(String),
    Encrypted,
    Unsupported(String),
}

/// The private key in a key file's text, and its comment if the format has one.
fn parse_key(text: &str) -> Result<(KeypairData, Option<String>), Problem> {
    if let Some(pem) = pem_block(text, "OPENSSH PRIVATE KEY") {
        let key = PrivateKey::from_openssh(pem).map_err(|e| Problem::NotKey(format!("its OpenSSH private key cannot be parsed ({e})")))?;
        if key.is_encrypted() {
            return Err(Problem::Encrypted);
        }
        let comment = key.comment().as_str_lossy().to_string();
        let data = key.key_data().clone();
        return match data {
            KeypairData::Ed25519(_) | KeypairData::Ecdsa(_) | KeypairData::Rsa(_) => Ok((data, Some(comment))),
            KeypairData::SkEd25519(_) | KeypairData::SkEcdsaSha2NistP256(_) => {
                Err(Problem::Unsupported("a FIDO security key (its signatures are made by the token)".to_string()))
            }
            KeypairData::Dsa(_) => Err(Problem::Unsupported("a DSA key".to_string())),
            other => Err(Problem::Unsupported(match other.algorithm() {
                Ok(a) => format!("a {a} key"),
                Err(_) => "of an unknown type".to_string(),
            })),
        };
    }
    if pem_block(text, "ENCRYPTED PRIVATE KEY").is_some() {
        return Err(Problem::Encrypted);
    }
    if let Some(pem) = pem_block(text, "RSA PRIVATE KEY") {
        if legacy_encrypted(pem) {
            return Err(Problem::Encrypted);
        }
        use rsa::pkcs1::DecodeRsaPrivateKey;
        let key = rsa::PrivateKey::from_pkcs1_pem(pem)
            .map_err(|e| Problem::NotKey(format!("its PKCS#1 RSA private key cannot be parsed ({e})")))?;
        return Ok((rsa_keypair(&key)?, None));
    }
    if let Some(pem) = pem_block(text, "EC PRIVATE KEY") {
        if legacy_encrypted(pem) {
            return Err(Problem::Encrypted);
        }
        return sec1_ec(pem).map(|k| (k, None));
    }
    if let Some(pem) = pem_block(text, "PRIVATE KEY") {
        return pkcs8(pem).map(|k| (k, None));
    }
    if pem_block(text, "DSA PRIVATE KEY").is_some() {
        return Err(Problem::Unsupported("a DSA key".to_string()));
    }
    let start = text.trim_start();
    if start.starts_with("---- BEGIN SSH2 PUBLIC KEY")
        || start.split_whitespace().next().is_some_and(|w| ssh_key::Algorithm::new(w).is_ok())
    {
        return Err(Problem::NotKey("it is a public key: pass the private key file (usually the same name without .pub)".to_string()));
    }
    if start.starts_with("PuTTY-User-Key-File-") {
        return Err(Problem::NotKey(
            "it is a PuTTY key: convert it with `puttygen KEY -O private-openssh -o KEY.openssh` and pass that file".to_string(),
        ));
    }
    Err(Problem::NotKey("it holds no OpenSSH or PEM private key (`-----BEGIN OPENSSH PRIVATE KEY-----`)".to_string()))
}

/// The PEM block of `label` in `text` (from its BEGIN line to its END line), if any. Text
/// around it is allowed: OpenSSL puts `EC PARAMETERS` before an EC key.
fn pem_block<'t>(text: &'t str, label: &str) -> Option<&'t str> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)?;
    let stop = start + text[start..].find(&end)? + end.len();
    Some(&text[start..stop])
}

/// An old-style encrypted PEM key (`Proc-Type: 4,ENCRYPTED` and a `DEK-Info` header).
fn legacy_encrypted(pem: &str) -> bool {
    pem.lines().any(|l| l.starts_with("Proc-Type:") && l.contains("ENCRYPTED"))
}

fn rsa_keypair(key: &rsa::PrivateKey) -> Result<KeypairData, Problem> {
    RsaKeypair::try_from(key)
        .map(KeypairData::Rsa)
        .map_err(|_| Problem::Unsupported("an RSA key of a kind OpenSSH does not use (more than two primes)".to_string()))
}

fn sec1_ec(pem: &str) -> Result<KeypairData, Problem> {
    if let Ok(k) = p256::SecretKey::from_sec1_pem(pem) {
        return Ok(ecdsa_p256(k));
    }
    if let Ok(k) = p384::SecretKey::from_sec1_pem(pem) {
        return Ok(ecdsa_p384(k));
    }
    match p521::SecretKey::from_sec1_pem(pem) {
        Ok(k) => Ok(ecdsa_p521(k)),
        Err(e) => Err(Problem::NotKey(format!("its EC private key cannot be parsed, or is not on the curve P-256, P-384 or P-521 ({e})"))),
    }
}

fn pkcs8(pem: &str) -> Result<KeypairData, Problem> {
    // One trait (the pkcs8 crate's) for every key type here.
    use ed25519_dalek::pkcs8::DecodePrivateKey as _;
    if let Ok(k) = rsa::PrivateKey::from_pkcs8_pem(pem) {
        return rsa_keypair(&k);
    }
    if let Ok(k) = p256::SecretKey::from_pkcs8_pem(pem) {
        return Ok(ecdsa_p256(k));
    }
    if let Ok(k) = p384::SecretKey::from_pkcs8_pem(pem) {
        return Ok(ecdsa_p384(k));
    }
    if let Ok(k) = p521::SecretKey::from_pkcs8_pem(pem) {
        return Ok(ecdsa_p521(k));
    }
    match ed25519_dalek::SigningKey::from_pkcs8_pem(pem) {
        Ok(k) => Ok(KeypairData::Ed25519(Ed25519Keypair::from(k))),
        Err(_) => Err(Problem::NotKey(
            "its PKCS#8 private key cannot be parsed, or is not an RSA, ECDSA (P-256, P-384, P-521) or Ed25519 key".to_string(),
        )),
    }
}

fn ecdsa_p256(k: p256::SecretKey) -> KeypairData {
    let public = k.public_key().into();
    KeypairData::Ecdsa(EcdsaKeypair::NistP256 { public, private: k.into() })
}

fn ecdsa_p384(k: p384::SecretKey) -> KeypairData {
    let public = k.public_key().into();
    KeypairData::Ecdsa(EcdsaKeypair::NistP384 { public, private: k.into() })
}

fn ecdsa_p521(k: p521::SecretKey) -> KeypairData {
    let public = k.public_key().into();
    KeypairData::Ecdsa(EcdsaKeypair::NistP521 { public, private: k.into() })
}

#[cfg(test)]
mod tests {
    //! Against the real OpenSSH tools: keys from `ssh-keygen`, the agent listed by
    //! `ssh-add -l`, signatures made through it by `ssh-keygen -Y sign` and checked by
    //! `ssh-keygen -Y verify` (or `openssl dgst -verify` for the RSA hash variants), and raw
    //! protocol bytes for what a hostile peer may send.

    use super::*;
    use std::process::Output;
    use std::time::Duration;
    use tokio::net::{UnixListener, UnixStream};
    use tokio::process::Command;

    /// Run a tool to its end (stdin empty unless set). Those that may use an agent are
    /// given SSH_AUTH_SOCK (or have it removed) by the caller.
    async fn run(cmd: &mut Command) -> Output {
        cmd.output().await.expect("starting a tool")
    }

    fn text(out: &Output) -> String {
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// `ssh-keygen -t ... -f dir/name` with the given passphrase; returns the private key's path.
    async fn keygen(dir: &Path, name: &str, args: &[&str], passphrase: &str) -> PathBuf {
        let path = dir.join(name);
        let out = run(Command::new("ssh-keygen")
            .arg("-q")
            .args(args)
            .args(["-N", passphrase, "-C"])
            .arg(format!("{name}@hoist"))
            .arg("-f")
            .arg(&path))
        .await;
        assert!(out.status.success(), "ssh-keygen {args:?}: {}", text(&out));
        path
    }

    /// The SHA256 fingerprint `ssh-keygen -lf` prints for a key file.
    async fn fingerprint(path: &Path) -> String {
        let out = run(Command::new("ssh-keygen").arg("-lf").arg(path)).await;
        assert!(out.status.success(), "ssh-keygen -lf {}: {}", path.display(), text(&out));
        String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_string()
    }

    /// The agent on a unix socket in `dir`, a task per connection, as the builder's forwarding
    /// will use it. Stops when dropped.
    struct Served {
        sock: PathBuf,
        task: tokio::task::JoinHandle<()>,
        /// Connections whose `serve` panicked.
        panics: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Served {
        fn assert_no_panics(&self) {
            assert_eq!(self.panics.load(std::sync::atomic::Ordering::SeqCst), 0, "serve panicked");
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn serve_on(agent: KeyAgent, dir: &Path) -> Served {
        let sock = dir.join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let panics = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&panics);
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let agent = agent.clone();
                let count = Arc::clone(&count);
                tokio::spawn(async move {
                    let serving = tokio::spawn(async move { agent.serve(conn).await });
                    if serving.await.is_err_and(|e| e.is_panic()) {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
        });
        Served { sock, task, panics }
    }

    async fn ssh_add(served: &Served, args: &[&str]) -> Output {
        run(Command::new("ssh-add").args(args).env("SSH_AUTH_SOCK", &served.sock)).await
    }

    /// The fingerprints `ssh-add -l` lists, sorted.
    async fn listed(served: &Served) -> Vec<String> {
        let out = ssh_add(served, &["-l"]).await;
        assert!(out.status.success(), "ssh-add -l: {}", text(&out));
        let mut v: Vec<String> =
            String::from_utf8_lossy(&out.stdout).lines().map(|l| l.split_whitespace().nth(1).unwrap().to_string()).collect();
        v.sort();
        v
    }

    /// `ssh-keygen -Y sign` through the agent with the public key `pub_path` (the private key
    /// file is gone, so only the agent can sign), then `ssh-keygen -Y verify` of the result.
    /// Returns the signature file.
    async fn sign_and_verify(served: &Served, dir: &Path, pub_path: &Path) -> PathBuf {
        let data = dir.join("data");
        std::fs::write(&data, b"the data to sign\n").unwrap();
        let sig = dir.join("data.sig");
        let _ = std::fs::remove_file(&sig);
        let mut cmd = Command::new("ssh-keygen");
        cmd.args(["-Y", "sign", "-n", "file", "-f"]).arg(pub_path).arg(&data);
        let out = run(cmd.env_remove("SSH_AUTH_SOCK")).await;
        assert!(!out.status.success(), "without the agent, signing with only {} must fail", pub_path.display());
        let out = run(cmd.env("SSH_AUTH_SOCK", &served.sock)).await;
        assert!(out.status.success(), "ssh-keygen -Y sign -f {} through the agent: {}", pub_path.display(), text(&out));
        let pubkey = std::fs::read_to_string(pub_path).unwrap();
        let allowed = dir.join("allowed_signers");
        std::fs::write(&allowed, format!("signer@hoist {}\n", pubkey.trim())).unwrap();
        let out = run(Command::new("ssh-keygen")
            .args(["-Y", "verify", "-n", "file", "-I", "signer@hoist", "-f"])
            .arg(&allowed)
            .arg("-s")
            .arg(&sig)
            .stdin(std::fs::File::open(&data).unwrap()))
        .await;
        assert!(out.status.success(), "ssh-keygen -Y verify of {}'s signature: {}", pub_path.display(), text(&out));
        sig
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ssh_add_lists_each_key_with_ssh_keygen_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let keys = vec![
            keygen(d, "ed25519", &["-t", "ed25519"], "").await,
            keygen(d, "ecdsa256", &["-t", "ecdsa", "-b", "256"], "").await,
            keygen(d, "ecdsa384", &["-t", "ecdsa", "-b", "384"], "").await,
            keygen(d, "ecdsa521", &["-t", "ecdsa", "-b", "521"], "").await,
            keygen(d, "rsa", &["-t", "rsa", "-b", "2048"], "").await,
            // The PEM formats of older keys.
            keygen(d, "rsa-pkcs1", &["-t", "rsa", "-b", "2048", "-m", "PEM"], "").await,
            keygen(d, "rsa-pkcs8", &["-t", "rsa", "-b", "2048", "-m", "PKCS8"], "").await,
            keygen(d, "ecdsa-sec1", &["-t", "ecdsa", "-b", "384", "-m", "PEM"], "").await,
            keygen(d, "ecdsa-pkcs8", &["-t", "ecdsa", "-b", "521", "-m", "PKCS8"], "").await,
        ];
        assert!(std::fs::read_to_string(&keys[5]).unwrap().starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        assert!(std::fs::read_to_string(&keys[6]).unwrap().starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(std::fs::read_to_string(&keys[7]).unwrap().starts_with("-----BEGIN EC PRIVATE KEY-----"));
        let mut want = Vec::new();
        for k in &keys {
            want.push(fingerprint(k).await);
        }
        want.sort();
        // A key given twice is listed once.
        let mut paths = keys.clone();
        paths.push(keys[0].clone());
        let agent = KeyAgent::load(&paths).unwrap();
        let served = serve_on(agent.clone(), d);
        assert_eq!(listed(&served).await, want);
        // The comments are the keys' own; Debug shows fingerprints and no key material.
        let out = ssh_add(&served, &["-l"]).await;
        assert!(String::from_utf8_lossy(&out.stdout).contains("ed25519@hoist"), "{}", text(&out));
        let debug = format!("{agent:?}");
        for f in &want {
            assert!(debug.contains(f.as_str()), "{debug}");
        }
        // `ssh-add -L` prints the same public keys as the .pub files.
        let out = ssh_add(&served, &["-L"]).await;
        let listed_keys = String::from_utf8_lossy(&out.stdout).to_string();
        for k in &keys {
            let pubkey = std::fs::read_to_string(k.with_extension("pub")).unwrap();
            let blob = pubkey.split_whitespace().nth(1).unwrap();
            assert!(listed_keys.contains(blob), "{} not in ssh-add -L:\n{listed_keys}", k.display());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ssh_keygen_signs_through_the_agent_with_each_key_type() {
        let kinds: &[(&str, &[&str])] = &[
            ("ed25519", &["-t", "ed25519"]),
            ("ecdsa256", &["-t", "ecdsa", "-b", "256"]),
            ("ecdsa384", &["-t", "ecdsa", "-b", "384"]),
            ("ecdsa521", &["-t", "ecdsa", "-b", "521"]),
            ("rsa", &["-t", "rsa", "-b", "3072"]),
            ("rsa-pkcs1", &["-t", "rsa", "-b", "2048", "-m", "PEM"]),
            ("rsa-pkcs8", &["-t", "rsa", "-b", "2048", "-m", "PKCS8"]),
            ("ecdsa-sec1", &["-t", "ecdsa", "-b", "256", "-m", "PEM"]),
            ("ecdsa-pkcs8", &["-t", "ecdsa", "-b", "521", "-m", "PKCS8"]),
        ];
        for (name, args) in kinds {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let key = keygen(d, name, args, "").await;
            let agent = KeyAgent::load(std::slice::from_ref(&key)).unwrap();
            std::fs::remove_file(&key).unwrap();
            let served = serve_on(agent, d);
            let sig = sign_and_verify(&served, d, &key.with_extension("pub")).await;
            if name.starts_with("rsa") {
                // ssh-keygen asks the agent for rsa-sha2-512 (flag SSH_AGENT_RSA_SHA2_512).
                let sig = ssh_key::SshSig::from_pem(std::fs::read_to_string(&sig).unwrap()).unwrap();
                assert_eq!(sig.signature().algorithm(), ssh_key::Algorithm::Rsa { hash: Some(HashAlg::Sha512) }, "{name}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_openssl_ed25519_pkcs8_key_signs_through_the_agent() {
        // OpenSSH cannot write (or read) an Ed25519 key in PKCS#8; OpenSSL can. Its public
        // key in OpenSSH form is built here by hand (RFC 8709: string "ssh-ed25519",
        // string the 32 bytes), from `openssl pkey -pubout`.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = d.join("ed25519-pkcs8");
        let out = run(Command::new("openssl").args(["genpkey", "-algorithm", "ed25519", "-out"]).arg(&key)).await;
        assert!(out.status.success(), "{}", text(&out));
        let out = run(Command::new("openssl").args(["pkey", "-pubout", "-outform", "DER", "-in"]).arg(&key)).await;
        assert!(out.status.success(), "{}", text(&out));
        let raw = &out.stdout[out.stdout.len() - 32..];
        let mut blob = Vec::new();
        put_string(&mut blob, b"ssh-ed25519");
        put_string(&mut blob, raw);
        std::fs::write(d.join("blob"), &blob).unwrap();
        let out = run(Command::new("base64").arg("-w0").arg(d.join("blob"))).await;
        let pub_path = d.join("ed25519-pkcs8.pub");
        std::fs::write(&pub_path, format!("ssh-ed25519 {} pkcs8@hoist\n", String::from_utf8_lossy(&out.stdout))).unwrap();

        let agent = KeyAgent::load(std::slice::from_ref(&key)).unwrap();
        std::fs::remove_file(&key).unwrap();
        let served = serve_on(agent, d);
        assert_eq!(listed(&served).await, vec![fingerprint(&pub_path).await]);
        // No comment in the file: the agent offers its path, as ssh-add does.
        let out = ssh_add(&served, &["-l"]).await;
        assert!(String::from_utf8_lossy(&out.stdout).contains(&key.display().to_string()), "{}", text(&out));
        sign_and_verify(&served, d, &pub_path).await;
    }

    /// One request on a raw connection; the reply's body.
    async fn request(conn: &mut UnixStream, body: &[u8]) -> Vec<u8> {
        let mut msg = (body.len() as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(body);
        conn.write_all(&msg).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(30), read_message(conn)).await.expect("the agent answers").unwrap();
        reply.expect("the agent answers before closing")
    }

    fn sign_request(blob: &[u8], data: &[u8], flags: u32) -> Vec<u8> {
        let mut body = vec![SSH_AGENTC_SIGN_REQUEST];
        put_string(&mut body, blob);
        put_string(&mut body, data);
        body.extend_from_slice(&flags.to_be_bytes());
        body
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rsa_flags_choose_the_hash_and_openssl_verifies_each() {
        // ssh-keygen -Y only asks for rsa-sha2-512; ssh asks for rsa-sha2-256 or (to old
        // servers) ssh-rsa. Each signature is checked by OpenSSL against the key's PKCS#8
        // public key, as a PKCS#1 v1.5 signature over the data with that hash.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = keygen(d, "rsa", &["-t", "rsa", "-b", "2048"], "").await;
        let out = run(Command::new("ssh-keygen").args(["-e", "-m", "PKCS8", "-f"]).arg(key.with_extension("pub"))).await;
        assert!(out.status.success(), "{}", text(&out));
        let pem = d.join("rsa.pub.pem");
        std::fs::write(&pem, &out.stdout).unwrap();
        let data = d.join("data");
        std::fs::write(&data, b"session id and userauth request").unwrap();

        let agent = KeyAgent::load(std::slice::from_ref(&key)).unwrap();
        let blob = agent.keys[0].blob.clone();
        let served = serve_on(agent, d);
        let mut conn = UnixStream::connect(&served.sock).await.unwrap();
        for (flags, alg, digest) in [
            (0, "ssh-rsa", "-sha1"),
            (SSH_AGENT_RSA_SHA2_256, "rsa-sha2-256", "-sha256"),
            (SSH_AGENT_RSA_SHA2_512, "rsa-sha2-512", "-sha512"),
            // Both: SHA-256, as OpenSSH's agent.
            (SSH_AGENT_RSA_SHA2_256 | SSH_AGENT_RSA_SHA2_512, "rsa-sha2-256", "-sha256"),
        ] {
            let reply = request(&mut conn, &sign_request(&blob, &std::fs::read(&data).unwrap(), flags)).await;
            assert_eq!(reply[0], SSH_AGENT_SIGN_RESPONSE, "flags {flags}");
            let mut f = Fields(&reply[1..]);
            let mut sig = Fields(f.string().unwrap());
            assert!(f.0.is_empty());
            assert_eq!(std::str::from_utf8(sig.string().unwrap()).unwrap(), alg, "flags {flags}");
            let raw = sig.string().unwrap();
            assert!(sig.0.is_empty());
            std::fs::write(d.join("sig"), raw).unwrap();
            let out =
                run(Command::new("openssl").args(["dgst", digest, "-verify"]).arg(&pem).arg("-signature").arg(d.join("sig")).arg(&data))
                    .await;
            assert!(out.status.success(), "openssl dgst {digest} -verify ({alg}): {}", text(&out));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_agent_is_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = keygen(d, "held", &["-t", "ed25519"], "").await;
        let other = keygen(d, "other", &["-t", "ed25519"], "").await;
        let served = serve_on(KeyAgent::load(std::slice::from_ref(&key)).unwrap(), d);
        let want = vec![fingerprint(&key).await];

        let out = ssh_add(&served, &[other.to_str().unwrap()]).await;
        assert!(!out.status.success() && text(&out).contains("agent refused operation"), "ssh-add of a new key must fail: {}", text(&out));
        let out = ssh_add(&served, &["-D"]).await;
        assert!(!out.status.success() && text(&out).contains("Failed to remove all identities"), "ssh-add -D must fail: {}", text(&out));
        let out = ssh_add(&served, &["-d", key.with_extension("pub").to_str().unwrap()]).await;
        assert!(!out.status.success() && text(&out).contains("agent refused operation"), "ssh-add -d must fail: {}", text(&out));
        assert_eq!(listed(&served).await, want);

        // Every other request, on one connection that goes on after each failure.
        let mut conn = UnixStream::connect(&served.sock).await.unwrap();
        for ty in [1u8, 9, 17, 18, 19, 20, 21, 22, 23, 25, 26, 27, 0, 255] {
            assert_eq!(request(&mut conn, &[ty, 0, 0, 0, 0]).await, [SSH_AGENT_FAILURE], "request type {ty}");
        }
        // A signature with a key the agent does not hold, and malformed sign requests.
        let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
        let other_blob = ssh_key::PublicKey::from_openssh(&other_pub).unwrap().to_bytes().unwrap();
        assert_eq!(request(&mut conn, &sign_request(&other_blob, b"x", 0)).await, [SSH_AGENT_FAILURE]);
        let held_blob = KeyAgent::load(std::slice::from_ref(&key)).unwrap().keys[0].blob.clone();
        let good = sign_request(&held_blob, b"x", 0);
        assert_eq!(request(&mut conn, &good[..good.len() - 1]).await, [SSH_AGENT_FAILURE], "truncated flags");
        assert_eq!(request(&mut conn, &[&good[..], &[0]].concat()).await, [SSH_AGENT_FAILURE], "trailing byte");
        assert_eq!(request(&mut conn, &[SSH_AGENTC_SIGN_REQUEST, 0x40, 0, 0, 0, 1, 2, 3]).await, [SSH_AGENT_FAILURE], "a 1 GiB key string");
        assert_eq!(request(&mut conn, &[SSH_AGENTC_SIGN_REQUEST]).await, [SSH_AGENT_FAILURE], "no fields");
        // After all that, good requests on the same connection are answered.
        assert_eq!(request(&mut conn, &good).await[0], SSH_AGENT_SIGN_RESPONSE);
        assert_eq!(request(&mut conn, &[SSH_AGENTC_REQUEST_IDENTITIES]).await[0], SSH_AGENT_IDENTITIES_ANSWER);
        assert_eq!(listed(&served).await, want);
        served.assert_no_panics();
    }

    /// The peer's view of a connection the agent should have closed: EOF, promptly, while
    /// the peer still holds its end open.
    async fn closed_by_agent(conn: &mut UnixStream) {
        let mut buf = [0u8; 64];
        let n =
            tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await.expect("the agent closes the connection").unwrap_or(0);
        assert_eq!(n, 0, "the agent answered instead of closing: {:?}", &buf[..n]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_lengths_and_garbage_close_only_that_connection() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = keygen(d, "held", &["-t", "ed25519"], "").await;
        let agent = KeyAgent::load(std::slice::from_ref(&key)).unwrap();
        let served = serve_on(agent.clone(), d);
        let want = vec![fingerprint(&key).await];

        // A 1 GiB claim: closed at once, without waiting for (or allocating) the body.
        let mut conn = UnixStream::connect(&served.sock).await.unwrap();
        conn.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        closed_by_agent(&mut conn).await;
        // Just over the limit, the largest length there is, and an empty message.
        for len in [MAX_MESSAGE_LEN as u32 + 1, u32::MAX, 0] {
            let mut conn = UnixStream::connect(&served.sock).await.unwrap();
            conn.write_all(&len.to_be_bytes()).await.unwrap();
            // The agent may close on the length alone, before this byte arrives (EPIPE).
            let _ = conn.write_all(&[SSH_AGENTC_REQUEST_IDENTITIES]).await;
            closed_by_agent(&mut conn).await;
        }
        // Text where the length should be ("GET " is 1.2 GB).
        let mut conn = UnixStream::connect(&served.sock).await.unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n").await.unwrap();
        closed_by_agent(&mut conn).await;
        // A message at the limit is read and answered (an unknown type: failure).
        let mut conn = UnixStream::connect(&served.sock).await.unwrap();
        let mut big = vec![0u8; MAX_MESSAGE_LEN];
        big[0] = 200;
        assert_eq!(request(&mut conn, &big).await, [SSH_AGENT_FAILURE]);
        // Pseudo-random garbage of every small length after a valid length: a failure or a
        // close, never a panic or a hang.
        let mut x: u32 = 0x2545_f491;
        for len in 1..64usize {
            let body: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let reply = request(&mut conn, &body).await;
            assert!(reply == [SSH_AGENT_FAILURE] || reply[0] == SSH_AGENT_IDENTITIES_ANSWER, "{body:?} → {reply:?}");
        }
        // A peer that closes inside a message.
        let mut conn = UnixStream::connect(&served.sock).await.unwrap();
        conn.write_all(&[0, 0, 0, 9, SSH_AGENTC_SIGN_REQUEST, 0]).await.unwrap();
        drop(conn);

        // `serve` itself says why it closed, and does so without reading further.
        let (mut client, server) = UnixStream::pair().unwrap();
        let serving = tokio::spawn({
            let agent = agent.clone();
            async move { agent.serve(server).await }
        });
        client.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), serving).await.expect("serve returns").unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("limit"), "{err}");
        // And returns Ok when the peer closes between messages.
        let (mut client, server) = UnixStream::pair().unwrap();
        let serving = tokio::spawn({
            let agent = agent.clone();
            async move { agent.serve(server).await }
        });
        assert_eq!(request(&mut client, &[SSH_AGENTC_REQUEST_IDENTITIES]).await[0], SSH_AGENT_IDENTITIES_ANSWER);
        drop(client);
        tokio::time::timeout(Duration::from_secs(10), serving).await.unwrap().unwrap().unwrap();

        // The agent still serves new connections.
        assert_eq!(listed(&served).await, want);
        std::fs::remove_file(&key).unwrap();
        sign_and_verify(&served, d, &key.with_extension("pub")).await;
        served.assert_no_panics();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unusable_key_files_fail_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let good = keygen(d, "good", &["-t", "ed25519"], "").await;
        let load_err = |p: &Path| KeyAgent::load(&[good.clone(), p.to_path_buf()]).unwrap_err();

        for (name, args) in [
            ("protected", &["-t", "ed25519"][..]),
            ("protected-rsa-pkcs1", &["-t", "rsa", "-b", "1024", "-m", "PEM"][..]),
            ("protected-ecdsa-sec1", &["-t", "ecdsa", "-m", "PEM"][..]),
            ("protected-pkcs8", &["-t", "ecdsa", "-m", "PKCS8"][..]),
        ] {
            let key = keygen(d, name, args, "secret").await;
            let err = load_err(&key);
            assert!(matches!(err, AgentError::Encrypted { .. }), "{name}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&key.display().to_string()) && msg.contains("passphrase") && msg.contains("ssh-add"), "{msg}");
        }

        let junk = d.join("not-a-key");
        std::fs::write(&junk, "hello\n").unwrap();
        let err = load_err(&junk);
        assert!(matches!(err, AgentError::NotAPrivateKey { .. }), "{err:?}");
        assert!(err.to_string().contains(&junk.display().to_string()), "{err}");
        assert!(!err.to_string().contains("hello"), "{err}");

        let binary = d.join("binary");
        std::fs::write(&binary, [0xff, 0xfe, 0, 1]).unwrap();
        assert!(matches!(load_err(&binary), AgentError::NotAPrivateKey { .. }));

        let huge = d.join("huge");
        std::fs::write(&huge, vec![b'a'; MAX_KEY_FILE_LEN as usize + 1]).unwrap();
        let err = load_err(&huge);
        assert!(err.to_string().contains("larger than 1 MiB"), "{err}");

        // A damaged key: the right header around base64 that is not a key.
        let damaged = d.join("damaged");
        std::fs::write(&damaged, "-----BEGIN OPENSSH PRIVATE KEY-----\naGVsbG8gd29ybGQ=\n-----END OPENSSH PRIVATE KEY-----\n").unwrap();
        let err = load_err(&damaged);
        assert!(matches!(err, AgentError::NotAPrivateKey { .. }) && err.to_string().contains(&damaged.display().to_string()), "{err:?}");

        let public = good.with_extension("pub");
        let err = load_err(&public);
        assert!(matches!(err, AgentError::NotAPrivateKey { .. }) && err.to_string().contains("public key"), "{err}");

        let missing = d.join("missing");
        let err = load_err(&missing);
        assert!(matches!(err, AgentError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains(&missing.display().to_string()), "{err}");

        let err = load_err(d);
        assert!(matches!(err, AgentError::Read { .. }) && err.to_string().contains(&d.display().to_string()), "{err:?}");

        // DSA: ssh-keygen still makes such keys; nothing modern accepts their signatures.
        let dsa = d.join("dsa");
        let out = run(Command::new("ssh-keygen").args(["-q", "-t", "dsa", "-N", "", "-f"]).arg(&dsa)).await;
        if out.status.success() {
            let err = load_err(&dsa);
            assert!(matches!(err, AgentError::Unsupported { .. }) && err.to_string().contains("DSA"), "{err:?}");
            assert!(err.to_string().contains(&dsa.display().to_string()), "{err}");
        }

        // No key material in any error.
        let secret = std::fs::read_to_string(&good).unwrap();
        let body: String = secret.lines().nth(2).unwrap().chars().take(40).collect();
        for p in [&junk, &damaged, &public, &missing] {
            assert!(!format!("{:?}", load_err(p)).contains(&body));
        }
        // The good key alone loads.
        assert_eq!(KeyAgent::load(std::slice::from_ref(&good)).unwrap().keys.len(), 1);
        assert_eq!(KeyAgent::load(&[]).unwrap().keys.len(), 0);
    }
}
