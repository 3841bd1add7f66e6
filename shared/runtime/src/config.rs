//! Layered configuration: defaults < TOML file < environment < flags, then one typed deserialisation whose errors
//! name the offending key.
//!
//! A service declares its config as a `serde` struct with `#[serde(deny_unknown_fields, default)]` and a
//! `Default`. The layers are merged as JSON trees: a file sets any subset of keys, an environment variable
//! `PREFIX__SECTION__KEY=value` sets `section.key`, a flag override `section.key=value` likewise. Values from the
//! environment and flags are parsed as JSON when they parse (numbers, booleans, arrays) and taken as strings
//! otherwise. Tests pass the environment as a list instead of touching the process environment.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A key is unknown or has the wrong type.
    #[error("config key `{key}`: {message}")]
    Key {
        /// Dotted path of the key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// An override is not `key=value`.
    #[error("override `{0}` is not of the form key=value")]
    Override(String),
}

/// The sources of a configuration, lowest precedence first (after the defaults).
#[derive(Debug, Default, Clone)]
pub struct Layers {
    /// A TOML file.
    pub file: Option<PathBuf>,
    /// Environment variables (name, value); only those starting with `env_prefix` + `__` are used.
    pub env: Vec<(String, String)>,
    /// The prefix of the service's variables, e.g. `KOSMOS_DECODER`.
    pub env_prefix: String,
    /// Flag overrides as `dotted.key=value`.
    pub overrides: Vec<String>,
}

impl Layers {
    /// Layers with the process environment and the given file and overrides.
    pub fn from_process(env_prefix: &str, file: Option<PathBuf>, overrides: Vec<String>) -> Self {
        Self {
            file,
            env: std::env::vars().collect(),
            env_prefix: env_prefix.to_string(),
            overrides,
        }
    }
}

/// Merges the layers over `T::default()` and deserialises the result.
pub fn load<T: Serialize + DeserializeOwned + Default>(layers: &Layers) -> Result<T, ConfigError> {
    let mut tree = serde_json::to_value(T::default()).map_err(|err| ConfigError::Key {
        key: ".".into(),
        message: err.to_string(),
    })?;
    if let Some(path) = &layers.file {
        merge(&mut tree, read_toml(path)?);
    }
    let env_prefix = format!("{}__", layers.env_prefix);
    for (name, value) in &layers.env {
        if let Some(rest) = name.strip_prefix(&env_prefix) {
            let key = rest.to_ascii_lowercase().replace("__", ".");
            set_path(&mut tree, &key, parse_scalar(value));
        }
    }
    for item in &layers.overrides {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| ConfigError::Override(item.clone()))?;
        set_path(&mut tree, key.trim(), parse_scalar(value.trim()));
    }
    serde_path_to_error::deserialize(tree).map_err(|err| ConfigError::Key {
        key: err.path().to_string(),
        message: err.inner().to_string(),
    })
}

fn read_toml(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let value: toml::Value = toml::from_str(&text).map_err(|err| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: err.to_string(),
    })?;
    serde_json::to_value(value).map_err(|err| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: err.to_string(),
    })
}

/// Deep merge: objects merge key by key, anything else replaces.
fn merge(base: &mut Value, top: Value) {
    match (base, top) {
        (Value::Object(base), Value::Object(top)) => {
            for (key, value) in top {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, top) => *base = top,
    }
}

fn set_path(tree: &mut Value, dotted: &str, value: Value) {
    let mut node = tree;
    for part in dotted.split('.') {
        if !node.is_object() {
            *node = Value::Object(serde_json::Map::new());
        }
        let Value::Object(map) = node else { return };
        node = map.entry(part.to_string()).or_insert(Value::Null);
    }
    *node = value;
}

fn parse_scalar(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Serde helpers for durations written as seconds (`0.005`) in config files.
pub mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises a duration as fractional seconds.
    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(duration.as_secs_f64())
    }

    /// Reads fractional seconds; negative or non-finite values are an error.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let seconds = f64::deserialize(deserializer)?;
        Duration::try_from_secs_f64(seconds).map_err(|_| {
            serde::de::Error::custom(format!(
                "expected a non-negative number of seconds, got {seconds}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Example {
        listen: String,
        limits: Limits,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Limits {
        max_images: u32,
        formats: Vec<String>,
    }

    impl Default for Example {
        fn default() -> Self {
            Self {
                listen: "127.0.0.1:1".into(),
                limits: Limits::default(),
            }
        }
    }

    impl Default for Limits {
        fn default() -> Self {
            Self {
                max_images: 4,
                formats: vec!["png".into()],
            }
        }
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("kosmos-runtime-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn later_layers_win_key_by_key() {
        let file = temp_file(
            "layers",
            "listen = \"0.0.0.0:9\"\n[limits]\nmax_images = 8\n",
        );
        let layers = Layers {
            file: Some(file),
            env: vec![
                ("KOSMOS_X__LIMITS__MAX_IMAGES".into(), "16".into()),
                ("OTHER__LISTEN".into(), "ignored".into()),
            ],
            env_prefix: "KOSMOS_X".into(),
            overrides: vec!["limits.formats=[\"png\",\"jpeg\"]".into()],
        };
        let config: Example = load(&layers).expect("loads");
        assert_eq!(config.listen, "0.0.0.0:9");
        assert_eq!(config.limits.max_images, 16);
        assert_eq!(config.limits.formats, vec!["png", "jpeg"]);
    }

    #[test]
    fn an_unknown_or_mistyped_key_is_named() {
        let layers = Layers {
            overrides: vec!["limits.max_imagez=3".into()],
            ..Layers::default()
        };
        let err = load::<Example>(&layers).expect_err("unknown key");
        assert!(err.to_string().contains("max_imagez"), "{err}");
        let layers = Layers {
            overrides: vec!["limits.max_images=many".into()],
            ..Layers::default()
        };
        let err = load::<Example>(&layers).expect_err("wrong type");
        assert!(err.to_string().contains("limits.max_images"), "{err}");
    }
}

/// A key whose value is invalid; the message says what is wrong and what was given.
pub fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.to_string(),
        message: message.into(),
    }
}

/// `value` as a count of at least 1, or an error naming `key`.
pub fn positive(key: &str, value: u64) -> Result<NonZeroUsize, ConfigError> {
    usize::try_from(value)
        .ok()
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| invalid(key, format!("must be at least 1, got {value}")))
}

/// `text` as a socket address (`host:port`), or an error naming `key`.
pub fn address(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim().parse().map_err(|err| {
        invalid(
            key,
            format!("`{text}` is not an address (host:port): {err}"),
        )
    })
}

/// `path` when it is not empty, or an error naming `key` (a model directory every service needs).
pub fn required_path(key: &str, path: &Path) -> Result<PathBuf, ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(invalid(key, "a directory is required"));
    }
    Ok(path.to_path_buf())
}

/// `[server]`: where the gRPC server listens, how long it drains, how it logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// Address the gRPC server binds (`host:port`; port 0: any free port).
    pub listen: String,
    /// How long in-flight calls may take to finish after shutdown begins.
    #[serde(rename = "drain_timeout_seconds", with = "seconds")]
    pub drain_timeout: Duration,
    /// Log JSON lines instead of text.
    pub log_json: bool,
    /// A second, plaintext port serving grpc.health.v1 only (the kubelet's gRPC probes cannot speak TLS);
    /// empty: none.
    pub health_listen: String,
}

impl RawServer {
    /// The defaults of a service whose gRPC port is `port` (gateway 50051, encoder 50052, decoder 50053).
    pub fn on_port(port: u16) -> Self {
        Self {
            listen: format!("0.0.0.0:{port}"),
            drain_timeout: Duration::from_secs(30),
            log_json: false,
            health_listen: String::new(),
        }
    }
}

impl Default for RawServer {
    fn default() -> Self {
        Self::on_port(50051)
    }
}

/// `[grpc]`: transport settings of the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawGrpc {
    /// Largest request and response message, in bytes (tonic's 4 MiB default is below a request of a few photos).
    pub max_message_bytes: u64,
    /// Interval of HTTP/2 keepalive pings to idle clients; 0: none.
    #[serde(rename = "keepalive_interval_seconds", with = "seconds")]
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[serde(rename = "keepalive_timeout_seconds", with = "seconds")]
    pub keepalive_timeout: Duration,
    /// Most concurrent HTTP/2 streams (calls) one connection may open.
    pub max_concurrent_streams: u32,
}

impl Default for RawGrpc {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 << 20,
            // Pings find peers that vanished without closing (a node lost, a NAT entry expired).
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            max_concurrent_streams: 256,
        }
    }
}

/// The `[metrics]` section every service shares: where `GET /metrics` is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    /// Address the `/metrics` HTTP server binds (`host:port`; port 0: any free port).
    pub listen: String,
    /// When `listen` is taken, serve on any free port instead (and log where) rather than fail.
    pub fallback_to_free_port: bool,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9090".into(),
            fallback_to_free_port: false,
        }
    }
}

/// The validated `[server]`, `[grpc]` and `[metrics]` sections: everything the service lifecycle
/// ([`crate::service`]) needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// gRPC listen address (`server.listen`).
    pub listen: SocketAddr,
    /// Drain period after shutdown begins (`server.drain_timeout_seconds`).
    pub drain_timeout: Duration,
    /// JSON log lines (`server.log_json`).
    pub log_json: bool,
    /// Largest gRPC message both ways (`grpc.max_message_bytes`).
    pub max_message_bytes: NonZeroUsize,
    /// HTTP/2 keepalive ping interval, if any (`grpc.keepalive_interval_seconds`).
    pub keepalive_interval: Option<Duration>,
    /// Keepalive ping timeout (`grpc.keepalive_timeout_seconds`).
    pub keepalive_timeout: Duration,
    /// `/metrics` listen address (`metrics.listen`).
    pub metrics_listen: SocketAddr,
    /// Whether a taken `metrics.listen` falls back to a free port (`metrics.fallback_to_free_port`).
    pub metrics_fallback: bool,
    /// Concurrent calls per connection (`grpc.max_concurrent_streams`).
    pub max_concurrent_streams: u32,
    /// TLS, when `[tls]` is set.
    pub tls: Option<crate::tls::TlsSettings>,
    /// The plaintext health-only port (`server.health_listen`), if any.
    pub health_listen: Option<SocketAddr>,
}

/// The smallest `grpc.max_message_bytes` accepted.
const MIN_MESSAGE_BYTES: u64 = 1024;

impl ServerSettings {
    /// Validates the shared sections; every error names its key.
    pub fn from_raw(
        server: &RawServer,
        grpc: &RawGrpc,
        metrics: &RawMetrics,
        tls: &crate::tls::RawTls,
    ) -> Result<Self, ConfigError> {
        if grpc.max_concurrent_streams == 0 {
            return Err(invalid("grpc.max_concurrent_streams", "must be at least 1"));
        }
        // tonic takes the message limit as a usize and HTTP/2 frames count it in u32.
        let max_message_bytes = positive("grpc.max_message_bytes", grpc.max_message_bytes)?;
        if grpc.max_message_bytes < MIN_MESSAGE_BYTES
            || grpc.max_message_bytes > u64::from(u32::MAX)
        {
            return Err(invalid(
                "grpc.max_message_bytes",
                format!(
                    "must be between {MIN_MESSAGE_BYTES} and {}, got {}",
                    u32::MAX,
                    grpc.max_message_bytes
                ),
            ));
        }
        Ok(Self {
            listen: address("server.listen", &server.listen)?,
            drain_timeout: server.drain_timeout,
            log_json: server.log_json,
            max_message_bytes,
            keepalive_interval: (!grpc.keepalive_interval.is_zero())
                .then_some(grpc.keepalive_interval),
            keepalive_timeout: grpc.keepalive_timeout,
            metrics_listen: address("metrics.listen", &metrics.listen)?,
            metrics_fallback: metrics.fallback_to_free_port,
            max_concurrent_streams: grpc.max_concurrent_streams,
            tls: crate::tls::TlsSettings::from_raw(tls)?,
            health_listen: match server.health_listen.trim() {
                "" => None,
                text => Some(address("server.health_listen", text)?),
            },
        })
    }
}

/// `value` as a JSON string literal: a flag's value always stays a string in the overrides (a directory named
/// `2024` stays a path, not a number).
pub fn json_string(value: &str) -> String {
    Value::String(value.to_string()).to_string()
}

/// Builds flag overrides (`key=value`), each value quoted as what its type says.
#[derive(Debug, Default, Clone)]
pub struct Overrides(Vec<String>);

impl Overrides {
    /// No overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// `key` set to the string `value` (never re-read as a number or a boolean).
    pub fn string(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.0
            .push(format!("{key}={}", json_string(&value.to_string())));
        self
    }

    /// `key` set to `value` when there is one.
    pub fn string_opt(self, key: &str, value: Option<impl std::fmt::Display>) -> Self {
        match value {
            Some(value) => self.string(key, value),
            None => self,
        }
    }

    /// `key` set to the path `value`.
    pub fn path(self, key: &str, value: &Path) -> Self {
        self.string(key, value.display())
    }

    /// `key` set to a list of strings.
    pub fn strings<S: AsRef<str>>(mut self, key: &str, values: &[S]) -> Self {
        let list = Value::Array(
            values
                .iter()
                .map(|value| Value::String(value.as_ref().to_string()))
                .collect(),
        );
        self.0.push(format!("{key}={list}"));
        self
    }

    /// `key` set to the boolean `value`.
    pub fn flag(mut self, key: &str, value: bool) -> Self {
        self.0.push(format!("{key}={value}"));
        self
    }

    /// Raw `key=value` items (e.g. `--set`), parsed as JSON when they parse.
    pub fn raw<S: AsRef<str>>(mut self, items: impl IntoIterator<Item = S>) -> Self {
        self.0
            .extend(items.into_iter().map(|item| item.as_ref().to_string()));
        self
    }

    /// The overrides, in order (later wins).
    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

#[cfg(test)]
mod section_tests {
    use super::*;

    #[test]
    fn flag_values_stay_strings() {
        let overrides = Overrides::new()
            .string("model_dir", "2024")
            .string("device", "a\"b\\c")
            .strings("encoder.endpoints", &["http://x:1"])
            .into_vec();
        assert_eq!(overrides[0], "model_dir=\"2024\"");
        assert_eq!(overrides[1], "device=\"a\\\"b\\\\c\"");
        assert_eq!(overrides[2], "encoder.endpoints=[\"http://x:1\"]");
    }

    #[test]
    fn shared_sections_validate_and_name_their_keys() {
        let settings = ServerSettings::from_raw(
            &RawServer::on_port(50053),
            &RawGrpc::default(),
            &RawMetrics::default(),
            &crate::tls::RawTls::default(),
        )
        .expect("defaults are valid");
        assert_eq!(settings.listen, SocketAddr::from(([0, 0, 0, 0], 50053)));
        assert_eq!(settings.keepalive_interval, Some(Duration::from_secs(60)));
        assert_eq!(settings.tls, None);
        let bad_listen = RawServer {
            listen: "nowhere".into(),
            ..RawServer::default()
        };
        let err = ServerSettings::from_raw(
            &bad_listen,
            &RawGrpc::default(),
            &RawMetrics::default(),
            &crate::tls::RawTls::default(),
        )
        .expect_err("rejects");
        assert!(err.to_string().contains("server.listen"), "{err}");
        let tiny = RawGrpc {
            max_message_bytes: 10,
            ..RawGrpc::default()
        };
        let err = ServerSettings::from_raw(
            &RawServer::default(),
            &tiny,
            &RawMetrics::default(),
            &crate::tls::RawTls::default(),
        )
        .expect_err("rejects");
        assert!(err.to_string().contains("grpc.max_message_bytes"), "{err}");
        let closed = RawGrpc {
            max_concurrent_streams: 0,
            ..RawGrpc::default()
        };
        let err = ServerSettings::from_raw(
            &RawServer::default(),
            &closed,
            &RawMetrics::default(),
            &crate::tls::RawTls::default(),
        )
        .expect_err("rejects");
        assert!(
            err.to_string().contains("grpc.max_concurrent_streams"),
            "{err}"
        );
    }
}
