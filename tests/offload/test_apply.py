"""`offload.apply` on unmodified HF Llama and GPT-2 models and plain stacks: block discovery, bit-identical
training, plan validation (nothing installed on a bad plan), and `remove()` restoring the model."""

from __future__ import annotations

import copy
import functools
import importlib.util
import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import offload
from offload.activations import PolicyError
from offload.apply import OffloadHandle
from offload.blocks import BlockDiscoveryError, find_blocks
from planner.plan import ActivationPolicy, LossPlan, OptimizerPlan, Plan, TierPlan
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.workload import Workload

SEQ, BATCH, VOCAB, LAYERS = 24, 2, 512, 3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread beats two on a shared 2-core machine. Reference and hooked runs
    use the same count (bit-exactness holds per thread count); the previous count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def llama() -> LlamaForCausalLM:
    spec = MODEL_PRESETS["tiny-llama"]
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=spec.hidden_size,
            intermediate_size=spec.ffn_hidden_size,
            num_hidden_layers=LAYERS,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            vocab_size=VOCAB,
            max_position_embeddings=spec.max_position_embeddings,
            attention_dropout=0.1,  # dropout inside SDPA: recompute must redraw the same mask
        )
    )


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)  # GPT-2 has embedding, attention and residual dropout (0.1) by default
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=256))


MODELS = {"llama": llama, "gpt2": gpt2}


def make_plan(acts=(), tiers=(), **changes) -> Plan:
    return Plan(
        model=MODEL_PRESETS["tiny-llama"],
        cluster=resolve_cluster("rtx4090-nvme"),
        workload=Workload(global_batch=BATCH, seq_len=SEQ),
        activations=tuple(acts),
        tiers=tuple(tiers),
        **changes,
    )


def swap(layer, s, tier="dram"):
    return ActivationPolicy(layer=layer, keep_fraction=1 - s, swap_fraction=s, swap_tier=tier)


def recompute(layer):
    return ActivationPolicy(layer=layer, keep_fraction=0.0, recompute_fraction=1.0)


DRAM = TierPlan(kind="dram", capacity_bytes=64 << 20)


def train(model: nn.Module, steps: int, *, autocast: bool = False):
    torch.manual_seed(1234)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(7)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=data)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    return [p.grad.clone() for p in model.parameters()], [p.detach().clone() for p in model.parameters()]


@functools.cache
def reference(name: str, steps: int, autocast: bool):
    return train(MODELS[name](), steps, autocast=autocast)


def assert_identical(ref, got) -> None:
    for kind, a, b in zip(("grad", "param"), ref, got):
        for i, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"{kind} {i} differs"


# ---------------------------------------------------------------------------------------------- discovery
def test_finds_hf_llama_and_gpt2_blocks():
    m = llama()
    found = find_blocks(m)
    assert found.path == "model.layers" and list(found) == list(m.model.layers)
    assert find_blocks(m.model).path == "layers"
    g = gpt2()
    found = find_blocks(g)
    assert found.path == "transformer.h" and list(found) == list(g.transformer.h)


def test_generic_discovery_takes_the_largest_homogeneous_container():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))  # more children, fewer params

        def forward(self, x):
            return sum(e(x) for e in self.experts)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.Sequential(Block(), Block(), Block())
            self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(10))

    net = Net()
    found = find_blocks(net)
    assert found.path == "stack" and list(found) == list(net.stack)
    assert list(find_blocks(net, blocks=net.heads[:2])) == list(net.heads[:2])


def test_discovery_errors_name_the_field():
    with pytest.raises(BlockDiscoveryError, match="pass blocks=") as err:
        find_blocks(nn.Linear(4, 4))
    assert err.value.field == "blocks"
    with pytest.raises(BlockDiscoveryError, match="not a submodule"):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), blocks=[nn.Linear(2, 2)])


# ---------------------------------------------------------------------------------------------- HF training
HF_POLICIES = {
    "swap_all": [swap(i, 1.0) for i in range(LAYERS)],
    "recompute_all": [recompute(i) for i in range(LAYERS)],
    "mixed": [swap(0, 0.5), recompute(1), swap(2, 0.25)],
}


@pytest.mark.parametrize("policy", list(HF_POLICIES))
@pytest.mark.parametrize("name", list(MODELS))
def test_hf_training_is_bit_identical(name, policy):
    model = MODELS[name]()
    with warnings.catch_warnings():
        # Recomputed and swapped blocks ignore the KV cache that training does not use (and say so once per block).
        warnings.filterwarnings(
            "ignore", message="memtier: block .* is (recomputed|swapped)", category=RuntimeWarning
        )
        with offload.apply(model, None, make_plan(HF_POLICIES[policy], [DRAM])) as handle:
            got = train(model, 20)
    assert_identical(reference(name, 20, False), got)
    if policy != "recompute_all":
        assert handle.stats.tensors_swapped > 0


def test_hf_llama_bf16_autocast_mixed_plan_is_bit_identical():
    model = llama()
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="memtier: block .* is (recomputed|swapped)", category=RuntimeWarning
        )
        with offload.apply(model, None, make_plan(HF_POLICIES["mixed"], [DRAM])):
            got = train(model, 10, autocast=True)
    assert_identical(reference("llama", 10, True), got)


@pytest.mark.parametrize("mode", ["recomputed", "swapped"])
def test_hf_block_not_kept_writes_no_kv_cache_and_warns_once(mode):
    """A recomputed block would write the cache twice; a swapped block's cache would hold its keys and values
    on the device, undoing part of the swap: neither writes it in training (as HF checkpointing does)."""
    model = llama()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    policy = recompute(0) if mode == "recomputed" else swap(0, 1.0)
    with offload.apply(model, None, make_plan([policy], [DRAM])):
        with pytest.warns(RuntimeWarning, match=f"block 0 is {mode}; not writing its KV cache"):
            out = model(input_ids=ids, labels=ids, use_cache=True)
            out.loss.backward()
        cache = out.past_key_values
        assert (
            cache.get_seq_length(0) == 0 and cache.get_seq_length(1) == SEQ
        )  # the kept blocks still write it
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(input_ids=ids, labels=ids, use_cache=True).loss.backward()


# ---------------------------------------------------------------------------------------------- validation
def _untouched(model: nn.Module) -> bool:
    return all(
        "forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks
        for m in model.modules()
    )


@pytest.mark.parametrize(
    ("plan", "error", "match"),
    [
        (
            make_plan([ActivationPolicy(layer=1, keep_fraction=0.5, recompute_fraction=0.5)]),
            PolicyError,
            r"layer 1: recompute_fraction=0.5 is fractional",
        ),
        (make_plan([swap(5, 1.0)], [DRAM]), PolicyError, r"layer 5 is out of range: the model has 3"),
        (make_plan([swap(0, 1.0), recompute(0)], [DRAM]), PolicyError, r"layer 0 has two policies"),
        (make_plan([swap(0, 1.0), swap(2, 0.5, "nvme")], [DRAM]), PolicyError, r"no 'nvme' entry in tiers"),
        (
            make_plan([swap(0, 1.0)], [DRAM], optimizer=OptimizerPlan(offload=True)),
            PolicyError,
            "needs the optimizer to offload",
        ),
    ],
    ids=[
        "fractional_recompute",
        "layer_out_of_range",
        "duplicate_layer",
        "missing_tier",
        "optimizer_offload",
    ],
)
def test_bad_plans_raise_and_install_nothing(plan, error, match):
    model = llama()
    with pytest.raises(error, match=match):
        offload.apply(model, None, plan)
    assert _untouched(model)


@pytest.mark.skipif(importlib.util.find_spec("offload.loss") is not None, reason="offload.loss exists")
def test_chunked_loss_without_its_module_says_so():
    model = llama()
    with pytest.raises(NotImplementedError, match="install_chunked_loss"):
        offload.apply(model, None, make_plan(loss=LossPlan(kind="chunked", chunk_size=8)))
    assert _untouched(model)


@pytest.mark.skipif(importlib.util.find_spec("offload.loss") is None, reason="offload.loss not written yet")
def test_chunked_loss_is_installed_with_swap_and_removed():
    model = llama().eval()  # no dropout: the chunked loss equals the standard one
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss
    plan = make_plan([swap(0, 1.0), swap(1, 0.5)], [DRAM], loss=LossPlan(kind="chunked", chunk_size=8))
    handle = offload.apply(model, None, plan)
    assert handle._loss_handle is not None
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert handle.stats.tensors_swapped > 0
    torch.testing.assert_close(loss.detach(), expected)
    handle.remove()
    assert _untouched(model)


# ---------------------------------------------------------------------------------------------- remove
def test_remove_restores_the_model_and_deletes_swap_files(tmp_path):
    model = gpt2().eval()
    pristine = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    nvme = TierPlan(kind="nvme", capacity_bytes=64 << 20, path=str(tmp_path))
    plan = make_plan([swap(0, 1.0, "nvme"), recompute(1), swap(2, 0.5)], [DRAM, nvme])
    handle = offload.apply(model, None, plan)
    assert isinstance(handle, OffloadHandle) and sorted(handle.tiers) == ["dram", "nvme"]
    assert "forward" in model.transformer.h[0].__dict__ and any(tmp_path.iterdir())
    model.config.use_cache = False  # a recomputed block would not write the KV cache (and warn)
    model(input_ids=ids, labels=ids).loss.backward()
    tiers = list(handle.tiers.values())
    handle.remove()
    handle.remove()  # idempotent
    assert _untouched(model)
    assert all(t.closed for t in tiers)
    assert not any(tmp_path.iterdir()), "swap files and the run directory are deleted"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, pristine(input_ids=ids).logits)
    assert type(model.transformer.h[0]).forward is type(pristine.transformer.h[0]).forward


def test_keep_only_plan_installs_nothing():
    model = llama()
    handle = offload.apply(model, None, make_plan())
    assert handle.engine is None and not handle.tiers and _untouched(model)
    assert [p.mode for p in handle.policies] == ["keep"] * LAYERS
    handle.remove()


def test_hf_llama_measured_peak_falls_with_swap_and_recompute():
    from torch.distributed._tools.mem_tracker import MemTracker

    ids = torch.randint(0, VOCAB, (BATCH, 128))
    peaks = {}
    for name, acts in {
        "keep": [],
        "swap_half": [swap(i, 0.5) for i in range(LAYERS)],
        "swap_all": [swap(i, 1.0) for i in range(LAYERS)],
        "recompute_all": [recompute(i) for i in range(LAYERS)],
    }.items():
        model = llama()
        model.config.use_cache = False
        with offload.apply(model, None, make_plan(acts, [DRAM])):
            model(input_ids=ids, labels=ids).loss.backward()  # gradients allocated before measuring
            tracker = MemTracker()
            tracker.track_external(model)
            with tracker:
                model(input_ids=ids, labels=ids).loss.backward()
            peaks[name] = sum(d["Total"] for d in tracker.get_tracker_snapshot("peak").values())
    assert peaks["keep"] > peaks["swap_half"] > peaks["swap_all"] > peaks["recompute_all"], peaks


def test_profile_blocks_of_hf_models_find_a_token_dim_in_every_saved_tensor():
    from offload.activations import BlockPolicy, profile_blocks

    ids = torch.randint(0, VOCAB, (BATCH, 40))
    for make in MODELS.values():
        model = make()
        model.config.use_cache = False
        profiles = profile_blocks(model, input_ids=ids)
        assert len(profiles) == LAYERS
        for p in profiles:
            assert p.seq_len == 40 and p.input_bytes == BATCH * 40 * 64 * 4
            assert p.saved_bytes > 10 * p.input_bytes and p.other_saved_bytes == 0
            half = BlockPolicy(layer=0, mode="swap", swap_fraction=0.5)
            assert p.swap_bytes(half) + p.resident_bytes(half) == sum(b for b, _ in p.saved_tensors)


def test_apply_offloads_the_optimizer_when_the_plan_says_so():
    """plan.optimizer.offload: apply() wraps the AdamW; stepping handle.optimizer equals fused AdamW."""
    import copy

    from offload.optimizer import OffloadSettings

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    model = copy.deepcopy(ref)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    plan = make_plan([], [DRAM], optimizer=OptimizerPlan(offload=True, tier="dram"))
    x = torch.randn(8, 16)
    handle = offload.apply(
        model,
        opt,
        plan,
        blocks=list(model),
        optimizer_settings=OffloadSettings(cpu_kernel="torch_fused", schedule="cpu"),
    )
    try:
        assert handle.optimizer is not opt
        for _ in range(3):
            for m, o in ((ref, ref_opt), (model, handle.optimizer)):
                m(x).square().mean().backward()
                o.step()
                o.zero_grad(set_to_none=True)
        for a, b in zip(ref.parameters(), model.parameters()):
            assert torch.equal(a, b)
    finally:
        handle.remove()
