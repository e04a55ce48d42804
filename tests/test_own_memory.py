"""A model loaded as views of its safetensors file is moved into memory of its own, so that what pruning writes or
releases is held once."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama
from transformers import LlamaForCausalLM

from spdy_hf.modeling.loading import own_memory


def mapped(model) -> list[str]:
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.numel() and not t.untyped_storage().resizable()]


def test_a_checkpoint_loaded_in_its_own_dtype_leaves_its_file_mapping(tmp_path):
    make_llama().to(torch.bfloat16).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    if not mapped(model):
        pytest.skip("this transformers copies a checkpoint at load: nothing lies in a file mapping")
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    own_memory(model)
    assert mapped(model) == []
    for n, p in model.named_parameters():
        assert torch.equal(p, values[n])
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied


def test_tensors_in_memory_of_their_own_are_left_as_they_are():
    data = bytearray(torch.arange(6, dtype=torch.float32).numpy().tobytes())
    from_buffer = torch.frombuffer(data, dtype=torch.float32)  # a view of memory torch did not allocate
    module = torch.nn.Linear(3, 2)
    module.weight.data = from_buffer.view(2, 3)
    bias = module.bias.data_ptr()
    own_memory(module)
    assert module.weight.untyped_storage().resizable()
    assert torch.equal(module.weight, torch.arange(6, dtype=torch.float32).view(2, 3))
    data[0:4] = b"\x00\x00\x80\x3f"  # the buffer changes; the weight no longer follows it
    assert module.weight[0, 0] == 0
    assert module.bias.data_ptr() == bias
