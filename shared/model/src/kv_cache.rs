//! Per-sequence key/value cache.
//!
//! Each sequence owns one [`SequenceCache`]: for every decoder layer a key and a value buffer
//! `(1, heads, capacity, head_dim)` that grows by doubling (amortised O(1) appends, no copy of the whole history
//! at each decode step), plus the token ids seen so far, which give the reference's pad-aware positions and let a
//! cache be cut back (`truncate`) or copied (`deep_clone`) for scoring candidates after a shared context.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

#[derive(Debug, Clone)]
struct LayerCache {
    /// `(1, heads, capacity, head_dim)`; rows `[0, len)` are valid.
    keys: Tensor,
    values: Tensor,
}

/// The KV state of one sequence across all decoder layers.
#[derive(Debug)]
pub struct SequenceCache {
    layers: Vec<Option<LayerCache>>,
    /// Token ids whose keys and values are cached, in order.
    tokens: Vec<u32>,
    capacity: usize,
}

const MIN_CAPACITY: usize = 16;

impl SequenceCache {
    /// An empty cache for a model of `layers` decoder layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            tokens: Vec::new(),
            capacity: 0,
        }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The cached token ids, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Elements held per layer and K/V (capacity, not length): what this cache costs in memory.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything after the first `len` tokens (a no-op when `len >= self.len()`).
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
    }

    /// An independent copy: appends to the copy never touch this cache's buffers.
    pub fn deep_clone(&self) -> Result<Self> {
        let len = self.len();
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                layer
                    .as_ref()
                    .map(|layer| -> Result<LayerCache> {
                        let (_, heads, _, head_dim) = layer.keys.dims4()?;
                        let copy = |src: &Tensor| -> Result<Tensor> {
                            let dst = Tensor::zeros(
                                (1, heads, self.capacity.max(MIN_CAPACITY), head_dim),
                                src.dtype(),
                                src.device(),
                            )?;
                            if len > 0 {
                                dst.slice_set(&src.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                            }
                            Ok(dst)
                        };
                        Ok(LayerCache {
                            keys: copy(&layer.keys)?,
                            values: copy(&layer.values)?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            tokens: self.tokens.clone(),
            capacity: self.capacity.max(MIN_CAPACITY),
        })
    }

    /// Records the ids of a chunk whose keys and values every layer has just appended.
    pub(crate) fn commit(&mut self, input_ids: &[u32]) {
        self.tokens.extend_from_slice(input_ids);
    }

    /// Appends `(1, heads, new, head_dim)` keys and values to `layer` after the committed tokens and returns the
    /// whole history `(1, heads, len + new, head_dim)` of that layer.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (_, heads, new, head_dim) = keys.dims4()?;
        let len = self.len();
        let needed = len + new;
        if needed > self.capacity || self.layers.get(layer).is_some_and(Option::is_none) {
            self.grow(
                needed.max(self.capacity * 2).max(MIN_CAPACITY),
                heads,
                head_dim,
                keys.dtype(),
                keys.device(),
            )?;
        }
        let slot = self
            .layers
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| ModelError::InvalidInput(format!("kv cache has no layer {layer}")))?;
        slot.keys.slice_set(&keys.contiguous()?, 2, len)?;
        slot.values.slice_set(&values.contiguous()?, 2, len)?;
        Ok((
            slot.keys.narrow(2, 0, needed)?,
            slot.values.narrow(2, 0, needed)?,
        ))
    }

    /// Reallocates every layer's buffers to `capacity` rows, keeping the committed rows.
    fn grow(
        &mut self,
        capacity: usize,
        heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        let len = self.len();
        let capacity = capacity.max(self.capacity);
        for slot in &mut self.layers {
            let fresh = |old: Option<&Tensor>| -> Result<Tensor> {
                let buffer = Tensor::zeros((1, heads, capacity, head_dim), dtype, device)?;
                if let Some(old) = old
                    && len > 0
                {
                    buffer.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok(buffer)
            };
            let grown = LayerCache {
                keys: fresh(slot.as_ref().map(|layer| &layer.keys))?,
                values: fresh(slot.as_ref().map(|layer| &layer.values))?,
            };
            *slot = Some(grown);
        }
        self.capacity = capacity;
        Ok(())
    }
}
