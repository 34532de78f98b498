"""The block-wise CPU attention against ``F.scaled_dot_product_attention``: exact in float64, causal
and with a packed-document mask, GQA and plain heads, sequences that do not fill the last block;
in bfloat16 no less accurate than SDPA itself (both measured against float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nxd_lora import scratch
from nxd_lora.model import attention
from nxd_lora.model.attention import blocked_attention
from nxd_lora.model.llama import checkpoint, document_attention_mask
from nxd_lora.scratch import pooled

# Which kernel runs is probed through PyTorch's CPU-capability API, which differs by version (67dd821);
# the reference is aten's SDPA, the bf16 products oneDNN's (mkldnn fp32_precision), the checkpoint torch's.
pytestmark = pytest.mark.torch_version


def _inputs(batch, heads, kv_heads, seq, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], grad.to(dtype)


def _doc_mask(batch, seq, seed=0):
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, seq, generator=gen) < 0.02  # a new document every ~50 tokens
    starts[:, 0] = True
    return document_attention_mask(starts.cumsum(1))


def _sdpa(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _out_and_grads(fn, tensors, grad, mask):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, mask)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


@pytest.fixture(params=[None, 40], ids=["default-blocks", "40-row-blocks"])
def block_rows(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(attention, "_BLOCK_ROWS", request.param)
    return request.param


@pytest.fixture(params=["kept", "recomputed"])
def probabilities(request, monkeypatch):
    """Backward reads the probabilities forward kept (up to ``KEEP_PROBS_MAX_SEQ``) or recomputes them."""
    if request.param == "recomputed":
        monkeypatch.setattr(attention, "KEEP_PROBS_MAX_SEQ", 0)
    return request.param


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "documents"])
def test_float64_output_and_gradients_equal_sdpa(heads, kv_heads, masked, block_rows, probabilities):
    seq = 300  # not a multiple of any block size used here
    tensors, grad = _inputs(2, heads, kv_heads, seq, 16, torch.float64)
    mask = _doc_mask(2, seq) if masked else None
    ours = _out_and_grads(blocked_attention, tensors, grad, mask)
    ref = _out_and_grads(_sdpa, tensors, grad, mask)
    for name, a, b in zip(["out", "dq", "dk", "dv"], ours, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


def test_gradcheck_in_float64(monkeypatch):
    monkeypatch.setattr(attention, "_BLOCK_ROWS", 4)  # two positions of two heads per block
    tensors, _ = _inputs(1, 4, 2, 7, 4, torch.float64)
    leaves = [t.requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(lambda q, k, v: blocked_attention(q, k, v), leaves)
    mask = _doc_mask(1, 7)
    assert torch.autograd.gradcheck(lambda q, k, v: blocked_attention(q, k, v, mask), leaves)


@pytest.mark.parametrize("dim", [64, 128])  # 128: a scale that is not a power of two
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "documents"])
def test_bfloat16_error_is_no_larger_than_sdpa_error(masked, dim, probabilities):
    """Both against the float64 result from the same bf16 inputs: ours may round differently, not worse."""
    seq = 700
    tensors, grad = _inputs(2, 9, 3, seq, dim, torch.bfloat16, seed=3)
    mask = _doc_mask(2, seq, seed=3) if masked else None
    exact = _out_and_grads(_sdpa, [t.double() for t in tensors], grad.double(), mask)
    ours = _out_and_grads(blocked_attention, tensors, grad, mask)
    sdpa = _out_and_grads(_sdpa, tensors, grad, mask)
    for name, truth, a, b in zip(["out", "dq", "dk", "dv"], exact, ours, sdpa):
        err_ours = (a.double() - truth).norm() / truth.norm()
        err_sdpa = (b.double() - truth).norm() / truth.norm()
        assert err_ours < 1.5 * err_sdpa + 1e-4, f"{name}: relative error {err_ours:.2e} vs SDPA's {err_sdpa:.2e}"
        assert err_ours < 1e-2, name


def _spy_on_pool(monkeypatch) -> list[int]:
    sizes = []

    def spy(dtype, numel, device):
        sizes.append(numel)
        return pooled(dtype, numel, device)

    monkeypatch.setattr(attention, "pooled", spy)
    return sizes


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "documents"])
def test_kept_probabilities_give_the_bits_of_recomputed_ones(masked, monkeypatch):
    """Keeping the rounded probabilities for backward removes work, not precision: backward's
    products read the same rounded values either way. Kept only when a gradient will be taken."""
    seq = 700
    tensors, grad = _inputs(2, 9, 3, seq, 64, torch.bfloat16, seed=4)
    mask = _doc_mask(2, seq, seed=4) if masked else None
    kept_sizes = _spy_on_pool(monkeypatch)
    kept = _out_and_grads(blocked_attention, tensors, grad, mask)
    assert kept_sizes == [attention._kept_numel(2 * 3, seq, 3)]
    monkeypatch.setattr(attention, "KEEP_PROBS_MAX_SEQ", seq - 1)
    recomputed = _out_and_grads(blocked_attention, tensors, grad, mask)
    with torch.no_grad():
        blocked_attention(*tensors, mask)
    assert len(kept_sizes) == 1  # neither beyond the limit nor without grad
    for name, a, b in zip(["out", "dq", "dk", "dv"], kept, recomputed):
        assert torch.equal(a, b), name


def test_kept_probabilities_serve_a_second_backward():
    tensors, grad = _inputs(1, 4, 2, 50, 8, torch.bfloat16, seed=6)
    leaves = [t.requires_grad_() for t in tensors]
    out = blocked_attention(*leaves)
    first = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    other, other_grad = _inputs(1, 4, 2, 50, 8, torch.bfloat16, seed=7)  # takes pooled memory: not the kept one
    _out_and_grads(blocked_attention, other, other_grad, None)
    second = torch.autograd.grad(out, leaves, grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_activation_checkpointing_holds_one_layer_of_kept_probabilities(monkeypatch):
    """Under the model's activation checkpointing (``train.activation_checkpointing=full``, non-reentrant
    on eager devices) a layer's kept probabilities are dropped after its forward and its recomputation,
    so the layers take turns with one pooled buffer instead of each holding its own; the gradients are
    those without checkpointing."""
    monkeypatch.setattr(scratch, "_free", {})
    tensors, grad = _inputs(1, 4, 2, 64, 8, torch.bfloat16, seed=8)
    free = scratch._free.setdefault((torch.bfloat16, torch.device("cpu")), [])

    def three_layers(q, k, v, mask, wrap):
        for _ in range(3):
            q = wrap(lambda x: blocked_attention(x, k, v, mask), q)
        return q

    plain = _out_and_grads(lambda *a: three_layers(*a, lambda f, x: f(x)), tensors, grad, None)
    assert len(free) == 3  # each layer held its own until backward
    free.clear()
    held = []

    def checkpointed(f, x):
        out = checkpoint(f, x)
        held.append(len(free))
        return out

    recomputed = _out_and_grads(lambda *a: three_layers(*a, checkpointed), tensors, grad, None)
    assert held == [1, 1, 1] and len(free) == 1  # one buffer, free again after each layer
    for name, a, b in zip(["out", "dq", "dk", "dv"], plain, recomputed):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [64, 128])
def test_scores_are_fp32_accurate(dtype, dim):
    """The probabilities come from fp32 products of the inputs' exact values (on CPUs with bf16 units,
    oneDNN multiplies bf16 operands for bf16 inputs): against float64 they are off by fp32 rounding,
    not by a bf16 rounding of an operand (which costs ~1e-3 here), and the matmul precision setting
    is as it was afterwards."""
    precision = torch.backends.mkldnn.matmul.fp32_precision
    seq = 200
    (q, k, _), _ = _inputs(1, 3, 3, seq, dim, dtype, seed=5)
    q32, k32 = q[0].float(), k[0].float()
    probs = attention._probabilities(q32, k32, dtype == torch.bfloat16, dim ** -0.5, 0, seq, 1, None, 1)
    scores = (q32.double() @ k32.double().transpose(1, 2)) * dim ** -0.5
    causal = torch.ones(seq, seq, dtype=torch.bool).triu_(1)
    exact = scores.masked_fill(causal, float("-inf")).softmax(-1)
    assert (probs.double() - exact).abs().max() < 2e-5
    assert torch.backends.mkldnn.matmul.fp32_precision == precision


@pytest.mark.parametrize("amx", [True, False])
def test_blocked_attention_is_used_where_it_is_the_faster_kernel(amx, monkeypatch):
    """Eager CPU: ours, except causal attention on CPUs with AMX (aten's flash kernel is faster there);
    a document mask always stays ours (it skips the key blocks after the diagonal); never off the CPU."""
    monkeypatch.setattr(attention, "_cpu_has_amx", lambda: amx)
    q = torch.zeros(1, 2, 4, 8)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    assert attention.use_blocked_attention(q, None) is not amx
    assert attention.use_blocked_attention(q, mask)
    assert not attention.use_blocked_attention(q.to("meta"), mask)


def test_float_mask_is_refused():
    tensors, _ = _inputs(1, 2, 2, 5, 4, torch.float32)
    with pytest.raises(TypeError, match="boolean"):
        blocked_attention(*tensors, torch.zeros(1, 1, 5, 5))
