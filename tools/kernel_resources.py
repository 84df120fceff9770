"""Registers, spills and SASS instruction mix of the SLA, W8A8 and row kernels for a GPU, compiled here.

    python tools/kernel_resources.py [--arch 90] [--variants fused,folded,dq_fused,...] [--warps N] [--stages N]

No GPU needed: Triton compiles for the named architecture on the CPU and its bundled cuobjdump /
nvdisasm read the cubin. This answers "did it spill, are the matrix instructions there, how long is the
epilogue" before a device call is spent (METHOD.md: read what costs no device time). The CPU's Triton
may be newer than the GPU machine's, so figures can differ a little from what runs there.

Variants at the Wan-1.3B settings (128x64 map blocks, D = 128, bf16; tiles, warps and stages as the
launchers take them from SLAKernelConfig's defaults):
    unfused     forward, the sparse branch alone (LINEAR=False; the linear branch in its own kernel)
    fused       forward + linear-branch epilogue, two D x D products (training forward)
    folded      forward + inference epilogue: proj_l folded into Hm, phi(q) precomputed
    dq_unfused  dQ backward kernel, sparse branch alone (the default backward since 2026-12-03)
    dq_fused    dQ backward kernel with the linear branch's dQ part fused in
    dkdv_unfused, dkdv_fused  the dK/dV backward kernel without / with the linear branch's part
    lin_state, lin_state_b4  the linear branch's state kernel (proj_l folded in), one / four key blocks per program
    lin_fwd, lin_bwd_q, lin_bwd_kv  the separate linear-branch kernels (fuse_linear[_bwd] = False)
W8A8 GEMMs at the Wan-1.3B FFN shapes (fp8 unless named, 128-row tiles, 8 warps; `kernels/gemm/w8a8.py`):
    w8a8_tma          the descriptor kernel, 128x256x128, the FFN down's gated residual in the epilogue (gate path 1)
    w8a8_tma_gate2, w8a8_tma_gate3  the same with a gate row that changes inside a tile (select) / per row (gather)
    w8a8_tma_group_out  the FFN up: GELU, output quantized per row and group of 128 columns (out_group)
    w8a8_tma_persist, w8a8_tma_flat, w8a8_tma_flat_gelu  persistent grid (132 programs), bf16 out: the tile loop as
                      it is / flattened with the K loop into one pipelined loop (GemmConfig.flatten), + GELU;
    w8a8_tma_flat_res  flattened, the FFN down's gated residual in the epilogue (gate path 1)
    w8a8_tma_flat_f32out, w8a8_tma_persist_f32out  fp32 output (calibration's fp32 model): flattened (does not fit
                      sm_90's shared memory) / the persistent loop the launcher takes for outputs wider than 2 bytes
    w8a8_tma_flat_gelu_store, w8a8_tma_flat_gelu_fp8_store  flattened + GELU, the output (bf16 / fp8 with a static
                      scale) stored through a tensor descriptor in two half-width subtiles (GemmConfig.store_desc)
    w8a8_ptr_group_a, w8a8_ptr_int8_group_a  the FFN down with group-scaled A (128-wide N tiles, pointer kernel)
Row kernels: rope_split (q/k RMSNorm + RoPE, contiguous pair tiles, 4 warps), norm_quant (LayerNorm + modulation +
fp8 quantization, 1 warp).
sagesla's sparse kernel (tensor descriptors, 128x64 blocks, 4 warps, 3 stages): sagesla_tma (O_s alone),
sagesla_tma_linear (+ the linear branch in its epilogue, SparseLowbitConfig.fuse_linear), sagesla_ptr_linear_toy (the
pointer kernel at the toy model's head dim 64 and 16-token blocks).
The device machine's Triton may be older than this one's: to compile with its version, run the tool from a venv,
e.g. python -m venv --system-site-packages /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0 &&
/tmp/t36/bin/python tools/kernel_resources.py --variants w8a8_tma,w8a8_ptr_group_a (a compiler assertion aborts
the process: one variant per run then says which).
Prints per variant: registers, stack bytes, instructions, spill loads/stores, wgmma (HGMMA) count,
the main loop's length, spills and global loads (LDGSTS...128 = 16-byte asynchronous copies), and the
most frequent opcodes. Arguments get the specialization a real launch gives them (16-byte aligned
tensors, integers divisible by 16 marked so): without it Triton cannot vectorize the tile loads and the
listing shows 1- and 2-byte loads and spills that a launched kernel does not have.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

# variant -> (kernel, its constexprs beyond the common ones)
VARIANTS = {
    "unfused": ("_sla_fwd_kernel", dict(LINEAR=False, HAS_BIAS=False, FOLDED=False)),
    "fused": ("_sla_fwd_kernel", dict(LINEAR=True, HAS_BIAS=True, FOLDED=False)),
    "folded": ("_sla_fwd_kernel", dict(LINEAR=True, HAS_BIAS=True, FOLDED=True)),
    "dq_unfused": ("_sla_bwd_dq_kernel", dict(LINEAR=False)),
    "dq_fused": ("_sla_bwd_dq_kernel", dict(LINEAR=True)),
    "dkdv_unfused": ("_sla_bwd_dkdv_kernel", dict(LINEAR=False)),
    "dkdv_fused": ("_sla_bwd_dkdv_kernel", dict(LINEAR=True)),
    "lin_state": ("_sla_lin_state_kernel", dict(FOLD_W=True, BLOCKS=1)),
    "lin_state_b4": ("_sla_lin_state_kernel", dict(FOLD_W=True, BLOCKS=4)),
    "lin_fwd": ("_sla_lin_fwd_kernel", dict(HAS_BIAS=True, FOLDED=True)),
    "lin_bwd_q": ("_sla_lin_bwd_q_kernel", dict()),
    "lin_bwd_kv": ("_sla_lin_bwd_kv_kernel", dict()),
}
# kernel -> the SLAKernelConfig fields its launcher takes (BLOCK_M, BLOCK_N, num_warps, num_stages);
# None = not a parameter of that kernel (stages: the launcher passes none, Triton's default applies)
LAUNCH_FIELDS = {
    "_sla_fwd_kernel": ("fwd_block_m", "fwd_block_n", "fwd_warps", "fwd_stages"),
    "_sla_bwd_dq_kernel": ("dq_block_m", "dq_block_n", "dq_warps", "dq_stages"),
    "_sla_bwd_dkdv_kernel": ("dkdv_block_m", "dkdv_block_n", "dkdv_warps", "dkdv_stages"),
    "_sla_lin_state_kernel": (None, None, "state_warps", None),
    "_sla_lin_fwd_kernel": ("fwd_block_m", None, "lin_warps", None),
    "_sla_lin_bwd_q_kernel": ("dq_block_m", None, "lin_warps", None),
    "_sla_lin_bwd_kv_kernel": (None, "dkdv_block_n", "lin_warps", None),
}
TRITON_DEFAULT_STAGES = 3
FP32_PTRS = {"LSE", "DELTA", "ZM", "DZM", "BIAS", "DZ"}
FP32_SCALARS = {"qk_scale", "lin_eps", "sm_scale", "inv_lk"}
NOT_DIV16 = {"H", "Lq", "Lk", "n_sel", "inv_lk"}  # integer arguments not divisible by 16 at the 1.3B shape
MMA = ("HGMMA", "IGMMA", "QGMMA")  # Hopper warpgroup matrix instructions (bf16/fp16, int8, fp8)
ADDR = re.compile(r"/\*([0-9a-f]{4,})\*/")


def _w8a8_signature(name: str, c: dict) -> str:
    """Argument types of the W8A8 GEMM kernels for the constexprs c (int8 or fp8 operands, an fp8 output when
    the epilogue quantizes, descriptors of the A and B tiles)."""
    q = "i8" if c["INT8"] else "fp8e4nv"
    if name in ("A", "B"):
        return f"*{q}"
    if name == "a_desc":
        return f"tensordesc<{q}[{c['BLOCK_M']}, {c['BLOCK_K']}]>"
    if name == "b_desc":
        return f"tensordesc<{q}[{c['BLOCK_N']}, {c['BLOCK_K']}]>"
    if name == "c_desc":  # STORE_DESC: the output tile (or half of it) through a descriptor
        out = "fp8e4nv" if c["OUT_QUANT"] else "bf16"
        return f"tensordesc<{out}[{c['BLOCK_M']}, {c['BLOCK_N'] // (2 if c['SUBTILE'] else 1)}]>"
    if name in ("AS", "BS", "G", "S"):
        return "*fp32"
    if name == "C":
        return "*fp8e4nv" if c["OUT_QUANT"] else "*bf16"
    if name in ("R", "Bias"):
        return "*bf16"
    return "fp32" if name in ("out_inv", "a_inv", "a_scale") else "i32"


_W8A8_BASE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, HAS_BIAS=True, INT8=False, EVEN_K=True,
                  EXACT_CAST=False, A_QUANT=False, RESIDUAL=False, GATE=0, NUM_PROGRAMS=1024, WS=False, GELU=False,
                  OUT_QUANT=False, OUT_FP8=False, OUT_GROUP=0, A_GROUP=0, FLATTEN=False,
                  FAST_GELU=True, c_desc=None, STORE_DESC=False, SUBTILE=False)
# variant -> (module, kernel, constexprs, signature function (name, constexprs) -> type, warps, stages)
OTHER_VARIANTS = {
    "w8a8_tma": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_tma_kernel", dict(RESIDUAL=True, GATE=1), _w8a8_signature, 8, 4),
    "w8a8_tma_gate2": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_tma_kernel", dict(RESIDUAL=True, GATE=2),
                       _w8a8_signature, 8, 4),
    "w8a8_tma_gate3": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_tma_kernel", dict(RESIDUAL=True, GATE=3),
                       _w8a8_signature, 8, 4),
    "w8a8_tma_group_out": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_tma_kernel",
                           dict(GELU=True, OUT_QUANT=True, OUT_FP8=True, OUT_GROUP=128), _w8a8_signature, 8, 4),
    "w8a8_tma_flat": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_tma_kernel", dict(NUM_PROGRAMS=132, FLATTEN=True),
                      _w8a8_signature, 8, 4),
    "w8a8_tma_flat_gelu": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_tma_kernel",
                           dict(NUM_PROGRAMS=132, FLATTEN=True, GELU=True), _w8a8_signature, 8, 4),
    "w8a8_tma_flat_f32out": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_tma_kernel", dict(NUM_PROGRAMS=132, FLATTEN=True),
                             lambda n, c: "*fp32" if n == "C" else _w8a8_signature(n, c), 8, 4),
    "w8a8_tma_persist_f32out": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_tma_kernel", dict(NUM_PROGRAMS=132),
                                lambda n, c: "*fp32" if n == "C" else _w8a8_signature(n, c), 8, 4),
    "w8a8_tma_flat_gelu_store": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_tma_kernel",
                                 dict(NUM_PROGRAMS=132, FLATTEN=True, GELU=True, STORE_DESC=True, SUBTILE=True),
                                 _w8a8_signature, 8, 3),
    "w8a8_tma_flat_gelu_fp8_store": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_tma_kernel",
                                     dict(NUM_PROGRAMS=132, FLATTEN=True, GELU=True, OUT_QUANT=True, OUT_FP8=True,
                                          STORE_DESC=True, SUBTILE=True), _w8a8_signature, 8, 3),
    "w8a8_tma_flat_res": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_tma_kernel",
                          dict(NUM_PROGRAMS=132, FLATTEN=True, RESIDUAL=True, GATE=1), _w8a8_signature, 8, 4),
    "w8a8_tma_persist": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_tma_kernel", dict(NUM_PROGRAMS=132), _w8a8_signature,
                         8, 4),
    "w8a8_ptr_group_a": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_kernel",
                         dict(BLOCK_N=128, A_GROUP=128, RESIDUAL=True, GATE=1), _w8a8_signature, 8, 3),
    "w8a8_ptr_int8_group_a": ("turbo_kernels.gemm.w8a8", "_w8a8_gemm_kernel",
                              dict(BLOCK_N=128, A_GROUP=128, INT8=True, RESIDUAL=True, GATE=1), _w8a8_signature, 8, 3),
    "rope_split": ("turbo_kernels.attention.qk_norm_rope", "_qk_norm_rope_kernel", dict(BLOCK_P=1024, SPLIT=True),
                   lambda n, c: "*bf16" if n in ("X", "Out", "W") else "*fp32" if n in ("Cos", "Sin")
                   else "fp32" if n == "eps" else "i32", 4, 3),
    "norm_quant": ("turbo_kernels.gemm.norm_quant", "_norm_modulate_quant_kernel",
                   dict(BLOCK_C=2048, RMS=False, HAS_W=False, HAS_B=False, HAS_SCALE=True, HAS_SHIFT=True, QUANT=True,
                        STATIC=False, FP8=True, EXACT_CAST=False),
                   lambda n, c: "*bf16" if n in ("X", "W", "Bv") else "*fp8e4nv" if n == "Out"
                   else "*fp32" if n in ("Shift", "Scale", "OutScale")
                   else "fp32" if n in ("eps", "static_inv", "static_scale") else "i32", 1, 3),
}
_SAGESLA_BASE = dict(D=128, BLOCK_M=128, BLK_Q=128, BLK_K=64, PV_FP8=True, I2F=2, EXACT_CAST=False, TAU=0.0, SHIFT=8.0,
                     LINEAR=False, HAS_BIAS=True, FEATURE=0, stride_od=1)  # a launch specializes the stride 1


def _sagesla_signature(name: str, c: dict) -> str:
    """Argument types of the sparse low-bit kernels at the Wan-1.3B settings (int8 Q/K, fp8 V, bf16 float Q/O)."""
    if name == "k_desc":
        return f"tensordesc<i8[{c['BLK_K']}, {c['D']}]>"
    if name == "v_desc":
        return f"tensordesc<fp8e4nv[{c['D']}, {c['BLK_K']}]>"
    if name in ("Q", "K"):
        return "*i8"
    if name == "V":
        return "*fp8e4nv"
    if name in ("QS", "KS", "VS", "BIAS"):
        return "*fp32"
    if name == "LUT":
        return "*i32"
    if name in ("Out", "QF", "HM", "ZM"):
        return "*bf16"
    return "fp32" if name == "lin_eps" else "i32"


_TMA_SPARSE = ("turbo_kernels.attention.lowbit_sparse", "_lowbit_sparse_fwd_tma_kernel")
OTHER_VARIANTS.update({
    "sagesla_tma": (*_TMA_SPARSE, dict(_SAGESLA_BASE), _sagesla_signature, 4, 3),
    "sagesla_tma_linear": (*_TMA_SPARSE, dict(_SAGESLA_BASE, LINEAR=True), _sagesla_signature, 4, 3),
    # the toy model's sagesla bundle: head dim 64, 16-token blocks (pointer kernel, two key blocks per fp8 step)
    "sagesla_ptr_linear_toy": ("turbo_kernels.attention.lowbit_sparse", "_lowbit_sparse_fwd_kernel",
                               dict(_SAGESLA_BASE, D=64, BLOCK_M=16, BLK_Q=16, BLK_K=16, GROUP=2, LINEAR=True),
                               _sagesla_signature, 4, 3),
})
NOT_DIV16_OTHER = {"M", "L", "gate_rows", "H", "Lq", "Lk", "n"}  # 32 760 rows, 12 heads, 51 blocks: not multiples of 16


def _compile_other(variant: str, arch: int, warps: int = 0, stages: int = 0):
    """Compile an OTHER_VARIANTS entry (W8A8 GEMMs, row kernels) with a launch's specialization."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, kernel, extra, signature, w, st = OTHER_VARIANTS[variant]
    fn = getattr(importlib.import_module(module), kernel)
    const = {**_W8A8_BASE, **extra} if module.endswith("w8a8") else dict(extra)
    if const.get("STORE_DESC"):
        del const["c_desc"]  # an argument then, not the constexpr None
    const = {k: v for k, v in const.items() if k in fn.arg_names}
    sig = {n: "constexpr" if n in const else signature(n, const) for n in fn.arg_names}
    aligned = [i for i, n in enumerate(fn.arg_names) if n not in const and n not in NOT_DIV16_OTHER
               and (sig[n].startswith("*") or sig[n] == "i32")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps or w, num_stages=stages or st))


def compile_variant(variant: str, arch: int, warps: int = 0, stages: int = 0, block_n: int = 0):
    """Compile one VARIANTS entry at the Wan-1.3B settings (128x64 map blocks, D = 128, bf16) for
    compute capability arch/10, here on the CPU, with the tiles, warps and stages its launcher takes
    from `DEFAULT_CONFIG` (kernels/attention/sla.py); warps / stages / block_n > 0 override them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from turbo_kernels.attention import sla, sla_kernels

    if variant in OTHER_VARIANTS:
        return _compile_other(variant, arch, warps, stages)
    name, extra = VARIANTS[variant]
    fn = getattr(sla_kernels, name)
    f_m, f_n, f_w, f_s = (getattr(sla.DEFAULT_CONFIG, f) if f else None for f in LAUNCH_FIELDS[name])
    warps, stages = warps or f_w, stages or f_s or TRITON_DEFAULT_STAGES
    const = dict(MAP_BQ=128, MAP_BK=64, BLOCK_M=f_m, BLOCK_N=block_n or f_n, BLOCK_D=128, EVEN_N=False,
                 FEATURE=0, PAD_D=False, STORE_LSE=False, STORE_OS=False,
                 TAU=float(sla.DEFAULT_CONFIG.fwd_rescale_tau), **extra)
    const = {k: v for k, v in const.items() if k in fn.arg_names}  # the ones this kernel takes
    sig = {}
    for n in fn.arg_names:
        if n in const:
            sig[n] = "constexpr"
        elif n in ("LUT", "KV_OFF", "KV_QIDX"):
            sig[n] = "*i32"
        elif n in FP32_PTRS:
            sig[n] = "*fp32"
        elif n.isupper() and n not in ("H", "D"):  # tensors are upper case; H, D are sizes
            sig[n] = "*bf16"
        else:
            sig[n] = "fp32" if n in FP32_SCALARS else "i32"
    # What Triton's launcher specializes at a real launch: tensors are 16-byte aligned, and integers
    # divisible by 16 are marked so (it vectorizes loads only where it can prove this). At the 1.3B
    # shape every stride, D and the block counts are; H = 12, L = 32 760 and n = 51 are not.
    aligned = [i for i, n in enumerate(fn.arg_names)
               if n not in const and (sig[n].startswith("*") or (sig[n] == "i32" and n not in NOT_DIV16))]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: this Triton install has no NVIDIA binutils")
    return path


def inspect(kernel) -> dict:
    """Resource usage and instruction mix of a compiled Triton kernel's cubin."""
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    instrs, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        a = ADDR.search(line)
        op = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if a and op:
            addr = int(a.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append((addr, op.group(1), line))
    ops = collections.Counter(op for _, op, _ in instrs)
    loops = []  # backward branches: (start, end) of each loop body
    for addr, op, line in instrs:
        m = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", line)
        if op.startswith("BRA") and m and labels.get(m.group(1), addr + 1) < addr:
            loops.append((labels[m.group(1)], addr))

    def body_of(loop):
        return [op for x, op, _ in instrs if loop[0] <= x <= loop[1]]

    # the main loop: the one with the most matrix instructions (then the longest)
    def count(ops_, *prefixes):  # opcodes carry modifiers (LDL.64, HGMMA.64x64x16.F32.BF16)
        return sum(1 for o in ops_ if o.split(".")[0] in prefixes)

    main = max(loops, key=lambda lp: (count(body_of(lp), *MMA), lp[1] - lp[0]), default=None)
    body = body_of(main) if main else []
    loads = collections.Counter(op for op in body if op.startswith(("LDG", "LDGSTS", "UTMALDG")))
    return {"loop_global_loads": dict(loads), "shared_bytes": kernel.metadata.shared,
            "registers": regs, "stack_bytes": stack, "instructions": len(instrs),
            "spill_loads": count(ops.elements(), "LDL"), "spill_stores": count(ops.elements(), "STL"),
            "hgmma": count(ops.elements(), *MMA), "main_loop_instructions": len(body),
            "main_loop_spills": count(body, "LDL", "STL"),
            "top_ops": collections.Counter(o.split(".")[0] for o in ops.elements()).most_common(8)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated among {[*VARIANTS, *OTHER_VARIANTS]} (default: the SLA ones)")
    p.add_argument("--warps", type=int, default=0, help="warps per program (default: the launcher's config)")
    p.add_argument("--stages", type=int, default=0, help="pipeline stages (default: the launcher's config)")
    p.add_argument("--block-n", type=int, default=0, help="key tile of the kernels that take one (default: config)")
    p.add_argument("--json", action="store_true", help="print {variant: figures} as JSON instead of the table")
    a = p.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS and v not in OTHER_VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose among {[*VARIANTS, *OTHER_VARIANTS]}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    results = {}
    for v in names:
        results[v] = inspect(compile_variant(v, a.arch, a.warps, a.stages, a.block_n))
    if a.json:
        print(json.dumps(results))
        return 0
    print(f"{'variant':<12} {'regs':>5} {'stack':>6} {'instrs':>7} {'LDL/STL':>8} {'HGMMA':>6} {'loop':>5} "
          f"{'loop spills':>11}  loop global loads; top opcodes")
    for v, r in results.items():
        print(f"{v:<12} {r['registers']:>5} {r['stack_bytes']:>6} {r['instructions']:>7} "
              f"{r['spill_loads']:>3}/{r['spill_stores']:<4} {r['hgmma']:>6} {r['main_loop_instructions']:>5} "
              f"{r['main_loop_spills']:>11}  {' '.join(f'{o}:{n}' for o, n in r['loop_global_loads'].items())}; "
              f"{' '.join(f'{o}:{n}' for o, n in r['top_ops'])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
