"""The runtime on a PEFT (LoRA) model: blocks, the chunked loss, and a LoRA plan carried out end to end."""

from __future__ import annotations

import copy

import pytest
import torch

import offload
from offload.blocks import find_blocks
from offload.loss import install_chunked_loss
from offload.loss_errors import UnsupportedModelError
from planner.budget import plan_for_budget
from planner.model import ModelSpec
from planner.workload import Workload
from tests.helpers import hf_model, measure_step_peak
from tests.integration.helpers import cpu_cluster

peft = pytest.importorskip("peft")

# activations dominate (as in test_policy_peaks): 4 blocks, batch 4 x 256 tokens
SPEC = ModelSpec(name="t-llama-lora", family="llama", num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=4,
                 ffn_hidden_size=352, vocab_size=512, max_position_embeddings=256)  # fmt: skip
BATCH, SEQ, RANK, TARGETS = 4, 256, 8, ("q_proj", "v_proj")
LORA = Workload(global_batch=BATCH, micro_batch=BATCH, seq_len=SEQ, dtype="fp32", lora_rank=RANK,
                lora_targets=TARGETS, max_grad_norm=0.0)  # fmt: skip


def _peft_model(spec: ModelSpec = SPEC):
    torch.set_num_threads(1)
    config = peft.LoraConfig(r=RANK, target_modules=list(TARGETS), lora_dropout=0.0)
    return peft.get_peft_model(hf_model(spec), config)


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)


def _batches(n: int) -> list[torch.Tensor]:
    return [torch.randint(0, SPEC.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(i))
            for i in range(n)]  # fmt: skip


def test_blocks_found_inside_the_peft_model():
    model = _peft_model()
    blocks = find_blocks(model)
    assert blocks.path == "base_model.model.model.layers"
    assert list(blocks) == list(model.get_base_model().model.layers)


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_chunked_loss_on_a_peft_model_equals_the_standard_loss():
    ref = _peft_model()
    model = copy.deepcopy(ref)
    ids = _batches(1)[0]
    expected = ref(ids, labels=ids).loss
    expected.backward()
    handle = install_chunked_loss(model, chunk_size=256)
    assert handle.model is model.get_base_model()  # the hooks sit on the causal LM inside
    got = model(ids, labels=ids).loss
    got.backward()
    assert handle.calls == 1
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(_lora_grads(model), _lora_grads(ref))
    handle.remove()
    assert model(ids).logits.shape == (BATCH, SEQ, SPEC.vocab_size)  # inference: ordinary logits


class _Zero3Passthrough(torch.autograd.Function):
    """What DeepSpeed ZeRO-3's forward hook does to a module's output (PreBackwardFunctionForModule)."""

    @staticmethod
    def forward(ctx, output):
        return output.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_chunked_loss_under_a_zero3_style_head_hook():
    """The head's output handed on as a new tensor over the same storage is not mistaken for soft-capping;
    a head whose output really changes still is."""
    ref = _peft_model()
    model = copy.deepcopy(ref)
    ids = _batches(1)[0]
    expected = ref(ids, labels=ids).loss
    expected.backward()
    head = model.get_base_model().lm_head
    hook = head.register_forward_hook(lambda mod, args, out: _Zero3Passthrough.apply(out))
    handle = install_chunked_loss(model, chunk_size=256)
    got = model(ids, labels=ids).loss
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(_lora_grads(model), _lora_grads(ref))
    hook.remove()
    head.register_forward_hook(lambda mod, args, out: 30.0 * torch.tanh(out / 30.0))  # soft-capping
    with pytest.raises(UnsupportedModelError, match="soft-capping"):
        model(ids, labels=ids)
    handle.remove()


def _measured_peak(plan) -> int:
    model = _peft_model()
    with offload.apply(model, _optimizer(model), plan) as handle:
        return measure_step_peak(model, handle.optimizer, _batches(1)[0])["Total"]


@pytest.mark.parametrize("optimizer_offload", [False, True], ids=["resident", "offloaded"])
def test_lora_plan_runs_a_peft_model(optimizer_offload):
    """A plan made for the LoRA run (swap, chunked loss, optionally the optimizer offloaded) gives the losses
    of the same run without memtier; its predicted peak is within 10% of the measured one and below what
    full fine-tuning would need."""
    cluster = cpu_cluster(1)
    keep = plan_for_budget(SPEC, cluster, LORA, budget_bytes=1 << 40).plan
    full = plan_for_budget(SPEC, cluster, LORA.replace(lora_rank=0), budget_bytes=1 << 40).plan
    budget = int(0.6 * keep.predicted.peak_bytes)
    plan = plan_for_budget(SPEC, cluster, LORA, budget_bytes=budget, optimizer_offload=optimizer_offload).plan
    assert plan.loss.kind == "chunked" and any(p.swap_fraction > 0 for p in plan.activations)
    assert plan.optimizer.offload == optimizer_offload

    batches = _batches(3)
    ref = _peft_model()
    ref_opt = _optimizer(ref)
    expected = []
    for ids in batches:
        loss = ref(ids, labels=ids).loss
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        expected.append(loss.item())
    model = _peft_model()
    got = []
    with offload.apply(model, _optimizer(model), plan) as handle:
        for ids in batches:
            loss = model(ids, labels=ids).loss
            loss.backward()
            handle.optimizer.step()
            handle.optimizer.zero_grad(set_to_none=True)
            got.append(loss.item())
        assert handle.stats.bytes_swapped > 0
        assert (type(handle.optimizer).__name__ == "OffloadedAdamW") == optimizer_offload
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    measured = _measured_peak(plan)
    predicted = plan.predicted.peak_bytes
    assert abs(measured / predicted - 1) <= 0.10, (measured, predicted)
    assert predicted < keep.predicted.peak_bytes < full.predicted.peak_bytes
