//! API keys and their quotas (`auth.api_keys_file`).
//!
//! The file is TOML, re-read when it changes:
//!
//! ```toml
//! [[keys]]
//! id = "team-search"                 # appears in logs, traces, metrics labels; never the secret
//! sha256 = "<hex SHA-256 of the secret>"
//! requests_per_minute = 600          # optional, token bucket
//! tokens_per_minute = 200000         # optional: prompt + image + generated tokens
//! max_concurrent_requests = 32       # optional
//! ```
//!
//! Callers send `authorization: Bearer <secret>`. The secret's SHA-256 is compared with every key's in constant
//! time (no early exit, no secret-dependent branch before the end). No or unknown key: UNAUTHENTICATED. Over a
//! quota: RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo` saying when the bucket allows the next request.
//!
//! Quotas are token buckets that hold one minute's worth: `requests_per_minute` is taken one per request at
//! admission; `tokens_per_minute` admits a request while the bucket is above zero and is charged as the tokens
//! become known (prompt and images at admission, generated tokens as they stream), so one long request may take
//! the bucket below zero and the next waits for it to refill. A key's quota state survives reloads of the file
//! unless its limits change.
//!
//! Without a file the gateway is open: every caller is the anonymous tenant (it says so at startup).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::RequestError;
use kosmos_runtime::reload::{ReloadError, Reloading};

/// How often the keys file is re-read.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// A key's quotas, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Requests per minute (token bucket).
    pub requests_per_minute: Option<u64>,
    /// Prompt + image + generated tokens per minute (token bucket).
    pub tokens_per_minute: Option<u64>,
    /// Requests in flight at once (streams included).
    pub max_concurrent_requests: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    sha256: String,
    #[serde(flatten)]
    quotas: Quotas,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    #[serde(default)]
    keys: Vec<RawKey>,
}

/// One key of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// The key's public name.
    pub id: String,
    /// SHA-256 of the secret.
    pub sha256: [u8; 32],
    /// Its quotas.
    pub quotas: Quotas,
}

/// The keys of one version of the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    /// In file order.
    pub keys: Vec<KeyEntry>,
}

fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl KeySet {
    /// Parses the file's text; every error names the key (by position and id) and the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawKeys = toml::from_str(text).map_err(|err| err.to_string())?;
        let mut keys = Vec::with_capacity(raw.keys.len());
        for (index, key) in raw.keys.into_iter().enumerate() {
            let at = format!("keys[{index}] (id `{}`)", key.id);
            if !is_valid_id(&key.id) {
                return Err(format!(
                    "{at}: `id` must be 1 to 64 characters of letters, digits, `-`, `_`, `.`"
                ));
            }
            let sha256 = parse_hex32(&key.sha256)
                .ok_or_else(|| format!("{at}: `sha256` must be 64 hex digits"))?;
            for (field, value) in [
                ("requests_per_minute", key.quotas.requests_per_minute),
                ("tokens_per_minute", key.quotas.tokens_per_minute),
                (
                    "max_concurrent_requests",
                    key.quotas.max_concurrent_requests,
                ),
            ] {
                if value == Some(0) {
                    return Err(format!(
                        "{at}: `{field}` must be at least 1 (omit it for no limit)"
                    ));
                }
            }
            if keys.iter().any(|k: &KeyEntry| k.id == key.id) {
                return Err(format!("{at}: `id` is used twice"));
            }
            if keys.iter().any(|k: &KeyEntry| k.sha256 == sha256) {
                return Err(format!("{at}: `sha256` is used twice"));
            }
            keys.push(KeyEntry {
                id: key.id,
                sha256,
                quotas: key.quotas,
            });
        }
        Ok(Self { keys })
    }

    /// The key whose hash is the SHA-256 of `secret`, compared in constant time against every key.
    fn find(&self, secret: &[u8]) -> Option<&KeyEntry> {
        let digest: [u8; 32] = Sha256::digest(secret).into();
        let mut found = None;
        for key in &self.keys {
            let difference = key
                .sha256
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if std::hint::black_box(difference) == 0 {
                found = Some(key);
            }
        }
        found
    }
}

/// A token bucket holding up to one minute's worth.
#[derive(Debug)]
struct Bucket {
    per_minute: f64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn new(per_minute: u64, now: Instant) -> Self {
        Self {
            per_minute: per_minute as f64,
            level: per_minute as f64,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.updated = now;
    }

    /// How long until the level reaches `needed`.
    fn wait_for(&self, needed: f64) -> Duration {
        let missing = (needed - self.level).max(0.0);
        Duration::from_secs_f64(missing * 60.0 / self.per_minute).max(Duration::from_millis(1))
    }
}

/// The live quota state of one key.
#[derive(Debug)]
struct KeyQuota {
    quotas: Quotas,
    buckets: Mutex<(Option<Bucket>, Option<Bucket>)>,
    concurrent: Option<Arc<Semaphore>>,
}

impl KeyQuota {
    fn new(quotas: Quotas) -> Self {
        let now = Instant::now();
        Self {
            quotas,
            buckets: Mutex::new((
                quotas.requests_per_minute.map(|n| Bucket::new(n, now)),
                quotas.tokens_per_minute.map(|n| Bucket::new(n, now)),
            )),
            concurrent: quotas
                .max_concurrent_requests
                .map(|n| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS as u64) as usize))),
        }
    }
}

/// Who is calling: a key's id (the tenant that partitions the caches) and its quotas, or the anonymous caller
/// of an open gateway.
#[derive(Debug, Clone)]
pub struct Caller {
    id: Arc<str>,
    quota: Option<Arc<KeyQuota>>,
}

impl Caller {
    /// The caller of a gateway without keys.
    pub fn anonymous() -> Self {
        Self {
            id: Arc::from(""),
            quota: None,
        }
    }

    /// The key's id; empty for the anonymous caller. Caches are partitioned by it.
    pub fn tenant(&self) -> &str {
        &self.id
    }

    /// The name logs and traces use: the key's id, or `anonymous`.
    pub fn name(&self) -> &str {
        if self.id.is_empty() {
            "anonymous"
        } else {
            &self.id
        }
    }

    /// Admits one request under the key's quotas; the permit is held for the whole request (stream included)
    /// and is charged its tokens. RESOURCE_EXHAUSTED (with when to retry) when a quota is spent.
    pub fn admit(&self) -> Result<QuotaPermit, RequestError> {
        let Some(quota) = &self.quota else {
            return Ok(QuotaPermit::default());
        };
        let over = |quota_name: &'static str, limit: u64, retry_after: Duration| {
            RequestError::QuotaExceeded {
                key: self.id.to_string(),
                quota: quota_name,
                limit,
                retry_after,
            }
        };
        let concurrent = match &quota.concurrent {
            Some(semaphore) => Some(Arc::clone(semaphore).try_acquire_owned().map_err(|_| {
                over(
                    "max_concurrent_requests",
                    quota.quotas.max_concurrent_requests.unwrap_or_default(),
                    Duration::from_secs(1),
                )
            })?),
            None => None,
        };
        let now = Instant::now();
        let mut buckets = quota.buckets.lock().unwrap_or_else(|err| err.into_inner());
        let (requests, tokens) = &mut *buckets;
        if let Some(tokens) = tokens {
            tokens.refill(now);
            if tokens.level <= 0.0 {
                return Err(over(
                    "tokens_per_minute",
                    tokens.per_minute as u64,
                    tokens.wait_for(f64::MIN_POSITIVE),
                ));
            }
        }
        if let Some(requests) = requests {
            requests.refill(now);
            if requests.level < 1.0 {
                return Err(over(
                    "requests_per_minute",
                    requests.per_minute as u64,
                    requests.wait_for(1.0),
                ));
            }
            requests.level -= 1.0;
        }
        drop(buckets);
        Ok(QuotaPermit {
            quota: Some(Arc::clone(quota)),
            _concurrent: concurrent,
        })
    }
}

/// A request admitted under its key's quotas; charge it the tokens it uses.
#[derive(Debug, Default)]
pub struct QuotaPermit {
    quota: Option<Arc<KeyQuota>>,
    _concurrent: Option<OwnedSemaphorePermit>,
}

impl QuotaPermit {
    /// Takes `tokens` from the key's token bucket (which may go below zero).
    pub fn charge(&self, tokens: u64) {
        let Some(quota) = &self.quota else { return };
        let mut buckets = quota.buckets.lock().unwrap_or_else(|err| err.into_inner());
        if let Some(bucket) = &mut buckets.1 {
            bucket.refill(Instant::now());
            bucket.level -= tokens as f64;
        }
    }
}

/// Why a caller was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` header.
    #[error("missing API key: send `authorization: Bearer <key>`")]
    Missing,
    /// Not `Bearer <secret>`.
    #[error("malformed `authorization` header: expected `Bearer <key>`")]
    Malformed,
    /// No key has this secret.
    #[error("unknown API key")]
    Unknown,
}

/// The gateway's API keys (or none: open).
#[derive(Debug, Clone)]
pub struct Authenticator {
    keys: Option<Reloading<KeySet>>,
    quotas: Arc<Mutex<HashMap<String, Arc<KeyQuota>>>>,
}

impl Authenticator {
    /// An open gateway: every caller is anonymous.
    pub fn open() -> Self {
        Self {
            keys: None,
            quotas: Arc::default(),
        }
    }

    /// Keys from `path`, re-read every `interval` (0: never).
    pub fn from_file(path: &Path, interval: Duration) -> Result<Self, ReloadError> {
        let shown = path.display().to_string();
        let keys = Reloading::load(
            "api keys",
            vec![path.to_path_buf()],
            interval,
            move |files| {
                let text = std::str::from_utf8(&files[0])
                    .map_err(|_| ReloadError::Build(format!("{shown}: not UTF-8")))?;
                KeySet::parse(text).map_err(|err| ReloadError::Build(format!("{shown}: {err}")))
            },
        )?;
        Ok(Self {
            keys: Some(keys),
            quotas: Arc::default(),
        })
    }

    /// Whether keys are required.
    pub fn is_open(&self) -> bool {
        self.keys.is_none()
    }

    /// How many keys the file holds now.
    pub fn key_count(&self) -> usize {
        self.keys
            .as_ref()
            .map_or(0, |keys| keys.current().keys.len())
    }

    /// The keys file, if any.
    pub fn file(&self) -> Option<PathBuf> {
        self.keys.as_ref().map(|keys| keys.files()[0].clone())
    }

    /// The caller an `authorization` header value names (a gateway without keys: anonymous).
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Caller, AuthError> {
        let Some(keys) = &self.keys else {
            return Ok(Caller::anonymous());
        };
        let header = authorization.ok_or(AuthError::Missing)?;
        let secret = bearer(header).ok_or(AuthError::Malformed)?;
        let keys = keys.current();
        let key = keys.find(secret).ok_or(AuthError::Unknown)?;
        let mut quotas = self.quotas.lock().unwrap_or_else(|err| err.into_inner());
        let quota = match quotas.get(&key.id) {
            Some(quota) if quota.quotas == key.quotas => Arc::clone(quota),
            _ => {
                let quota = Arc::new(KeyQuota::new(key.quotas));
                quotas.insert(key.id.clone(), Arc::clone(&quota));
                quota
            }
        };
        Ok(Caller {
            id: Arc::from(key.id.as_str()),
            quota: Some(quota),
        })
    }
}

/// The secret of `Bearer <secret>` (scheme case-insensitive, as RFC 7235 says).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let header = header.trim_ascii();
    let (scheme, rest) = header.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || !rest.first()?.is_ascii_whitespace() {
        return None;
    }
    let secret = rest.trim_ascii();
    (!secret.is_empty()).then_some(secret)
}

/// A new key for `id`: the secret (to show once) and the TOML entry holding its hash.
pub fn new_key(id: &str) -> Result<(String, String), String> {
    if !is_valid_id(id) {
        return Err(format!(
            "id `{id}` must be 1 to 64 characters of letters, digits, `-`, `_`, `.`"
        ));
    }
    let mut bytes = [0u8; 32];
    // The thread RNG is a CSPRNG (ChaCha12) seeded from the operating system.
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    let secret = format!("ksk_{}", hex(&bytes));
    let digest = Sha256::digest(secret.as_bytes());
    let entry = format!("\n[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\n", hex(&digest));
    Ok((secret, entry))
}

#[cfg(test)]
mod tests;
