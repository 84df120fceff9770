"""The runtime's kernel calls as torch.library custom ops, so that torch.compile sees each as one opaque call.

Dynamo traces into a Python function that launches Triton kernels and hands user-defined Triton
kernels to Inductor, which recompiles them itself; our int8 quantization kernel failed there (the
e2e benchmark's `compile_error`, sagesla bundle), and every such kernel is a risk of the same. A custom
op with a fake (meta) implementation is a leaf of the graph instead: Inductor compiles and fuses the
elementwise work around it (norms, modulation, residuals) and calls the op as is.

Forward only: the modules use these ops where no gradient is needed (inference); training keeps the
autograd Functions. Each op runs on any device (CPU tensors take the torch references inside the
same functions), which is how the tests check them; the modules route only CUDA tensors through them.
No `from __future__ import annotations` here: custom_op reads the schema from the annotations.

Static activation scales travel as 0-d fp32 CPU tensors (`W8A8Linear.static_scale`), not floats: a float
argument is a constant of the compiled graph, so the DiT's blocks — one compiled code object, each with
its own calibrated scales — would each compile again (Dynamo's recompile limit is 8); a tensor is a graph
input. Read on the CPU inside the op, it costs no device synchronization.
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from turbo_kernels.attention.blockmap import sla_block_map, sla_block_map_reference
from turbo_kernels.attention.lowbit import lowbit_attention, lowbit_attention_reference
from turbo_kernels.attention import lowbit_sparse
from turbo_kernels.attention.lowbit_sparse import sagesla_sparse, sagesla_sparse_reference
from turbo_kernels.attention.qk_norm_rope import qk_norm_rope
from turbo_kernels.attention.sla import DEFAULT_CONFIG, add_linear_branch, sagesla_with_linear, sla_attention
from turbo_kernels.capability import kernel_support
from turbo_kernels.gemm.norm_quant import norm_modulate_quant, norm_modulate_quant_reference
from turbo_kernels.gemm.quantize import QDTYPE, quantize_rows, quantize_rows_reference
from turbo_kernels.gemm.w8a8 import GROUPED_GEMM_CONFIG, default_gemm_config, w8a8_matmul, w8a8_matmul_reference
from turbo_kernels.utils import as_heads_output, heads_output_like


class _Op:
    """A torch.library custom op that eager code calls as the plain function: the op (and its fake
    implementation, `register_fake`) is what torch.compile traces, but outside compilation a call goes
    straight to the Python function. A custom op's first eager call imports torch._dynamo: 1.1 s on a
    2-core CPU, 0.7 s of it that import (-X importtime), paid by every fresh process on its way to the
    first video; and every eager call went through the dispatcher."""

    def __init__(self, name: str, fn):
        self.fn = fn
        self.op = torch.library.custom_op(name, mutates_args=())(fn)
        functools.update_wrapper(self, fn)

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.op(*args, **kwargs)
        return self.fn(*args, **kwargs)


def _custom_op(name: str):
    return lambda fn: _Op(name, fn)


def _fast_lowbit(t: Tensor, pv: str) -> tuple[bool, str]:
    """(run the Triton kernels?, PV format) for tensors on t's device; pv "auto" = the device's choice."""
    if not t.is_cuda:
        return False, "fp8" if pv == "auto" else pv
    cap = kernel_support(t.device)
    return cap.int8_attention, cap.attention_pv if pv == "auto" else pv


@_custom_op("turbo::sla_forward")
def sla_forward(q: Tensor, k: Tensor, v: Tensor, proj_weight: Optional[Tensor], proj_bias: Optional[Tensor],
                topk: float, block_q: int, block_k: int, feature_map: str) -> Tensor:
    """SLA inference forward (B, H, L, D) -> (B, H, L, D) in q's dtype (turbo_kernels sla_attention)."""
    with torch.no_grad():
        return as_heads_output(sla_attention(q, k, v, proj_weight, proj_bias, topk, block_q, block_k, feature_map), q)


@sla_forward.register_fake
def _(q, k, v, proj_weight, proj_bias, topk, block_q, block_k, feature_map):
    return heads_output_like(q)


@_custom_op("turbo::sage_forward")
def sage_forward(q: Tensor, k: Tensor, v: Tensor, pv: str) -> Tensor:
    """Dense low-bit attention (SageAttention-style): int8 QK^T, fp8/fp16 PV. pv: fp8 | fp16 | auto."""
    fast, pv = _fast_lowbit(q, pv)
    with torch.no_grad():
        out = lowbit_attention(q, k, v, pv=pv) if fast else lowbit_attention_reference(q, k, v, pv=pv)
    return as_heads_output(out, q)


@sage_forward.register_fake
def _(q, k, v, pv):
    return heads_output_like(q)


@_custom_op("turbo::sagesla_forward")
def sagesla_forward(q: Tensor, k: Tensor, v: Tensor, proj_weight: Tensor, proj_bias: Tensor, topk: float,
                    block_q: int, block_k: int, feature_map: str, pv: str) -> Tensor:
    """SLA with the low-bit sparse branch: O = O_s^lowbit + proj_l(O_l), in q's dtype."""
    fast, pv = _fast_lowbit(q, pv)
    with torch.no_grad():
        if fast:
            bm = sla_block_map(q, k, topk, block_q, block_k, select=DEFAULT_CONFIG.map_select)
            if lowbit_sparse.DEFAULT_SPARSE_CONFIG.fuse_linear:  # read at call time: bench_e2e --ab can switch it
                return as_heads_output(sagesla_with_linear(q, k, v, bm, proj_weight, proj_bias, feature_map, pv), q)
            o_s = sagesla_sparse(q, k, v, bm, pv=pv)
        else:
            bm = sla_block_map_reference(q, k, topk, block_q, block_k)
            o_s = sagesla_sparse_reference(q, k, v, bm, pv=pv)
        # + proj_l(O_l): SLA's linear state and epilogue kernel where Triton runs (was torch block GEMMs,
        # ~3.6 ms of the 5.1 ms module at the 1.3B shape), the torch linear_branch elsewhere
        out = add_linear_branch(o_s, q, k, v, bm, proj_weight, proj_bias, feature_map, inplace=True)
        return as_heads_output(out, q)


@sagesla_forward.register_fake
def _(q, k, v, proj_weight, proj_bias, topk, block_q, block_k, feature_map, pv):
    return heads_output_like(q)


def quantize_activation(x: Tensor, mode: str, act_scale: Optional[Tensor], smooth_inv: Optional[Tensor],
                        use_kernels: bool) -> tuple[Tensor, Tensor]:
    """x (..., K) -> (rows (M, K) int8/fp8, scales): the Triton kernel or its torch reference."""
    if use_kernels:
        return quantize_rows(x, mode, act_scale, smooth_inv=smooth_inv)
    return quantize_rows_reference(x.reshape(-1, x.shape[-1]), mode, act_scale, smooth_inv)


def quantized_product(q: Tensor, s: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                      out_dtype: torch.dtype, use_kernels: bool, residual: Optional[Tensor] = None,
                      gate: Optional[Tensor] = None) -> Tensor:
    """(M, N) = dequantized q W_q^T + bias: the kernel, or the CPU fallback's dequantized product (exact
    int8 products, same epilogue order). residual (..., N) and gate (G, N): residual + gate·y instead, added
    in the GEMM's epilogue (out_dtype should then be the residual's)."""
    fn = w8a8_matmul if use_kernels else w8a8_matmul_reference
    if residual is not None:
        residual = residual.reshape(-1, weight_q.shape[0])
    return fn(q, s, weight_q, weight_scale, bias, out_dtype=out_dtype, residual=residual, gate=gate)


def _out_dtype(dtype: torch.dtype, residual: Optional[Tensor]) -> torch.dtype:
    """The output dtype of a W8A8 op: the input's, or the residual's when one is added."""
    return dtype if residual is None else residual.dtype


@_custom_op("turbo::w8a8_linear")
def w8a8_linear(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                smooth_inv: Optional[Tensor], act_scale: Optional[Tensor], mode: str, use_kernels: bool,
                residual: Optional[Tensor] = None, gate: Optional[Tensor] = None) -> Tensor:
    """y = quant(x) W_q^T · scales + bias for x (..., K) -> (..., N) in x's dtype (W8A8Linear's math); with a
    residual (..., N) (and gate (B, N)): residual + gate·y in the residual's dtype, summed in the epilogue."""
    q, s = quantize_activation(x, mode, act_scale, smooth_inv, use_kernels)
    y = quantized_product(q, s, weight_q, weight_scale, bias, _out_dtype(x.dtype, residual), use_kernels, residual,
                          gate)
    return y.reshape(*x.shape[:-1], weight_q.shape[0]).contiguous()


@w8a8_linear.register_fake
def _(x, weight_q, weight_scale, bias, smooth_inv, act_scale, mode, use_kernels, residual=None, gate=None):
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]), dtype=_out_dtype(x.dtype, residual))


# Dynamic (uncalibrated) FFNs: None quantizes the GELU output per token in a pass of its own (it reads the bf16
# hidden state the up GEMM wrote); an int G instead has the up GEMM's epilogue quantize it with scales per token and
# group of G hidden channels, which the down GEMM's K loop applies step by step (`w8a8_matmul(out_group=G)`, x_scale
# (K // G, M)), so the hidden state is written once in 8 bits and the pass is gone. Used where G divides the hidden
# width and the up GEMM's N tile and is a multiple of the down GEMM's K tile. Off: measured slower (H100, session 30,
# whole dynamic fp8 FFN 2.254 ms with groups of 128 against 1.833 per token; the grouped down GEMM takes twice as long).
FFN_HIDDEN_GROUP: Optional[int] = None


def _hidden_group(q: Tensor, hidden: int, use_kernels: bool) -> Optional[int]:
    """FFN_HIDDEN_GROUP where the GEMM tiles allow it (see there), else None."""
    G = FFN_HIDDEN_GROUP
    if not G or hidden % G:
        return None
    if use_kernels and (default_gemm_config(q).block_n % G or G % GROUPED_GEMM_CONFIG.block_k):
        return None
    return G


def _gelu_ffn_tail(q: Tensor, s: Tensor, up_wq, up_ws, up_b, down_wq, down_ws, down_b, down_smooth_inv,
                   down_act_scale, down_mode: str, out_dtype: torch.dtype, use_kernels: bool, residual=None,
                   gate=None) -> Tensor:
    """(M, N) = down(gelu_tanh(up(q·s))) from the up layer's quantized input (see w8a8_gelu_ffn); with a
    residual: residual + gate·that, in the down GEMM's epilogue."""
    mm = w8a8_matmul if use_kernels else w8a8_matmul_reference
    group = _hidden_group(q, up_wq.shape[0], use_kernels) if down_smooth_inv is None else None
    if down_act_scale is not None and down_smooth_inv is None:
        hq, hs = mm(q, s, up_wq, up_ws, up_b, out_dtype=out_dtype, activation="gelu_tanh", out_quant=down_mode,
                    out_scale=down_act_scale)
    elif group is not None:
        hq, hs = mm(q, s, up_wq, up_ws, up_b, out_dtype=out_dtype, activation="gelu_tanh", out_quant=down_mode,
                    out_group=group)
    else:
        h = mm(q, s, up_wq, up_ws, up_b, out_dtype=out_dtype, activation="gelu_tanh")
        hq, hs = quantize_activation(h, down_mode, down_act_scale, down_smooth_inv, use_kernels)
    return quantized_product(hq, hs, down_wq, down_ws, down_b, _out_dtype(out_dtype, residual),
                             use_kernels, residual, gate)


@_custom_op("turbo::w8a8_gelu_ffn")
def w8a8_gelu_ffn(x: Tensor, up_wq: Tensor, up_ws: Tensor, up_b: Optional[Tensor], up_smooth_inv: Optional[Tensor],
                  up_act_scale: Optional[Tensor], up_mode: str, down_wq: Tensor, down_ws: Tensor,
                  down_b: Optional[Tensor], down_smooth_inv: Optional[Tensor], down_act_scale: Optional[Tensor],
                  down_mode: str, use_kernels: bool, residual: Optional[Tensor] = None,
                  gate: Optional[Tensor] = None) -> Tensor:
    """down(gelu_tanh(up(x))) for two W8A8 layers (W8A8GeluFFN's math): GELU runs in the up GEMM's
    epilogue on its fp32 result; with a static activation scale on `down` (and no smoothing there) the
    epilogue also writes down's quantized input, so the (M, 4·dim) hidden state never exists in bf16.
    residual, gate: residual + gate·FFN(x) from the down GEMM's epilogue (see w8a8_linear)."""
    q, s = quantize_activation(x, up_mode, up_act_scale, up_smooth_inv, use_kernels)
    y = _gelu_ffn_tail(q, s, up_wq, up_ws, up_b, down_wq, down_ws, down_b, down_smooth_inv, down_act_scale,
                       down_mode, x.dtype, use_kernels, residual, gate)
    return y.reshape(*x.shape[:-1], down_wq.shape[0]).contiguous()


@w8a8_gelu_ffn.register_fake
def _(x, up_wq, up_ws, up_b, up_smooth_inv, up_act_scale, up_mode, down_wq, down_ws, down_b, down_smooth_inv,
      down_act_scale, down_mode, use_kernels, residual=None, gate=None):
    return x.new_empty((*x.shape[:-1], down_wq.shape[0]), dtype=_out_dtype(x.dtype, residual))


@_custom_op("turbo::w8a8_gelu_ffn_q")
def w8a8_gelu_ffn_q(q: Tensor, s: Tensor, up_wq: Tensor, up_ws: Tensor, up_b: Optional[Tensor], down_wq: Tensor,
                    down_ws: Tensor, down_b: Optional[Tensor], down_smooth_inv: Optional[Tensor],
                    down_act_scale: Optional[Tensor], down_mode: str, out_dtype: torch.dtype,
                    use_kernels: bool, residual: Optional[Tensor] = None, gate: Optional[Tensor] = None) -> Tensor:
    """w8a8_gelu_ffn from an already quantized input q (M, K), s (M,) -> (M, N) in out_dtype (the residual's
    dtype when one is added)."""
    return _gelu_ffn_tail(q, s, up_wq, up_ws, up_b, down_wq, down_ws, down_b, down_smooth_inv, down_act_scale,
                          down_mode, out_dtype, use_kernels, residual, gate).contiguous()


@w8a8_gelu_ffn_q.register_fake
def _(q, s, up_wq, up_ws, up_b, down_wq, down_ws, down_b, down_smooth_inv, down_act_scale, down_mode, out_dtype,
      use_kernels, residual=None, gate=None):
    return q.new_empty((q.shape[0], down_wq.shape[0]), dtype=_out_dtype(out_dtype, residual))


@_custom_op("turbo::w8a8_product")
def w8a8_product(q: Tensor, s: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                 out_dtype: torch.dtype, use_kernels: bool) -> Tensor:
    """(M, N) = dequantized q W_q^T + bias for an already quantized input (W8A8Linear on a QuantizedActivation)."""
    return quantized_product(q, s, weight_q, weight_scale, bias, out_dtype, use_kernels).contiguous()


@w8a8_product.register_fake
def _(q, s, weight_q, weight_scale, bias, out_dtype, use_kernels):
    return q.new_empty((q.shape[0], weight_q.shape[0]), dtype=out_dtype)


@_custom_op("turbo::norm_quant")
def norm_quant(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, shift: Optional[Tensor],
               scale: Optional[Tensor], mode: str, act_scale: Optional[Tensor],
               use_kernels: bool) -> tuple[Tensor, Tensor]:
    """LayerNorm (fp32) -> x·(1 + scale) + shift -> per-token (or static) quantization, in one pass:
    x (B, L, C), shift/scale (B, C) -> (q (B·L, C) int8/fp8, s (B·L,) fp32) (turbo_kernels norm_quant)."""
    fn = norm_modulate_quant if use_kernels else norm_modulate_quant_reference
    q, s = fn(x, shift, scale, norm="layer", weight=weight, bias=bias, eps=eps, quant=mode, act_scale=act_scale)
    return q, s


@norm_quant.register_fake
def _(x, weight, bias, eps, shift, scale, mode, act_scale, use_kernels):
    M = x.numel() // x.shape[-1]
    return x.new_empty((M, x.shape[-1]), dtype=QDTYPE[mode]), x.new_empty((M,), dtype=torch.float32)


@_custom_op("turbo::rms_norm")
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim in fp32, times weight, back in x's dtype, in one pass over x (turbo_kernels
    norm_quant with norm="rms", no modulation, no quantization): x (..., C) -> like x."""
    with torch.no_grad():
        return norm_modulate_quant(x, norm="rms", weight=weight, eps=eps, quant=None)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@_custom_op("turbo::norm_rope")
def norm_rope(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, num_heads: int, eps: float) -> Tensor:
    """Fused q/k RMSNorm + RoPE: x (B, L, C) -> (B, L, H, D) in x's dtype (turbo_kernels qk_norm_rope)."""
    with torch.no_grad():
        return qk_norm_rope(x, weight, cos, sin, num_heads, eps)


@norm_rope.register_fake
def _(x, weight, cos, sin, num_heads, eps):
    B, L, C = x.shape
    return x.new_empty((B, L, num_heads, C // num_heads))


__all__ = ["norm_rope", "quantize_activation", "rms_norm", "quantized_product", "sage_forward", "sagesla_forward",
           "sla_forward", "w8a8_linear"]
