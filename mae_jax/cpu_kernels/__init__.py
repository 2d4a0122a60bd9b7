"""CPU custom calls for the step's two heaviest kernels: Linear matmuls and multi-head attention.

Why: on the Intel CPU measured, XLA's matmul library (YNNPACK) runs the ViT's linear layers at
~210 GFLOP/s where MKL's sgemm runs them at ~265 on the same cores (numpy's OpenBLAS: slower than
YNNPACK), and XLA:CPU has no fused attention, so softmax and its backward are separate passes over
the (B, H, T, T) logits (docs/benchmarks.md). `kernels.cc` is a small XLA FFI library: a matmul that calls sgemm, and a
forward/backward attention that works one (batch, head) at a time on qkv's own (B, T, 3, H, hd)
layout, both parallel over XLA's intra-op thread pool.

How it is built: on first use, with the system C++ compiler, against the XLA FFI headers that
jaxlib ships, into a cache folder (`$MAE_JAX_CACHE`, default `~/.cache/mae_jax`) keyed by the
source, jaxlib's version and this CPU (`-march=native`). The BLAS is MKL when the `mkl` wheel is
installed (requirements.txt, x86-64 Linux), else numpy's own OpenBLAS (scipy-openblas64, loaded as a
private copy so that its thread count does not change numpy's); single-threaded either way, the
threads are XLA's. With no compiler or no BLAS the model keeps XLA's kernels and the reason is
logged once.

When they are used: JAX's default backend is the CPU with one device (a custom call has no sharding
rule, so a sharded CPU mesh keeps XLA's kernels), the build loaded, and the dtype is float32 (other
dtypes keep XLA's kernels). Then attention always takes the fused kernel, and the linear layers take
sgemm where it was measured faster than XLA's dots: MKL on an Intel CPU (`use_for_matmul`).
`MAE_JAX_CPU_KERNELS` = auto (default) | on (both kernels on any CPU, with any BLAS) | off.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(__file__), "kernels.cc")
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-w"]
ENV = "MAE_JAX_CPU_KERNELS"


def cache_dir() -> str:
  return os.environ.get("MAE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mae_jax")


def _mkl_path() -> str | None:
  """libmkl_rt from the `mkl` wheel (installed into the environment's lib/), if present."""
  for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
    found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
    if found:
      return found[0]
  return None


def _openblas_path() -> str:
  """numpy's bundled scipy-openblas64."""
  libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
  found = sorted(glob.glob(os.path.join(libs, "libscipy_openblas64_*.so")))
  if not found:
    raise RuntimeError(f"no libscipy_openblas64_*.so beside numpy ({libs}); numpy not from a wheel?")
  return found[0]


def _sgemm(folder: str) -> tuple[str, int]:
  """(library name, address of a cblas_sgemm with 64-bit integers), single-threaded.

  MKL first: on the CPUs measured it runs these shapes ~1/3 faster per core than OpenBLAS
  (docs/benchmarks.md). `$MAE_JAX_CPU_BLAS` = mkl or openblas forces one.
  """
  want = os.environ.get("MAE_JAX_CPU_BLAS", "").lower()
  if want not in ("", "mkl", "openblas"):
    raise ValueError(f"MAE_JAX_CPU_BLAS={want!r}: expected mkl or openblas")
  mkl = _mkl_path() if want in ("", "mkl") else None
  if mkl is not None:
    lib = ctypes.CDLL(mkl)
    lib.MKL_Set_Threading_Layer(ctypes.c_int(1))  # MKL_THREADING_SEQUENTIAL: the threads are XLA's
    return "MKL", ctypes.cast(lib.cblas_sgemm_64, ctypes.c_void_p).value
  if want == "mkl":
    raise RuntimeError("MAE_JAX_CPU_BLAS=mkl but no libmkl_rt in this environment (pip install mkl)")
  # A private copy, so that setting its thread count to one leaves numpy's BLAS as it was.
  blas = ctypes.CDLL(_private_copy(_openblas_path(), folder), mode=os.RTLD_LOCAL)
  blas.scipy_openblas_set_num_threads64_(ctypes.c_int(1))
  return "OpenBLAS", ctypes.cast(blas.scipy_cblas_sgemm64_, ctypes.c_void_p).value


@functools.cache
def _cpuinfo() -> list[str]:
  """The first CPU's vendor, model name and flags lines of /proc/cpuinfo (empty elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().split("\n\n", 1)[0].splitlines()
  except OSError:
    return []
  return [l for l in lines if l.startswith(("vendor_id", "model name", "flags"))]


def _cpu_tag() -> str:
  """What `-march=native` depends on: the CPU model and its flags."""
  return platform.machine() + "|" + "|".join(_cpuinfo())


def _build(folder: str) -> str:
  import jaxlib
  with open(_SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(source + jaxlib.__version__.encode() + " ".join(_FLAGS).encode()
                       + _cpu_tag().encode()).hexdigest()[:16]
  target = os.path.join(folder, f"kernels-{key}.so")
  if os.path.exists(target):
    return target
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if cxx is None:
    raise RuntimeError("no C++ compiler (g++, c++ or clang++, or $CXX)")
  os.makedirs(folder, exist_ok=True)
  # Build beside the target and rename: parallel test workers may build at the same time.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
  os.close(fd)
  cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    os.unlink(tmp)
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
  os.replace(tmp, target)
  return target


def _private_copy(path: str, folder: str) -> str:
  """A copy of the BLAS under its own name, so dlopen gives this module its own instance."""
  target = os.path.join(folder, "blas-" + os.path.basename(path))
  if not os.path.exists(target):
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    shutil.copyfile(path, tmp)
    os.replace(tmp, target)
  return target


_BLAS = {"name": None}


@functools.cache
def load() -> str | None:
  """Builds and registers the kernels once; returns None when they are ready, else the reason."""
  try:
    folder = os.path.join(cache_dir(), "cpu_kernels")
    lib = ctypes.CDLL(_build(folder))
    name, sgemm = _sgemm(folder)
    if not sgemm or not lib.mae_cpu_kernels_set_sgemm(ctypes.c_void_p(sgemm)):
      raise RuntimeError(f"{name}: no cblas_sgemm")
    for target in ("MaeMatmul", "MaeAttentionFwd", "MaeAttentionBwd"):
      jax.ffi.register_ffi_target(f"mae_jax_{target}", jax.ffi.pycapsule(getattr(lib, target)),
                                  platform="cpu")
  except Exception as e:  # any failure: XLA's own kernels, said once
    reason = f"{type(e).__name__}: {e}"
    log.warning("mae_jax.cpu_kernels not used (XLA's kernels instead): %s", reason)
    return reason
  _BLAS["name"] = name
  log.debug("mae_jax.cpu_kernels loaded (%s sgemm)", name)  # mae_jax.main logs describe()
  return None


def describe() -> str:
  """One line for logs and benchmark headers."""
  if not enabled():
    reason = load() if jax.default_backend() == "cpu" and _setting() != "off" else None
    return "XLA's kernels" + (f" ({reason})" if reason else "")
  matmul = f"{_BLAS['name']} sgemm matmuls" if use_for_matmul() else "XLA's matmuls"
  return f"mae_jax.cpu_kernels: fused attention, {matmul}"


def _setting() -> str:
  value = os.environ.get(ENV, "auto").lower() or "auto"
  if value not in ("auto", "on", "off"):
    raise ValueError(f"{ENV}={value!r}: expected auto, on or off")
  return value


def enabled() -> bool:
  """Whether the kernels can be used here (decided while tracing): JAX's backend is the CPU with one
  device, `MAE_JAX_CPU_KERNELS` is not `off`, and the build loaded."""
  if _setting() == "off" or jax.default_backend() != "cpu" or jax.device_count() != 1:
    return False
  return load() is None


def _intel() -> bool:
  return any("GenuineIntel" in l for l in _cpuinfo())


# What the model asks (each a function so that benchmarks/levers.py can turn one off at a time).
def use_for_matmul() -> bool:
  """Linear layers: where measured faster than XLA's dots, i.e. MKL on an Intel CPU. (OpenBLAS lost
  to XLA's YNNPACK by ~6 % of the step on the Intel host, and YNNPACK beat MKL on an AMD host;
  docs/benchmarks.md.) `MAE_JAX_CPU_KERNELS=on` takes them with any BLAS on any CPU."""
  if not enabled():
    return False
  return _setting() == "on" or (_BLAS["name"] == "MKL" and _intel())


def use_for_attention() -> bool:
  """Attention: wherever the kernels load (one op instead of XLA's separate softmax passes)."""
  return enabled()


# Under jax.vmap a custom call runs once per example (correct, if slower); nothing in mae_jax vmaps
# a model, this only keeps a user's vmap from failing.
_VMAP = "sequential"


def _require():
  reason = load()
  if reason is not None:
    raise RuntimeError(f"mae_jax.cpu_kernels unavailable: {reason}")


def matmul(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """op(a) @ op(b) for 2-D float32 operands, op = transpose where asked."""
  _require()
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  out = jax.ShapeDtypeStruct((m, n), jnp.float32)
  call = jax.ffi.ffi_call("mae_jax_MaeMatmul", out, vmap_method=_VMAP)
  return call(a, b, trans_a=np.int32(trans_a), trans_b=np.int32(trans_b))


@jax.custom_vjp
def dense(x, w):
  """x (M, K) @ w (K, N) with both gradients as sgemm calls: dx = dy·wᵀ, dw = xᵀ·dy."""
  return matmul(x, w)


def _dense_fwd(x, w):
  return matmul(x, w), (x, w)


def _dense_bwd(res, dy):
  x, w = res
  return matmul(dy, w, trans_b=True), matmul(x, dy, trans_a=True)


dense.defvjp(_dense_fwd, _dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def attention(qkv, scale: float):
  """softmax(scale·q·kᵀ)·v per head, from qkv (B, T, 3, H, hd) float32 to (B, T, H, hd)."""
  return _attention_fwd(qkv, scale)[0]


def _attention_fwd(qkv, scale):
  _require()
  b, t, _, h, hd = qkv.shape
  out, lse = jax.ffi.ffi_call(
      "mae_jax_MaeAttentionFwd",
      (jax.ShapeDtypeStruct((b, t, h, hd), jnp.float32), jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
      vmap_method=_VMAP,
  )(qkv, scale=np.float32(scale))
  return out, (qkv, out, lse)


def _attention_bwd(scale, res, dout):
  qkv, out, lse = res
  call = jax.ffi.ffi_call("mae_jax_MaeAttentionBwd", jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
                          vmap_method=_VMAP)
  dqkv = call(qkv, out, lse, dout, scale=np.float32(scale))
  return (dqkv,)


attention.defvjp(_attention_fwd, _attention_bwd)
