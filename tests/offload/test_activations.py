"""Activation swap/recompute hooks on a plain nn.Module stack: exact round trips, bit-identical training,
parameters never swapped, dedupe, prefetch one layer ahead, and the measured peak against the prediction."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

import offload
from offload.activations import (
    ALIGN_BYTES,
    BlockPolicy,
    PolicyError,
    SwapEngine,
    predict_activation_peak_bytes,
    profile_block,
    profile_blocks,
    swap_tokens,
)
from offload.tiers import make_tier
from planner.plan import ActivationPolicy, Plan, TierPlan
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.workload import Workload

HIDDEN, SEQ, BATCH, LAYERS = 32, 24, 3, 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread beats two on a shared 2-core machine. Reference and hooked runs
    use the same count (bit-exactness holds per thread count); the previous count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ViewsBlock(nn.Module):
    """A pre-norm block whose saved tensors include a transposed view, a non-contiguous slice at a storage
    offset, an expanded (stride-0) tensor, (batch*seq, hidden) Linear inputs, tensors without a token dim,
    and a dropout mask."""

    def __init__(self, hidden: int, *, p_drop: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)
        self.mix = nn.Linear(hidden // 2, hidden)
        self.gate = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(p_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        z = self.down(self.drop(F.gelu(self.up(y))))
        t = y.transpose(1, 2)  # (b, h, s): a transposed view, saved by the matmul
        gram = torch.matmul(t, y) / y.shape[1]  # (b, h, h): no token dim
        mixed = torch.matmul(y, gram)
        odd = y[..., 1::2]  # a non-contiguous slice at storage offset 1, saved by sin
        w = self.mix(odd.sin())
        g = torch.sigmoid(self.gate(y.mean(dim=1, keepdim=True)))  # (b, 1, h)
        gated = y * g.expand_as(y)  # mul saves the expanded view
        return x + z + w + 0.1 * mixed + gated


class Stack(nn.Module):
    def __init__(
        self, block: type[nn.Module] = ViewsBlock, *, hidden: int = HIDDEN, layers: int = LAYERS
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(block(hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def make_plan(acts, tiers=()) -> Plan:
    return Plan(
        model=MODEL_PRESETS["tiny-llama"],
        cluster=resolve_cluster("rtx4090-nvme"),
        workload=Workload(global_batch=BATCH, seq_len=SEQ),
        activations=tuple(acts),
        tiers=tuple(tiers),
    )


def swap(layer, s, tier="dram"):
    return ActivationPolicy(layer=layer, keep_fraction=1 - s, swap_fraction=s, swap_tier=tier)


def recompute(layer):
    return ActivationPolicy(layer=layer, keep_fraction=0.0, recompute_fraction=1.0)


def dram(capacity=64 << 20):
    return TierPlan(kind="dram", capacity_bytes=capacity)


def train(model: nn.Module, steps: int, *, autocast: bool = False, device: str = "cpu"):
    """`steps` AdamW steps on fixed random data; returns (last gradients, parameters)."""
    torch.manual_seed(1234)  # dropout masks
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(BATCH, SEQ, HIDDEN, generator=data).to(device)
        opt.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
    return [p.grad.clone() for p in model.parameters()], [p.detach().clone() for p in model.parameters()]


@functools.cache
def base_model() -> Stack:
    torch.manual_seed(0)
    return Stack()


@functools.cache
def reference(steps: int, autocast: bool):
    return train(copy.deepcopy(base_model()), steps, autocast=autocast)


def assert_identical(ref, got) -> None:
    for name, a, b in zip(("grad", "param"), ref, got):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"{name} {i} differs (max {(x.float() - y.float()).abs().max().item()})"


# ---------------------------------------------------------------------------------------------- units
def test_swap_tokens_rounds_half_up():
    assert [swap_tokens(s, 10) for s in (0.0, 0.04, 0.05, 0.25, 0.5, 0.96, 1.0)] == [0, 0, 1, 3, 5, 10, 10]
    assert swap_tokens(0.3, 24) == 7  # 7.2 -> 7


def test_fractional_recompute_is_rejected_naming_the_layer():
    with pytest.raises(PolicyError, match=r"layer 2: recompute_fraction=0.5") as err:
        BlockPolicy.from_plan(ActivationPolicy(layer=2, keep_fraction=0.5, recompute_fraction=0.5), index=1)
    assert err.value.field == "activations[1].recompute_fraction"
    assert isinstance(err.value, ValueError)


def _roundtrip(t: torch.Tensor, s: float, tokens=(SEQ, BATCH * SEQ)):
    tier = make_tier("host", capacity_bytes=4 << 20)
    engine = SwapEngine({"dram": tier})
    try:
        record = engine.new_record(0)
        packed = engine.pack(
            t, record, BlockPolicy(layer=0, mode="swap", swap_fraction=s), tokens, 1, frozenset()
        )
        record.dedupe = None
        engine.synchronize()
        out = engine.unpack(packed) if hasattr(packed, "engine") else None
        return packed, out, engine.stats
    finally:
        engine.close()
        tier.close()


def _layouts():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(BATCH, SEQ, HIDDEN, generator=g)
    return {
        "contiguous": y,
        "transposed": y.transpose(1, 2),
        "slice_at_offset": y[..., 1::2],
        "expanded": torch.randn(BATCH, 1, HIDDEN, generator=g).expand(BATCH, SEQ, HIDDEN),
        "flat_tokens": y.view(BATCH * SEQ, HIDDEN),
        "bf16": y.to(torch.bfloat16),
        "int64": torch.randint(0, 100, (BATCH, SEQ), generator=g),
        "bool_mask": torch.rand(BATCH, SEQ, HIDDEN, generator=g) > 0.5,
        "no_token_dim": torch.randn(BATCH, HIDDEN, HIDDEN, generator=g),
        "permuted_4d": torch.randn(BATCH, SEQ, 4, 8, generator=g).permute(0, 2, 1, 3),
    }


@pytest.mark.parametrize("s", [1.0, 0.5, 0.3])
@pytest.mark.parametrize("name", list(_layouts()))
def test_unpack_restores_size_stride_dtype_and_alignment_exactly(name, s):
    t = _layouts()[name]
    packed, out, stats = _roundtrip(t, s)
    if out is None:  # kept as is: only tensors without a token dim below s = 0.5
        assert name in ("no_token_dim", "expanded") and s < 0.5
        assert stats.tensors_kept == 1
        return
    assert stats.tensors_swapped == 1 and stats.bytes_fetched == stats.bytes_swapped > 0
    assert out.shape == t.shape and out.stride() == t.stride() and out.dtype == t.dtype
    per = ALIGN_BYTES // t.element_size()
    assert out.storage_offset() % per == t.storage_offset() % per
    assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()  # a real copy came back
    assert torch.equal(out, t)


def test_token_split_sends_the_planned_share():
    t = _layouts()["contiguous"]
    _, out, stats = _roundtrip(t, 0.25)
    k = swap_tokens(0.25, SEQ)
    assert stats.bytes_swapped == t.numel() * 4 * k // SEQ
    flat = _layouts()["flat_tokens"]
    _, out, stats = _roundtrip(flat, 0.25)
    assert stats.bytes_swapped == flat.numel() * 4 * swap_tokens(0.25, BATCH * SEQ) // (BATCH * SEQ)


# ---------------------------------------------------------------------------------------------- training
STEPS = 20
POLICIES = {
    "swap_all_host": lambda tmp: ([swap(i, 1.0) for i in range(LAYERS)], [dram()]),
    "swap_all_nvme": lambda tmp: (
        [swap(i, 1.0, "nvme") for i in range(LAYERS)],
        [TierPlan(kind="nvme", capacity_bytes=256 << 20, path=str(tmp))],
    ),
    "recompute_all": lambda tmp: ([recompute(i) for i in range(LAYERS)], []),
    "mixed_tokenwise": lambda tmp: (
        [swap(0, 0.5), recompute(1), swap(2, 0.3, "nvme"), swap(3, 0.75)],
        [dram(), TierPlan(kind="nvme", capacity_bytes=256 << 20, path=str(tmp))],
    ),
}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_training_is_bit_identical_to_no_hooks(policy, tmp_path):
    acts, tiers = POLICIES[policy](tmp_path)
    model = copy.deepcopy(base_model())
    with offload.apply(model, None, make_plan(acts, tiers)) as handle:
        got = train(model, STEPS)
        stats = handle.stats
    assert_identical(reference(STEPS, False), got)
    if policy != "recompute_all":
        assert stats.tensors_swapped > 0 and stats.bytes_fetched == stats.bytes_swapped
    assert not any(tmp_path.iterdir()), "remove() leaves no swap files"


def test_mixed_dtypes_under_bf16_autocast_are_bit_identical():
    model = copy.deepcopy(base_model())
    with offload.apply(
        model, None, make_plan([swap(0, 1.0), swap(1, 0.5), recompute(2)], [dram()])
    ) as handle:
        got = train(model, 10, autocast=True)
    assert_identical(reference(10, True), got)
    assert handle.stats.bytes_swapped > 0


def test_parameters_and_their_casts_are_never_swapped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN))  # blocks: the two Linears
    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True).clone()  # an activation, not a user leaf
    for autocast in (False, True):
        with offload.apply(model, None, make_plan([swap(0, 1.0), swap(1, 1.0)], [dram()])) as handle:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model(x).float().sum().backward()
            handle.synchronize()
            stats, written = handle.stats, handle.tiers["dram"].stats.bytes_written
        # Each Linear saves its input (a (batch*seq, hidden) view) and its weight (a transposed view; under
        # autocast a bf16 copy): only the inputs go to the tier.
        assert stats.tensors_kept == 2 and stats.tensors_swapped == 2
        assert written == 2 * x.numel() * (2 if autocast else 4)


class QKVBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        return x + torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v


def test_one_storage_saved_by_several_ops_is_swapped_once():
    torch.manual_seed(0)
    model = Stack(QKVBlock, layers=2)
    reference_model = copy.deepcopy(model)
    x = torch.randn(BATCH, SEQ, HIDDEN)
    reference_model(x).sum().backward()
    with offload.apply(model, None, make_plan([swap(0, 1.0), swap(1, 1.0)], [dram()])) as handle:
        model(x).sum().backward()
        stats = handle.stats
    # Per block: x feeds q, k and v (packed once, shared twice); the softmax output is saved by softmax and
    # by the matmul with v (shared once).
    assert stats.dedupe_hits == 2 * 3
    for a, b in zip(reference_model.parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_backward_prefetches_one_swapped_layer_ahead():
    model = copy.deepcopy(base_model())
    seen = {}
    with offload.apply(model, None, make_plan([swap(i, 1.0) for i in range(LAYERS)], [dram()])) as handle:
        for i, block in enumerate(model.blocks):
            # Fires once block i's backward is done, i.e. after it unpacked its tensors, before block i-1's.
            def record(_m, _gi, _go, i=i):
                seen.setdefault(i, handle.stats.prefetches)

            block.register_full_backward_hook(record)
        x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
        model(x).sum().backward()
    # Block 3's first unpack prefetched block 2, block 2's prefetched block 1, block 1's block 0.
    assert seen == {3: 1, 2: 2, 1: 3, 0: 3}


def test_inplace_modification_of_a_saved_tensor_raises_like_autograd():
    class Mutating(nn.Module):
        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.lin = nn.Linear(hidden, hidden)

        def forward(self, x):
            y = self.lin(x)
            gram = torch.matmul(y.transpose(1, 2), y)  # (b, h, h): no token dim, kept below s = 0.5
            out = torch.matmul(y, gram)  # saves gram
            gram.mul_(2)
            return out

    torch.manual_seed(0)
    model = Stack(Mutating, layers=2)
    x = torch.randn(BATCH, SEQ, HIDDEN)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()  # autograd without hooks
    with (
        offload.apply(model, None, make_plan([swap(0, 0.25), swap(1, 0.25)], [dram()])),
        pytest.raises(RuntimeError, match="modified by an inplace operation"),
    ):
        model(x).sum().backward()


def test_no_grad_forward_swaps_nothing():
    model = copy.deepcopy(base_model()).eval()
    x = torch.randn(BATCH, SEQ, HIDDEN)
    expected = model(x)
    with offload.apply(model, None, make_plan([swap(i, 1.0) for i in range(LAYERS)], [dram()])) as handle:
        with torch.no_grad():
            got = model(x)
        assert handle.stats.tensors_swapped == 0
    assert torch.equal(expected, got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_swap_is_bit_identical():
    ref_model = copy.deepcopy(base_model()).cuda()
    ref = train(ref_model, 5, device="cuda")
    model = copy.deepcopy(base_model()).cuda()
    with offload.apply(model, None, make_plan([swap(0, 1.0), swap(1, 0.5), recompute(2)], [dram()])):
        got = train(model, 5, device="cuda")
    assert_identical(ref, got)


# ---------------------------------------------------------------------------------------------- memory
class MLPBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


MEM_LAYERS, MEM_HIDDEN, MEM_SEQ, MEM_BATCH = 6, 64, 200, 4
BUDGET_PLANS = {  # from the largest activation budget to the smallest
    "keep_all": lambda: [],
    "swap_25": lambda: [swap(i, 0.25) for i in range(MEM_LAYERS)],
    "swap_50": lambda: [swap(i, 0.5) for i in range(MEM_LAYERS)],
    "mixed": lambda: [recompute(0), swap(1, 0.5), swap(3, 1.0), recompute(5)],
    "swap_all": lambda: [swap(i, 1.0) for i in range(MEM_LAYERS)],
    "recompute_all": lambda: [recompute(i) for i in range(MEM_LAYERS)],
}


def _measured_step_peak(model: nn.Module, x: torch.Tensor) -> int:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()

    step()  # gradients allocated: the measured step is a steady-state one
    tracker = MemTracker()
    tracker.track_external(model, opt, x)
    with tracker:
        step()
    return sum(dev["Total"] for dev in tracker.get_tracker_snapshot("peak").values())


def test_measured_peak_matches_prediction_and_falls_with_the_budget():
    torch.manual_seed(0)
    model = Stack(MLPBlock, hidden=MEM_HIDDEN, layers=MEM_LAYERS)
    x = torch.randn(MEM_BATCH, MEM_SEQ, MEM_HIDDEN)
    profiles = profile_blocks(model, x)
    assert len(profiles) == MEM_LAYERS and profiles[0].saved_bytes > profiles[0].input_bytes > 0
    # static: parameters and their (persistent) gradients; head: its output and the squared output.
    static = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    head = 2 * MEM_BATCH * MEM_SEQ * 8 * 4
    measured, predicted = {}, {}
    for name, acts in BUDGET_PLANS.items():
        m = copy.deepcopy(model)
        with offload.apply(m, None, make_plan(acts(), [dram()])) as handle:
            measured[name] = _measured_step_peak(m, x)
            predicted[name] = static + predict_activation_peak_bytes(
                profiles, handle.policies, head_bytes=head
            )
    for name in BUDGET_PLANS:
        ratio = measured[name] / predicted[name]
        assert 0.9 <= ratio <= 1.1, f"{name}: measured {measured[name]} vs predicted {predicted[name]}"
    order = list(BUDGET_PLANS)
    assert all(measured[a] > measured[b] for a, b in zip(order, order[1:])), measured
    assert all(predicted[a] > predicted[b] for a, b in zip(order, order[1:])), predicted


def test_profile_block_counts_saved_tensors_by_token_dim():
    torch.manual_seed(0)
    block = MLPBlock(MEM_HIDDEN)
    x = torch.randn(2, 40, MEM_HIDDEN)
    p = profile_block(block, x)
    h, tokens = MEM_HIDDEN, 2 * 40
    # LayerNorm: input, mean, rstd; up: its input as (b*s, h); gelu: its input; down: its input as (b*s, 4h)
    assert p.saved_bytes == 4 * (tokens * h + 2 * tokens + tokens * h + 2 * tokens * 4 * h)
    assert p.other_saved_bytes == 0 and p.token_saved_bytes == p.saved_bytes
    assert p.input_bytes == p.output_bytes == tokens * h * 4
    assert p.param_bytes == 4 * sum(q.numel() for q in block.parameters())
    assert p.resident_bytes(BlockPolicy(layer=0, mode="recompute")) == p.input_bytes
    half = BlockPolicy(layer=0, mode="swap", swap_fraction=0.5)
    assert p.resident_bytes(half) + p.swap_bytes(half) == p.saved_bytes
    assert p.backward_transient_bytes > 0 and p.forward_peak_bytes >= p.saved_bytes
    assert all(q.grad is None for q in block.parameters())


def test_retain_graph_backward_twice_is_bit_identical():
    torch.manual_seed(0)
    ref_model, model = copy.deepcopy(base_model()).eval(), copy.deepcopy(base_model()).eval()
    x = torch.randn(BATCH, SEQ, HIDDEN)
    loss = ref_model(x).square().mean()
    loss.backward(retain_graph=True)
    loss.backward()
    with offload.apply(model, None, make_plan([swap(i, 0.5) for i in range(LAYERS)], [dram()])):
        loss = model(x).square().mean()
        loss.backward(retain_graph=True)  # unpacked tensors are cached for the second pass
        loss.backward()
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.filterwarnings("ignore:module forward hook with ``always_call=True`` raised")
def test_a_full_tier_raises_instead_of_returning_garbage():
    model = copy.deepcopy(base_model())
    x = torch.randn(BATCH, SEQ, HIDDEN)
    handle = offload.apply(
        model, None, make_plan([swap(i, 1.0) for i in range(LAYERS)], [dram(capacity=4096)])
    )
    with pytest.raises(RuntimeError, match=r"swapping out a tensor of block \d failed: .*capacity") as err:
        model(x).sum().backward()
    assert type(err.value.__cause__).__name__ == "TierCapacityError"
    handle.remove()
    model(x).sum().backward()  # removed: the model trains as before
