"""Native CPU kernels for decoding, called by XLA through its FFI (source: `packed_matmul.cc`):
matmuls against float32 or bfloat16 weights packed in 48-column panels (`PackedWeight`; float32
activations and accumulation either way), and one-token attention over the KV cache
(`decode_attention`).

Why: XLA's CPU dots run a batch-16 decode step's matmuls (M = 16 rows against SmolLM2's weights)
at 35-48 GFLOP/s on a 2-core AVX-512 machine, and these take most of the step; the panel kernel
reads each weight once, as a sequential stream, and reuses it for 8 rows from registers. XLA's
batched dots for decode attention ran at about 11 GFLOP/s; the attention kernel also reads only
the filled cache slots (benchmarks/NOTES.md has the measurements). Only generation's weights are
packed (`pvjax.engine.generate.decode_params`); the forward, training and other backends keep XLA's
dots.

The kernel is compiled on first use with the system's C++ compiler for the host CPU
(`-march=native`) and cached under `$PVJAX_CACHE` (default `~/.cache/pvjax`), keyed by the source,
the jaxlib version and the CPU's feature flags. Without a compiler, on a CPU other than x86-64 or
aarch64, or with `PVJAX_CPU_KERNELS=0`, `available()` is False and callers keep XLA's dots.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pvjax.files import atomic

PANEL = 48  # columns per panel; must match kNR in packed_matmul.cc
_TARGET = "pvjax_packed_matmul"
_TARGET_BF16 = "pvjax_packed_matmul_bf16"
_ATTENTION = "pvjax_decode_attention"
_SOURCE = Path(__file__).with_name("packed_matmul.cc")
_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("PVJAX_CACHE", Path.home() / ".cache" / "pvjax")) / "kernels"


def _build() -> Path:
    """The compiled library, built once per (source, jaxlib, CPU) and reused afterwards."""
    import jaxlib

    compiler = (
        os.environ.get("CXX")
        or shutil.which("c++")
        or shutil.which("g++")
        or shutil.which("clang++")
    )
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    arch_flag = "-mcpu=native" if platform.machine() in ("arm64", "aarch64") else "-march=native"
    flags = ["-std=c++17", "-O3", arch_flag, "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256(
        "\n".join(
            [
                _SOURCE.read_text(),
                jaxlib.__version__,
                compiler,
                " ".join(flags),
                platform.machine(),
                _cpu_flags(),
            ]
        ).encode()
    ).hexdigest()[:16]
    out = _cache_dir() / f"packed_matmul-{key}.so"
    if out.exists():
        return out
    # The compiler writes into a scratch folder; the library lands by an atomic rename, so
    # concurrent processes never load a half-written file.
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch) / out.name
        res = subprocess.run(
            [compiler, *flags, str(_SOURCE), "-o", str(tmp)], capture_output=True, text=True
        )
        if res.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {_SOURCE.name}:\n{res.stderr[-2000:]}")
        atomic.write_bytes(out, tmp.read_bytes())
    return out


def available() -> bool:
    """Whether the packed kernel can serve CPU matmuls in this process (built and registered on
    the first call; a failure warns once and leaves XLA's dots in place)."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _register()
        return _state["ok"]


def _register() -> bool:
    if os.environ.get("PVJAX_CPU_KERNELS", "1") == "0":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "arm64", "aarch64"):
        return False
    try:
        import ctypes

        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(
            _TARGET, jax.ffi.pycapsule(lib.PvjaxPackedMatmul), platform="cpu"
        )
        jax.ffi.register_ffi_target(
            _TARGET_BF16, jax.ffi.pycapsule(lib.PvjaxPackedMatmulBF16), platform="cpu"
        )
        jax.ffi.register_ffi_target(
            _ATTENTION, jax.ffi.pycapsule(lib.PvjaxDecodeAttention), platform="cpu"
        )
        _state["lib"] = lib  # keep the library loaded for the life of the process
        return True
    except Exception as e:  # no compiler, no headers, a foreign toolchain: fall back, loudly once
        warnings.warn(
            f"pvjax: CPU decode kernel unavailable, using XLA's dots ({e})", RuntimeWarning
        )
        return False


@jax.tree_util.register_pytree_node_class
class PackedWeight:
    """A `[K, N]` weight stored as `[ceil(N / 48), K', 48]` column panels (zero padded), float32,
    or bfloat16 when the weight is bfloat16 (half the bytes to stream; products still float32).
    bfloat16 panels hold their rows in pairs, each column's (k, k+1) weights side by side (`K'` is
    `K` rounded up to even), which the kernel widens to float32 with a shift and a mask. `K` and
    `N` travel as static pytree data, so jitted code knows the shapes."""

    def __init__(self, panels, n: int, k: int | None = None):
        self.panels, self.n = panels, n
        self.k = panels.shape[1] if k is None else k

    @classmethod
    def pack(cls, w_KN) -> "PackedWeight":
        w = jnp.asarray(w_KN)
        K, N = w.shape
        P = -(-N // PANEL)
        if w.dtype != jnp.bfloat16:
            w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, P * PANEL - N)))
            return cls(w.reshape(K, P, PANEL).transpose(1, 0, 2), N, K)
        K2 = K + K % 2
        w = jnp.pad(w, ((0, K2 - K), (0, P * PANEL - N)))
        pairs = w.reshape(K2 // 2, 2, P, PANEL).transpose(2, 0, 3, 1)  # [P, K2/2, 48, (k, k+1)]
        return cls(pairs.reshape(P, K2, PANEL), N, K)

    @property
    def dtype(self):
        return self.panels.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.n)

    def unpack(self) -> jax.Array:
        P, K2, R = self.panels.shape
        if self.panels.dtype == jnp.bfloat16:
            w = self.panels.reshape(P, K2 // 2, R, 2).transpose(1, 3, 0, 2)
        else:
            w = self.panels.transpose(1, 0, 2)
        return w.reshape(K2, P * R)[: self.k, : self.n]

    def tree_flatten(self):
        return (self.panels,), (self.n, self.k)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        return cls(leaves[0], *aux)

    def __rmatmul__(self, x):
        """`x @ w` for any leading axes of `x`; the result is float32."""
        if not available():
            raise RuntimeError(
                "a PackedWeight needs the CPU decode kernel, which is unavailable here "
                "(see the warning above, or PVJAX_CPU_KERNELS)"
            )
        x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        if x2.shape[1] != self.k:
            raise ValueError(f"packed weight has K={self.k}, input has {x2.shape[1]}")
        target = _TARGET
        if self.panels.dtype == jnp.bfloat16:
            target = _TARGET_BF16
            if self.k % 2:  # the panels' last row pair is half zeros; x gets the matching column
                x2 = jnp.pad(x2, ((0, 0), (0, 1)))
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x2.shape[0], self.n), jnp.float32))
        return call(x2, self.panels).reshape(x.shape[:-1] + (self.n,))


def decode_attention(q_BTHE, k_RES, v_RSE, valid_BS, upto, scale=None, softcap=None):
    """One new token's grouped-query attention over the merged cache (`R = B * kv heads` rows;
    see `pvjax.models.decoder.init_cache`), reading only the `upto` filled slots. float32.
    Scores are scaled by `scale` (default `E ** -0.5`), then soft-capped
    (`softcap * tanh(s / softcap)`, Gemma 2) when `softcap` is given, as `pvjax.models.block`."""
    if not available():
        raise RuntimeError("the CPU decode kernels are unavailable here (see PVJAX_CPU_KERNELS)")
    B, T, H, E = q_BTHE.shape
    R = k_RES.shape[0]
    if T != 1 or R % B or H % (R // B):
        raise ValueError(
            f"decode_attention needs one token and whole kv heads, got q {q_BTHE.shape}, k "
            f"{k_RES.shape}"
        )
    q = q_BTHE.reshape(R, H // (R // B), E).astype(jnp.float32)
    call = jax.ffi.ffi_call(_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    o = call(
        q,
        k_RES.astype(jnp.float32),
        v_RSE.astype(jnp.float32),
        valid_BS.astype(bool),
        jnp.asarray(upto, jnp.int32).reshape(1),
        scale=np.float32(0.0 if scale is None else scale),
        softcap=np.float32(0.0 if softcap is None else softcap),
    )
    return o.reshape(B, T, H * E).astype(q_BTHE.dtype)
