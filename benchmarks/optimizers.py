"""How do memtier's low-memory optimizers compare with galore-torch and AdamW, side by side in one run?

Four measurements, all in the same process and with the same thread count:

1. refresh: time to recompute a rank-128 projection of real 2048x2048 gradients (a Llama with hidden size
   2048), galore-torch's full SVD vs memtier's exact and randomized refresh, with the gradient energy each
   basis captures (``||P^T G||^2 / ||G||^2``) relative to the exact SVD's. Goal: >= 10x faster at >= 99%.
2. step: steady-state optimizer step time (no refresh) on the parameter shapes of the convergence model,
   relative to torch's fused AdamW.
3. memory: optimizer state bytes of each optimizer (measured from its tensors), and memtier's formula.
4. convergence: a ~20M-parameter Llama (``--quick``: ~3M) trained on generated text (an order-2 Markov
   chain over a synthetic vocabulary, with a known entropy rate) by AdamW, galore-torch, GaLore, Natural
   GaLore and FRUGAL, the last four at equal optimizer-state memory.

Run from the repository root: ``python -m benchmarks.optimizers --quick``. Results go to
``benchmarks/results/optimizers[_quick].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optim import FRUGAL, GaLoreAdamW, NaturalGaLoreAdamW, low_rank_param_groups
from optim.projection import captured_energy, compute_basis
from optim.state_bytes import expected_state_bytes, matrix_shape

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PARTS = ("refresh", "step", "memory", "convergence")


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    seq: int
    batch: int


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    quick: bool
    threads: int
    seed: int
    parts: tuple[str, ...]
    optimizers: tuple[str, ...]
    # refresh
    refresh_hidden: int
    refresh_layers: int
    refresh_rank: int
    refresh_repeats: int
    power_iters: tuple[int, ...]
    oversample: int | None
    # step timing
    step_repeats: int
    # convergence
    model: ModelConfig
    steps: int
    eval_every: int
    eval_batches: int
    update_proj_gap: int
    galore_rank: int
    natural_history: int
    lr_grid: tuple[float, ...]
    sweep_steps: int
    galore_scale: float


def make_config(args: argparse.Namespace) -> BenchConfig:
    if args.quick:
        model = ModelConfig(vocab=512, hidden=128, ffn=344, layers=4, heads=4, seq=64, batch=8)
        steps, eval_every, gap, rank = 120, 20, 40, 32
        refresh_layers, repeats = 1, 2
    else:
        model = ModelConfig(vocab=2048, hidden=512, ffn=1376, layers=6, heads=8, seq=128, batch=4)
        steps, eval_every, gap, rank = 300, 25, 100, 128
        refresh_layers, repeats = 2, 2
    return BenchConfig(
        quick=args.quick,
        threads=args.threads,
        seed=args.seed,
        parts=tuple(args.parts),
        optimizers=tuple(args.optimizers),
        refresh_hidden=2048,
        refresh_layers=refresh_layers,
        refresh_rank=128,
        refresh_repeats=repeats,
        power_iters=(1, 2),
        oversample=None,  # the library default: as many extra sketch columns as the rank
        step_repeats=5 if args.quick else 10,
        model=model,
        steps=args.steps or steps,
        eval_every=eval_every,
        eval_batches=4,
        update_proj_gap=gap,
        galore_rank=rank,
        natural_history=4,
        # Each optimizer gets the best peak learning rate of this grid, chosen by eval loss after a short
        # prefix of the run (the papers' recipes, 1e-3 for AdamW/FRUGAL and 1e-2 for GaLore, are in it).
        lr_grid=(1e-3, 3e-3, 1e-2, 3e-2),
        sweep_steps=max(20, (args.steps or steps) // 5),
        galore_scale=0.25,  # GaLore's alpha (Zhao et al. 2024, sec. 5)
    )


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        from importlib.metadata import version

        import galore_torch  # noqa: F401

        info["galore_torch"] = version("galore-torch")
    except Exception:  # noqa: BLE001 - optional package
        info["galore_torch"] = None
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_average"] = list(os.getloadavg())
    except Exception:  # noqa: BLE001 - optional package
        pass
    return info


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data and model


def generated_corpus(
    vocab: int,
    n_tokens: int,
    *,
    seed: int,
    successors: int = 4,
    noise: float = 0.05,
    memory: int = 4,
    zipf: float = 1.1,
) -> tuple[torch.Tensor, float]:
    """Text-like tokens from an order-2 Markov chain; returns (tokens, entropy rate in nats/token).

    Token frequencies follow Zipf's law (exponent ``zipf``), as words in text do. The context of a token
    is the previous token ``b`` and ``a mod memory`` for the one before (``vocab * memory`` contexts: few
    enough to learn in a short run, and more than a bigram table). Each context has ``successors`` next
    tokens, drawn once from the Zipf distribution by a fixed hash and used with weights ``1/j^1.5``; with
    probability ``noise`` the next token is drawn from the Zipf distribution instead. The best achievable
    loss is the entropy rate: the exact entropy of each context's next-token distribution, averaged with
    the contexts' frequencies in the generated text.
    """
    unigram = 1.0 / np.arange(1, vocab + 1) ** zipf
    unigram /= unigram.sum()
    cdf = np.cumsum(unigram)
    cdf[-1] = 1.0
    weights = 1.0 / np.arange(1, successors + 1) ** 1.5
    weights /= weights.sum()
    # Successor table: token = Zipf quantile of a hash of (b, a mod memory, j), a fixed pseudo-random map.
    b_idx, m_idx, j_idx = np.meshgrid(
        np.arange(vocab), np.arange(memory), np.arange(successors), indexing="ij"
    )
    h = (
        m_idx.astype(np.uint64) * 1009
        + b_idx.astype(np.uint64) * 9176
        + j_idx.astype(np.uint64) * 7919
        + 12345
    )
    h = (h * np.uint64(2654435761)) % np.uint64(2**32)
    table = np.minimum(np.searchsorted(cdf, h.astype(np.float64) / 2**32, side="right"), vocab - 1)

    rng = np.random.default_rng(seed)
    pick = np.searchsorted(np.cumsum(weights), rng.random(n_tokens), side="right").clip(max=successors - 1)
    noise_tokens = np.minimum(np.searchsorted(cdf, rng.random(n_tokens), side="right"), vocab - 1)
    is_noise = rng.random(n_tokens) < noise
    tokens = np.empty(n_tokens, dtype=np.int64)
    counts = np.zeros((vocab, memory), dtype=np.int64)
    a, b = 1, 2
    for i in range(n_tokens):
        counts[b, a % memory] += 1
        nxt = int(noise_tokens[i]) if is_noise[i] else int(table[b, a % memory, pick[i]])
        tokens[i] = nxt
        a, b = b, nxt

    # Entropy of p(t) = (1 - noise) * sum_{j: table_j = t} w_j + noise * unigram(t), per context: the
    # noise-only part summed over all tokens, corrected on the (at most `successors`) tokens in the table.
    eps_u = noise * unigram
    base = float(-(eps_u * np.log(eps_u)).sum())
    entropy = np.full((vocab, memory), base)
    for bb in range(vocab):
        for mm in range(memory):
            mass: dict[int, float] = {}
            for j in range(successors):
                t = int(table[bb, mm, j])
                mass[t] = mass.get(t, 0.0) + (1 - noise) * weights[j]
            for t, w in mass.items():
                p = w + eps_u[t]
                entropy[bb, mm] += -p * math.log(p) + eps_u[t] * math.log(eps_u[t])
    rate = float((entropy * counts).sum() / counts.sum())
    return torch.from_numpy(tokens), rate


def build_llama(cfg: ModelConfig, *, seed: int, tie: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=max(cfg.seq, 64),
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM(config)


def batches_from(tokens: torch.Tensor, batch: int, seq: int, n: int, offset: int = 0) -> list[torch.Tensor]:
    out = []
    per = batch * seq
    for i in range(n):
        start = offset + i * per
        out.append(tokens[start : start + per].view(batch, seq))
    return out


# --------------------------------------------------------------------------- optimizers


def galore_torch_optimizer(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW as ReferenceGaLoreAdamW

    ref_groups = []
    for g in groups:
        g = dict(g)
        if g.pop("galore", False):
            g.setdefault("proj_type", "std")
        ref_groups.append(g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ReferenceGaLoreAdamW(ref_groups, no_deprecation_warning=True, **kwargs)


def state_bytes_of(opt: torch.optim.Optimizer) -> int:
    """Measured state bytes; counts galore-torch's projector matrices, which live outside tensors' dicts."""
    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes())
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif hasattr(value, "ortho_matrix") and isinstance(value.ortho_matrix, torch.Tensor):
                total += value.ortho_matrix.numel() * value.ortho_matrix.element_size()
            elif isinstance(value, int):
                total += 8
    return total


def equal_memory_settings(shapes: Sequence[tuple[int, ...]], rank: int, history: int) -> dict[str, Any]:
    """Natural GaLore rank and FRUGAL density whose projected-state bytes match GaLore at ``rank``."""
    target = sum(expected_state_bytes("galore", s, rank=rank) for s in shapes)
    best_rank = min(
        range(1, rank + 1),
        key=lambda r: abs(
            sum(expected_state_bytes("natural_galore", s, rank=r, history_size=history) for s in shapes)
            - target
        ),
    )
    min_dim = min(min(matrix_shape(s) or (1, 1)) for s in shapes)
    densities = [k / min_dim for k in range(0, min_dim + 1)]
    best_density = min(
        densities,
        key=lambda d: abs(sum(expected_state_bytes("frugal", s, density=d) for s in shapes) - target),
    )
    return {"target_bytes": target, "natural_rank": best_rank, "frugal_density": best_density}


OptimizerFactory = Callable[[torch.nn.Module, BenchConfig, dict[str, Any], float], torch.optim.Optimizer]


def _adamw(model: torch.nn.Module, cfg: BenchConfig, eq: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)


def _galore_torch(
    model: torch.nn.Module, cfg: BenchConfig, eq: dict[str, Any], lr: float
) -> torch.optim.Optimizer:
    groups = low_rank_param_groups(
        model,
        switch_key="galore",
        rank=cfg.galore_rank,
        update_proj_gap=cfg.update_proj_gap,
        scale=cfg.galore_scale,
    )
    return galore_torch_optimizer(groups, lr=lr, eps=1e-8)


def _galore(model: torch.nn.Module, cfg: BenchConfig, eq: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    groups = low_rank_param_groups(model, switch_key="galore")
    return GaLoreAdamW(
        groups, lr=lr, rank=cfg.galore_rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.galore_scale
    )


def _natural_galore(
    model: torch.nn.Module, cfg: BenchConfig, eq: dict[str, Any], lr: float
) -> torch.optim.Optimizer:
    groups = low_rank_param_groups(model, switch_key="galore")
    return NaturalGaLoreAdamW(
        groups,
        lr=lr,
        rank=eq["natural_rank"],
        history_size=cfg.natural_history,
        update_proj_gap=cfg.update_proj_gap,
        scale=cfg.galore_scale,
    )


def _frugal(model: torch.nn.Module, cfg: BenchConfig, eq: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    groups = low_rank_param_groups(model, switch_key="frugal")
    return FRUGAL(groups, lr=lr, density=eq["frugal_density"], update_proj_gap=cfg.update_proj_gap)


OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adamw": _adamw,
    "galore_torch": _galore_torch,
    "galore": _galore,
    "natural_galore": _natural_galore,
    "frugal": _frugal,
}


# --------------------------------------------------------------------------- 1. refresh


def real_gradients(cfg: BenchConfig, corpus: str) -> list[tuple[str, torch.Tensor]]:
    """Gradients of the 2048x2048 attention matrices of a Llama after a few AdamW steps.

    ``corpus="text"``: the generated Zipfian text (repeated frequent tokens make these gradients close to
    low-rank, the easy case). ``corpus="random"``: uniformly random tokens, whose gradients have flat
    spectra around rank 128 (the hard case for a randomized range finder).
    """
    mcfg = ModelConfig(
        vocab=2048, hidden=cfg.refresh_hidden, ffn=cfg.refresh_hidden, layers=cfg.refresh_layers, heads=16,
        seq=256, batch=2,
    )  # fmt: skip
    n = 4 * mcfg.batch * mcfg.seq
    if corpus == "text":
        tokens, _ = generated_corpus(mcfg.vocab, n, seed=cfg.seed + 1)
    else:
        tokens = torch.randint(0, mcfg.vocab, (n,), generator=torch.Generator().manual_seed(cfg.seed + 1))
    model = build_llama(mcfg, seed=cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = batches_from(tokens, mcfg.batch, mcfg.seq, 4)
    for i, ids in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        if i < len(batches) - 1:
            opt.step()
        log(f"refresh: {corpus} gradient model pass {i + 1}/{len(batches)}")
    grads = []
    for name, p in model.named_parameters():
        if "self_attn" in name and p.grad is not None and p.shape == (cfg.refresh_hidden, cfg.refresh_hidden):
            grads.append((f"{corpus}:{name}", p.grad.detach().clone()))
    return grads


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_refresh(cfg: BenchConfig) -> dict[str, Any]:
    from galore_torch.galore_projector import GaLoreProjector

    grads = real_gradients(cfg, "text") + real_gradients(cfg, "random")
    rank = cfg.refresh_rank
    rows: list[dict[str, Any]] = []
    for name, g in grads:
        side = "right"  # square: galore-torch's "std" projects the right side when rows >= cols
        projector = GaLoreProjector(rank, update_proj_gap=200, proj_type="std")
        t_ref, ref_basis = _time(
            lambda g=g, pr=projector: pr.get_orthogonal_matrix(g, rank, type="right"), cfg.refresh_repeats
        )
        e_ref = captured_energy(g, ref_basis, side)
        row: dict[str, Any] = {
            "matrix": name,
            "shape": list(g.shape),
            "galore_torch_s": t_ref,
            "energy_exact": e_ref,
        }
        # memtier's exact refresh is the same LAPACK call as galore-torch's: timed once, for reference.
        t_exact, ours_exact = _time(lambda g=g, side=side: compute_basis(g, rank, side, method="exact"), 1)
        row["memtier_exact_s"] = t_exact
        row["energy_memtier_exact"] = captured_energy(g, ours_exact, side)
        for q in cfg.power_iters:
            t_r, basis = _time(
                lambda g=g, q=q, side=side: compute_basis(
                    g, rank, side, method="randomized", power_iters=q, oversample=cfg.oversample,
                    generator=torch.Generator().manual_seed(cfg.seed),
                ),
                cfg.refresh_repeats,
            )  # fmt: skip
            row[f"randomized_q{q}_s"] = t_r
            row[f"energy_randomized_q{q}"] = captured_energy(g, basis, side)
        rows.append(row)
        log(
            f"refresh {name}: galore-torch {t_ref:.3f}s, memtier exact {t_exact:.3f}s, "
            + ", ".join(
                f"randomized q={q} {row[f'randomized_q{q}_s']:.3f}s "
                f"(energy {row[f'energy_randomized_q{q}'] / e_ref:.4f} of exact)"
                for q in cfg.power_iters
            )
        )
    summary: dict[str, Any] = {"galore_torch_total_s": sum(r["galore_torch_s"] for r in rows)}
    for q in cfg.power_iters:
        total = sum(r[f"randomized_q{q}_s"] for r in rows)
        summary[f"randomized_q{q}"] = {
            "total_s": total,
            "speedup_vs_galore_torch": summary["galore_torch_total_s"] / total,
            "min_energy_ratio": min(r[f"energy_randomized_q{q}"] / r["energy_exact"] for r in rows),
            "mean_energy_ratio": float(
                np.mean([r[f"energy_randomized_q{q}"] / r["energy_exact"] for r in rows])
            ),
            "max_energy_shortfall_points": 100
            * max(r["energy_exact"] - r[f"energy_randomized_q{q}"] for r in rows),
            "min_energy_ratio_by_corpus": {
                corpus: min(
                    r[f"energy_randomized_q{q}"] / r["energy_exact"]
                    for r in rows
                    if r["matrix"].startswith(corpus)
                )
                for corpus in ("text", "random")
            },
        }
    summary["memtier_exact_total_s"] = sum(r["memtier_exact_s"] for r in rows)
    default_q = GaLoreAdamW([torch.nn.Parameter(torch.zeros(1))]).defaults["power_iters"]
    d = summary.get(f"randomized_q{default_q}")
    if d is not None:
        summary["default_power_iters"] = default_q
        summary["goal_met"] = bool(d["speedup_vs_galore_torch"] >= 10.0 and d["min_energy_ratio"] >= 0.99)
    return {"rank": rank, "matrices": rows, "summary": summary}


# --------------------------------------------------------------------------- 2. step time and 3. memory


def bench_step_and_memory(cfg: BenchConfig, eq: dict[str, Any]) -> dict[str, Any]:
    """Median steady step time (interleaved rounds, so load changes hit every optimizer alike) and state."""
    base_model = build_llama(cfg.model, seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in base_model.parameters()]
    no_refresh = dataclasses.replace(cfg, update_proj_gap=10**9)
    opts: dict[str, torch.optim.Optimizer] = {}
    for name in cfg.optimizers:
        model = copy.deepcopy(base_model)
        for p, grad in zip(model.parameters(), grads):
            p.grad = grad.clone()
        opts[name] = OPTIMIZERS[name](model, no_refresh, eq, 1e-3)
        opts[name].step()  # first step: state creation and the one refresh
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(cfg.step_repeats):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {}
    for name, opt in opts.items():
        out[name] = {
            "step_s_median": float(np.median(times[name])),
            "state_bytes": state_bytes_of(opt),
            "formula_bytes": int(opt.expected_state_bytes())
            if hasattr(opt, "expected_state_bytes")
            else None,
        }
        log(
            f"step {name}: {out[name]['step_s_median'] * 1e3:.1f} ms, state {out[name]['state_bytes'] / 2**20:.2f} MiB"
        )
    base = out.get("adamw", {}).get("step_s_median")
    if base:
        for v in out.values():
            v["step_time_vs_fused_adamw"] = v["step_s_median"] / base
    return out


# --------------------------------------------------------------------------- 4. convergence


def _train_run(
    name: str, cfg: BenchConfig, eq: dict[str, Any], lr: float, train: list[torch.Tensor], evals: list[torch.Tensor],
    steps: int, schedule: Callable[[int], float], verbose: bool,
) -> dict[str, Any]:  # fmt: skip
    model = build_llama(cfg.model, seed=cfg.seed)
    opt = OPTIMIZERS[name](model, cfg, eq, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    train_loss: list[float] = []
    eval_points: list[list[float]] = []
    t0 = time.perf_counter()
    for step, ids in enumerate(train[:steps]):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        train_loss.append(float(loss.detach()))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            with torch.no_grad():
                ev = float(np.mean([float(model(input_ids=e, labels=e).loss) for e in evals]))
            if not math.isfinite(ev):
                ev = float("inf")
            eval_points.append([step + 1, ev])
            if verbose:
                log(
                    f"convergence {name} lr {lr:g}: step {step + 1}/{steps} train {train_loss[-1]:.3f} eval {ev:.3f}"
                )
    return {
        "lr": lr,
        "train_loss": train_loss,
        "eval_loss": eval_points,
        "final_eval_loss": eval_points[-1][1],
        "seconds": time.perf_counter() - t0,
        "state_bytes": state_bytes_of(opt),
    }


def bench_convergence(cfg: BenchConfig, eq: dict[str, Any]) -> dict[str, Any]:
    m = cfg.model
    per = m.batch * m.seq
    tokens, entropy = generated_corpus(m.vocab, (cfg.steps + cfg.eval_batches) * per + 1, seed=cfg.seed + 2)
    train = batches_from(tokens, m.batch, m.seq, cfg.steps)
    evals = batches_from(tokens, m.batch, m.seq, cfg.eval_batches, offset=cfg.steps * per)
    warmup = max(1, cfg.steps // 10)

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sweeps: dict[str, dict[str, float]] = {}
    chosen: dict[str, float] = {}
    for name in cfg.optimizers:
        twin = {"galore": "galore_torch", "galore_torch": "galore"}.get(name)
        if twin in chosen:
            chosen[name] = chosen[twin]  # the same algorithm and settings: reuse its twin's sweep
            continue
        scores = {}
        for lr in cfg.lr_grid:
            run = _train_run(name, cfg, eq, lr, train, evals, cfg.sweep_steps, schedule, verbose=False)
            scores[f"{lr:g}"] = run["final_eval_loss"]
        sweeps[name] = scores
        chosen[name] = float(min(scores, key=lambda k: scores[k]))
        log(f"lr sweep {name} ({cfg.sweep_steps} steps): {scores} -> {chosen[name]:g}")

    curves = {
        name: _train_run(name, cfg, eq, chosen[name], train, evals, cfg.steps, schedule, verbose=True)
        for name in cfg.optimizers
    }
    n_params = sum(p.numel() for p in build_llama(m, seed=0).parameters())
    return {
        "params": n_params,
        "entropy_rate": entropy,
        "curves": curves,
        "lr_sweep": sweeps,
        "warmup_steps": warmup,
        "tokens_per_step": per,
    }


# --------------------------------------------------------------------------- plot and main


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    refresh = results.get("refresh")
    if refresh:
        s = refresh["summary"]
        labels = ["galore-torch SVD", "memtier exact"] + [
            f"randomized q={q}" for q in results["config"]["power_iters"]
        ]
        totals = [s["galore_torch_total_s"], s["memtier_exact_total_s"]] + [
            s[f"randomized_q{q}"]["total_s"] for q in results["config"]["power_iters"]
        ]
        bars = ax.bar(labels, totals, color=["tab:gray", "tab:blue", "tab:green", "tab:olive"][: len(labels)])
        ax.set_yscale("log")
        ax.axhline(
            s["galore_torch_total_s"] / 10, color="k", ls=":", lw=0.8, label="10x faster than galore-torch"
        )
        ax.legend(fontsize=8, loc="upper right")
        ax.set_ylabel("refresh time, all matrices (s)")
        n = len(refresh["matrices"])
        ax.set_title(f"Projection refresh, {n} x 2048x2048 gradients, rank {refresh['rank']}")
        for q, bar in zip(results["config"]["power_iters"], bars[2:]):
            d = s[f"randomized_q{q}"]
            ax.annotate(
                f"{d['speedup_vs_galore_torch']:.1f}x\nenergy >= {100 * d['min_energy_ratio']:.2f}% of SVD's",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom", fontsize=8,
            )  # fmt: skip
    else:
        ax.set_visible(False)
    step = results.get("step")
    for ax, key, ylabel, title in (
        (
            axes[0][1],
            "step_time_vs_fused_adamw",
            "step time / fused AdamW",
            "Steady optimizer step (no refresh)",
        ),
        (axes[1][0], "state_bytes", "optimizer state (MiB)", "Optimizer state memory"),
    ):
        if not step:
            ax.set_visible(False)
            continue
        names = list(step)
        vals = [step[n].get(key, float("nan")) for n in names]
        if key == "state_bytes":
            vals = [v / 2**20 for v in vals]
        ax.bar(names, vals, color="tab:blue")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    ax = axes[1][1]
    conv = results.get("convergence")
    if conv:
        for name, c in conv["curves"].items():
            tl = np.array(c["train_loss"])
            k = max(1, len(tl) // 30)
            smooth = np.convolve(tl, np.ones(k) / k, mode="valid")
            (line,) = ax.plot(np.arange(k, len(tl) + 1), smooth, alpha=0.5)
            ev = np.array(c["eval_loss"])
            ax.plot(
                ev[:, 0],
                ev[:, 1],
                "o-",
                color=line.get_color(),
                label=f"{name}, lr {c['lr']:g} ({c['state_bytes'] / 2**20:.1f} MiB state)",
            )
        ax.axhline(conv["entropy_rate"], color="k", ls="--", lw=0.8, label="entropy rate (best possible)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token); lines: train, dots: eval")
        ax.set_title(f"Llama {conv['params'] / 1e6:.1f}M on generated text")
        ax.legend(fontsize=8)
    else:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small convergence model, one layer of refresh gradients"
    )
    parser.add_argument(
        "--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch intra-op threads"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0, help="convergence steps (0: the mode's default)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "optimizers_quick" if cfg.quick else "optimizers"
    t_start = time.perf_counter()
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "machine": machine_info()}

    shapes_model = build_llama(cfg.model, seed=0)
    projected = low_rank_param_groups(shapes_model, switch_key="galore")[0]["params"]
    eq = equal_memory_settings([tuple(p.shape) for p in projected], cfg.galore_rank, cfg.natural_history)
    results["equal_memory"] = eq
    log(f"equal memory: GaLore rank {cfg.galore_rank}, Natural GaLore rank {eq['natural_rank']} "
        f"(history {cfg.natural_history}), FRUGAL density {eq['frugal_density']:.4f}")  # fmt: skip

    if "refresh" in cfg.parts:
        results["refresh"] = bench_refresh(cfg)
    if "step" in cfg.parts or "memory" in cfg.parts:
        results["step"] = bench_step_and_memory(cfg, eq)
    if "convergence" in cfg.parts:
        results["convergence"] = bench_convergence(cfg, eq)
    results["wall_seconds"] = time.perf_counter() - t_start

    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=1))
    plot(results, args.out / f"{stem}.png")
    log(f"wrote {json_path} and {stem}.png in {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
