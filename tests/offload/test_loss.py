"""Chunked linear cross-entropy (offload/loss.py) against the standard path: F.linear + F.cross_entropy and
HF's own ForCausalLMLoss on real Llama / Qwen2 / GPT-2 models (random init), plus the memory it saves
(torch.distributed._tools.mem_tracker) against the formula the planner mirrors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from offload.loss import (
    ChunkedLossError,
    UnsupportedModelError,
    chunked_loss_peak_bytes,
    install_chunked_loss,
    linear_cross_entropy,
    logits_bytes,
    standard_loss_peak_bytes,
)

MODES = ("recompute", "precompute")


def _reference(h, w, b, labels, *, reduction="mean", label_smoothing=0.0, z_loss_weight=0.0):
    """The standard path: full logits, HF's causal shift, F.cross_entropy (+ PaLM z-loss)."""
    vocab = w.shape[0]
    z = F.linear(h, w, b).reshape(-1, vocab)
    y = F.pad(labels[..., 1:], (0, 1), value=-100).reshape(-1)
    loss = F.cross_entropy(z, y, ignore_index=-100, reduction=reduction, label_smoothing=label_smoothing)
    if z_loss_weight:
        valid = y != -100
        zl = z_loss_weight * torch.logsumexp(z, dim=1)[valid].square().sum()
        loss = loss + (zl / valid.sum() if reduction == "mean" else zl)
    return loss


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize(
    "mode,vocab_block", [("recompute", None), ("recompute", 23), ("precompute", None)]
)  # precompute needs whole vocabulary rows (refused with vocab_block: test_bad_options_name_the_field)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(
    "reduction,label_smoothing,z_loss_weight", [("mean", 0.0, 0.0), ("sum", 0.0, 0.0), ("mean", 0.1, 1e-2)]
)
def test_matches_cross_entropy_fp64(mode, vocab_block, with_bias, reduction, label_smoothing, z_loss_weight):
    g = torch.Generator().manual_seed(0)
    batch, seq, hidden, vocab = 2, 19, 8, 101  # 101 = 4 blocks of 23 + a partial one
    h = torch.randn(batch, seq, hidden, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(vocab, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, 2:7] = -100  # ignored tokens; 33 valid tokens: chunks of 5 end with a partial one
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss_weight=z_loss_weight)
    ref = _reference(h, w, b, labels, **kw)
    out = linear_cross_entropy(h, w, labels, bias=b, chunk_size=5, vocab_block=vocab_block, mode=mode, **kw)
    assert out.dtype == torch.float64
    assert_close(out, ref)
    for got, want in zip(_grads(out, [h, w, b]), _grads(ref, [h, w, b])):
        assert_close(got, want)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def _tiny_config(arch: str, *, tied: bool, vocab: int = 211):
    if arch in ("llama", "qwen2"):
        config_class = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
        return config_class(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
        )
    assert arch == "gpt2"
    return transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tied,
    )


def _tiny_model(arch: str, *, tied: bool, seed: int = 0, vocab: int = 211):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_tiny_config(arch, tied=tied, vocab=vocab))
    return model.train()


def _batch(vocab: int, *, batch: int = 2, seq: int = 23, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100  # a masked prompt
    labels[1, 10:12] = -100
    return ids, labels


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)])
def test_hf_head_and_loss(arch, tied, mode):
    """Loss and d/d hidden, d/d weight of the function against lm_head + the model's own ForCausalLMLoss."""
    model = _tiny_model(arch, tied=tied)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    ids, labels = _batch(model.config.vocab_size)
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
    h_ref = hidden.clone().requires_grad_()
    h_new = hidden.clone().requires_grad_()
    weight = model.lm_head.weight
    ref = model.loss_function(model.lm_head(h_ref), labels, vocab_size=model.config.vocab_size)
    # 38 valid tokens, chunks of 8: the last chunk is partial
    out = linear_cross_entropy(h_new, weight, labels, chunk_size=8, mode=mode)
    assert_close(out, ref)
    g_ref = torch.autograd.grad(ref, [h_ref, weight])
    g_new = torch.autograd.grad(out, [h_new, weight])
    assert_close(g_new[0], g_ref[0])
    assert_close(g_new[1], g_ref[1])
    if mode == "recompute":
        blocked = linear_cross_entropy(h_new, weight, labels, chunk_size=8, vocab_block=64, mode="recompute")
        assert_close(blocked, ref)
        for got, want in zip(torch.autograd.grad(blocked, [h_new, weight]), g_ref):
            assert_close(got, want)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True), ("gpt2", True)])
def test_installer_matches_unmodified_model(arch, tied, mode):
    model = _tiny_model(arch, tied=tied)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    ids, labels = _batch(model.config.vocab_size)

    handle = install_chunked_loss(model, chunk_size=8, mode=mode)
    assert list(model.state_dict()) == keys  # module tree untouched
    with _LargestTensor() as chunked_largest:
        out = model(ids, labels=labels)
        out.loss.backward()
    with _LargestTensor() as standard_largest:
        ref = reference(ids, labels=labels)
        ref.loss.backward()
    logits_numel = ids.numel() * model.config.vocab_size
    assert standard_largest.numel >= logits_numel  # the reference does make full logits
    assert chunked_largest.numel < logits_numel  # the chunked path never does, forward or backward
    assert out.logits is None
    assert handle.calls == 1
    assert_close(out.loss, ref.loss)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.grad is not None, name
        assert_close(p.grad, q.grad, msg=name)

    # inference (no labels) is unaffected and does not take the chunked path
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert handle.calls == 1
    # return_dict=False: the tuple has no logits entry
    as_tuple = model(ids, labels=labels, return_dict=False)
    assert_close(as_tuple[0], ref.loss)
    assert not any(torch.is_tensor(t) and t.shape[-1] == model.config.vocab_size for t in as_tuple[1:])

    handle.remove()
    handle.remove()  # idempotent
    assert "forward" not in vars(model.lm_head) and "_loss_function" not in vars(model)
    restored = model(ids, labels=labels)
    assert restored.logits is not None and restored.logits.shape == (*ids.shape, model.config.vocab_size)
    assert handle.calls == 2


def test_installer_num_items_in_batch_and_shift_labels():
    """HF Trainer's gradient-accumulation keyword (sum / items) and pre-shifted labels take the same route."""
    model = _tiny_model("llama", tied=False)
    reference = copy.deepcopy(model)
    ids, labels = _batch(model.config.vocab_size)
    install_chunked_loss(model, chunk_size=16)
    items = torch.tensor(50)
    assert_close(
        model(ids, labels=labels, num_items_in_batch=items).loss,
        reference(ids, labels=labels, num_items_in_batch=items).loss,
    )
    shifted = F.pad(labels[..., 1:], (0, 1), value=-100)
    assert_close(
        model(ids, labels=labels, shift_labels=shifted).loss,
        reference(ids, labels=labels, shift_labels=shifted).loss,
    )


def test_memory_drop_matches_prediction():
    """A training step's measured peak falls by the predicted logits bytes (within 10%), fp32 and bf16."""
    from torch.distributed._tools.mem_tracker import MemTracker

    vocab, batch, seq, hidden = 32000, 2, 512, 64
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, vocab, (batch, seq))
    tokens = batch * seq

    def step_peak(model, hold_outputs):
        tracker = MemTracker()
        tracker.track_external(model, ids)
        with tracker:
            if hold_outputs:  # a hand-written loop keeping `outputs` in scope through backward
                outputs = model(ids, labels=ids)
                outputs.loss.backward()
                del outputs
            else:  # HF Trainer's way: only the loss survives the forward
                model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    for dtype, chunk, mode, held in (
        (torch.float32, 256, "recompute", True),
        (torch.bfloat16, 512, "precompute", False),
    ):
        model = base.to(dtype)
        dtype_bytes = torch.finfo(dtype).bits // 8
        standard = step_peak(model, held)
        handle = install_chunked_loss(model, chunk_size=chunk, mode=mode)
        chunked = step_peak(model, held)
        handle.remove()
        predicted = standard_loss_peak_bytes(
            tokens=tokens, vocab=vocab, dtype_bytes=dtype_bytes, logits_held=held
        ) - (
            chunked_loss_peak_bytes(
                tokens=tokens, vocab=vocab, dtype_bytes=dtype_bytes, chunk_size=chunk, hidden=hidden
            )
        )
        assert predicted > 2 * logits_bytes(tokens, vocab, 4)  # the logits dominate this model
        assert 0.9 <= (standard - chunked) / predicted <= 1.1, (dtype, standard, chunked, predicted)


def test_peak_formulas():
    # the example: 128K vocabulary x 8K tokens of fp32 logits = 4 GiB
    assert logits_bytes(8192, 131072, 4) == 4 << 30
    assert standard_loss_peak_bytes(tokens=8192, vocab=131072, dtype_bytes=2) == (2 << 30) + 3 * (4 << 30)
    assert standard_loss_peak_bytes(tokens=8192, vocab=131072, dtype_bytes=2, logits_held=False) == 3 * (
        4 << 30
    )
    # one fp32 tile + one bf16 tile + the per-token log-sum-exp
    assert chunked_loss_peak_bytes(tokens=8192, vocab=131072, dtype_bytes=2, chunk_size=1024) == (
        1024 * 131072 * 6 + 4 * 8192
    )
    # vocabulary blocks shrink the tile; gradient buffers count when hidden is given
    assert chunked_loss_peak_bytes(
        tokens=100, vocab=1000, dtype_bytes=4, chunk_size=10, vocab_block=250, hidden=8
    ) == (10 * 250 * 4 + 4 * 100 + (1000 + 100) * 8 * 4 + 4 * 10 * 8)
    # a chunk larger than the batch is the batch
    assert chunked_loss_peak_bytes(tokens=8, vocab=10, dtype_bytes=4, chunk_size=64) == 8 * 10 * 4 + 32


def test_all_tokens_ignored_matches_standard():
    h = torch.randn(1, 6, 4, requires_grad=True)
    w = torch.randn(11, 4, requires_grad=True)
    labels = torch.full((1, 6), -100)
    for mode in MODES:
        out = linear_cross_entropy(h, w, labels, chunk_size=4, mode=mode)
        ref = _reference(h, w, None, labels)
        assert torch.isnan(out) and torch.isnan(ref)
        for got, want in zip(_grads(out, [h, w]), _grads(ref, [h, w])):
            assert torch.equal(got, want)  # zeros


def test_autocast_bf16_cpu():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 16, 32, generator=g, requires_grad=True)
    w = (torch.randn(300, 32, generator=g) * 0.1).requires_grad_()
    labels = torch.randint(0, 300, (2, 16), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(h, w, None, labels)
        out = linear_cross_entropy(h, w, labels, chunk_size=8)
    assert out.dtype == torch.float32
    assert_close(out, ref.float(), rtol=1e-2, atol=1e-2)
    for got, want in zip(_grads(out, [h, w]), _grads(ref, [h, w])):
        assert got.dtype == torch.float32  # back through the autocast cast to the fp32 leaves
        assert_close(got, want, rtol=5e-2, atol=1e-3)


def test_no_grad_forward_computes_no_gradients():
    h = torch.randn(1, 9, 4)
    w = torch.randn(13, 4, requires_grad=True)
    labels = torch.randint(0, 13, (1, 9))
    with torch.no_grad():
        out = linear_cross_entropy(h, w, labels, chunk_size=4, mode="precompute")
    assert out.grad_fn is None
    assert_close(out, _reference(h, w, None, labels))
    # only hidden requires grad (a frozen head, as with adapters): the weight gets none
    h.requires_grad_()
    w.requires_grad_(False)
    out = linear_cross_entropy(h, w, labels, chunk_size=4)
    (gh,) = torch.autograd.grad(out, [h])
    assert_close(gh, torch.autograd.grad(_reference(h, w, None, labels), [h])[0])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=True), "chunk_size"),
        (dict(chunk_size=2.0), "chunk_size"),
        (dict(vocab_block=0), "vocab_block"),
        (dict(mode="precompute", vocab_block=4), "vocab_block"),
        (dict(mode="fused"), "mode"),
        (dict(reduction="none"), "reduction"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(z_loss_weight=-1.0), "z_loss_weight"),
    ],
)
def test_bad_options_name_the_field(kwargs, field):
    h, w, labels = torch.randn(1, 5, 4), torch.randn(7, 4), torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ChunkedLossError) as info:
        linear_cross_entropy(h, w, labels, **kwargs)
    assert info.value.field == field and str(info.value).startswith(field)


def test_bad_tensors_name_the_field():
    h, w = torch.randn(1, 5, 4), torch.randn(7, 4)
    with pytest.raises(ChunkedLossError, match="labels"):
        linear_cross_entropy(h, w, torch.tensor([[0, 1, 7, 2, 3]]))  # 7 is outside [0, 7)
    with pytest.raises(ChunkedLossError, match="labels"):
        linear_cross_entropy(h, w, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ChunkedLossError, match="labels"):
        linear_cross_entropy(h, w, torch.zeros(1, 5))
    with pytest.raises(ChunkedLossError, match="weight"):
        linear_cross_entropy(h, torch.randn(7, 3), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ChunkedLossError, match="bias"):
        linear_cross_entropy(h, w, torch.zeros(1, 5, dtype=torch.long), bias=torch.zeros(6))
    with pytest.raises(ChunkedLossError, match="hidden"):
        linear_cross_entropy(h.double(), w, torch.zeros(1, 5, dtype=torch.long))


def test_installer_rejects_what_it_cannot_serve():
    model = _tiny_model("llama", tied=False)
    handle = install_chunked_loss(model, chunk_size=8)
    with pytest.raises(ChunkedLossError, match="already"):
        install_chunked_loss(model, chunk_size=8)
    handle.remove()
    with pytest.raises(ChunkedLossError) as info:
        install_chunked_loss(model, chunk_size=0)
    assert info.value.field == "chunk_size"

    model.loss_function = lambda *a, **k: torch.zeros(())  # a user's custom loss is not replaced
    with pytest.raises(UnsupportedModelError) as info:
        install_chunked_loss(model, chunk_size=8)
    assert info.value.field == "model.loss_function"


def test_softcapped_logits_are_refused_and_the_model_recovers():
    """Gemma-2 soft-caps logits between head and loss: the chunked loss cannot stand in, and says so."""
    config = transformers.Gemma2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    assert config.final_logit_softcapping
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config)
    ids, labels = _batch(97)
    install_chunked_loss(model, chunk_size=8)
    with pytest.raises(UnsupportedModelError, match="changes the lm_head output"):
        model(ids, labels=labels)
    # the failed call left nothing armed: inference still gets real logits
    assert model(ids).logits.shape == (*ids.shape, 97)


def test_backward_twice():
    """recompute supports retain_graph (it keeps its inputs); precompute refuses a second backward clearly."""
    h = torch.randn(1, 9, 4, requires_grad=True)
    w = torch.randn(13, 4, requires_grad=True)
    labels = torch.randint(0, 13, (1, 9))
    out = linear_cross_entropy(h, w, labels, chunk_size=4, mode="recompute")
    first = torch.autograd.grad(out, [h, w], retain_graph=True)
    second = torch.autograd.grad(out, [h, w])
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    out = linear_cross_entropy(h, w, labels, chunk_size=4, mode="precompute")
    torch.autograd.grad(out, [h, w], retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        torch.autograd.grad(out, [h, w])


def test_vocab_block_without_mode_takes_recompute():
    h = torch.randn(1, 9, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (1, 9))
    out = linear_cross_entropy(h, w, labels, chunk_size=4, vocab_block=5)  # default mode would refuse blocks
    ref = _reference(h, w, None, labels)
    assert_close(out, ref)
    for got, want in zip(_grads(out, [h, w]), _grads(ref, [h, w])):
        assert_close(got, want)
