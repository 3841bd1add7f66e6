//! Layered configuration: defaults < TOML file < environment < flags, then one typed deserialisation whose errors
//! name the offending key.
//!
//! A service declares its config as a `serde` struct with `#[serde(deny_unknown_fields, default)]` and a
//! `Default`. The layers are merged as JSON trees: a file sets any subset of keys, an environment variable
//! `PREFIX__SECTION__KEY=value` sets `section.key`, a flag override `section.key=value` likewise. Values from the
//! environment and flags are parsed as JSON when they parse (numbers, booleans, arrays) and taken as strings
//! otherwise. Tests pass the environment as a list instead of touching the process environment.

use std::path::{Path, PathBuf};

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

/// The `[metrics]` section every service shares: where `GET /metrics` is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    /// Address the `/metrics` HTTP server binds (`host:port`; port 0: any free port).
    pub listen: String,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9090".into(),
        }
    }
}

impl RawMetrics {
    /// The validated address; the error names the key and the value.
    pub fn listen_address(&self) -> Result<std::net::SocketAddr, String> {
        self.listen.trim().parse().map_err(|err| {
            format!(
                "`metrics.listen` = `{}` is not an address (host:port): {err}",
                self.listen
            )
        })
    }
}
