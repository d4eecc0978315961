//! Where the model runs and in what arithmetic: the `--device` and `--dtype`
//! choices shared by `sift train`, `sift infer`, `sift classify` and the
//! benchmarks, the Candle device they open, and the size of the thread pool
//! the CPU path uses. It sits on the ground floor with `config.rs`, which
//! holds these choices for `infer.device` and `infer.dtype`.

use candle_core::{DType, Device};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use sift_training::Arithmetic;

/// Where to train or score.
#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceArg {
    /// The CPU.
    #[default]
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// Number format of the model's arithmetic.
#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeArg {
    /// 32-bit floats (the CPU default).
    #[default]
    F32,
    /// bfloat16 (GPU).
    Bf16,
    /// IEEE half (GPU).
    F16,
    /// int8 on the CPU: the encoder's linear layers with int8 weights (per
    /// output channel) and activations (per row), on AVX-512 VNNI or AVX2
    /// as the CPU has them; the rest in f32.
    Int8,
}

impl DtypeArg {
    /// The Candle dtype the weights are loaded in (f32 for int8, which is
    /// quantised from them).
    pub fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 | DtypeArg::Int8 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        }
    }

    /// What the predictor computes in.
    pub fn arithmetic(self) -> Arithmetic {
        match self {
            DtypeArg::Int8 => Arithmetic::Int8(None),
            other => Arithmetic::Float(other.dtype()),
        }
    }
}

/// The device could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(String);

/// Opens the device `arg` names.
pub fn device(arg: DeviceArg) -> Result<Device, DeviceError> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => Device::new_cuda(0).map_err(|e| {
            DeviceError(format!(
                "cannot open CUDA device 0 ({e}); sift must be built with `--features cuda` \
                 on a machine with an NVIDIA GPU and driver"
            ))
        }),
    }
}

/// Sets the size of rayon's global pool (the model's matrix products and
/// sift's own parallel work) before anything starts it; 0 keeps one thread
/// per core. Returns the pool's size.
pub fn set_threads(threads: usize) -> usize {
    if threads > 0 {
        // Candle's CPU kernels read this too.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        if rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .is_err()
        {
            tracing::warn!("The thread pool was already started; --threads has no effect.");
        }
    }
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_is_read_from_the_config_and_loads_f32_weights_to_quantise() {
        #[derive(Deserialize)]
        struct Infer {
            dtype: DtypeArg,
        }
        let infer: Infer = toml::from_str(r#"dtype = "int8""#).expect("int8 parses");
        assert_eq!(infer.dtype, DtypeArg::Int8);
        assert_eq!(infer.dtype.dtype(), DType::F32);
        assert_eq!(infer.dtype.arithmetic(), Arithmetic::Int8(None));
        assert_eq!(DtypeArg::Bf16.arithmetic(), Arithmetic::Float(DType::BF16));
        assert_eq!(
            DtypeArg::from_str("int8", true).ok(),
            Some(DtypeArg::Int8),
            "--dtype int8"
        );
    }
}
