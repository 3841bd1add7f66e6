//! The wire tensor (`kosmos.tensor.v1.Tensor`): checked before any byte is read, converted to and from f32.

use kosmos_proto::tensor::v1::{DType, Tensor};

/// What is wrong with a wire tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    /// The dtype is unset or unknown.
    #[error("dtype {0} is not one of f32, f16, bf16")]
    UnknownDtype(i32),
    /// The shape is not the expected one.
    #[error("shape {found:?} differs from the expected {expected:?}")]
    Shape {
        /// The shape that was sent.
        found: Vec<u64>,
        /// The shape required.
        expected: Vec<u64>,
    },
    /// The byte length does not equal product(shape) × element size.
    #[error("data has {found} bytes, shape {shape:?} of {dtype} needs {expected}")]
    ByteLength {
        /// Bytes sent.
        found: usize,
        /// Bytes required.
        expected: usize,
        /// The shape.
        shape: Vec<u64>,
        /// The dtype's name.
        dtype: &'static str,
    },
    /// The shape's element count overflows.
    #[error("shape {0:?} is too large")]
    TooLarge(Vec<u64>),
    /// A value is NaN or infinite.
    #[error("element {0} is not finite")]
    NotFinite(usize),
}

/// Bytes per element and the name of a known dtype.
pub fn dtype_info(dtype: i32) -> Result<(DType, usize, &'static str), TensorError> {
    match DType::try_from(dtype) {
        Ok(DType::DtypeF32) => Ok((DType::DtypeF32, 4, "f32")),
        Ok(DType::DtypeF16) => Ok((DType::DtypeF16, 2, "f16")),
        Ok(DType::DtypeBf16) => Ok((DType::DtypeBf16, 2, "bf16")),
        Ok(DType::DtypeUnspecified) | Err(_) => Err(TensorError::UnknownDtype(dtype)),
    }
}

/// Checks dtype, shape (when `expected_shape` is given) and byte length without reading the data.
pub fn check(tensor: &Tensor, expected_shape: Option<&[u64]>) -> Result<(), TensorError> {
    let (_, size, name) = dtype_info(tensor.dtype)?;
    if let Some(expected) = expected_shape
        && tensor.shape != expected
    {
        return Err(TensorError::Shape {
            found: tensor.shape.clone(),
            expected: expected.to_vec(),
        });
    }
    let elements = tensor
        .shape
        .iter()
        .try_fold(1usize, |acc, &dim| {
            acc.checked_mul(usize::try_from(dim).ok()?)
        })
        .ok_or_else(|| TensorError::TooLarge(tensor.shape.clone()))?;
    let expected = elements
        .checked_mul(size)
        .ok_or_else(|| TensorError::TooLarge(tensor.shape.clone()))?;
    if tensor.data.len() != expected {
        return Err(TensorError::ByteLength {
            found: tensor.data.len(),
            expected,
            shape: tensor.shape.clone(),
            dtype: name,
        });
    }
    Ok(())
}

/// The elements as f32 after [`check`]; non-finite values are refused (they would poison a whole batch).
pub fn to_f32(tensor: &Tensor, expected_shape: Option<&[u64]>) -> Result<Vec<f32>, TensorError> {
    check(tensor, expected_shape)?;
    let (dtype, size, _) = dtype_info(tensor.dtype)?;
    let values: Vec<f32> = tensor
        .data
        .chunks_exact(size)
        .map(|bytes| match (dtype, bytes) {
            (DType::DtypeF32, &[a, b, c, d]) => f32::from_le_bytes([a, b, c, d]),
            (DType::DtypeF16, &[a, b]) => half::f16::from_le_bytes([a, b]).to_f32(),
            (DType::DtypeBf16, &[a, b]) => half::bf16::from_le_bytes([a, b]).to_f32(),
            _ => f32::NAN,
        })
        .collect();
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(TensorError::NotFinite(index));
    }
    Ok(values)
}

/// A wire tensor of `dtype` holding `values` with `shape`.
pub fn from_f32(values: &[f32], shape: &[usize], dtype: DType) -> Result<Tensor, TensorError> {
    let (dtype, size, _) = dtype_info(dtype as i32)?;
    let mut data = Vec::with_capacity(values.len() * size);
    for &value in values {
        match dtype {
            DType::DtypeF16 => data.extend_from_slice(&half::f16::from_f32(value).to_le_bytes()),
            DType::DtypeBf16 => data.extend_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
            _ => data.extend_from_slice(&value.to_le_bytes()),
        }
    }
    let tensor = Tensor {
        dtype: dtype as i32,
        shape: shape.iter().map(|&d| d as u64).collect(),
        data,
    };
    check(&tensor, None)?;
    Ok(tensor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_every_dtype() {
        let values = [0.5f32, -2.0, 3.25, 1.0e-3];
        for dtype in [DType::DtypeF32, DType::DtypeF16, DType::DtypeBf16] {
            let wire = from_f32(&values, &[2, 2], dtype).expect("encodes");
            let back = to_f32(&wire, Some(&[2, 2])).expect("decodes");
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * 1e-2, "{dtype:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn bad_tensors_are_refused_before_reading() {
        let good = from_f32(&[1.0; 6], &[2, 3], DType::DtypeF32).expect("encodes");
        let err = check(&good, Some(&[3, 2])).expect_err("shape");
        assert!(matches!(err, TensorError::Shape { .. }));
        let short = Tensor {
            data: good.data[..20].to_vec(),
            ..good.clone()
        };
        assert!(matches!(
            check(&short, None),
            Err(TensorError::ByteLength {
                found: 20,
                expected: 24,
                ..
            })
        ));
        let unknown = Tensor {
            dtype: 0,
            ..good.clone()
        };
        assert_eq!(check(&unknown, None), Err(TensorError::UnknownDtype(0)));
        let huge = Tensor {
            shape: vec![u64::MAX, 2],
            ..good.clone()
        };
        assert!(matches!(check(&huge, None), Err(TensorError::TooLarge(_))));
        let nan = from_f32(&[f32::NAN], &[1], DType::DtypeF32).expect("encodes");
        assert_eq!(to_f32(&nan, None), Err(TensorError::NotFinite(0)));
    }
}
