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
    bce_elements(logits, targets)?.mean_all()
}

fn bce_elements(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(logits.dtype())?;
    let softplus = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    (logits.relu()? - (logits * targets)?)? + softplus
}

/// Binary cross-entropy where each element counts with its `weight` (same
/// shape): the sum of weighted losses over the sum of weights. A weight of
/// 0 leaves a label out of a document's loss, which is how a rejection that
/// says only "not these five" is trained without claiming anything about the
/// other labels.
pub fn weighted_bce_with_logits(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<Tensor> {
    let weights = weights.to_dtype(logits.dtype())?;
    let total = (bce_elements(logits, targets)? * &weights)?.sum_all()?;
    let count = weights.sum_all()?.clamp(1e-6, f64::INFINITY)?;
    total.div(&count)
}

/// Log-softmax over the last dimension, stable and differentiable.
pub fn log_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let shifted = xs.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// Cross-entropy of a softmax over labels against each row's multi-hot
/// target normalised to sum to 1, averaged over rows whose `row_weight`
/// (`[B]`) is 1; rows with no positive label must carry weight 0.
pub fn soft_target_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    row_weight: &Tensor,
) -> Result<Tensor> {
    let targets = targets.to_dtype(logits.dtype())?;
    let row_weight = row_weight.to_dtype(logits.dtype())?;
    let mass = targets.sum_keepdim(D::Minus1)?.clamp(1e-6, f64::INFINITY)?;
    let normalised = targets.broadcast_div(&mass)?;
    let per_row = (normalised * log_softmax_last_dim(logits)?)?
        .sum(D::Minus1)?
        .neg()?;
    let total = (per_row * &row_weight)?.sum_all()?;
    let count = row_weight.sum_all()?.clamp(1e-6, f64::INFINITY)?;
    total.div(&count)
}

/// Per-label scores from logits `[B, L]` for a model with this output.
pub fn scores(logits: &Tensor, output: crate::Output) -> Result<Tensor> {
    match output {
        crate::Output::Sigmoid => candle_nn::ops::sigmoid(logits),
        crate::Output::Softmax => softmax_last_dim(logits),
    }
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

    #[test]
    fn weighted_bce_counts_only_weighted_elements() -> Result<()> {
        let device = Device::Cpu;
        let logits = Tensor::new(&[[-3.0f32, 0.0, 2.5], [1.0, -0.5, 4.0]], &device)?;
        let targets = Tensor::new(&[[0u8, 1, 1], [0, 0, 0]], &device)?;
        let ones = Tensor::ones((2, 3), DType::F32, &device)?;
        let all = weighted_bce_with_logits(&logits, &targets, &ones)?.to_scalar::<f32>()?;
        let plain = bce_with_logits(&logits, &targets)?.to_scalar::<f32>()?;
        assert!((all - plain).abs() < 1e-6);
        // Only the second row's last label: softplus(4) = 4.01815.
        let one = Tensor::new(&[[0f32, 0.0, 0.0], [0.0, 0.0, 1.0]], &device)?;
        let only = weighted_bce_with_logits(&logits, &targets, &one)?.to_scalar::<f32>()?;
        assert!((only - 4.018_149).abs() < 1e-4, "{only}");
        Ok(())
    }

    #[test]
    fn soft_target_cross_entropy_matches_a_hand_computation() -> Result<()> {
        let device = Device::Cpu;
        let logits = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.0, 0.0, 0.0]], &device)?;
        let targets = Tensor::new(&[[1u8, 0, 1], [0, 0, 0]], &device)?;
        let rows = Tensor::new(&[1f32, 0.0], &device)?;
        let loss = soft_target_cross_entropy(&logits, &targets, &rows)?.to_scalar::<f32>()?;
        let log_z = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        let expected = -0.5 * ((1.0 - log_z) + (3.0 - log_z));
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
        let logs = log_softmax_last_dim(&logits)?
            .exp()?
            .sum(1)?
            .to_vec1::<f32>()?;
        assert!(logs.iter().all(|s| (s - 1.0).abs() < 1e-5));
        Ok(())
    }
}
