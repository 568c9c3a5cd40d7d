"""Tracing nn.Modules on the meta device: exact against real runs, nothing allocated for huge models."""

import resource

import pytest
import torch
import transformers
from torch import nn

from planner.memory import block_saved_bytes
from planner.model import to_hf_config_dict
from planner.presets import MODEL_PRESETS
from planner.trace import TraceError, model_spec_of, trace_module
from planner.workload import Workload
from tests.helpers import hf_model


def _meta_hf(spec):
    d = to_hf_config_dict(spec)
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.train()
    return model


def _real_saved_bytes(model, ids):
    """Independent count on a real CPU run: unique storages saved for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids)  # kept: the graph holds every saved storage, so no address is reused
    total = sum(seen.values())
    del out
    return total


@pytest.mark.parametrize("name", ["tiny-llama", "llama-20m"])
def test_meta_trace_equals_a_real_run(name):
    spec = MODEL_PRESETS[name]
    b, s = 2, 128
    ids = torch.randint(0, spec.vocab_size, (b, s))
    real = _real_saved_bytes(hf_model(spec), ids)
    meta = _meta_hf(spec)
    ids_meta = ids.to("meta")
    tr = trace_module(meta, {"input_ids": ids_meta, "labels": ids_meta})
    assert tr.params == spec.params
    assert tr.saved_bytes == real
    # one decoder layer's saved bytes agree with the memory model's per-block formula
    layer = tr.module("model.layers.0")
    w = Workload(global_batch=b, micro_batch=b, seq_len=s, dtype="fp32")
    assert layer.saved_bytes == pytest.approx(block_saved_bytes(spec, w, micro_batch=b), rel=0.05)
    # identical layers trace identically, and children partition no more than their parent holds
    assert len({m.saved_bytes for m in tr.children_of("model.layers")}) == 1
    assert sum(m.saved_bytes for m in tr.children_of("model.layers.0")) >= layer.saved_bytes * 0.5
    assert tr.module("").saved_bytes == tr.saved_bytes


def test_a_70b_model_traces_without_allocating():
    spec = MODEL_PRESETS["llama2-70b"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = _meta_hf(spec)
    ids = torch.zeros(1, 4096, dtype=torch.long, device="meta")
    tr = trace_module(model, (ids,))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert tr.params == spec.params  # 69B parameters, counted exactly
    assert tr.param_bytes == 4 * spec.params
    assert tr.saved_bytes > 80 * 4096 * spec.hidden_size * 4  # at least every layer's input
    assert grown_mib < 500  # 276 GB of fp32 weights were never allocated
    assert model_spec_of(model).params == spec.params


def test_plain_module_stack_and_loss_is_charged_to_the_root():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 1000))
    x = torch.empty(8, 64, device="meta")
    tr = trace_module(net, (x,), loss=lambda out: out.logsumexp(-1).sum())
    assert tr.params == 64 * 256 + 256 + 256 * 1000 + 1000
    # Linear saves its input, GELU its input, the last Linear its input: 8x64 + 8x256 (shared) floats
    assert tr.module("0").saved_bytes == 8 * 64 * 4
    assert tr.module("1").saved_bytes == 8 * 256 * 4
    # logsumexp saves its input (the 8 x 1000 output) and result: more than the layers alone
    layers = sum(tr.module(n).saved_bytes for n in ("0", "1", "2"))
    assert tr.saved_bytes > layers
    assert tr.module("2").output_bytes == 8 * 1000 * 4


def test_bad_inputs_name_the_field():
    net = nn.Linear(4, 4)  # real parameters
    with pytest.raises(TraceError, match="not meta") as exc:
        trace_module(net, (torch.empty(2, 4, device="meta"),))
    assert exc.value.field == "model"
    with torch.device("meta"):
        net = nn.Linear(4, 4)
    with pytest.raises(TraceError) as exc:
        trace_module(net, (torch.empty(2, 4),))
    assert exc.value.field == "inputs"
    with pytest.raises(TraceError, match="no transformers config"):
        model_spec_of(net)
