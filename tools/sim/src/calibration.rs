//! Service times, measured on some hardware: the encoder's images/s by batch size and the decoder's step time by
//! batch size and context, plus the serving knobs the pools run with and a pod's start-up time.
//!
//! Policy:
//! - the file is TOML (`.toml`) or JSON (any other extension), with unknown keys refused; every number is
//!   checked and an error names its key (`decoder.step[2].ms`);
//! - encoder: a batch of `b` images takes `b / images_per_second(b)` seconds, with `images_per_second` linear between
//!   the measured batch sizes and flat beyond the last one (a device saturates); below the first point it is the
//!   first point's rate;
//! - decoder: one packed step with `r` decoding rows at mean context `c` takes `ms(r, c)`, linear in `r` between
//!   measured batch sizes (and extended along the last segment beyond the largest one), linear in `c` between
//!   measured contexts and flat outside them; the prompt tokens prefilled in the same step add
//!   `tokens / prefill_tokens_per_second`. A step of prefills only costs the prefill term.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, SimError};

/// How long one encoder batch takes around its calibrated mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceDistribution {
    /// Exactly the calibrated time (a GPU kernel sequence varies little).
    #[default]
    Deterministic,
    /// Exponentially distributed with the calibrated mean (queueing-theory checks: M/M/c).
    Exponential,
}

/// A measured service-time model for one hardware class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// A short name, shown in reports.
    pub name: String,
    /// Where the numbers come from (measured, with the command, or assumed).
    pub source: String,
    /// Seconds from a pod's creation until it serves (scheduling, image pull, model load, readiness probe).
    pub pod_startup_seconds: f64,
    /// The vision-encoder pool.
    pub encoder: EncoderCalibration,
    /// The decoder pool.
    pub decoder: DecoderCalibration,
}

/// The encoder: dynamic batching knobs (`batching.*` of the encoder config) and measured throughput.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderCalibration {
    /// `batching.max_batch_images`: most images per model call.
    pub max_batch_images: u32,
    /// `batching.max_queue_delay`: seconds the first image of a batch waits for more.
    pub max_queue_delay_seconds: f64,
    /// `batching.max_queued_images`: images admitted and not yet running, per replica.
    pub max_queued_images: u32,
    /// Variability of a batch's time around the calibrated mean.
    #[serde(default)]
    pub service: ServiceDistribution,
    /// Measured images/s at each batch size.
    pub throughput: Vec<EncoderPoint>,
}

/// One encoder measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderPoint {
    /// Images per model call.
    pub batch: u32,
    /// Images encoded per second at that batch size.
    pub images_per_second: f64,
}

/// The decoder: continuous-batching knobs (`scheduler.*` of the decoder config) and measured step times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderCalibration {
    /// `scheduler.max_running_sequences`: most sequences in a step.
    pub max_running_sequences: u32,
    /// `scheduler.max_waiting_requests`: waiting queue bound per replica.
    pub max_waiting_requests: u32,
    /// `scheduler.max_prefill_tokens_per_step`: prompt tokens admitted into one step (one longer prompt runs alone).
    pub max_prefill_tokens_per_step: u32,
    /// Prompt tokens prefilled per second.
    pub prefill_tokens_per_second: f64,
    /// Decoder positions one image takes in the prompt (the model's latent queries; 64 for Kosmos-2).
    pub image_tokens: u32,
    /// Measured time of one packed decode step.
    pub step: Vec<StepPoint>,
}

/// One decoder measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepPoint {
    /// Decoding rows (sequences) in the step.
    pub batch: u32,
    /// Mean tokens in each row's cache during the measurement.
    pub context: u32,
    /// Milliseconds per step.
    pub ms: f64,
}

impl Calibration {
    /// Reads and checks a calibration file (TOML for `.toml`, JSON otherwise).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_error = |message: String| SimError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let calibration: Calibration = if path.extension().is_some_and(|ext| ext == "toml") {
            toml::from_str(&text).map_err(|err| parse_error(err.to_string()))?
        } else {
            serde_json::from_str(&text).map_err(|err| parse_error(err.to_string()))?
        };
        calibration.validate()?;
        Ok(calibration)
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<()> {
        positive("pod_startup_seconds", self.pod_startup_seconds, true)?;
        let encoder = &self.encoder;
        at_least_one("encoder.max_batch_images", encoder.max_batch_images)?;
        positive(
            "encoder.max_queue_delay_seconds",
            encoder.max_queue_delay_seconds,
            true,
        )?;
        at_least_one("encoder.max_queued_images", encoder.max_queued_images)?;
        if encoder.throughput.is_empty() {
            return Err(calibration_error(
                "encoder.throughput",
                "needs at least one point",
            ));
        }
        let mut previous_batch = 0;
        for (index, point) in encoder.throughput.iter().enumerate() {
            let key = format!("encoder.throughput[{index}]");
            if point.batch <= previous_batch {
                return Err(calibration_error(
                    &format!("{key}.batch"),
                    &format!(
                        "batch sizes must be >= 1 and increasing, got {} after {previous_batch}",
                        point.batch
                    ),
                ));
            }
            previous_batch = point.batch;
            positive(
                &format!("{key}.images_per_second"),
                point.images_per_second,
                false,
            )?;
        }
        let decoder = &self.decoder;
        at_least_one(
            "decoder.max_running_sequences",
            decoder.max_running_sequences,
        )?;
        at_least_one("decoder.max_waiting_requests", decoder.max_waiting_requests)?;
        at_least_one(
            "decoder.max_prefill_tokens_per_step",
            decoder.max_prefill_tokens_per_step,
        )?;
        positive(
            "decoder.prefill_tokens_per_second",
            decoder.prefill_tokens_per_second,
            false,
        )?;
        if decoder.step.is_empty() {
            return Err(calibration_error(
                "decoder.step",
                "needs at least one point",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (index, point) in decoder.step.iter().enumerate() {
            let key = format!("decoder.step[{index}]");
            at_least_one(&format!("{key}.batch"), point.batch)?;
            positive(&format!("{key}.ms"), point.ms, false)?;
            if !seen.insert((point.context, point.batch)) {
                return Err(calibration_error(
                    &key,
                    &format!(
                        "batch {} at context {} is given twice",
                        point.batch, point.context
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Mean seconds one encoder batch of `images` images takes.
    pub fn encoder_batch_seconds(&self, images: u32) -> f64 {
        let points: Vec<(f64, f64)> = self
            .encoder
            .throughput
            .iter()
            .map(|point| (f64::from(point.batch), point.images_per_second))
            .collect();
        let rate = interpolate(&points, f64::from(images), Extend::Flat);
        f64::from(images) / rate
    }

    /// Seconds one decoder step takes with `decode_rows` decoding rows at mean context `mean_context` and
    /// `prefill_tokens` prompt tokens prefilled in the same step.
    pub fn decoder_step_seconds(
        &self,
        decode_rows: u32,
        mean_context: f64,
        prefill_tokens: u32,
    ) -> f64 {
        let prefill = f64::from(prefill_tokens) / self.decoder.prefill_tokens_per_second;
        if decode_rows == 0 {
            return prefill;
        }
        let mut by_context: BTreeMap<u32, Vec<(f64, f64)>> = BTreeMap::new();
        for point in &self.decoder.step {
            by_context
                .entry(point.context)
                .or_default()
                .push((f64::from(point.batch), point.ms));
        }
        let per_context: Vec<(f64, f64)> = by_context
            .into_iter()
            .map(|(context, mut points)| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                (
                    f64::from(context),
                    interpolate(&points, f64::from(decode_rows), Extend::Linear),
                )
            })
            .collect();
        let ms = interpolate(&per_context, mean_context, Extend::Flat);
        ms / 1000.0 + prefill
    }
}

/// What [`interpolate`] does beyond the last point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extend {
    /// The last value.
    Flat,
    /// Along the last segment (never below the last value).
    Linear,
}

/// Piecewise-linear `y(x)` through `points` (sorted by x, at least one); flat before the first point.
fn interpolate(points: &[(f64, f64)], x: f64, extend: Extend) -> f64 {
    let Some(&(first_x, first_y)) = points.first() else {
        return 0.0;
    };
    if x <= first_x {
        return first_y;
    }
    for pair in points.windows(2) {
        let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
        if x <= x1 {
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0);
        }
    }
    let (last_x, last_y) = points[points.len() - 1];
    match (extend, points.len()) {
        (Extend::Linear, len) if len >= 2 => {
            let (x0, y0) = points[len - 2];
            let slope = (last_y - y0) / (last_x - x0);
            (last_y + slope * (x - last_x)).max(last_y)
        }
        _ => last_y,
    }
}

fn calibration_error(key: &str, message: &str) -> SimError {
    SimError::Calibration {
        key: key.to_owned(),
        message: message.to_owned(),
    }
}

fn positive(key: &str, value: f64, zero_allowed: bool) -> Result<()> {
    let ok = value.is_finite() && (value > 0.0 || (zero_allowed && value == 0.0));
    if ok {
        Ok(())
    } else {
        let bound = if zero_allowed { ">= 0" } else { "> 0" };
        Err(calibration_error(
            key,
            &format!("must be a finite number {bound}, got {value}"),
        ))
    }
}

fn at_least_one(key: &str, value: u32) -> Result<()> {
    if value >= 1 {
        Ok(())
    } else {
        Err(calibration_error(
            key,
            &format!("must be >= 1, got {value}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> Calibration {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("calibration")
            .join(name);
        match Calibration::load(&path) {
            Ok(calibration) => calibration,
            Err(err) => panic!("{err}"),
        }
    }

    #[test]
    fn the_shipped_calibrations_load() {
        let cpu = shipped("cpu-2core.toml");
        let gpu = shipped("gpu-class-assumed.toml");
        assert_eq!(cpu.encoder.max_batch_images, 16);
        assert!(gpu.source.contains("ASSUMED"), "{}", gpu.source);
    }

    #[test]
    fn encoder_time_interpolates_the_rate_and_saturates() {
        let cpu = shipped("cpu-2core.toml");
        // 1.09 images/s at batch 1 (encoder README).
        assert!((cpu.encoder_batch_seconds(1) - 1.0 / 1.09).abs() < 1e-9);
        // Beyond the last batch size the rate stays flat: time grows linearly.
        let at_16 = cpu.encoder_batch_seconds(16);
        assert!((cpu.encoder_batch_seconds(32) - 2.0 * at_16).abs() < 1e-9);
    }

    #[test]
    fn decoder_step_interpolates_batch_and_context() {
        let gpu = shipped("gpu-class-assumed.toml");
        let small = gpu.decoder_step_seconds(1, 512.0, 0);
        let large = gpu.decoder_step_seconds(32, 512.0, 0);
        let long_context = gpu.decoder_step_seconds(32, 2048.0, 0);
        assert!(small < large && large < long_context);
        let with_prefill = gpu.decoder_step_seconds(32, 512.0, 1000);
        let expected = large + 1000.0 / gpu.decoder.prefill_tokens_per_second;
        assert!((with_prefill - expected).abs() < 1e-12);
        assert_eq!(
            gpu.decoder_step_seconds(0, 0.0, 300),
            300.0 / gpu.decoder.prefill_tokens_per_second
        );
    }

    #[test]
    fn a_bad_value_is_named_by_its_key() {
        let mut calibration = shipped("cpu-2core.toml");
        calibration.decoder.step[1].ms = -3.0;
        let message = match calibration.validate() {
            Err(err) => err.to_string(),
            Ok(()) => panic!("accepted a negative step time"),
        };
        assert!(message.contains("decoder.step[1].ms"), "{message}");
        assert!(message.contains("-3"), "{message}");
    }
}
