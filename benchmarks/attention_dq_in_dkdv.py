"""dQ inside the dK/dV kernel, added into an fp32 buffer (pointer atomics or TMA reduce-add), against
gla's current backward (preprocess, dK/dV, dQ kernels). Causal, no extras, bf16, MHA + GQA.
GPU time from CUDA-graph replays (do_bench_cudagraph)."""
import sys, time
import torch, triton
import triton.language as tl
from triton.testing import do_bench_cudagraph
from triton.tools.tensor_descriptor import TensorDescriptor
from gla.kernels.attention import flash
from gla.kernels.attention.flash import _query_range, _scores, _load_tile, _pow2, _cdiv



@triton.jit
def _inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
           dq_desc, dq_base, bhq, offs_n, offs_d, lo, hi, qk_scale, TQ, TK,
           D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DQ_MODE: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, TQ, offs_d,
                       D, MASKED)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=offs_m < TQ, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < TQ, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        qkT = tl.dot(k, tl.trans(q))
        if MASKED:
            sT = _scores(qkT, offs_m[None, :], offs_n[:, None], qk_scale, TQ, TK, 0,
                         q_base, 0, 0, q_base, 0, True, True, False, False, False)
            pT = tl.math.exp2(sT - lse[None, :])
        else:
            pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], offs_m, TQ,
                        offs_d, D, MASKED)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = tl.dot(dsT, q, dk)
        if DQ_MODE == 1:
            dq = tl.dot(tl.trans(dsT), k)
            tl.atomic_add(dq_base + offs_m[:, None] * D + offs_d[None, :], dq,
                          mask=offs_m[:, None] < TQ, sem="relaxed")
        elif DQ_MODE == 2:  # 2-d descriptor over [B*H*TQ, D]: rows past TQ add zeros
            dq = tl.dot(tl.trans(dsT), k)
            dq_desc.atomic_add([(bhq * TQ + start_m).to(tl.int32), 0], dq)
        elif DQ_MODE == 3:  # 3-d descriptor [B*H, TQ, D]
            dq = tl.dot(tl.trans(dsT), k)
            dq_desc.atomic_add([bhq.to(tl.int32), start_m, 0], tl.reshape(dq, [1, BLOCK_M, D]))
    return dk, dv


@triton.jit
def _dkdv_dq(Q, K, V, DO, LSE, DELTA, DK, DV, dq_desc, DQACC, sm_scale,
             stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
             stride_dob, stride_doh, stride_dom, H, HK, GROUP, TQ, TK,
             D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             DQ_MODE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // HK).to(tl.int64)
    off_hk = (pid_bh % HK).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    qk_scale = sm_scale * 1.4426950408889634
    col_ok = offs_n < TK
    kv_off = off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    k = tl.load(K + kv_off, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    lo, lo_full, hi_full, hi = _query_range(start_n, TQ, TK, 0, BLOCK_M, BLOCK_N, True, False)
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        bhq = off_b * H + off_h
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        lse_base = LSE + bhq * TQ
        delta_base = DELTA + bhq * TQ
        dq_base = DQACC + bhq * TQ * D
        dk, dv = _inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm,
                        stride_dom, dq_desc, dq_base, bhq, offs_n, offs_d, lo, lo_full,
                        qk_scale, TQ, TK, D, BLOCK_M, True, DQ_MODE)
        dk, dv = _inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm,
                        stride_dom, dq_desc, dq_base, bhq, offs_n, offs_d, lo_full, hi_full,
                        qk_scale, TQ, TK, D, BLOCK_M, False, DQ_MODE)
        dk, dv = _inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm,
                        stride_dom, dq_desc, dq_base, bhq, offs_n, offs_d, hi_full, hi,
                        qk_scale, TQ, TK, D, BLOCK_M, True, DQ_MODE)
    dk = dk * sm_scale
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


def fused_backward(do, q, k, v, out, lse, cfg, mode):
    B, H, TQ, D = q.shape
    HK, TK = k.shape[1], k.shape[2]
    scale = D ** -0.5
    delta = torch.empty(B, H, TQ, device=q.device, dtype=torch.float32)
    c = flash._configs(D, D, q.dtype, True, TQ)["pre"]
    flash._attn_bwd_preprocess[(_cdiv(TQ, c["BLOCK_M"]), B * H)](
        out, do, delta, do, delta, delta, *out.stride(), *do.stride(), 0, 0, 0, 0,
        *do.stride(), 0, 0, 0, 0, H, TQ, DV=D, BLOCK_DV=D, BLOCK_M=c["BLOCK_M"],
        HAS_GATE=False, GATE_HEADWISE=False, INT64=False, num_warps=4, num_stages=1)
    dk = torch.empty(B, TK, HK, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    dv = torch.empty_like(dk)
    acc = torch.zeros(B * H, TQ, D, device=q.device, dtype=torch.float32)
    BM, BN, w, s = cfg
    if mode == 3:
        desc = TensorDescriptor(acc, [B * H, TQ, D], [TQ * D, D, 1], [1, BM, D])
    else:
        desc = TensorDescriptor(acc.view(B * H * TQ, D), [B * H * TQ, D], [D, 1], [BM, D])
    _dkdv_dq[(_cdiv(TK, BN), B * HK)](
        q, k, v, do, lse, delta, dk, dv, desc, acc, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        do.stride(0), do.stride(1), do.stride(2), H, HK, H // HK, TQ, TK,
        D=D, BLOCK_M=BM, BLOCK_N=BN, DQ_MODE=mode, num_warps=w, num_stages=s)
    dq = (acc.view(B, H, TQ, D) * scale).to(q.dtype)
    return dq, dk, dv


def rel(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def main():
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    B, H = 2, 16
    CFGS = {128: [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2),
                  (128, 64, 8, 1)],
            64: [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)]}
    quick = len(sys.argv) > 1 and sys.argv[1] == "quick"
    shapes = [(128, 4096, 16), (64, 4096, 16)] if quick else \
        [(128, 1024, 16), (128, 2048, 16), (128, 4096, 16), (128, 8192, 16), (64, 2048, 16),
         (64, 4096, 16), (64, 8192, 16), (128, 4096, 4), (64, 4096, 4)]
    modes = [2, 3] if quick else [2]
    for D, T, HK in shapes:
        t0 = time.time()
        q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k, v = (torch.randn(B, T, HK, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                for _ in range(2))
        do = torch.randn_like(q)
        out, lse = flash.attention_forward(q, k, v, causal=True)
        f = lambda: flash.attention_backward(do, q, k, v, out, lse, causal=True)
        ref = f()
        base = min(do_bench_cudagraph(f, rep=100) for _ in range(2))
        flops = 2.5 * 4 * B * H * T * T * D / 2
        print(f"D={D} T={T} HK={HK}: gla backward {base*1e3:7.1f} us ({flops/base/1e9:.0f} TFLOP/s)",
              flush=True)
        for mode in modes:
            for cfg in CFGS[D]:
                try:
                    g = lambda: fused_backward(do, q, k, v, out, lse, cfg, mode)
                    res = g()
                    errs = [rel(a, b) for a, b in zip(res, ref[:3])]
                    t = min(do_bench_cudagraph(g, rep=100) for _ in range(2))
                    print(f"   mode {mode} cfg {cfg}: {t*1e3:7.1f} us  x{base/t:.3f}  "
                          f"err dq/dk/dv {errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e}", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"   mode {mode} cfg {cfg}: FAILED {type(e).__name__}: {str(e)[-400:]}",
                          flush=True)
        print(f"   ({time.time()-t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
