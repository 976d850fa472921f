"""The invariant every figure rests on: a quantized layer's own product `layer(x)` equals `x @ Q^T`, with Q read
back by `dequantized_weight`, for every bitsandbytes layout a user can hold: NF4 / FP4, double quantization on and
off, blocks of 64 and 128, the plain layout and the one bitsandbytes repacks to at an inference forward on
AVX512-BF16 CPUs, compute dtypes float32 / bfloat16 / float16; LLM.int8 before and after its first forward."""
import itertools

import bitsandbytes as bnb
import pytest
import torch

from quailora_app.engine.quantization.bnb import dequantized_weight

pytestmark = pytest.mark.usefixtures("one_thread")
#: bitsandbytes repacks a 4-bit layer (and has the kernel for that layout) only on a CPU with AVX512-BF16; forcing the
#: layer's flag elsewhere gives a layout no kernel of this CPU reads, a state bitsandbytes never produces itself
needs_avx512bf16 = "this CPU has no AVX512-BF16: bitsandbytes keeps the plain layout"

OUT, IN = 64, 512  # 8 blocks of 64 per row: a misread block order shows as a large error
#: relative Frobenius error allowed between layer(x) and x @ Q^T: the compute dtype's rounding of the product
#: (the repacked CPU kernel computes in bfloat16 whatever compute dtype was asked for)
TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
INT8_TOLERANCE = 2e-2  # measured 7e-3; a misread row scale is off by far more


def _linear4bit(quant: str, double_quant: bool, block_size: int, compute_dtype: torch.dtype):
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN) / IN ** 0.5
    layer = bnb.nn.Linear4bit(IN, OUT, bias=False, compute_dtype=compute_dtype, compress_statistics=double_quant,
                              quant_type=quant)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=block_size,
                                     compress_statistics=double_quant, quant_type=quant, module=layer)
    layer.weight._quantize("cpu")
    return layer.eval()


def _relative_error(layer, x: torch.Tensor) -> float:
    with torch.no_grad():
        out = layer(x.to(getattr(layer, "compute_dtype", None) or torch.float32)).float()
        expected = x.float() @ dequantized_weight(layer).T
    return ((out - expected).norm() / expected.norm()).item()


LAYOUTS = list(itertools.product(("nf4", "fp4"), (True, False), (64, 128),
                                 (torch.float32, torch.bfloat16, torch.float16), (False, True)))


@pytest.mark.parametrize("quant,double_quant,block_size,compute_dtype,repacked", LAYOUTS,
                         ids=[f"{q}-dq{int(d)}-b{b}-{str(c)[6:]}-{'repacked' if r else 'plain'}"
                              for q, d, b, c, r in LAYOUTS])
def test_4bit_layer_product_is_x_times_q_transposed(quant, double_quant, block_size, compute_dtype, repacked):
    if repacked and not bnb.functional.has_avx512bf16():
        pytest.skip(needs_avx512bf16)
    layer = _linear4bit(quant, double_quant, block_size, compute_dtype)
    layer.support_avx512bf16_for_cpu = repacked  # bitsandbytes repacks only where the CPU has AVX512-BF16
    x = torch.randn(16, IN)
    first = _relative_error(layer, x)  # Q read before the first forward, product of the first forward
    state = layer.weight.quant_state
    assert getattr(state, "packing_format_for_cpu", False) == repacked
    tolerance = TOLERANCE[torch.bfloat16 if repacked else compute_dtype]
    assert first < tolerance
    assert _relative_error(layer, x) < tolerance  # and read back after the forward, in whichever layout it left


@pytest.mark.parametrize("forward_first", [False, True], ids=["before-forward", "after-forward"])
def test_8bit_layer_product_is_x_times_q_transposed(forward_first):
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN) / IN ** 0.5
    layer = bnb.nn.Linear8bitLt(IN, OUT, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu").eval()  # quantizes to int8 rows and their scales
    x = torch.randn(16, IN)
    if forward_first:
        with torch.no_grad():
            layer(x)  # moves the row scales from the weight to the layer's state
    # LLM.int8 quantizes the input rows to int8 too (absmax / 127 per row): the product carries that rounding
    assert _relative_error(layer, x) < INT8_TOLERANCE


def test_repacked_read_back_would_be_caught_without_the_absmax_fix():
    """The test above can fail: reading the repacked absmax the way bitsandbytes 0.50.2's own inverse leaves it
    (transposed, not double-quantized) gives a Q far from the layer's product."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse, dequantize_4bit

    if not bnb.functional.has_avx512bf16():
        pytest.skip(needs_avx512bf16)
    layer = _linear4bit("nf4", False, 64, torch.float32)
    layer.support_avx512bf16_for_cpu = True
    x = torch.randn(16, IN)
    with torch.no_grad():
        out = layer(x).float()
    state = layer.weight.quant_state
    assert getattr(state, "packing_format_for_cpu", False)
    import copy

    data, naive = _convert_weight_packed_for_cpu_inverse(layer.weight.data, copy.deepcopy(state))
    wrong = x @ dequantize_4bit(data, naive).float().T
    assert ((out - wrong).norm() / out.norm()).item() > 0.1
