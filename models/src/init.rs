//! Seeded weight initialisation.
//!
//! candle cannot seed its CPU random generator (`Device::set_seed` fails on
//! CPU), so a `VarMap`-backed `VarBuilder` initialises differently on every
//! run. [`seeded_var_builder`] creates the same variables in the same
//! `VarMap`, but draws each one from a generator seeded by the model seed and
//! the variable's name: the same seed gives the same weights on any device,
//! whatever order the modules are built in.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal, Uniform};

/// A `VarBuilder` that creates missing variables in `varmap` with seeded
/// values (existing ones are returned as they are), so the training crate
/// can hand `varmap.all_vars()` to an optimiser and save with
/// `varmap.save(..)`.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededVarMap {
            varmap: varmap.clone(),
            seed,
        }),
        dtype,
        device.clone(),
    )
}

struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

/// FNV-1a: a fixed, documented hash so a name maps to the same stream in
/// every build (std's `DefaultHasher` promises no such thing).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn sample(shape: &Shape, init: Init, rng: &mut StdRng) -> Result<Vec<f32>> {
    let n = shape.elem_count();
    let values = match init {
        Init::Const(value) => vec![value as f32; n],
        Init::Randn { mean, stdev } => normal(n, mean, stdev, rng)?,
        Init::Uniform { lo, up } => uniform(n, lo, up, rng)?,
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = fan.for_shape(shape) as f64;
            let stdev = non_linearity.gain() / fan.max(1.0).sqrt();
            match dist {
                NormalOrUniform::Normal => normal(n, 0.0, stdev, rng)?,
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * stdev;
                    uniform(n, -bound, bound, rng)?
                }
            }
        }
    };
    Ok(values)
}

fn normal(n: usize, mean: f64, stdev: f64, rng: &mut StdRng) -> Result<Vec<f32>> {
    let dist = Normal::new(mean, stdev).map_err(candle_core::Error::wrap)?;
    Ok((0..n).map(|_| dist.sample(rng) as f32).collect())
}

fn uniform(n: usize, lo: f64, up: f64, rng: &mut StdRng) -> Result<Vec<f32>> {
    let dist = Uniform::new(lo, up).map_err(candle_core::Error::wrap)?;
    Ok((0..n).map(|_| rng.sample(dist) as f32).collect())
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mut vars = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        if let Some(var) = vars.get(name) {
            let tensor = var.as_tensor();
            if tensor.shape() != &shape {
                candle_core::bail!(
                    "shape mismatch for {name}: the VarMap holds {:?}, the model expects {shape:?}",
                    tensor.shape()
                );
            }
            return Ok(tensor.clone());
        }
        let mut rng = StdRng::seed_from_u64(self.seed ^ name_hash(name));
        let values = sample(&shape, init, &mut rng)?;
        let tensor = Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&tensor)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("`get_unchecked` needs a shape to create {name}; use `get`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .is_ok_and(|vars| vars.contains_key(name))
    }
}
