#!/usr/bin/env bash
# Builds the `sift` binary with `--features cuda` on a machine that has neither
# a GPU nor a CUDA toolkit, so that the binary can be carried to a GPU machine
# that has no Rust toolchain.
#
# Why it looks like this:
# - The CUDA 13.0 build toolchain (nvcc, ptxas, cicc, headers, and the shared
#   libraries cudarc's `dynamic-linking` feature links against) comes from
#   NVIDIA's PyPI wheels, installed with pip into the ignored target-cuda/
#   folder: no root, no system change. The versions are pinned to
#   CUDA 13.0 because cudarc picks its API bindings from `nvcc --version`, and
#   the kernels' PTX must not be newer than the GPU machine's driver (580,
#   CUDA 13.0) can load.
# - The wheels carry no libcuda: that library comes with the driver. The link
#   only needs a library that exports the driver-API symbols under the
#   driver's soname (libcuda.so.1), so a stub is generated from the symbol
#   names in cudarc's own bindings. The real one is found at run time.
# - The wheels ship versioned sonames only (libcublas.so.13, ...); the linker
#   looks for libNAME.so, so unversioned links are made in a separate folder.
# - The build uses its own target folder (target-cuda/) so that it never
#   waits on, nor invalidates, the ordinary CPU build in target/. The
#   toolchain lives beside cargo's output in it, so one ignored folder holds
#   everything this script makes.
#
# Environment (all optional):
#   CUDA_COMPUTE_CAP   GPU architecture the kernels are compiled for (default
#                      90: H100 and H200). candle's kernel builder turns 90 into
#                      sm_90a, which loads on compute capability 9.0 only.
#   CARGO_TARGET_DIR   where cargo builds (default: target-cuda/ in the repo).
#   SIFT_CUDA_TOOLCHAIN where the toolchain is installed (default:
#                      target-cuda/toolchain/ in the repo).
#   PYTHON             the Python whose pip installs the wheels (python3).
#   CUDAFORGE_THREADS  parallel nvcc jobs for the kernels (default 2).
#   NICE               niceness for the build (default 19; 0 to disable).
#
# Usage: scripts/cuda-build.sh
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

toolchain=${SIFT_CUDA_TOOLCHAIN:-$repo/target-cuda/toolchain}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target-cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
python=${PYTHON:-python3}
niceness=${NICE:-19}

# CUDA 13.0 components: the newest 13.0.x of the toolkit's own packages on
# PyPI (cuBLAS and cuRAND number their releases separately). nvcc, crt and
# nvvm must agree with each other and report 13.0; the libraries only need
# the CUDA 13 sonames, which every 13.x release keeps.
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.0.3
  nvidia-curand==10.4.0.35
)

log() { printf 'cuda-build: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}

for tool in "$python" cargo gcc g++ objdump ldd strip; do
  command -v "$tool" >/dev/null 2>&1 || die "needs '$tool' on PATH"
done
if command -v zstd >/dev/null 2>&1; then
  compressor=zstd
elif command -v xz >/dev/null 2>&1; then
  compressor=xz
else
  die "needs zstd or xz to compress the binary"
fi

# --- 1. The toolchain --------------------------------------------------------

site=$toolchain/site
cuda=$site/nvidia/cu13
stamp=$toolchain/installed.txt
wanted=$(printf '%s\n' "${pins[@]}")
if [ ! -x "$cuda/bin/nvcc" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  log "installing the CUDA 13.0 build toolchain into $toolchain (about 800 MB of wheels)"
  rm -rf "$site" "$toolchain/link"
  mkdir -p "$site"
  "$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --only-binary=:all: --no-compile --target "$site" "${pins[@]}"
  printf '%s\n' "$wanted" >"$stamp"
fi
[ -x "$cuda/bin/nvcc" ] || die "nvcc missing from $cuda/bin after install"

# The wheels lay the toolkit out flat under nvidia/cu13 (bin, include, lib,
# nvvm); tools that expect the usual toolkit tree look in lib64 and
# targets/x86_64-linux.
ln -sfn lib "$cuda/lib64"
mkdir -p "$cuda/targets/x86_64-linux"
ln -sfn ../../include "$cuda/targets/x86_64-linux/include"
ln -sfn ../../lib "$cuda/targets/x86_64-linux/lib"

# Link-time libraries: unversioned names for the wheels' libraries, plus the
# libcuda stub.
link=$toolchain/link
mkdir -p "$link"
for lib in cublas cublasLt curand nvrtc cudart; do
  real=
  for candidate in "$cuda/lib/lib$lib.so."[0-9]*; do
    # The soname itself (libX.so.13), not libnvrtc-builtins.so.13.0 and kin.
    [[ $candidate =~ /lib$lib\.so\.[0-9]+$ ]] && real=$candidate && break
  done
  [ -n "$real" ] || die "no lib$lib.so.N in $cuda/lib"
  ln -sfn "$real" "$link/lib$lib.so"
done

if [ ! -f "$link/libcuda.so" ]; then
  log "generating the libcuda link stub from cudarc's driver bindings"
  cargo fetch --locked --quiet
  cudarc_version=$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
  [ -n "$cudarc_version" ] || die "cudarc not found in Cargo.lock"
  cargo_home=${CARGO_HOME:-$HOME/.cargo}
  bindings=
  for candidate in "$cargo_home"/registry/src/*/"cudarc-$cudarc_version"/src/driver/sys/mod.rs; do
    [ -f "$candidate" ] && bindings=$candidate && break
  done
  [ -n "$bindings" ] || die "cudarc $cudarc_version sources not found under $cargo_home/registry/src"
  # Every `fn cuXxx(` inside the bindings' `extern "C"` blocks, for all CUDA
  # versions: a superset does no harm to a link-only stub.
  grep -oE '^[[:space:]]+fn cu[A-Za-z0-9_]+\(' "$bindings" |
    sed -E 's/^[[:space:]]+fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' |
    sort -u >"$link/libcuda-stub.c"
  count=$(wc -l <"$link/libcuda-stub.c")
  [ "$count" -gt 100 ] || die "only $count driver symbols found in $bindings"
  gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so.tmp" "$link/libcuda-stub.c"
  mv "$link/libcuda.so.tmp" "$link/libcuda.so"
  log "libcuda stub: $count symbols"
fi

# --- 2. The build ------------------------------------------------------------

export PATH=$cuda/bin:$PATH
export NVCC=$cuda/bin/nvcc
export CUDA_ROOT=$cuda CUDA_PATH=$cuda CUDA_HOME=$cuda CUDA_TOOLKIT_ROOT_DIR=$cuda
export LIBRARY_PATH=$link:$cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
# The linker resolves the libraries' own dependencies (libcublas needs
# libcublasLt) through -rpath-link. The RUNPATH entries are the GPU machine's
# usual homes of the CUDA 13 libraries, so the binary also runs there without
# LD_LIBRARY_PATH; LD_LIBRARY_PATH still takes precedence.
runpath=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$link -C link-arg=-Wl,-rpath-link,$link:$cuda/lib -C link-arg=-Wl,-rpath,$runpath"

nvcc_release=$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
[ "$nvcc_release" = "13.0" ] || die "nvcc reports release '$nvcc_release', expected 13.0"
log "nvcc $nvcc_release at $cuda/bin/nvcc; CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; CARGO_TARGET_DIR=$CARGO_TARGET_DIR"

build=(cargo build --locked --release --features cuda --bin sift)
[ "$niceness" = 0 ] || build=(nice -n "$niceness" "${build[@]}")
log "running: ${build[*]}"
start=$(date +%s)
"${build[@]}"
elapsed=$(($(date +%s) - start))

# --- 3. What to carry --------------------------------------------------------

bin=$CARGO_TARGET_DIR/release/sift
[ -x "$bin" ] || die "no binary at $bin"
dist=$CARGO_TARGET_DIR/dist
mkdir -p "$dist"
stripped=$dist/sift-cuda
strip -o "$stripped" "$bin"
case $compressor in
  zstd)
    packed=$stripped.zst
    zstd -19 -T0 -q -f "$stripped" -o "$packed"
    unpack="zstd -d sift-cuda.zst -o sift-cuda && chmod +x sift-cuda"
    ;;
  xz)
    packed=$stripped.xz
    xz -9 -T0 -k -c "$stripped" >"$packed"
    unpack="xz -d sift-cuda.xz && chmod +x sift-cuda"
    ;;
esac

size() { stat -c %s "$1" | awk '{ printf "%d bytes (%.1f MiB)", $1, $1 / 1048576 }'; }
glibc=$(objdump -T "$bin" | grep -oE 'GLIBC_[0-9]+(\.[0-9]+)*' | sort -u -V | tail -1)
glibcxx=$(objdump -T "$bin" | grep -oE 'GLIBCXX_[0-9]+(\.[0-9]+)*' | sort -u -V | tail -1 || true)

cat <<EOF

== sift built with --features cuda (compute capability $CUDA_COMPUTE_CAP, CUDA $nvcc_release) in ${elapsed}s
binary:     $bin
  raw:      $(size "$bin")
  stripped: $(size "$stripped")  -> $stripped
  packed:   $(size "$packed")  -> $packed   ($compressor)
highest glibc symbol version:     ${glibc:-none}
highest libstdc++ symbol version: ${glibcxx:-none}

NEEDED (sonames the binary asks for at run time):
$(objdump -p "$bin" | awk '/NEEDED/ { print "  " $2 }')
RUNPATH: $(objdump -p "$bin" | awk '/RUNPATH|RPATH/ { print $2 }')

ldd here (the CUDA libraries resolve to this machine's link-time copies; libcuda.so.1 is
"not found" because only the GPU driver provides it):
$(LD_LIBRARY_PATH=$link:$cuda/lib ldd "$bin" | sed 's/^/ /')

On the GPU machine:
  $unpack
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64:\$(ls -d /opt/torch/.venv/lib/python3.12/site-packages/nvidia/*/lib 2>/dev/null | paste -sd:)\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
  ldd ./sift-cuda | grep -E 'not found|cu|nvrtc'
EOF
