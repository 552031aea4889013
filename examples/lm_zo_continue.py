"""Warm a small decoder up with backprop, then continue with zeroth-order steps only.

The corpus is real text that ships with the interpreter: the standard library's top-level Python
sources (``sysconfig.get_paths()["stdlib"]/*.py``, sorted by name), read as bytes (vocabulary 256,
no tokenizer to download). Every 10th file is held out for validation; the training stream is the
other files concatenated (``--train-mb`` caps how much of it is used).

The model is a ``transformers`` Llama-style decoder built from a config (random init, a few million
weights, nothing downloaded). Per seed:

1. **warm-up**: ``--warmup-steps`` AdamW steps with backprop, up to the pivot;
2. from the same pivot weights, three continuations of ``--steps`` steps each:
   - ``zo``: :class:`zowarmup.ZOOptimizer` only (forward passes, no gradient, no optimizer state);
   - ``backprop``: AdamW continues (the upper reference, at 2-3x the memory of inference);
   - ``stop``: training stops at the pivot (the baseline ZO must beat to be useful).

Validation perplexity (``exp`` of the mean byte-level cross-entropy on a fixed set of held-out
windows) is logged along the way. Writes ``examples/results/lm_zo_continue.json`` (every curve, the
config, the machine) and ``examples/results/lm_zo_continue.png`` (mean(std) over seeds).

Usage::

    python examples/lm_zo_continue.py                 # the committed run (3 seeds; ~30 min on a shared 2-core machine)
    python examples/lm_zo_continue.py --quick         # a smoke run (seconds)

A user fine-tuning a checkpoint they already have passes it as usual instead of a config:
``LlamaForCausalLM.from_pretrained(local_dir)``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


# -- data -------------------------------------------------------------------------------------------
def stdlib_corpus() -> tuple[list[Path], list[Path]]:
    """(train files, validation files): the stdlib's top-level .py files, every 10th held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if len(files) < 20:
        raise SystemExit(f"expected the standard library's sources under {root}, found "
                         f"{len(files)} .py files")
    return [f for i, f in enumerate(files) if i % 10], [f for i, f in enumerate(files) if not i % 10]


def load_bytes(files: list[Path], cap: int | None = None) -> torch.Tensor:
    data = b"\n".join(f.read_bytes() for f in files)
    if cap is not None:
        data = data[:cap]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows(stream: torch.Tensor, seq: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows of ``seq + 1`` bytes (inputs and shifted targets)."""
    starts = torch.randint(0, stream.numel() - seq - 1, (n,), generator=gen)
    return torch.stack([stream[s:s + seq + 1] for s in starts.tolist()])


# -- model ------------------------------------------------------------------------------------------
def build_model(args, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=args.seq,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model, val: torch.Tensor, bs: int) -> float:
    was = model.training
    model.eval()
    tot = 0.0
    for i in range(0, val.shape[0], bs):
        part = val[i:i + bs]
        tot += float(lm_loss(model, part)) * part.shape[0]
    model.train(was)
    return math.exp(tot / val.shape[0])


# -- one seed ---------------------------------------------------------------------------------------
def run_seed(seed: int, args, train: torch.Tensor, val: torch.Tensor) -> dict:
    from zowarmup import ZOOptimizer
    model = build_model(args, seed)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.bp_lr, weight_decay=0.0)
    curves = {"warmup": [], "zo": [], "backprop": [], "stop": []}
    curves["warmup"].append((0, perplexity(model, val, args.eval_bs)))
    t0 = time.time()
    for t in range(1, args.warmup_steps + 1):
        loss = lm_loss(model, windows(train, args.seq, args.batch, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t % args.eval_every == 0 or t == args.warmup_steps:
            curves["warmup"].append((t, perplexity(model, val, args.eval_bs)))
    t_warm = time.time() - t0
    pivot = args.warmup_steps
    pivot_ppl = curves["warmup"][-1][1]
    pivot_state = {k: v.clone() for k, v in model.state_dict().items()}
    adam_state = opt.state_dict()
    data_state = gen.get_state()
    curves["stop"] = [(pivot, pivot_ppl), (pivot + args.steps, pivot_ppl)]
    times = {"warmup_s": t_warm}

    for arm in ("zo", "backprop"):
        model.load_state_dict(pivot_state)
        gen.set_state(data_state)  # both arms see the same batches
        curves[arm].append((pivot, pivot_ppl))
        if arm == "zo":
            zo = ZOOptimizer([p for p in model.parameters()], lr=args.zo_lr, eps=args.zo_eps,
                             num_samples=args.zo_samples, scale=1.0, seed=seed)
        else:
            opt.load_state_dict(adam_state)
        t0 = time.time()
        for t in range(1, args.steps + 1):
            batch = windows(train, args.seq, args.batch, gen)
            if arm == "zo":
                zo.step(lambda: lm_loss(model, batch))
            else:
                loss = lm_loss(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if t % args.eval_every == 0 or t == args.steps:
                curves[arm].append((pivot + t, perplexity(model, val, args.eval_bs)))
        times[f"{arm}_s"] = time.time() - t0
        print(f"  seed {seed} {arm:9s} ppl {pivot_ppl:.3f} -> {curves[arm][-1][1]:.3f} "
              f"({times[f'{arm}_s']:.0f} s)", flush=True)
    return {"seed": seed, "n_params": n_params, "pivot_ppl": pivot_ppl, "curves": curves,
            "times": times}


# -- summary and plot -------------------------------------------------------------------------------
def summarize(runs: list[dict]) -> dict:
    def ms(xs):
        m = sum(xs) / len(xs)
        s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        return {"mean": m, "std": s}
    out = {"pivot_ppl": ms([r["pivot_ppl"] for r in runs])}
    for arm in ("zo", "backprop", "stop"):
        out[f"final_ppl_{arm}"] = ms([r["curves"][arm][-1][1] for r in runs])
    out["zo_gain_over_stop"] = ms([r["curves"]["stop"][-1][1] - r["curves"]["zo"][-1][1]
                                   for r in runs])
    return out


def plot(runs: list[dict], path: Path, pivot: int) -> None:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    styles = {"warmup": ("warm-up (backprop, AdamW)", "k"), "backprop": ("continue: backprop", "C0"),
              "zo": ("continue: ZO only (ZOOptimizer)", "C3"), "stop": ("stop at the pivot", "C7")}
    for arm, (label, color) in styles.items():
        xs = [x for x, _ in runs[0]["curves"][arm]]
        ys = np.array([[y for _, y in r["curves"][arm]] for r in runs])
        m, s = ys.mean(0), ys.std(0, ddof=1) if len(runs) > 1 else np.zeros(ys.shape[1])
        ax.plot(xs, m, color=color, lw=1.6, ls="--" if arm == "stop" else "-",
                label=f"{label} (n={len(runs)})")
        ax.fill_between(xs, m - s, m + s, color=color, alpha=0.2, lw=0)
    ax.axvline(pivot, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity (bytes)")
    ax.set_yscale("log")
    ax.set_title("Byte-level LM on the Python stdlib sources: mean(std) over seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_table_rows(result: dict, args) -> None:
    """The summary as rows of ``benchmarks/results/lm_zo_continue.json`` (README table)."""
    sys.path.insert(0, str(HERE.parent / "benchmarks"))
    from _common import write_rows
    s = result["summary"]
    piv = f"{s['pivot_ppl']['mean']:.3f} ({s['pivot_ppl']['std']:.3f})"
    labels = {"zo": "ZO only (ZOOptimizer, no backward)", "backprop": "backprop (AdamW)",
              "stop": "stop at the pivot"}
    rows = [{"command": result["command"],
             "config": {"label": labels[arm], "steps": args.steps, "n_params": result["n_params"],
                        "warmup_steps": args.warmup_steps},
             "figures": {"pivot_ppl": piv, "n_seeds": len(args.seeds),
                         "final_ppl": f"{s[f'final_ppl_{arm}']['mean']:.3f} "
                                      f"({s[f'final_ppl_{arm}']['std']:.3f})"}}
            for arm in ("zo", "backprop", "stop")]
    print("wrote", write_rows("lm_zo_continue", rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-mb", type=float, default=2.0, help="MB of the training stream used")
    ap.add_argument("--val-windows", type=int, default=64)
    ap.add_argument("--eval-bs", type=int, default=64)
    ap.add_argument("--warmup-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=600, help="steps after the pivot, per arm")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--bp-lr", type=float, default=3e-3)
    ap.add_argument("--zo-lr", type=float, default=1e-3)
    ap.add_argument("--zo-eps", type=float, default=1e-3)
    ap.add_argument("--zo-samples", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny model, few steps")
    ap.add_argument("--no-table", action="store_true",
                    help="do not write benchmarks/results/lm_zo_continue.json")
    ap.add_argument("--out", default=str(HERE / "results" / "lm_zo_continue"))
    ap.add_argument("--rows-from", metavar="JSON",
                    help="only write the README table rows from an earlier run's results file")
    args = ap.parse_args(argv)
    if args.rows_from:
        result = json.loads(Path(args.rows_from).read_text())
        write_table_rows(result, argparse.Namespace(**result["config"]))
        return 0
    if args.quick:
        args.seeds, args.hidden, args.layers, args.warmup_steps, args.steps = [0], 32, 1, 6, 6
        args.eval_every, args.val_windows = 3, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    train_files, val_files = stdlib_corpus()
    train = load_bytes(train_files, int(args.train_mb * 2**20))
    val_stream = load_bytes(val_files)
    val = windows(val_stream, args.seq, args.val_windows, torch.Generator().manual_seed(12345))
    print(f"corpus: {len(train_files)} training files ({train.numel():,} bytes used), "
          f"{len(val_files)} validation files ({val_stream.numel():,} bytes, {args.val_windows} "
          f"windows)", flush=True)
    t0 = time.time()
    runs = []
    for s in args.seeds:
        runs.append(run_seed(s, args, train, val))
    summary = summarize(runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import zo_kernels
    ext = zo_kernels._backends.cpu_extension()
    result = {
        "command": "python examples/lm_zo_continue.py " + " ".join(sys.argv[1:] if argv is None
                                                                    else argv),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "corpus": {"root": str(Path(sysconfig.get_paths()["stdlib"])),
                   "python": platform.python_version(), "train_files": len(train_files),
                   "train_bytes_used": train.numel(), "val_files": len(val_files),
                   "val_bytes": val_stream.numel()},
        "n_params": runs[0]["n_params"], "summary": summary, "runs": runs,
        "wall_s": time.time() - t0,
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "cpu_isa": ext.cpu_isa() if ext is not None else None},
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    if not args.quick and not args.no_table:
        write_table_rows(result, args)
    plot(runs, out.with_suffix(".png"), args.warmup_steps)
    f = summary
    print(f"{runs[0]['n_params']:,} weights; perplexity at the pivot {f['pivot_ppl']['mean']:.3f}; "
          f"after {args.steps} more steps: ZO {f['final_ppl_zo']['mean']:.3f} "
          f"({f['final_ppl_zo']['std']:.3f}), backprop {f['final_ppl_backprop']['mean']:.3f} "
          f"({f['final_ppl_backprop']['std']:.3f}), stop {f['final_ppl_stop']['mean']:.3f}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
