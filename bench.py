"""Benchmarks: the figures BENCHMARKS.md quotes, and the commands that made them.

    python bench.py kernels [--batch 32] [--record]   attention + LayerNorm vs torch at ViT-g shapes
    python bench.py flops [--arch NAME]                parameters and MACs of every backbone preset
    python bench.py data [--n 2000]                    samples/s per core of every GV-D/GV-B source
    python bench.py step --stage amateur --arch eva_demo [--batch 64]
                                                       training-step images/s, peak memory, MFU on GPU
    python bench.py pipeline --run runs/demo           wall time of each stage of a pipeline run

`--record` appends the printed table to BENCHMARKS.md with the device, the command and the date,
so every number there names the run that made it. Wall time is measured here and only here:
tests never assert on it. GPU timings use CUDA events after warm-up, medians over many runs.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- timing utilities

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bench_ms(fn, device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def record(title: str, text: str, device: str, path: str = "BENCHMARKS.md"):
    """Append a measured table to BENCHMARKS.md under a heading naming command, device and date."""
    cmd = "python " + " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    stamp = datetime.date.today().isoformat()
    block = f"\n### {title}\n\n- command: `{cmd.replace(' --record', '')}`\n- device: {device}\n" \
            f"- date: {stamp}; torch {torch.__version__}\n\n{text}\n"
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("# Benchmarks\n\nEvery table below was appended by `bench.py --record`; "
                    "nothing here is typed by hand.\n")
    with open(path, "a") as f:
        f.write(block)
    print(f"[bench] appended to {path}")


# ----------------------------------------------------------------------------- kernels

def sdpa_backends(device: torch.device):
    from torch.nn.attention import SDPBackend
    if device.type == "cuda":
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                SDPBackend.MATH]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def bench_attention(B, H, N, D, dtype, device, reps):
    """Rows (impl, pass, ms, TFLOP/s) for our kernel and each SDPA backend that runs here."""
    from torch.nn.attention import sdpa_kernel
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    fwd_flops = 4 * B * H * N * N * D          # QK^T and PV, 2 flops per MAC
    both_flops = fwd_flops * 3.5               # backward = 2.5x forward (5 matmuls against 2)
    impls = []
    for backend in sdpa_backends(device):
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            run().backward(do)
        except RuntimeError:
            continue  # backend not available for this shape/dtype/device
        impls.append((f"sdpa[{backend.name}]", run))
    if device.type == "cuda":
        from kernels.attention import flash_attention
        impls.append(("ours (triton)", lambda: flash_attention(q, k, v)))
    rows = []
    for name, run in impls:
        with torch.no_grad():
            ms = bench_ms(run, device, reps=reps)
        rows.append([name, f"B{B} H{H} N{N} D{D} {str(dtype)[6:]}", "fwd", f"{ms:.3f}",
                     f"{fwd_flops / ms / 1e9:.1f}"])
        ms = bench_ms(lambda: run().backward(do), device, reps=reps)
        rows.append([name, f"B{B} H{H} N{N} D{D} {str(dtype)[6:]}", "fwd+bwd", f"{ms:.3f}",
                     f"{both_flops / ms / 1e9:.1f}"])
    return rows


def bench_layernorm(M, C, dtype, device, reps):
    """Rows (impl, pass, ms, GB/s) for our kernel and F.layer_norm, plus the copy bandwidth."""
    x = torch.randn(M, C, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(C, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(C, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    elt = x.element_size()
    fwd_bytes = 2 * M * C * elt                # read x, write y
    bwd_bytes = 3 * M * C * elt                # read x and dy, write dx (dw/db partials are tiny)
    impls = [("F.layer_norm", lambda: F.layer_norm(x, (C,), w, b, 1e-6))]
    if device.type == "cuda":
        from kernels.layernorm import fused_layer_norm
        impls.append(("ours (triton)", lambda: fused_layer_norm(x, w, b, 1e-6)))
    rows = []
    for name, run in impls:
        with torch.no_grad():
            ms = bench_ms(run, device, reps=reps)
        rows.append([name, f"{M}x{C} {str(dtype)[6:]}", "fwd", f"{ms:.3f}", f"{fwd_bytes / ms / 1e6:.0f}"])
        y = run()
        ms = bench_ms(lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True), device, reps=reps)
        rows.append([name, f"{M}x{C} {str(dtype)[6:]}", "bwd", f"{ms:.3f}", f"{bwd_bytes / ms / 1e6:.0f}"])
    big = torch.empty(256 * 2**20 // elt if device.type == "cuda" else 16 * 2**20 // elt, device=device, dtype=dtype)
    src = torch.randn_like(big)
    ms = bench_ms(lambda: big.copy_(src), device, reps=reps)
    rows.append(["copy (bandwidth ref)", f"{big.numel() * elt // 2**20} MiB", "copy", f"{ms:.3f}",
                 f"{2 * big.numel() * elt / ms / 1e6:.0f}"])
    return rows


def cmd_kernels(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    B = args.batch or (32 if device.type == "cuda" else 2)
    reps = 20 if device.type == "cuda" else 3
    rows = []
    for N in (257, 1025):
        rows += bench_attention(B, 16, N, 88, dtype, device, reps)
    text = "Attention (ViT-g heads: H=16, D=88)\n\n" + table(["impl", "shape", "pass", "ms", "TFLOP/s"], rows)
    M = B * 257
    ln_rows = bench_layernorm(M, 1408, dtype, device, reps)
    text += "\n\nLayerNorm (ViT-g width 1408; GB/s counts x,y / x,dy,dx bytes)\n\n" + \
        table(["impl", "shape", "pass", "ms", "GB/s"], ln_rows)
    if device.type != "cuda":
        text += "\n\n(no GPU: our Triton kernels run only on CUDA or in the interpreter, so only the torch path is timed)"
    print(text)
    if args.record:
        record("kernels", text, device_name(device))


# ----------------------------------------------------------------------------- flops

def count_flops(model: torch.nn.Module, img_size: int, device="meta") -> int:
    """Forward FLOPs of one image, counted by torch's FlopCounterMode (no hand-written counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 3, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def cmd_flops(args):
    import eva
    import metanet
    names = [args.arch] if args.arch else list(eva.PRESETS) + list(metanet.PRESETS)
    rows = []
    for name in names:
        module = eva if name in eva.PRESETS else metanet
        with torch.device("meta"):
            model = module.build(name)
        params = sum(p.numel() for p in model.parameters())
        with torch.device("meta"):
            model1k = module.build(name, num_classes=1000)
        params1k = sum(p.numel() for p in model1k.parameters())
        flops = count_flops(model, model.img_size)
        rows.append([name, model.img_size, f"{params:,}", f"{params1k / 1e6:.2f} M", f"{flops / 2e9:.3f}"])
    text = table(["preset", "img", "params (no head)", "params (1000-way head)", "GMACs/image"], rows)
    text += "\n\nMACs = FLOPs / 2 from torch.utils.flop_counter.FlopCounterMode on the meta device (batch 1)."
    print(text)
    if args.record:
        record("flops", text, "meta device (counted, not timed)")


# ----------------------------------------------------------------------------- data

def cmd_data(args):
    import data
    torch.set_num_threads(1)
    rows = []
    for spec in data.SOURCES:
        rate = data.throughput(spec, n=args.n, img_size=args.img_size)
        rows.append([spec, args.img_size, f"{rate:,.0f}", "yes" if rate >= 2000 else "no"])
    text = table(["source", "img", "samples/s (1 core)", ">= 2,000/s"], rows)
    print(text)
    if args.record:
        record("data", text, device_name(torch.device("cpu")) + ", one process, one thread")


# ----------------------------------------------------------------------------- training step

def cmd_step(args, extra):
    import stages
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cli = ["--stage", args.stage, "--arch", args.arch, "--batch-size", str(args.batch)] + extra
    res = stages.step_benchmark(cli, steps=args.steps)
    rows = [[args.stage, args.arch, args.batch, f"{res['images_per_s']:.1f}",
             f"{res['peak_mem_bytes'] / 2**30:.2f}", f"{res['mfu'] * 100:.1f} %" if res.get("mfu") else "n/a"]]
    text = table(["stage", "arch", "batch", "images/s", "peak mem GiB", "MFU"], rows)
    print(text)
    if args.record:
        record(f"step --stage {args.stage}", text, device_name(device))


# ----------------------------------------------------------------------------- pipeline

def cmd_pipeline(args):
    """Wall time of every stage in a finished `bash run.sh` run, read from each stage's summary."""
    rows = []
    for name in sorted(os.listdir(args.run)):
        path = os.path.join(args.run, name, "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                s = json.load(f)
            rows.append([name, s.get("steps", ""), f"{s.get('wall_s', float('nan')):.1f}"])
    if not rows:
        raise SystemExit(f"no */summary.json under {args.run}: run `bash run.sh` first")
    text = table(["stage", "steps", "wall s"], rows)
    print(text)
    if args.record:
        record(f"pipeline ({args.run})", text, device_name(torch.device("cpu")))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["kernels", "flops", "data", "step", "pipeline"])
    p.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--arch", default=None)
    p.add_argument("--stage", default="amateur")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--run", default="runs/demo")
    args, extra = p.parse_known_args()
    if args.what == "kernels":
        cmd_kernels(args)
    elif args.what == "flops":
        cmd_flops(args)
    elif args.what == "data":
        cmd_data(args)
    elif args.what == "step":
        args.arch = args.arch or "eva_demo"
        args.batch = args.batch or 64
        cmd_step(args, extra)
    else:
        cmd_pipeline(args)


if __name__ == "__main__":
    main()
