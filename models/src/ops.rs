//! Differentiable building blocks.
//!
//! candle-nn's fused `layer_norm`, `rms_norm` and `softmax_last_dim` kernels
//! have no backward pass: gradients silently stop at them. These versions are
//! written with primitive tensor ops that all have one, and the tests below
//! check they compute the same values as the fused kernels.

use candle_core::{DType, Result, Tensor, D};

/// Softmax over the last dimension, stable (the row maximum is subtracted
/// first) and differentiable.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    // Subtracting a per-row constant leaves softmax unchanged, so the maximum
    // needs no gradient of its own.
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let exp = xs.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    exp.broadcast_div(&sum)
}

/// Layer norm over the last dimension with a learned gain and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Gain (`weight`) and `bias` of shape `[hidden]`.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// Builds `weight` (ones) and `bias` (zeros) under `vb`.
    pub fn load(hidden: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(hidden, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(hidden, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self::new(weight, bias, eps))
    }

    /// Normalises `xs` over its last dimension, computing in f32 for
    /// half-precision inputs.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let xs = match dtype {
            DType::F16 | DType::BF16 => xs.to_dtype(DType::F32)?,
            _ => xs.clone(),
        };
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Mean binary cross-entropy of `logits` against 0/1 `targets` of the same
/// shape, the multi-label loss. Computed as
/// `max(x, 0) - x·y + log(1 + exp(-|x|))`, which never overflows, unlike
/// candle-nn's version that takes `log(sigmoid(x))`.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(logits.dtype())?;
    let softplus = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let loss = ((logits.relu()? - (logits * targets)?)? + softplus)?;
    loss.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    fn sample(device: &Device) -> Result<Tensor> {
        // Deterministic values with a wide range, including large ones that
        // would overflow a softmax without the max subtraction.
        let values: Vec<f32> = (0..3 * 5 * 17)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.7)
            .collect();
        Tensor::from_vec(values, (3, 5, 17), device)
    }

    #[test]
    fn softmax_matches_fused_kernel() -> Result<()> {
        let xs = sample(&Device::Cpu)?;
        let ours = softmax_last_dim(&xs)?;
        let fused = candle_nn::ops::softmax_last_dim(&xs)?;
        assert!(max_abs_diff(&ours, &fused)? < 1e-6);
        let sums = ours.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
        Ok(())
    }

    #[test]
    fn layer_norm_matches_fused_kernel() -> Result<()> {
        let device = Device::Cpu;
        let xs = sample(&device)?;
        let weight = Tensor::arange(0f32, 17.0, &device)?.affine(0.1, 0.5)?;
        let bias = Tensor::arange(0f32, 17.0, &device)?.affine(-0.05, 0.2)?;
        let ours = LayerNorm::new(weight.clone(), bias.clone(), 1e-5).forward(&xs)?;
        let fused = candle_nn::ops::layer_norm(&xs, &weight, &bias, 1e-5)?;
        assert!(max_abs_diff(&ours, &fused)? < 1e-4);
        Ok(())
    }

    #[test]
    fn bce_matches_the_textbook_formula() -> Result<()> {
        let device = Device::Cpu;
        let logits = Tensor::new(&[[-3.0f32, 0.0, 2.5], [1.0, -0.5, 4.0]], &device)?;
        let targets = Tensor::new(&[[0u8, 1, 1], [1, 0, 0]], &device)?;
        let ours = bce_with_logits(&logits, &targets)?.to_scalar::<f32>()?;
        let reference = candle_nn::loss::binary_cross_entropy_with_logit(
            &logits,
            &targets.to_dtype(DType::F32)?,
        )?
        .to_scalar::<f32>()?;
        assert!((ours - reference).abs() < 1e-5, "{ours} vs {reference}");
        // Large logits stay finite.
        let big = Tensor::new(&[[200.0f32, -200.0]], &device)?;
        let loss = bce_with_logits(&big, &Tensor::new(&[[0u8, 1]], &device)?)?;
        assert!((loss.to_scalar::<f32>()? - 200.0).abs() < 1e-3);
        Ok(())
    }
}
