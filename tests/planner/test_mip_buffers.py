"""The buffer-reuse MIP and its baselines, from a stored trace, random and hand-made instances;
and planner.lifetimes tracing real modules (an MLP and a HF Llama decoder layer) on CPU."""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch

from planner.lifetimes import (
    BlockTrace,
    LifetimeError,
    TensorLife,
    TraceError,
    live_bytes_peak,
    load_trace,
    save_trace,
    trace_block,
    trace_block_full,
)
from planner.mip.buffers import (
    STRATEGIES,
    BufferInputError,
    BufferSettings,
    best_fit,
    bump,
    caching_allocator,
    check_offsets,
    compact,
    live_peak,
    offsets_by_role,
    overlapping_pairs,
    solve_buffers,
    solve_mip,
)
from planner.mip.common import MipSettings

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MiB = 1 << 20


def settings(time_limit_s: float = 10.0, **kw) -> BufferSettings:  # type: ignore[no-untyped-def]
    return BufferSettings(mip=MipSettings(time_limit_s=time_limit_s), **kw)


def life(size: int, start: int, end: int) -> TensorLife:
    return TensorLife(size_bytes=size, start=start, end=end)


# ---- the stored trace --------------------------------------------------------------------------------


def test_fixture_trace_every_strategy_is_valid_and_mip_is_best() -> None:
    trace = load_trace(os.path.join(FIXTURES, "llama_block_trace.json"))
    tensors = trace.tensors
    assert len(tensors) > 100 and trace.forward_ops < trace.total_ops
    assert {t.role for t in tensors} == {"temporary", "saved", "output", "gradient"}
    peak = live_bytes_peak(tensors)
    sols = {name: solve_buffers(tensors, strategy=name, settings=settings()) for name in STRATEGIES}
    for name, sol in sols.items():
        check_offsets(tensors, sol.offsets, alignment_bytes=512)  # nothing alive together overlaps
        assert sol.strategy == name
        assert sol.live_peak_bytes == peak
        assert sol.arena_bytes >= peak
        assert sol.fragmentation == pytest.approx(sol.arena_bytes / peak)
    mip = sols["mip"]
    # best-fit leaves 2.8% above the live peak here; the MIP stage (its seeded local-search start)
    # reaches the live-bytes lower bound, which proves it optimal
    assert mip.status == "optimal" and mip.gap == 0.0
    assert mip.arena_bytes == live_peak(tensors, [-(-t.size_bytes // 512) * 512 for t in tensors])
    assert mip.arena_bytes < sols["best_fit"].arena_bytes
    for name in ("best_fit", "bump", "caching_allocator"):
        assert mip.arena_bytes <= sols[name].arena_bytes, name
    saved = offsets_by_role(tensors, mip, "saved")
    assert len(saved) == sum(t.role == "saved" for t in tensors) > 0
    # no reuse at all is the sum of (512-aligned) sizes; reuse needs under a third of it
    assert sols["bump"].arena_bytes == sum(-(-t.size_bytes // 512) * 512 for t in tensors)
    assert mip.arena_bytes < sols["bump"].arena_bytes / 3
    # the caching allocator's 2 and 20 MiB segments waste more than an offline plan
    assert sols["caching_allocator"].arena_bytes > mip.arena_bytes
    assert mip.fragmentation < 1.05
    assert mip.report().problem == "buffers"


# ---- exactness and scale ------------------------------------------------------------------------------


def random_instance(rng: random.Random, n: int, horizon: int, unit: int = 512) -> list[TensorLife]:
    out = []
    for _ in range(n):
        start = rng.randrange(horizon)
        out.append(life(rng.randint(1, 8) * unit, start, start + rng.randint(1, max(2, horizon // 2))))
    return out


def brute_force_arena(tensors: list[TensorLife]) -> int:
    sizes = [t.size_bytes for t in tensors]
    return min(
        max(o + s for o, s in zip(compact(tensors, sizes, list(order)), sizes))
        for order in itertools.permutations(range(len(tensors)))
    )


def test_mip_is_exact_on_small_instances() -> None:
    rng = random.Random(2)
    beaten = 0
    for _ in range(12):
        tensors = random_instance(rng, 6, 8)
        optimum = brute_force_arena(tensors)
        # the MIP alone (no local search in front of it)
        sol = solve_mip(tensors, settings(search_iterations=0))
        check_offsets(tensors, sol.offsets, alignment_bytes=512)
        assert sol.status == "optimal" and sol.gap == pytest.approx(0.0)
        assert sol.arena_bytes == optimum
        beaten += best_fit(tensors, settings()).arena_bytes > optimum
    assert beaten >= 1  # best-fit is not always optimal on these; the MIP is


def test_hundreds_of_tensors_stay_solvable_and_never_worse() -> None:
    rng = random.Random(3)
    tensors = [
        life(
            rng.choice([1, 2, 4, 8, 16, 3, 6]) * rng.randint(1, 64) * 1024,
            s,
            s + 1 + int(rng.expovariate(1 / 40)),
        )
        for s in (rng.randrange(400) for _ in range(400))
    ]
    assert len(overlapping_pairs(tensors)) > 5000  # more than the MIP takes binaries for
    sol = solve_mip(tensors, settings(time_limit_s=3.0, max_pair_binaries=1500))
    fit = best_fit(tensors, settings())
    check_offsets(tensors, sol.offsets, alignment_bytes=512)
    assert sol.status in ("optimal", "time_limit", "fallback")
    assert sol.arena_bytes <= fit.arena_bytes
    assert sol.gap is not None and sol.gap >= 0.0
    assert sol.arena_bytes >= live_peak(tensors)


# ---- the baselines by hand ------------------------------------------------------------------------------


def test_best_fit_picks_the_smallest_gap() -> None:
    # by size: d@0, a@8K, b@12K, c@15K, f@17K; at op 2 a and c die, leaving a 4 KiB hole (a's)
    # and a 2 KiB hole (c's, under f). e (1 KiB, from op 2) takes the 2 KiB hole: best fit, not first fit.
    d, a, b, c, f = life(8192, 0, 4), life(4096, 0, 2), life(3072, 0, 4), life(2048, 0, 2), life(1536, 0, 4)
    e = life(1024, 2, 4)
    tensors = [d, a, b, c, f, e]
    sol = best_fit(tensors, BufferSettings(alignment_bytes=1))
    check_offsets(tensors, sol.offsets)
    offs = dict(zip("dabcfe", sol.offsets))
    assert (offs["d"], offs["a"], offs["b"], offs["c"], offs["f"]) == (0, 8192, 12288, 15360, 17408)
    assert offs["e"] == offs["c"]
    assert sol.arena_bytes == 18944 == sol.live_peak_bytes
    assert sol.fragmentation == 1.0


def test_bump_never_reuses() -> None:
    tensors = [life(1000, 0, 1), life(1000, 1, 2), life(100, 2, 3)]
    sol = bump(tensors)
    assert sol.offsets == (0, 1024, 2048)  # 512-aligned
    assert sol.arena_bytes == 1024 + 1024 + 512 and sol.live_peak_bytes == 1000
    assert best_fit(tensors).arena_bytes == 1024


def test_caching_allocator_by_hand() -> None:
    tensors = [
        life(3 * MiB, 0, 2),  # large pool: 3 MiB < 10 MiB -> a 20 MiB segment, split (17 MiB rest > 1 MiB)
        life(3 * MiB, 1, 2),  # from the same segment's rest
        life(12 * MiB, 2, 3),  # both freed at op 2 and coalesced: the 20 MiB block is reused
        life(1000, 2, 3),  # small pool: a new 2 MiB segment, placed after the first
        life(25 * MiB, 3, 4),  # >= 10 MiB, no cached block fits: a new segment of 26 MiB (2 MiB rounding)
    ]
    sol = caching_allocator(tensors)
    assert sol.offsets == (0, 3 * MiB, 0, 20 * MiB, 22 * MiB)
    assert sol.arena_bytes == (20 + 2 + 26) * MiB
    check_offsets(tensors, sol.offsets, alignment_bytes=512)


def test_bad_input_names_the_field() -> None:
    with pytest.raises(LifetimeError, match="end"):
        TensorLife(size_bytes=1, start=3, end=3)
    with pytest.raises(BufferInputError, match="alignment_bytes"):
        BufferSettings(alignment_bytes=3)
    with pytest.raises(BufferInputError, match="strategy"):
        solve_buffers([life(1, 0, 1)], strategy="first_fit")
    with pytest.raises(BufferInputError, match=r"offsets\[1\]"):
        check_offsets([life(512, 0, 2), life(512, 1, 3)], [0, 256])


# ---- tracing real modules ------------------------------------------------------------------------------------


class _SavedStorages:
    """Storages autograd saves for backward (its pack hook), minus parameters and leaf inputs."""

    def __init__(self, module: torch.nn.Module, *inputs: torch.Tensor) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in [*module.parameters(), *inputs]}
        self.saved: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params and not (t.is_leaf and t.requires_grad):
            self.saved[ptr] = t.untyped_storage().nbytes()
        return t


def test_trace_mlp_block() -> None:
    torch.manual_seed(0)
    batch, d_in, d_hidden = 4, 8, 16
    mlp = torch.nn.Sequential(
        torch.nn.Linear(d_in, d_hidden), torch.nn.GELU(), torch.nn.Linear(d_hidden, d_in)
    )
    hooks = _SavedStorages(mlp)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, lambda t: t):
        trace = trace_block_full(mlp, torch.randn(batch, d_in))
    saved = [t for t in trace.tensors if t.role == "saved"]
    # GELU's input (first linear's output) and output (second linear's input): batch x hidden fp32 each
    assert sorted(t.size_bytes for t in saved) == [batch * d_hidden * 4] * 2
    assert sorted(hooks.saved.values()) == sorted(t.size_bytes for t in saved)
    assert all(t.start < trace.forward_ops < t.end for t in saved)
    (output,) = [t for t in trace.tensors if t.role == "output"]
    assert output.size_bytes == batch * d_in * 4
    # gradients: 2 weights, 2 biases and the input's
    grads = sorted(t.size_bytes for t in trace.tensors if t.role == "gradient")
    assert grads == sorted([d_hidden * d_in * 4] * 2 + [d_hidden * 4, d_in * 4, batch * d_in * 4])
    assert all(t.end == trace.total_ops for t in trace.tensors if t.role == "gradient")
    assert all(0 <= t.start < t.end <= trace.total_ops for t in trace.tensors)
    assert all(p.grad is None for p in mlp.parameters())  # the trace leaves the caller's grads as they were
    # deterministic (outside the hooks, which change when autograd frees what it saved)
    assert trace_block(mlp, torch.randn(batch, d_in)) == trace_block(mlp, torch.randn(batch, d_in))


def test_trace_llama_layer_feeds_the_buffer_solver(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=128,
        max_position_embeddings=32,
    )
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx=0)
    x = torch.randn(2, 32, 64)
    position_ids = torch.arange(32).unsqueeze(0)
    cos, sin = LlamaRotaryEmbedding(config)(x, position_ids)
    hooks = _SavedStorages(layer, cos, sin)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, lambda t: t):
        trace = trace_block_full(
            layer, x, example_kwargs={"position_embeddings": (cos, sin), "position_ids": position_ids}
        )
    saved = [t for t in trace.tensors if t.role == "saved"]
    # what the trace calls saved is exactly what autograd packed (by bytes)
    assert sum(hooks.saved.values()) == sum(t.size_bytes for t in saved) > 0
    assert trace.source["module"] == "LlamaDecoderLayer"
    # the JSON round trip is exact
    path = tmp_path / "trace.json"
    save_trace(trace, path)
    assert load_trace(path) == trace
    # and the solver places it
    sol = solve_buffers(trace.tensors, settings=settings())
    check_offsets(trace.tensors, sol.offsets, alignment_bytes=512)
    assert sol.arena_bytes <= best_fit(trace.tensors).arena_bytes
    assert sol.live_peak_bytes == live_bytes_peak(trace.tensors)


def test_load_trace_rejects_bad_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": "2.0", "tensors": [], "forward_ops": 0, "total_ops": 0}')
    with pytest.raises(TraceError, match="schema"):
        load_trace(bad)
    bad.write_text(
        '{"schema_version": "1.0", "tensors": [{"size_bytes": 1, "start": 2, "end": 1}], "forward_ops": 0, "total_ops": 3}'
    )
    with pytest.raises(TraceError, match=r"bad.json.*tensors\[0\]"):
        load_trace(bad)
    assert isinstance(BlockTrace(tensors=(), forward_ops=0, total_ops=0), BlockTrace)
