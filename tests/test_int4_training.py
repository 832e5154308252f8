"""Training for 4-bit weights: the grid the student is trained on is ONNX Runtime's own."""
import numpy as np
import pytest
import torch
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

from services.engine.int4_training import fake_quantize, training_on_grid


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size", [16, 32])
def test_the_grid_is_onnx_runtimes(symmetric, block_size):
    weight = torch.randn(24, 80, generator=torch.Generator().manual_seed(0)) * 0.05  # 80 = 2.5 blocks of 32
    ours = fake_quantize(weight, block_size, symmetric).numpy()
    # ONNX Runtime's own rounding of one block (the functions its quantizer applies to embedding tables;
    # the MatMul path, in C++, is checked end to end in test_method_distill.py)
    theirs = np.empty_like(ours)
    for start in range(0, 80, block_size):
        block = weight.numpy()[None, :, start:start + block_size].transpose(0, 2, 1)  # (1, block, rows)
        if symmetric:
            quantized, scale = DefaultWeightOnlyQuantizer.quant_slice_symmetric(block)
            values = quantized.astype(np.float32) * scale
        else:
            quantized, scale, zero = DefaultWeightOnlyQuantizer.quant_slice_asymmetric(block)
            values = (quantized.astype(np.float32) - zero) * scale
        theirs[:, start:start + block_size] = values[0].T
    np.testing.assert_allclose(ours, theirs, atol=1e-6)

def test_gradients_pass_the_rounding_and_the_rounded_weights_stay():
    layer = torch.nn.Linear(64, 8)
    with training_on_grid(layer, 32, symmetric=False, embeddings=False) as count:
        assert count == 1
        layer(torch.randn(4, 64)).sum().backward()
        assert layer.parametrizations.weight.original.grad is not None  # straight-through
        on_grid = layer.weight.detach().clone()
    assert torch.allclose(layer.weight, on_grid) and isinstance(layer.weight, torch.nn.Parameter)
    assert torch.allclose(fake_quantize(layer.weight, 32, False), layer.weight, atol=1e-6)
