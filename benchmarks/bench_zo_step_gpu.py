"""ZO step of an OPT-125m-shaped model on a GPU against the 2S forwards it must run.

The model is a plain-torch decoder with OPT-125m's shapes and parameter order (196 tensors,
125.2M parameters: vocab 50272, 2050 positions, 12 layers, width 768, 12 heads, FFN 3072, tied
LM head; pre-LayerNorm, causal ``scaled_dot_product_attention``), so no model download is needed.
Per configuration (dtype, backend, S):

- ``forwards_ms``: the 2S plain forwards (``torch.no_grad``) of one step, CUDA events;
- ``step_ms``: one ``ZOOptimizer.step(closure)`` (2S forwards + 2S+1 ``apply_seeds_`` passes);
- ``passes_ms``: the 2S+1 ``apply_seeds_`` passes alone (eager calls as the optimizer makes them);
- ``overhead`` = step / forwards - 1. Target (issue 15): <= 5 %.

Without a CUDA GPU (or with ``--dry-run``) the script runs the same code end to end on the CPU on a
tiny model of the same structure (2 layers, width 64) for one step, to show it works, and writes
every row with ``"measured": false``: no CPU time is reported as a GPU figure.
Writes ``benchmarks/results/zo_step_gpu.json`` (``--no-write`` to skip).

    python benchmarks/bench_zo_step_gpu.py                   # GPU: fp32 and bf16, S = 1, 2
    python benchmarks/bench_zo_step_gpu.py --dry-run
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_rows  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

RESULTS_NAME = "zo_step_gpu"
OVERHEAD_MAX = 0.05
OPT125M = dict(vocab=50272, positions=2050, layers=12, width=768, heads=12, ffn=3072)
TINY = dict(vocab=512, positions=64, layers=2, width=64, heads=4, ffn=256)


class DecoderLayer(nn.Module):
    """OPT's decoder layer, parameters in OPT's order: k/v/q/out projections, self-attention
    LayerNorm, fc1, fc2, final LayerNorm."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.q_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.self_attn_layer_norm(x)
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q_proj(h)), split(self.k_proj(h)),
                                           split(self.v_proj(h)), is_causal=True)
        x = x + self.out_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))


class OPTShaped(nn.Module):
    def __init__(self, vocab, positions, layers, width, heads, ffn):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, width)
        self.embed_positions = nn.Embedding(positions, width)
        self.layers = nn.ModuleList(DecoderLayer(width, heads, ffn) for _ in range(layers))
        self.final_layer_norm = nn.LayerNorm(width)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed_tokens(ids) + self.embed_positions(pos)[None]
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x) @ self.embed_tokens.weight.T   # tied LM head


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--samples", default="1,2", help="S values (default 1,2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    a.backends = [x for x in a.backends.split(",") if x]
    a.dtypes = [x for x in a.dtypes.split(",") if x]
    a.samples = [int(x) for x in a.samples.split(",") if x]
    if any(s < 1 for s in a.samples) or a.batch < 1 or a.seq < 1 or a.repeats < 1:
        ap.error("--samples, --batch, --seq and --repeats must be >= 1")
    return a


def _events(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def run_config(args, backend, dtype_name, S, device, shape, measure: bool) -> dict:
    from zowarmup.optim import ZOOptimizer
    import zo_kernels
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = OPTShaped(**shape).to(device=device, dtype=dtype).eval()
    seq = min(args.seq, shape["positions"])
    ids = torch.randint(0, shape["vocab"], (args.batch, seq + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]

    def closure():
        return F.cross_entropy(model(x).float().reshape(-1, shape["vocab"]), y.reshape(-1))

    params = list(model.parameters())
    opt = ZOOptimizer(params, lr=1e-6, eps=1e-3, num_samples=S, backend=backend)
    ts = [p.detach() for p in params]

    def forwards():
        with torch.no_grad():
            for _ in range(2 * S):
                closure()

    def passes():
        for k in range(2 * S + 1):
            zo_kernels.apply_seeds_(ts, [k + 1, k + 2][: 1 + (k % 2)], [1e-9, -1e-9][: 1 + (k % 2)],
                                    backend=backend)

    cfg = {"model": "opt125m-shaped" if shape is OPT125M else "tiny (dry run)",
           "params": sum(p.numel() for p in params), "tensors": len(params), "dtype": dtype_name,
           "backend": backend, "S": S, "batch": args.batch, "seq": seq, "device": str(device)}
    if not measure:
        opt.step(closure)    # end to end once: the code path works
        return {"config": cfg, "figures": {"measured": False,
                                           "status": "not measured: no CUDA GPU in this run "
                                                     "(ran one step of a tiny model on the CPU)"}}
    fw, st, ps, ratio = [], [], [], []
    for rnd in range(args.warmup + args.repeats):
        f = _events(forwards)
        s = _events(lambda: opt.step(closure))
        p = _events(passes)
        if rnd >= args.warmup:
            fw.append(f), st.append(s), ps.append(p), ratio.append(s / f - 1.0)
    over = statistics.median(ratio)
    return {"config": {**cfg, "device": torch.cuda.get_device_name(device)},
            "figures": {"measured": True, "forwards_ms": statistics.median(fw),
                        "step_ms": statistics.median(st), "passes_ms": statistics.median(ps),
                        "overhead": over,
                        "targets": [{"text": f"step <= {1 + OVERHEAD_MAX:g} x its 2S forwards",
                                     "pass": over <= OVERHEAD_MAX}],
                        "target": {"text": f"overhead <= {OVERHEAD_MAX:.0%}"},
                        "meets_target": over <= OVERHEAD_MAX}}


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/bench_zo_step_gpu.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv)
    gpu = torch.cuda.is_available() and not args.dry_run
    rows = []
    if gpu:
        import zo_kernels
        rep = zo_kernels.backends()
        backends = [b for b in args.backends if rep[b]["usable"] and "cuda" in rep[b]["devices"]]
        for b in set(args.backends) - set(backends):
            rows.append({"config": {"backend": b}, "figures": {"measured": False,
                                                               "status": rep[b]["why"]}})
        for d in args.dtypes:
            for b in backends:
                for S in args.samples:
                    rows.append(run_config(args, b, d, S, torch.device("cuda"), OPT125M, True))
    else:
        why = "--dry-run" if args.dry_run else "no CUDA GPU here"
        print(f"bench_zo_step_gpu: {why}: one step of a tiny model per configuration on the CPU "
              "(backend cpu); rows are written as not measured.")
        for d in args.dtypes:
            for S in args.samples:
                r = run_config(args, "cpu", d, S, torch.device("cpu"), TINY, False)
                for b in args.backends:
                    rows.append({"config": {**r["config"], "backend": b,
                                            "model": "opt125m-shaped", "device": "cuda"},
                                 "figures": {"measured": False,
                                             "status": f"not measured: {why}"}})
    for r in rows:
        c, f = r["config"], r["figures"]
        if f.get("measured"):
            t = f["targets"][0]
            print(f"{c['dtype']:>9} {c['backend']:<7} S={c['S']}: forwards {f['forwards_ms']:.2f} ms, "
                  f"step {f['step_ms']:.2f} ms, passes {f['passes_ms']:.2f} ms, overhead "
                  f"{100 * f['overhead']:.1f}% ({t['text']}: {'pass' if t['pass'] else 'FAIL'})")
        else:
            print(f"{c.get('dtype', ''):>9} {c.get('backend', ''):<7} S={c.get('S', '')}: "
                  f"{f.get('status')}")
    if not args.no_write:
        for r in rows:
            r["command"] = command
        print(f"wrote {write_rows(RESULTS_NAME, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
