"""memtier's per-block decisions on compiled blocks (`offload.apply(..., compile_blocks=...)`): gradients equal
those of the compiled model without memtier, swap moves the compiled graph's saved tensors through the
engine, recompute leaves only the inputs saved, and a block that cannot compile falls back, reported.

The tests compile with "aot_eager" (AOTAutograd's partitioned graphs run by eager kernels: no C++ compile);
`benchmarks/activations.py` runs inductor."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import offload
from offload.activations import CompileOptions, profile_blocks, profile_compiled_blocks
from planner.plan import ActivationPolicy, Plan, TierPlan
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.workload import Workload

SEQ, BATCH, VOCAB, LAYERS = 32, 2, 512, 3
BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def _one_thread_fresh_dynamo():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(before)


def llama() -> LlamaForCausalLM:
    spec = MODEL_PRESETS["tiny-llama"]
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=LAYERS,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=spec.max_position_embeddings,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def make_plan(acts=(), tiers=()) -> Plan:
    return Plan(
        model=MODEL_PRESETS["tiny-llama"],
        cluster=resolve_cluster("rtx4090-nvme"),
        workload=Workload(global_batch=BATCH, seq_len=SEQ),
        activations=tuple(acts),
        tiers=tuple(tiers),
    )


def swap(layer: int, s: float, tier: str = "nvme") -> ActivationPolicy:
    return ActivationPolicy(layer=layer, keep_fraction=1 - s, swap_fraction=s, swap_tier=tier)


def recompute(layer: int) -> ActivationPolicy:
    return ActivationPolicy(layer=layer, keep_fraction=0.0, recompute_fraction=1.0)


def train(model: nn.Module, steps: int = 2) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(7)
    grads: list[torch.Tensor] = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=data)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
    return grads


def compiled_reference(steps: int = 2) -> list[torch.Tensor]:
    """The compiled model without memtier: every block's forward under torch.compile, same backend."""
    model = llama()
    for block in model.model.layers:
        block.__dict__["forward"] = torch.compile(block.forward, backend=BACKEND, fullgraph=True)
    return train(model, steps)


def nvme(tmp_path) -> TierPlan:
    return TierPlan(kind="nvme", capacity_bytes=64 << 20, path=str(tmp_path))


def test_mixed_plan_under_compile_gives_the_compiled_models_gradients_and_swaps(tmp_path):
    ref = compiled_reference()
    torch._dynamo.reset()
    model = llama()
    plan = make_plan([swap(0, 0.5), recompute(1)], [nvme(tmp_path)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no block falls back
        handle = offload.apply(model, None, plan, compile_blocks=BACKEND)
        got = train(model)
    report = handle.compiled
    stats = handle.stats
    handle.remove()
    # aot_eager runs the same kernels on both sides: the compiler's tolerance here is exact equality
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b), f"grad {i} differs"
    assert [(b.layer, b.mode, b.compiled) for b in report] == [
        (0, "swap", True),
        (1, "recompute", True),
        (2, "keep", True),
    ]
    assert all(b.fallback is None for b in report)
    # the compiled graph's saved tensors went to the NVMe tier and came back
    assert stats.tensors_swapped > 0 and stats.bytes_swapped > 0
    assert stats.bytes_fetched == stats.bytes_swapped


def test_swap_under_compile_moves_the_compiled_graphs_saved_share(tmp_path):
    model = llama()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    eager = profile_blocks(model, ids)
    compiled = profile_compiled_blocks(model, ids, options=CompileOptions(backend=BACKEND), eager=eager)
    # the partitioner saves fewer bytes than eager autograd (it recomputes cheap pointwise ops)
    assert 0 < compiled[0].saved_bytes < eager[0].saved_bytes
    torch._dynamo.reset()
    plan = make_plan([swap(0, 1.0)], [nvme(tmp_path)])
    with offload.apply(model, None, plan, compile_blocks=BACKEND) as handle:
        model(input_ids=ids, labels=ids).loss.backward()
        stats = handle.stats
    # a full swap sends every saved token-dim tensor of the compiled block (parameters stay)
    assert stats.bytes_swapped == compiled[0].swap_bytes(handle.policies[0])
    assert stats.bytes_fetched == stats.bytes_swapped


def test_recompute_under_compile_saves_only_the_block_inputs():
    model = llama()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    block = model.model.layers[0]
    captured = []
    hook = block.register_forward_pre_hook(lambda _m, a, kw: captured.append((a, kw)), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    hook.remove()
    (args, kwargs) = captured[0]
    handle = offload.apply(model, None, make_plan([recompute(0)]), compile_blocks=BACKEND)
    x = args[0].detach().clone().requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, *args[1:], **kwargs)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    # the checkpoint's CPU RNG state (a uint8 tensor) is saved too: only floating-point tensors are activations
    activations = [t for t in saved if t.is_floating_point() and t.untyped_storage().data_ptr() not in params]
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    handle.remove()
    assert sum(t.numel() * t.element_size() for t in activations) <= x.numel() * x.element_size() + sum(
        t.numel() * t.element_size() for t in kwargs.get("position_embeddings", ())
    )


class _BreakingBlock(nn.Module):
    """A block dynamo cannot capture whole (a graph break in its forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.lin(x))
        torch._dynamo.graph_break()
        return torch.tanh(y) + x


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_BreakingBlock() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.layers:
            x = b(x)
        return x


def test_a_block_that_cannot_compile_falls_back_to_eager_with_its_decision_and_says_so(tmp_path):
    ref = _Stack()
    x = torch.randn(2, 8, 16)
    ref(x).square().sum().backward()
    model = _Stack()
    plan = make_plan([swap(0, 1.0), recompute(1)], [nvme(tmp_path)])
    handle = offload.apply(model, None, plan, compile_blocks=BACKEND)
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        model(x).square().sum().backward()
    report, stats = handle.compiled, handle.stats
    handle.remove()
    assert [(b.layer, b.compiled) for b in report] == [(0, False), (1, False)]
    assert all(b.fallback and "Unsupported" in b.fallback for b in report)
    assert stats.bytes_swapped > 0  # the swap decision is still carried out, eagerly
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_compile_off_installs_no_compiler():
    model = llama()
    handle = offload.apply(model, None, make_plan([recompute(0)]))
    assert handle.compiler is None and handle.compiled == ()
    assert "forward" not in model.model.layers[1].__dict__  # kept blocks are left alone without compile
    handle.remove()


def test_partitioner_budget_and_memtier_swap_add_up(tmp_path):
    """The min-cut partitioner's activation budget inside each block, memtier's swap across them: the swap
    moves exactly the (smaller) saved set the partitioner leaves at that budget."""
    model = llama()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    eager = profile_blocks(model, ids)
    profiles = []
    for b in (1.0, 0.1):
        torch._dynamo.reset()  # dynamo's cache does not key on the partitioner's budget
        options = CompileOptions(backend="aot_eager_decomp_partition", activation_memory_budget=b)
        profiles.append(profile_compiled_blocks(model, ids, options=options, eager=eager)[0])
    full, tight = profiles
    assert tight.saved_bytes < full.saved_bytes
    torch._dynamo.reset()
    options = CompileOptions(backend="aot_eager_decomp_partition", activation_memory_budget=0.1)
    with offload.apply(model, None, make_plan([swap(0, 1.0)], [nvme(tmp_path)]), compile_blocks=options) as h:
        model(input_ids=ids, labels=ids).loss.backward()
        assert h.stats.bytes_swapped == tight.swap_bytes(h.policies[0]) > 0
        assert h.compiled[0].compiled


def test_compile_options_refuse_a_budget_outside_zero_one():
    with pytest.raises(ValueError, match="activation_memory_budget"):
        CompileOptions(activation_memory_budget=1.5)


def compiled_plan(acts=(), tiers=(), budget=None) -> Plan:
    plan = make_plan(acts, tiers)
    return plan.replace(workload=plan.workload.replace(compile=BACKEND, compile_memory_budget=budget))


def test_a_compiled_plan_compiles_the_blocks_without_being_asked():
    """`Workload.compile` in the plan is what compiles the blocks: `offload.apply(model, opt, plan)` with no
    compile argument gives the compiled model's gradients, every block compiled."""
    ref = compiled_reference(steps=1)
    model = llama()
    with offload.apply(model, None, compiled_plan([recompute(1)])) as handle:
        got = train(model, steps=1)
        report = handle.compiled
    assert [b.compiled for b in report] == [True] * LAYERS
    assert report[1].how.startswith("torch.compile(checkpoint")
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_a_compile_argument_that_contradicts_a_compiled_plan_is_refused():
    from offload.activations import PolicyError

    for contrary in (False, "inductor", CompileOptions(backend=BACKEND, activation_memory_budget=0.5)):
        with pytest.raises(PolicyError, match="the plan runs the blocks compiled") as err:
            offload.apply(llama(), None, compiled_plan(), compile_blocks=contrary)
        assert err.value.field == "compile_blocks"
    # the same options as the plan's are no contradiction, nor torch's own budget (1.0) spelled out by the plan
    # (as `memtier plan --compile` writes the budget it chose)
    offload.apply(llama(), None, compiled_plan(), compile_blocks=BACKEND).remove()
    offload.apply(llama(), None, compiled_plan(budget=1.0), compile_blocks=BACKEND).remove()


def test_an_unknown_backend_is_refused_naming_it():
    with pytest.raises(ValueError, match="unknown torch.compile backend 'no_such'"):
        CompileOptions(backend="no_such")


def test_profiling_leaves_allocated_gradients_as_they_were():
    """Profiling runs a backward through each block. With the gradients allocated (a training loop that zeroes
    them in place), that backward must not add into them: the next optimizer step would apply it. Eager and
    compiled profiles both leave every `.grad` the same tensor with the same values."""
    torch.manual_seed(0)
    model = llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    model(ids, labels=ids).loss.backward()
    before = {p: (p.grad, p.grad.clone()) for p in model.parameters()}
    eager = profile_blocks(model, ids)
    profile_compiled_blocks(model, ids, options=CompileOptions(backend=BACKEND), eager=eager)
    for p, (obj, values) in before.items():
        assert p.grad is obj and torch.equal(p.grad, values)


def test_a_second_plan_at_another_partitioner_budget_gets_its_own_graphs(tmp_path):
    """dynamo's cache does not key on the partitioner's budget: a plan applied after blocks were compiled at a
    different budget (a profile, another plan), with no reset in between, would run those graphs. offload.apply
    resets dynamo then (and warns, and says so in `handle.compiler.resets`), so each plan's swap moves its own
    budget's saved set; where nothing compiled at another budget is cached, nothing is reset."""
    torch.manual_seed(0)
    model = llama()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    eager = profile_blocks(model, ids)

    def options(budget: float) -> CompileOptions:
        return CompileOptions(backend="aot_eager_decomp_partition", activation_memory_budget=budget)

    tight = profile_compiled_blocks(model, ids, options=options(0.1), eager=eager)[0]
    swapped, resets = [], []
    for b in (1.0, 0.1, 0.1):  # no torch._dynamo.reset() between the plans
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = offload.apply(
                model, None, make_plan([swap(0, 1.0)], [nvme(tmp_path)]), compile_blocks=options(b)
            )
            with handle:
                model(input_ids=ids, labels=ids).loss.backward()
                swapped.append(handle.stats.bytes_swapped)
                # a shorter batch: dynamo recompiles the blocks under this plan's budget (another cached graph)
                short = ids[:, : SEQ // 2]
                model(input_ids=short, labels=short).loss.backward()
        warned = [str(w.message) for w in caught if "torch._dynamo.reset() was called" in str(w.message)]
        resets.append(len(handle.compiler.resets))
        assert len(warned) == resets[-1], [str(w.message) for w in caught]
    # 1.0 follows the profile's 0.1, 0.1 follows 1.0, the second 0.1 reuses the first one's graphs (the
    # recompiled ones too)
    assert resets == [1, 1, 0]
    one_block = offload.activations.BlockPolicy(layer=0, mode="swap", swap_fraction=1.0)
    assert swapped[1] == swapped[2] == tight.swap_bytes(one_block) < swapped[0]
    # after a reset by anyone, compiling at another budget needs none
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with offload.apply(
            model, None, make_plan([swap(0, 1.0)], [nvme(tmp_path)]), compile_blocks=options(1.0)
        ) as h:
            model(input_ids=ids, labels=ids).loss.backward()
    assert h.compiler.resets == [] and h.stats.bytes_swapped == swapped[0]


def test_two_live_plans_at_two_budgets_each_run_their_own_graphs(tmp_path):
    """Two models of one class, each with a live compiled plan at its own partitioner budget, stepped in turn:
    the blocks share one code object, so each call finds the other plan's graphs cached. Every call checks what
    dynamo holds before it runs, so each plan swaps its own budget's saved set every step (with a reset and a
    warning at each switch), never the other's."""
    torch.manual_seed(0)
    models = [llama(), llama()]
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))

    def options(budget: float) -> CompileOptions:
        return CompileOptions(backend="aot_eager_decomp_partition", activation_memory_budget=budget)

    for b in (0.1, 1.0):
        (tmp_path / str(b)).mkdir()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        handles = [
            offload.apply(
                m, None, make_plan([swap(0, 1.0)], [nvme(tmp_path / str(b))]), compile_blocks=options(b)
            )
            for m, b in zip(models, (0.1, 1.0))
        ]
        per_step: list[list[int]] = [[], []]
        try:
            for _ in range(2):
                for i, (m, h) in enumerate(zip(models, handles)):
                    before = h.stats.bytes_swapped
                    m(input_ids=ids, labels=ids).loss.backward()
                    per_step[i].append(h.stats.bytes_swapped - before)
        finally:
            for h in handles:
                h.remove()
    tight, loose = per_step
    assert tight[0] == tight[1] < loose[0] == loose[1]
    assert all(h.compiler.resets for h in handles)  # each found the other's graphs at least once
