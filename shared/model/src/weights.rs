//! Weight loading from `model.safetensors` by mmap, with errors that name the tensor and the expected shape.
//!
//! Unlike candle's `VarBuilder` this never falls back to anything: a tensor is there with the right shape,
//! or loading fails.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

struct Source {
    safetensors: MmapedSafetensors,
    path: PathBuf,
    dtype: DType,
    device: Device,
}

/// What the header says about one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    /// Full tensor name.
    pub name: String,
    /// Stored dtype, as safetensors names it.
    pub dtype: String,
    /// Stored shape.
    pub shape: Vec<usize>,
}

/// A view of a safetensors file under a name prefix, converting every tensor to one dtype and device.
#[derive(Clone)]
pub struct Weights {
    source: Arc<Source>,
    prefix: String,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("path", &self.source.path)
            .field("prefix", &self.prefix)
            .field("dtype", &self.source.dtype)
            .finish()
    }
}

impl Weights {
    /// Memory-maps the safetensors files `paths` (one file, or the shards of a sharded checkpoint) and reads their
    /// headers; `paths[0]` names the source in errors.
    pub fn from_mmaped_safetensors(
        paths: &[PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if dtype == DType::BF16 && device.is_cpu() {
            return Err(ModelError::InvalidInput(
                "bf16 is not supported on the cpu (candle has no bf16 matrix product there): use f32 or f16 on \
                 cpu, bf16 on cuda"
                    .into(),
            ));
        }
        let Some(path) = paths.first() else {
            return Err(ModelError::InvalidInput("no safetensors file given".into()));
        };
        for shard in paths {
            if let Err(source) = std::fs::metadata(shard) {
                return Err(ModelError::Io {
                    path: shard.clone(),
                    source,
                });
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on nobody truncating a
        // model file while the process runs (model directories are read-only volumes in deployment).
        let safetensors = unsafe { MmapedSafetensors::multi(paths)? };
        Ok(Self {
            source: Arc::new(Source {
                safetensors,
                path: path.to_path_buf(),
                dtype,
                device: device.clone(),
            }),
            prefix: String::new(),
        })
    }

    /// The same file under `prefix.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            source: self.source.clone(),
            prefix,
        }
    }

    /// The dtype every loaded tensor is converted to.
    pub fn dtype(&self) -> DType {
        self.source.dtype
    }

    /// The device every loaded tensor is placed on.
    pub fn device(&self) -> &Device {
        &self.source.device
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether `name` (under the prefix) is stored.
    pub fn contains(&self, name: &str) -> bool {
        self.source.safetensors.get(&self.full_name(name)).is_ok()
    }

    /// Loads `name` (under the prefix), checking its shape, converted to the target dtype and device.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let full_name = self.full_name(name);
        let view = match self.source.safetensors.get(&full_name) {
            Ok(view) => view,
            Err(_) => {
                return Err(ModelError::MissingTensor {
                    name: full_name,
                    expected: shape.to_vec(),
                    path: self.source.path.clone(),
                });
            }
        };
        if view.shape() != shape {
            return Err(ModelError::ShapeMismatch {
                name: full_name,
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let stored = match view.dtype() {
            safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16 => view,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    name: full_name,
                    dtype: format!("{other:?}"),
                });
            }
        };
        let tensor = candle_core::safetensors::Load::load(&stored, &Device::Cpu)?;
        Ok(tensor
            .to_dtype(self.source.dtype)?
            .to_device(&self.source.device)?)
    }

    /// Name, dtype and shape of every stored tensor (prefix ignored).
    pub fn stored_tensors(&self) -> Vec<StoredTensor> {
        self.source
            .safetensors
            .tensors()
            .into_iter()
            .map(|(name, view)| StoredTensor {
                name,
                dtype: format!("{:?}", view.dtype()),
                shape: view.shape().to_vec(),
            })
            .collect()
    }

    /// The stored bytes of the tensor `name` (full name, prefix ignored), as laid out in the file.
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8]> {
        match self.source.safetensors.get(name) {
            Ok(view) => Ok(view.data()),
            Err(_) => Err(ModelError::MissingTensor {
                name: name.to_string(),
                expected: Vec::new(),
                path: self.source.path.clone(),
            }),
        }
    }

    /// A bias-carrying linear layer stored as `name.weight` `[out, in]` and `name.bias` `[out]`.
    pub fn linear(&self, in_dim: usize, out_dim: usize, name: &str) -> Result<candle_nn::Linear> {
        let weights = self.pp(name);
        let weight = weights.get(&[out_dim, in_dim], "weight")?;
        let bias = weights.get(&[out_dim], "bias")?;
        Ok(candle_nn::Linear::new(weight, Some(bias)))
    }

    /// A bias-carrying linear layer stored as `name.weight` `[out, in]` and `name.bias` `[out]`, kept transposed
    /// `(in, out)` for the matrix product.
    pub fn projection(
        &self,
        in_dim: usize,
        out_dim: usize,
        name: &str,
    ) -> Result<crate::nn::Projection> {
        let weights = self.pp(name);
        let weight = weights.get(&[out_dim, in_dim], "weight")?;
        let bias = weights.get(&[out_dim], "bias")?;
        crate::nn::Projection::from_out_in(&weight, bias)
    }

    /// A LayerNorm stored as `name.weight` and `name.bias`, both `[dim]`.
    pub fn layer_norm(&self, dim: usize, eps: f64, name: &str) -> Result<candle_nn::LayerNorm> {
        let weights = self.pp(name);
        let weight = weights.get(&[dim], "weight")?;
        let bias = weights.get(&[dim], "bias")?;
        Ok(candle_nn::LayerNorm::new(weight, bias, eps))
    }
}
