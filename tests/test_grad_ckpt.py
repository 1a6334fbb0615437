"""--grad_ckpt in every paper file: the same gradients as without it, and far fewer activations kept.

Each model is built twice from the same seed, once with --grad_ckpt; one loss over encode_image / encode_text
(the interface evaluate.py uses) is backpropagated through both. The gradients must agree (recomputation is the
same arithmetic, so to float32 rounding), and the bytes autograd saves for the backward (counted with
torch.autograd.graph.saved_tensors_hooks) must drop: checkpointed layers keep only their inputs.
"""
import pytest
import torch

import common

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "there is a no an pleural effusion nodule fracture normal the of".split()


def _pedclip(gc):
    import pedclip

    return pedclip.build(pedclip.Config(image_size=32, stem="conv", grad_ckpt=gc), common.tokenizer_from_vocab(VOCAB))


def _cxrclip(gc):
    import cxrclip

    cfg = cxrclip.Config(image_size=32, tiny_width=32, embed_dim=32, grad_ckpt=gc)
    return cxrclip.build(cfg, common.tokenizer_from_vocab(VOCAB))


def _cxrcml(gc):
    import cxrcml

    return cxrcml.build(cxrcml.Config(image_size=32, stem="conv", grad_ckpt=gc), common.tokenizer_from_vocab(VOCAB))


def _dmlm(gc):
    import dmlm

    cfg = dmlm.Config(**{**dmlm.PRESETS["demo"], "image_size": 32, "stem": "hmlp", "grad_ckpt": gc})
    know = dmlm.load_knowledge(str(common.Path(dmlm.__file__).parent / cfg.knowledge))
    return dmlm.build(cfg, common.tokenizer_from_vocab(VOCAB), None, know)


BUILDERS = {"pedclip": _pedclip, "cxrclip": _cxrclip, "cxrcml": _cxrcml, "dmlm": _dmlm}


def _run(paper, gc):
    torch.manual_seed(0)
    model = BUILDERS[paper](gc).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    texts = ["there is a pleural effusion", "no nodule", "fracture of the", "normal"]
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (model.encode_image(x) @ model.encode_text(texts).t()).square().sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, saved[0]


@pytest.mark.parametrize("paper", list(BUILDERS))
def test_grad_ckpt_same_gradients_fewer_saved_activations(paper):
    g0, b0 = _run(paper, False)
    g1, b1 = _run(paper, True)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{paper} {n}: {m}")
    assert b1 < 0.7 * b0, (paper, b0, b1)


@pytest.mark.parametrize("encoder", ["resnet50", "swin_t"])
def test_grad_ckpt_torchvision_encoders_same_gradients(encoder):
    """CXR-CLIP's paper encoders (torchvision ResNet-50 / Swin-T, random init): the stage-by-stage recomputed
    forward gives the ordinary forward's output and gradients. Eval mode, so BatchNorm uses (and does not
    update) its running statistics in both runs. Needs a torchvision that imports (not this CPU-only machine)."""
    try:
        common.require_torchvision()
    except RuntimeError as e:
        pytest.skip(str(e)[:120])
    import cxrclip

    torch.manual_seed(0)
    enc = cxrclip.ImageEncoder(cxrclip.Config(image_encoder=encoder, pretrained=False, grad_ckpt=True)).eval()
    x = torch.randn(2, 3, 64, 64)
    y0 = enc.net(x)  # torchvision's own forward
    g0 = torch.autograd.grad(y0.square().sum(), list(enc.parameters()), allow_unused=True)
    y1 = enc._forward_recomputed(x)
    g1 = torch.autograd.grad(y1.square().sum(), list(enc.parameters()), allow_unused=True)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
