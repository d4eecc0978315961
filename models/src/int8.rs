//! int8 matrix products for the packed encoder's linear layers.
//!
//! Weights are quantised once, per output channel and symmetrically:
//! `w ≈ scale[n] · q[k][n]` with `q` in `-127..=127` (`-63..=63` for the
//! AVX2 kernel, see below). Activations are quantised per row as the
//! product runs, asymmetrically to unsigned bytes: `x ≈ s · (u - z)` with
//! `u` in `0..=255` and the range widened to hold 0. The product is then
//!
//! ```text
//! out[r][n] = s[r] · scale[n] · (Σₖ u[r][k]·q[k][n] − z[r] · Σₖ q[k][n])
//! ```
//!
//! where the first sum is exact in i32 and the column sums are computed at
//! quantisation time. Per-row activation scales and per-channel weight
//! scales are finer than ONNX Runtime's dynamic quantisation (one scale per
//! tensor for both), which is what keeps the top 5 of the f32 model.
//!
//! Kernels, picked at run time ([`Kernel::detect`]):
//!
//! - [`Kernel::Vnni512`]: AVX-512 VNNI `vpdpbusd`, 64 multiply-adds of
//!   unsigned by signed bytes into i32 per instruction, on Intel since
//!   Cascade Lake and AMD since Zen 4;
//! - [`Kernel::Avx2`]: `vpmaddubsw` then `vpmaddwd`. The first adds pairs
//!   of byte products into i16 with saturation, so weights are kept to 7
//!   bits (255 · 63 · 2 < 2¹⁵), as ONNX Runtime's `reduce_range` does on
//!   CPUs without VNNI;
//! - [`Kernel::Portable`]: plain loops over the same layout, for any CPU.
//!
//! Every kernel computes the same i32 sums for the same quantised
//! operands, so with the same weights the three agree exactly; the AVX2
//! kernel's weights differ by its narrower range.
//!
//! Layout: weights are stored in blocks of [`BLOCK`] output columns; within
//! a block, for each group of 4 inputs, 16 columns × 4 bytes, which is one
//! `vpdpbusd` operand. Outputs are padded to a multiple of [`NR`] blocks
//! with zero columns, inputs to a multiple of 4 with zero rows.

use rayon::prelude::*;

use crate::packed::gelu;

/// Output columns per weight block: one 512-bit register of i32.
const BLOCK: usize = 16;
/// Weight blocks per micro-tile of the VNNI kernel.
const NR: usize = 4;
/// Rows per micro-tile.
const MR: usize = 6;
/// Rows per parallel task: each task quantises its rows once and runs
/// every column block over them.
const TASK_ROWS: usize = MR * 8;

/// Which instructions compute the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 VNNI (`avx512vnni` with `avx512bw`).
    Vnni512,
    /// AVX2; weights quantised to 7 bits.
    Avx2,
    /// Plain Rust; for CPUs without either.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                return Kernel::Vnni512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// Whether this CPU can run the kernel.
    pub fn supported(self) -> bool {
        match self {
            Kernel::Portable => true,
            Kernel::Avx2 => Self::detect() != Kernel::Portable,
            Kernel::Vnni512 => Self::detect() == Kernel::Vnni512,
        }
    }

    /// The largest weight magnitude this kernel takes.
    fn weight_limit(self) -> f32 {
        match self {
            Kernel::Avx2 => 63.0,
            Kernel::Vnni512 | Kernel::Portable => 127.0,
        }
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Vnni512 => "avx512-vnni",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }
}

/// A linear layer's weight, quantised; see the module documentation.
#[derive(Clone)]
pub(crate) struct QuantWeight {
    kernel: Kernel,
    /// `[blocks][groups][BLOCK][4]`.
    packed: Vec<i8>,
    /// Per output column (padded with zeros).
    scales: Vec<f32>,
    /// Σₖ q[k][n] per output column (padded with zeros).
    sums: Vec<i32>,
    inputs: usize,
    outputs: usize,
    /// Groups of 4 inputs.
    groups: usize,
    blocks: usize,
}

impl QuantWeight {
    /// Quantises `weight`, row-major `[inputs, outputs]`, for `kernel`.
    pub(crate) fn new(weight: &[f32], inputs: usize, outputs: usize, kernel: Kernel) -> Self {
        assert_eq!(
            weight.len(),
            inputs * outputs,
            "weight is [inputs, outputs]"
        );
        // The products run `kernel`'s instructions without checking again.
        assert!(
            kernel.supported(),
            "this CPU cannot run the {} kernel",
            kernel.name()
        );
        let groups = inputs.div_ceil(4);
        let blocks = outputs.div_ceil(BLOCK * NR) * NR;
        let limit = kernel.weight_limit();
        let mut scales = vec![0f32; blocks * BLOCK];
        let mut sums = vec![0i32; blocks * BLOCK];
        let mut packed = vec![0i8; blocks * groups * BLOCK * 4];
        for n in 0..outputs {
            let largest = (0..inputs).fold(0f32, |m, k| m.max(weight[k * outputs + n].abs()));
            let scale = if largest > 0.0 { largest / limit } else { 1.0 };
            scales[n] = scale;
            let (block, lane) = (n / BLOCK, n % BLOCK);
            for k in 0..inputs {
                let q = (weight[k * outputs + n] / scale)
                    .round()
                    .clamp(-limit, limit) as i8;
                sums[n] += i32::from(q);
                packed[((block * groups + k / 4) * BLOCK + lane) * 4 + k % 4] = q;
            }
        }
        Self {
            kernel,
            packed,
            scales,
            sums,
            inputs,
            outputs,
            groups,
            blocks,
        }
    }
}

/// One row quantised to bytes: `x ≈ scale · (u − zero)`, the range
/// widened to hold 0 so that 0 is exact; bytes past the row (`out` is
/// padded to whole groups of 4) are 0. A row holding NaN or ±∞ gets a NaN
/// scale, so its outputs are NaN as in f32.
#[inline(always)]
fn quantize_row(x: &[f32], out: &mut [u8]) -> (f32, i32) {
    // 1.5 · 2²³: adding it rounds to the nearest integer (ties to even)
    // and leaves that integer in the low mantissa bits, with no conversion
    // that would keep the loop from vectorising.
    const SHIFTER: f32 = 12_582_912.0;
    // Lane-wise partial results, so the loop vectorises (a single float
    // accumulator would fix the order of the additions).
    const LANES: usize = 16;
    let (mut lo, mut hi, mut poison) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (j, &v) in chunk.iter().enumerate() {
            lo[j] = if v < lo[j] { v } else { lo[j] };
            hi[j] = if v > hi[j] { v } else { hi[j] };
            poison[j] += v * 0.0;
        }
    }
    for (j, &v) in tail.iter().enumerate() {
        lo[j] = if v < lo[j] { v } else { lo[j] };
        hi[j] = if v > hi[j] { v } else { hi[j] };
        poison[j] += v * 0.0;
    }
    let lo = lo.iter().fold(0f32, |m, &v| if v < m { v } else { m });
    let hi = hi.iter().fold(0f32, |m, &v| if v > m { v } else { m });
    let poison: f32 = poison.iter().sum();
    let range = hi - lo;
    if !poison.is_finite() || !range.is_finite() {
        out.iter_mut().for_each(|u| *u = 0);
        return (f32::NAN, 0);
    }
    if range <= f32::MIN_POSITIVE {
        // All zeros: every byte is the zero point.
        out.iter_mut().for_each(|u| *u = 0);
        return (1.0, 0);
    }
    let scale = range / 255.0;
    let inv = 1.0 / scale;
    let zero = ((-lo * inv + SHIFTER).to_bits() & 0xff) as i32;
    let zero_f = zero as f32;
    for (u, &v) in out.iter_mut().zip(x) {
        let q = v.mul_add(inv, zero_f).clamp(0.0, 255.0);
        *u = (q + SHIFTER).to_bits() as u8;
    }
    out[x.len()..].iter_mut().for_each(|u| *u = 0);
    (scale, zero)
}

/// Quantises `input`'s rows of `k` values into rows of `width` bytes,
/// with their scales and zero points.
#[allow(unsafe_code)]
fn quantize_rows(
    input: &[f32],
    k: usize,
    width: usize,
    bytes: &mut [u8],
    scales: &mut [f32],
    zeros: &mut [i32],
) {
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx512() {
        for (r, x) in input.chunks_exact(k).enumerate() {
            // SAFETY: the CPU has AVX-512 F and BW.
            (scales[r], zeros[r]) =
                unsafe { x86::quantize_row(x, &mut bytes[r * width..][..width]) };
        }
        return;
    }
    for (r, x) in input.chunks_exact(k).enumerate() {
        (scales[r], zeros[r]) = quantize_row(x, &mut bytes[r * width..][..width]);
    }
}

/// What the product does with `out`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Epilogue<'a> {
    /// `out = product`.
    Store,
    /// `out += product` (a residual, or a bias filled in beforehand).
    Accumulate,
    /// `out = gelu(product + bias)`, while the tile is in registers rather
    /// than in a pass of its own over the whole matrix.
    BiasGelu(&'a [f32]),
}

/// `out[rows, outputs] (+)= input[rows, inputs] · weight` in int8 over
/// rayon's threads; `epilogue` says what is done with the product.
pub(crate) fn linear(
    out: &mut [f32],
    input: &[f32],
    weight: &QuantWeight,
    rows: usize,
    epilogue: Epilogue<'_>,
) {
    if let Epilogue::BiasGelu(bias) = epilogue {
        assert_eq!(bias.len(), weight.outputs, "one bias per output");
    }
    let (k, n) = (weight.inputs, weight.outputs);
    assert_eq!(input.len(), rows * k, "input is [rows, inputs]");
    assert_eq!(out.len(), rows * n, "output is [rows, outputs]");
    if rows == 0 {
        return;
    }
    let width = weight.groups * 4;
    thread_local! {
        /// A task's quantised rows, kept per thread: rayon calls a
        /// `for_each_init` closure once per split, and fresh buffers cost
        /// page faults.
        static ROWS: std::cell::RefCell<(Vec<u8>, Vec<f32>, Vec<i32>)> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
    }
    out.par_chunks_mut(TASK_ROWS * n)
        .zip(input.par_chunks(TASK_ROWS * k))
        .for_each(|(out, input)| {
            ROWS.with_borrow_mut(|(bytes, scales, zeros)| {
                bytes.resize(TASK_ROWS * width, 0);
                scales.resize(TASK_ROWS, 0.0);
                zeros.resize(TASK_ROWS, 0);
                let task_rows = input.len() / k;
                quantize_rows(input, k, width, bytes, scales, zeros);
                // Padding rows of the last micro-tile: computed, never stored.
                bytes[task_rows * width..task_rows.div_ceil(MR) * MR * width].fill(0);
                run_task(out, bytes, scales, zeros, task_rows, weight, epilogue);
            })
        });
}

/// The micro-tiles of one task's rows, by the weight's kernel.
#[allow(unsafe_code)]
fn run_task(
    out: &mut [f32],
    bytes: &[u8],
    scales: &[f32],
    zeros: &[i32],
    rows: usize,
    weight: &QuantWeight,
    epilogue: Epilogue<'_>,
) {
    let width = weight.groups * 4;
    let mut acc = [[0i32; BLOCK * NR]; MR];
    for quad in 0..weight.blocks / NR {
        let w = &weight.packed[quad * NR * weight.groups * BLOCK * 4..]
            [..NR * weight.groups * BLOCK * 4];
        for tile in 0..rows.div_ceil(MR) {
            let a = &bytes[tile * MR * width..][..MR * width];
            match weight.kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `QuantWeight::new` checked that this CPU runs the
                // kernel; the slices hold MR rows of `width` bytes and NR
                // blocks of the weight.
                Kernel::Vnni512 => unsafe { x86::tile_vnni(a, width, w, weight.groups, &mut acc) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Kernel::Avx2 => unsafe { x86::tile_avx2(a, width, w, weight.groups, &mut acc) },
                _ => tile_portable(a, width, w, weight.groups, &mut acc),
            }
            let at = quad * NR * BLOCK;
            let columns = (weight.outputs - at).min(NR * BLOCK);
            let first = tile * MR;
            let tile_rows = (rows - first).min(MR);
            let tile = Tile {
                at,
                columns,
                sums: &weight.sums[at..][..columns],
                scales: &weight.scales[at..][..columns],
                row_scales: &scales[first..][..tile_rows],
                zeros: &zeros[first..][..tile_rows],
                epilogue,
            };
            store_tile(
                &mut out[first * weight.outputs..(first + tile_rows) * weight.outputs],
                weight.outputs,
                &acc,
                &tile,
            );
        }
    }
}

/// Where a micro-tile's sums go and how they are dequantised.
struct Tile<'a> {
    /// First output column.
    at: usize,
    /// Output columns (at most NR blocks).
    columns: usize,
    /// The weight's column sums and scales for those columns.
    sums: &'a [i32],
    scales: &'a [f32],
    /// The rows' activation scales and zero points.
    row_scales: &'a [f32],
    zeros: &'a [i32],
    epilogue: Epilogue<'a>,
}

simd_fn! {
    /// Dequantises a micro-tile's rows into `out` (those rows, `n` wide).
    fn store_tile(out: &mut [f32], n: usize, acc: &[[i32; BLOCK * NR]; MR], tile: &Tile<'_>) {
        let Tile {
            at,
            columns,
            sums,
            scales,
            row_scales,
            zeros,
            epilogue,
        } = *tile;
        for (r, (row, acc)) in out.chunks_exact_mut(n).zip(acc).enumerate() {
            let (scale, zero) = (row_scales[r], zeros[r]);
            let row = &mut row[at..][..columns];
            let terms = acc[..columns].iter().zip(sums).zip(scales);
            match epilogue {
                Epilogue::Store => {
                    for (o, ((&a, &s), &w)) in row.iter_mut().zip(terms) {
                        *o = (a - zero * s) as f32 * (scale * w);
                    }
                }
                Epilogue::Accumulate => {
                    for (o, ((&a, &s), &w)) in row.iter_mut().zip(terms) {
                        *o += (a - zero * s) as f32 * (scale * w);
                    }
                }
                Epilogue::BiasGelu(bias) => {
                    for ((o, ((&a, &s), &w)), &b) in row.iter_mut().zip(terms).zip(&bias[at..]) {
                        *o = gelu((a - zero * s) as f32 * (scale * w) + b);
                    }
                }
            }
        }
    }
}

/// The reference kernel: `acc[r][c] = Σₖ a[r][k] · w[k][c]` over MR rows
/// and NR blocks.
fn tile_portable(
    a: &[u8],
    width: usize,
    w: &[i8],
    groups: usize,
    acc: &mut [[i32; BLOCK * NR]; MR],
) {
    for (r, acc) in acc.iter_mut().enumerate() {
        let row = &a[r * width..][..width];
        for (b, block) in acc.chunks_exact_mut(BLOCK).enumerate() {
            let weights = &w[b * groups * BLOCK * 4..][..groups * BLOCK * 4];
            for (c, out) in block.iter_mut().enumerate() {
                let mut total = 0i32;
                for g in 0..groups {
                    for j in 0..4 {
                        total +=
                            i32::from(row[g * 4 + j]) * i32::from(weights[(g * BLOCK + c) * 4 + j]);
                    }
                }
                *out = total;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::{BLOCK, MR, NR};
    use std::arch::x86_64::*;

    /// Whether the CPU has what [`quantize_row`] needs.
    pub(super) fn has_avx512() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }

    /// [`super::quantize_row`] in AVX-512, with the same results: the
    /// conversion rounds to nearest, ties to even, as the shifter does.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW; `out` must hold `x.len()` bytes
    /// or more.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_row(x: &[f32], out: &mut [u8]) -> (f32, i32) {
        assert!(out.len() >= x.len(), "out holds the row");
        let n = x.len();
        let full = n / 16 * 16;
        let tail: __mmask16 = ((1u32 << (n - full)) - 1) as u16;
        let p = x.as_ptr();
        let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut nan: __mmask16 = 0;
        let mut i = 0;
        while i < n {
            let mask = if i < full { u16::MAX } else { tail };
            // SAFETY: the mask covers only elements before `n`.
            let v = unsafe { _mm512_maskz_loadu_ps(mask, p.add(i)) };
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
            nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            i += 16;
        }
        let (lo, hi) = (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
        let range = hi - lo;
        if nan != 0 || !range.is_finite() {
            out.fill(0);
            return (f32::NAN, 0);
        }
        if range <= f32::MIN_POSITIVE {
            out.fill(0);
            return (1.0, 0);
        }
        let scale = range / 255.0;
        let inv = 1.0 / scale;
        let zero = ((-lo * inv + 12_582_912.0).to_bits() & 0xff) as i32;
        let (inv_v, zero_v) = (_mm512_set1_ps(inv), _mm512_set1_ps(zero as f32));
        let (floor, ceiling) = (_mm512_setzero_ps(), _mm512_set1_ps(255.0));
        let q = out.as_mut_ptr();
        let mut i = 0;
        while i < n {
            let mask = if i < full { u16::MAX } else { tail };
            // SAFETY: as above; `out` holds n bytes.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, p.add(i));
                let v = _mm512_fmadd_ps(v, inv_v, zero_v);
                let v = _mm512_min_ps(_mm512_max_ps(v, floor), ceiling);
                let v = _mm512_cvtps_epi32(v);
                _mm512_mask_cvtepi32_storeu_epi8(q.add(i).cast(), mask, v);
            }
            i += 16;
        }
        out[n..].fill(0);
        (scale, zero)
    }

    /// [`super::tile_portable`] with `vpdpbusd`: MR × NR accumulators of
    /// 16 i32, one broadcast of 4 activation bytes per row and group.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI; `a` must hold MR rows of
    /// `width ≥ 4 · groups` bytes and `w` NR blocks of `groups` groups.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_vnni(
        a: &[u8],
        width: usize,
        w: &[i8],
        groups: usize,
        acc: &mut [[i32; BLOCK * NR]; MR],
    ) {
        assert!(
            width >= 4 * groups && a.len() >= MR * width && w.len() >= NR * groups * BLOCK * 4,
            "a tile's operands"
        );
        let mut sums = [[_mm512_setzero_si512(); NR]; MR];
        let a = a.as_ptr();
        let w = w.as_ptr();
        let stride = groups * BLOCK * 4;
        for g in 0..groups {
            let mut weights = [_mm512_setzero_si512(); NR];
            for (b, v) in weights.iter_mut().enumerate() {
                // SAFETY: block b's group g is in `w` (caller's contract).
                *v = unsafe { _mm512_loadu_si512(w.add(b * stride + g * BLOCK * 4).cast()) };
            }
            for (r, row) in sums.iter_mut().enumerate() {
                // SAFETY: 4 bytes of row r at group g are in `a`.
                let bytes = unsafe { a.add(r * width + g * 4).cast::<i32>().read_unaligned() };
                let broadcast = _mm512_set1_epi32(bytes);
                for (s, &v) in row.iter_mut().zip(&weights) {
                    *s = _mm512_dpbusd_epi32(*s, broadcast, v);
                }
            }
        }
        for (out, row) in acc.iter_mut().zip(&sums) {
            for (b, &s) in row.iter().enumerate() {
                // SAFETY: `out` holds NR · 16 i32.
                unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(b * BLOCK).cast(), s) };
            }
        }
    }

    /// [`super::tile_portable`] with AVX2, one block of 16 columns at a
    /// time: `vpmaddubsw` adds pairs of byte products into i16 (weights
    /// of at most 63 keep that exact), `vpmaddwd` against ones adds the
    /// pairs into i32.
    ///
    /// # Safety
    /// The CPU must have AVX2; the slices as for [`tile_vnni`], and the
    /// weights within ±63.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile_avx2(
        a: &[u8],
        width: usize,
        w: &[i8],
        groups: usize,
        acc: &mut [[i32; BLOCK * NR]; MR],
    ) {
        assert!(
            width >= 4 * groups && a.len() >= MR * width && w.len() >= NR * groups * BLOCK * 4,
            "a tile's operands"
        );
        let ones = _mm256_set1_epi16(1);
        let a = a.as_ptr();
        let stride = groups * BLOCK * 4;
        for b in 0..NR {
            let w = w[b * stride..].as_ptr();
            let mut sums = [[_mm256_setzero_si256(); 2]; MR];
            for g in 0..groups {
                // SAFETY: block b's group g (64 bytes) is in `w`.
                let (lo, hi) = unsafe {
                    (
                        _mm256_loadu_si256(w.add(g * BLOCK * 4).cast()),
                        _mm256_loadu_si256(w.add(g * BLOCK * 4 + 32).cast()),
                    )
                };
                for (r, row) in sums.iter_mut().enumerate() {
                    // SAFETY: 4 bytes of row r at group g are in `a`.
                    let bytes = unsafe { a.add(r * width + g * 4).cast::<i32>().read_unaligned() };
                    let broadcast = _mm256_set1_epi32(bytes);
                    row[0] = _mm256_add_epi32(
                        row[0],
                        _mm256_madd_epi16(_mm256_maddubs_epi16(broadcast, lo), ones),
                    );
                    row[1] = _mm256_add_epi32(
                        row[1],
                        _mm256_madd_epi16(_mm256_maddubs_epi16(broadcast, hi), ones),
                    );
                }
            }
            for (out, row) in acc.iter_mut().zip(&sums) {
                // SAFETY: `out` holds NR · 16 i32; block b is 16 of them.
                unsafe {
                    _mm256_storeu_si256(out.as_mut_ptr().add(b * BLOCK).cast(), row[0]);
                    _mm256_storeu_si256(out.as_mut_ptr().add(b * BLOCK + 8).cast(), row[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernels compute, from the quantised operands, in i64.
    fn reference(input: &[f32], weight: &QuantWeight, rows: usize) -> Vec<f32> {
        let (k, n) = (weight.inputs, weight.outputs);
        let width = weight.groups * 4;
        let mut out = vec![0f32; rows * n];
        let mut bytes = vec![0u8; width];
        for r in 0..rows {
            let (scale, zero) = quantize_row(&input[r * k..][..k], &mut bytes);
            for c in 0..n {
                let (block, lane) = (c / BLOCK, c % BLOCK);
                let mut total = 0i64;
                for (j, &u) in bytes[..k].iter().enumerate() {
                    let q =
                        weight.packed[((block * weight.groups + j / 4) * BLOCK + lane) * 4 + j % 4];
                    total += i64::from(u) * i64::from(q);
                }
                let total = (total - i64::from(zero) * i64::from(weight.sums[c])) as i32;
                out[r * n + c] = total as f32 * (scale * weight.scales[c]);
            }
        }
        out
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn every_kernel_computes_the_exact_integer_product() {
        // Shapes with ragged rows, inputs and outputs.
        for &(rows, k, n) in &[
            (1, 4, 16),
            (7, 13, 70),
            (50, 128, 384),
            (97, 66, 65),
            (6, 3, 129),
        ] {
            let input = values(rows * k, rows as u64);
            let w = values(k * n, n as u64);
            for kernel in [Kernel::Portable, Kernel::Avx2, Kernel::Vnni512] {
                if !kernel.supported() {
                    continue;
                }
                let weight = QuantWeight::new(&w, k, n, kernel);
                let want = reference(&input, &weight, rows);
                let mut out = vec![0f32; rows * n];
                linear(&mut out, &input, &weight, rows, Epilogue::Store);
                assert_eq!(out, want, "{kernel:?} {rows}×{k}×{n}");
                // The fused GELU is the stored product through GELU.
                let bias = values(n, 9);
                let mut fused = vec![0f32; rows * n];
                linear(&mut fused, &input, &weight, rows, Epilogue::BiasGelu(&bias));
                for (i, (f, o)) in fused.iter().zip(&out).enumerate() {
                    assert_eq!(*f, gelu(o + bias[i % n]));
                }
                // Accumulating adds the same product to what was there.
                let mut twice = out.clone();
                linear(&mut twice, &input, &weight, rows, Epilogue::Accumulate);
                for (t, o) in twice.iter().zip(&out) {
                    assert_eq!(*t, o + o);
                }
            }
        }
    }

    #[test]
    fn the_int8_product_is_close_to_the_f32_one() {
        let (rows, k, n) = (40, 96, 48);
        let input = values(rows * k, 3);
        let w = values(k * n, 4);
        for kernel in [Kernel::Portable, Kernel::Avx2] {
            let weight = QuantWeight::new(&w, k, n, kernel);
            let mut out = vec![0f32; rows * n];
            linear(&mut out, &input, &weight, rows, Epilogue::Store);
            let mut worst = 0f32;
            for r in 0..rows {
                for c in 0..n {
                    let exact: f32 = (0..k).map(|j| input[r * k + j] * w[j * n + c]).sum();
                    worst = worst.max((out[r * n + c] - exact).abs());
                }
            }
            // Inputs and weights in ±2: a dot product of 96 terms with
            // rounding errors of 1/64 and 1/32 of a unit at most.
            let bound = if kernel == Kernel::Avx2 { 1.2 } else { 0.6 };
            assert!(worst < bound, "{kernel:?}: largest error {worst}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    #[allow(unsafe_code)]
    fn the_avx512_quantiser_gives_the_portable_bytes() {
        if !x86::has_avx512() {
            return;
        }
        for len in [1, 5, 16, 17, 31, 128, 130] {
            for seed in 0..20 {
                let mut row = values(len, seed * 31 + len as u64);
                if seed == 3 {
                    row[len / 2] = f32::NAN;
                }
                if seed == 4 {
                    row.iter_mut().for_each(|v| *v = v.abs() + 1.0);
                }
                let width = len.div_ceil(4) * 4;
                let (mut a, mut b) = (vec![9u8; width], vec![7u8; width]);
                let want = quantize_row(&row, &mut a);
                // SAFETY: checked above that the CPU has AVX-512 F and BW.
                let got = unsafe { x86::quantize_row(&row, &mut b) };
                assert_eq!(a, b, "len {len} seed {seed}");
                assert_eq!(want.1, got.1);
                assert!(want.0 == got.0 || (want.0.is_nan() && got.0.is_nan()));
            }
        }
    }

    #[test]
    fn a_row_of_zeros_quantises_to_zero() {
        let mut bytes = vec![7u8; 8];
        assert_eq!(quantize_row(&[0.0; 5], &mut bytes), (1.0, 0));
        assert_eq!(bytes, vec![0; 8]);
        let row = [1.0, -1.0, 0.5, 0.0, 0.25];
        let (scale, zero) = quantize_row(&row, &mut bytes);
        assert!((scale - 2.0 / 255.0).abs() < 1e-7);
        for (&x, &u) in row.iter().zip(&bytes) {
            let back = scale * (i32::from(u) - zero) as f32;
            assert!((back - x).abs() <= scale * 0.501, "{x} came back as {back}");
        }
        // The padding past the row's inputs multiplies zero weights.
        assert_eq!(bytes[5..], [0, 0, 0]);
    }
}
