//! Traffic traces: generated from a [`TraceSpec`] (a diurnal cycle, bursts, a drifting image-heavy share) with a
//! seeded ChaCha stream, or read from a JSON-lines file.
//!
//! Policy:
//! - arrivals are a non-homogeneous Poisson process drawn by thinning: rate(t) = `mean_rate` × (1 + `diurnal_amplitude`
//!   × sin(2π t / `diurnal_period_seconds` − π/2)) (the trace starts at the trough), multiplied by
//!   `bursts.rate_multiplier` inside a burst;
//! - bursts start as a Poisson process of `bursts.per_hour`, each lasting `bursts.duration_seconds`;
//! - each request is image-heavy with probability share(t) = `image_heavy_share` + `image_heavy_share_amplitude` ×
//!   sin(2π t / `image_heavy_share_period_seconds`) (clamped to [0, 1]), or `bursts.image_heavy_share` inside a
//!   burst; its images, prompt and output lengths are uniform in its class's ranges;
//! - a trace file holds one JSON object per line: `{"arrival": s, "images": n, "prompt_tokens": n,
//!   "output_tokens": n, "image_heavy": bool}`, arrivals non-decreasing; an error names the line.

use std::io::Write as _;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, SimError};

/// One client request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Seconds from the trace start.
    pub arrival: f64,
    /// Distinct images (each is one encode call; the embedding cache is not modelled, every image misses).
    pub images: u32,
    /// Text tokens of the prompt (the decoder also prefills `images × image_tokens` positions).
    pub prompt_tokens: u32,
    /// Tokens generated (at least 1).
    pub output_tokens: u32,
    /// Whether it came from the image-heavy class (reporting only).
    #[serde(default)]
    pub image_heavy: bool,
}

/// The shape of one request class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestClass {
    /// Fewest images.
    pub images_min: u32,
    /// Most images.
    pub images_max: u32,
    /// Shortest text prompt.
    pub prompt_tokens_min: u32,
    /// Longest text prompt.
    pub prompt_tokens_max: u32,
    /// Shortest output.
    pub output_tokens_min: u32,
    /// Longest output.
    pub output_tokens_max: u32,
}

/// Bursts on top of the diurnal rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bursts {
    /// Mean bursts per hour (0: none).
    pub per_hour: f64,
    /// Length of one burst.
    pub duration_seconds: f64,
    /// Rate multiplier inside a burst.
    pub rate_multiplier: f64,
    /// Image-heavy share inside a burst.
    pub image_heavy_share: f64,
}

/// A generated traffic pattern.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSpec {
    /// Length of the trace.
    pub duration_seconds: f64,
    /// Mean arrival rate over a diurnal period (requests/s), bursts excluded.
    pub mean_rate: f64,
    /// Relative amplitude of the diurnal cycle, in [0, 1).
    pub diurnal_amplitude: f64,
    /// Length of one diurnal cycle (a compressed "day" keeps runs short).
    pub diurnal_period_seconds: f64,
    /// Mean share of image-heavy requests.
    pub image_heavy_share: f64,
    /// Amplitude of the share's drift.
    pub image_heavy_share_amplitude: f64,
    /// Period of the share's drift.
    pub image_heavy_share_period_seconds: f64,
    /// Bursts.
    pub bursts: Bursts,
    /// The image-heavy class.
    pub image_heavy: RequestClass,
    /// The image-light class.
    pub image_light: RequestClass,
}

/// The built-in traffic patterns.
pub const PRESETS: [&str; 3] = ["image-heavy", "image-light", "shifting"];

impl TraceSpec {
    /// A built-in pattern at the given mean rate (requests/s) over `duration_seconds` (also the diurnal period).
    ///
    /// - `image-heavy`: 85 % image-heavy requests (captioning / grounding of several images, short answers);
    /// - `image-light`: 10 % image-heavy, the rest text chat with at most one image and long answers;
    /// - `shifting`: the share swings between 10 % and 90 % twice per day, with image-heavy bursts.
    pub fn preset(name: &str, mean_rate: f64, duration_seconds: f64) -> Result<Self> {
        let image_heavy = RequestClass {
            images_min: 4,
            images_max: 8,
            prompt_tokens_min: 8,
            prompt_tokens_max: 32,
            output_tokens_min: 8,
            output_tokens_max: 32,
        };
        let image_light = RequestClass {
            images_min: 0,
            images_max: 1,
            prompt_tokens_min: 64,
            prompt_tokens_max: 512,
            output_tokens_min: 64,
            output_tokens_max: 256,
        };
        let no_bursts = Bursts {
            per_hour: 0.0,
            duration_seconds: 120.0,
            rate_multiplier: 1.0,
            image_heavy_share: 0.5,
        };
        let base = Self {
            duration_seconds,
            mean_rate,
            diurnal_amplitude: 0.6,
            diurnal_period_seconds: duration_seconds,
            image_heavy_share: 0.5,
            image_heavy_share_amplitude: 0.0,
            image_heavy_share_period_seconds: duration_seconds,
            bursts: no_bursts,
            image_heavy,
            image_light,
        };
        let spec = match name {
            "image-heavy" => Self {
                image_heavy_share: 0.85,
                ..base
            },
            "image-light" => Self {
                image_heavy_share: 0.1,
                ..base
            },
            "shifting" => Self {
                image_heavy_share: 0.5,
                image_heavy_share_amplitude: 0.4,
                image_heavy_share_period_seconds: duration_seconds / 2.0,
                bursts: Bursts {
                    per_hour: 1.0,
                    duration_seconds: 180.0,
                    rate_multiplier: 2.5,
                    image_heavy_share: 0.95,
                },
                ..base
            },
            other => {
                return Err(SimError::Trace {
                    key: "preset".to_owned(),
                    message: format!("unknown preset `{other}`; one of {}", PRESETS.join(", ")),
                });
            }
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Reads a spec from a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let spec: Self = toml::from_str(&text).map_err(|err| SimError::Parse {
            path: path.to_path_buf(),
            message: err.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<()> {
        let check = |key: &str, ok: bool, value: f64, bound: &str| -> Result<()> {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(SimError::Trace {
                    key: key.to_owned(),
                    message: format!("must be {bound}, got {value}"),
                })
            }
        };
        check(
            "duration_seconds",
            self.duration_seconds > 0.0,
            self.duration_seconds,
            "> 0",
        )?;
        check("mean_rate", self.mean_rate > 0.0, self.mean_rate, "> 0")?;
        check(
            "diurnal_amplitude",
            (0.0..1.0).contains(&self.diurnal_amplitude),
            self.diurnal_amplitude,
            "in [0, 1)",
        )?;
        check(
            "diurnal_period_seconds",
            self.diurnal_period_seconds > 0.0,
            self.diurnal_period_seconds,
            "> 0",
        )?;
        check(
            "image_heavy_share",
            (0.0..=1.0).contains(&self.image_heavy_share),
            self.image_heavy_share,
            "in [0, 1]",
        )?;
        check(
            "image_heavy_share_amplitude",
            (0.0..=1.0).contains(&self.image_heavy_share_amplitude),
            self.image_heavy_share_amplitude,
            "in [0, 1]",
        )?;
        check(
            "image_heavy_share_period_seconds",
            self.image_heavy_share_period_seconds > 0.0,
            self.image_heavy_share_period_seconds,
            "> 0",
        )?;
        check(
            "bursts.per_hour",
            self.bursts.per_hour >= 0.0,
            self.bursts.per_hour,
            ">= 0",
        )?;
        check(
            "bursts.duration_seconds",
            self.bursts.duration_seconds > 0.0,
            self.bursts.duration_seconds,
            "> 0",
        )?;
        check(
            "bursts.rate_multiplier",
            self.bursts.rate_multiplier >= 1.0,
            self.bursts.rate_multiplier,
            ">= 1",
        )?;
        check(
            "bursts.image_heavy_share",
            (0.0..=1.0).contains(&self.bursts.image_heavy_share),
            self.bursts.image_heavy_share,
            "in [0, 1]",
        )?;
        for (name, class) in [
            ("image_heavy", &self.image_heavy),
            ("image_light", &self.image_light),
        ] {
            let ranges = [
                ("images", class.images_min, class.images_max),
                (
                    "prompt_tokens",
                    class.prompt_tokens_min,
                    class.prompt_tokens_max,
                ),
                (
                    "output_tokens",
                    class.output_tokens_min,
                    class.output_tokens_max,
                ),
            ];
            for (field, min, max) in ranges {
                if min > max {
                    return Err(SimError::Trace {
                        key: format!("{name}.{field}_min"),
                        message: format!("{min} is above {field}_max {max}"),
                    });
                }
            }
            if class.output_tokens_min == 0 {
                return Err(SimError::Trace {
                    key: format!("{name}.output_tokens_min"),
                    message: "must be >= 1, got 0".to_owned(),
                });
            }
        }
        Ok(())
    }

    /// The diurnal rate at `time` (bursts excluded).
    pub fn diurnal_rate(&self, time: f64) -> f64 {
        let phase = std::f64::consts::TAU * time / self.diurnal_period_seconds
            - std::f64::consts::FRAC_PI_2;
        self.mean_rate * (1.0 + self.diurnal_amplitude * phase.sin())
    }

    /// The image-heavy share at `time` outside bursts.
    pub fn image_heavy_share_at(&self, time: f64) -> f64 {
        let phase = std::f64::consts::TAU * time / self.image_heavy_share_period_seconds;
        (self.image_heavy_share + self.image_heavy_share_amplitude * phase.sin()).clamp(0.0, 1.0)
    }

    /// The requests of the pattern, for `seed`.
    pub fn generate(&self, seed: u64) -> Vec<Request> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut bursts = Vec::new();
        if self.bursts.per_hour > 0.0 {
            let mut time = 0.0;
            loop {
                time += exponential(&mut rng, self.bursts.per_hour / 3600.0);
                if time >= self.duration_seconds {
                    break;
                }
                bursts.push((time, time + self.bursts.duration_seconds));
            }
        }
        let in_burst = |time: f64| {
            bursts
                .iter()
                .any(|(start, end)| (*start..*end).contains(&time))
        };
        let peak_rate =
            self.mean_rate * (1.0 + self.diurnal_amplitude) * self.bursts.rate_multiplier;
        let mut requests = Vec::new();
        let mut time = 0.0;
        loop {
            time += exponential(&mut rng, peak_rate);
            if time >= self.duration_seconds {
                break;
            }
            let bursting = in_burst(time);
            let multiplier = if bursting {
                self.bursts.rate_multiplier
            } else {
                1.0
            };
            let rate = self.diurnal_rate(time) * multiplier;
            if rng.random::<f64>() * peak_rate >= rate {
                continue;
            }
            let share = if bursting {
                self.bursts.image_heavy_share
            } else {
                self.image_heavy_share_at(time)
            };
            let image_heavy = rng.random::<f64>() < share;
            let class = if image_heavy {
                &self.image_heavy
            } else {
                &self.image_light
            };
            requests.push(Request {
                arrival: time,
                images: rng.random_range(class.images_min..=class.images_max),
                prompt_tokens: rng.random_range(class.prompt_tokens_min..=class.prompt_tokens_max),
                output_tokens: rng.random_range(class.output_tokens_min..=class.output_tokens_max),
                image_heavy,
            });
        }
        requests
    }
}

/// An exponential draw of rate `rate` (inverse transform; `1 - u` is in (0, 1]).
pub fn exponential(rng: &mut impl Rng, rate: f64) -> f64 {
    -(1.0 - rng.random::<f64>()).ln() / rate
}

/// Reads a JSON-lines trace; blank lines are skipped.
pub fn read_trace(path: &Path) -> Result<Vec<Request>> {
    let text = std::fs::read_to_string(path).map_err(|source| SimError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut requests: Vec<Request> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let key = format!("{}: line {}", path.display(), index + 1);
        let request: Request = serde_json::from_str(line).map_err(|err| SimError::Trace {
            key: key.clone(),
            message: err.to_string(),
        })?;
        if !request.arrival.is_finite() || request.arrival < 0.0 {
            return Err(SimError::Trace {
                key,
                message: format!(
                    "arrival must be a finite number >= 0, got {}",
                    request.arrival
                ),
            });
        }
        if requests
            .last()
            .is_some_and(|last| last.arrival > request.arrival)
        {
            return Err(SimError::Trace {
                key,
                message: "arrivals must not decrease".to_owned(),
            });
        }
        if request.output_tokens == 0 {
            return Err(SimError::Trace {
                key,
                message: "output_tokens must be >= 1, got 0".to_owned(),
            });
        }
        requests.push(request);
    }
    Ok(requests)
}

/// Writes a trace as JSON lines.
pub fn write_trace(path: &Path, requests: &[Request]) -> Result<()> {
    let write_error = |source| SimError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(path).map_err(write_error)?;
    let mut writer = std::io::BufWriter::new(file);
    for request in requests {
        let line = serde_json::to_string(request).map_err(|err| SimError::Parse {
            path: path.to_path_buf(),
            message: err.to_string(),
        })?;
        writeln!(writer, "{line}").map_err(write_error)?;
    }
    writer.flush().map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_trace_follows_its_mean_rate_and_share() {
        let spec = match TraceSpec::preset("image-heavy", 5.0, 7200.0) {
            Ok(spec) => spec,
            Err(err) => panic!("{err}"),
        };
        let requests = spec.generate(3);
        let rate = requests.len() as f64 / spec.duration_seconds;
        assert!((rate - 5.0).abs() < 0.25, "rate {rate}");
        let heavy =
            requests.iter().filter(|r| r.image_heavy).count() as f64 / requests.len() as f64;
        assert!((heavy - 0.85).abs() < 0.02, "share {heavy}");
        assert!(
            requests
                .windows(2)
                .all(|pair| pair[0].arrival <= pair[1].arrival)
        );
    }

    #[test]
    fn a_trace_file_round_trips() {
        let spec = match TraceSpec::preset("shifting", 1.0, 600.0) {
            Ok(spec) => spec,
            Err(err) => panic!("{err}"),
        };
        let requests = spec.generate(9);
        let path =
            std::env::temp_dir().join(format!("kosmos-sim-trace-{}.jsonl", std::process::id()));
        let written = write_trace(&path, &requests);
        let read = read_trace(&path);
        let _ = std::fs::remove_file(&path);
        assert!(written.is_ok(), "{written:?}");
        let read = match read {
            Ok(read) => read,
            Err(err) => panic!("{err}"),
        };
        assert_eq!(read.len(), requests.len());
        // serde_json's float parsing may differ from the written value in the last bit.
        for (back, original) in read.iter().zip(&requests) {
            assert!((back.arrival - original.arrival).abs() < 1e-9);
            assert_eq!(
                (
                    back.images,
                    back.prompt_tokens,
                    back.output_tokens,
                    back.image_heavy
                ),
                (
                    original.images,
                    original.prompt_tokens,
                    original.output_tokens,
                    original.image_heavy
                )
            );
        }
    }

    #[test]
    fn a_bad_trace_line_is_named() {
        let path =
            std::env::temp_dir().join(format!("kosmos-sim-bad-{}.jsonl", std::process::id()));
        let text = "{\"arrival\": 1.0, \"images\": 1, \"prompt_tokens\": 4, \"output_tokens\": 2}\n\
                    {\"arrival\": 0.5, \"images\": 1, \"prompt_tokens\": 4, \"output_tokens\": 2}\n";
        let written = std::fs::write(&path, text);
        let read = read_trace(&path);
        let _ = std::fs::remove_file(&path);
        assert!(written.is_ok());
        let message = match read {
            Err(err) => err.to_string(),
            Ok(_) => panic!("accepted decreasing arrivals"),
        };
        assert!(
            message.contains("line 2") && message.contains("decrease"),
            "{message}"
        );
    }
}
