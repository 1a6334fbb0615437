"""The paper presets' encoders, built at their real sizes with random weights (no download), each taking
one training step at batch 2, 224 px, on the CPU: the architectures the paper presets train are tested."""
import dataclasses

import pytest
import torch

import common


def _vocab(n=1000):
    return common.tokenizer_from_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *map(str, range(n))])


def _step(model, loss):
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and sum(g is not None for g in grads) > 0.9 * len(grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.slow
def test_pedclip_paper_preset_vit_b16_with_23_experts_and_bert_base():
    import pedclip

    cfg = dataclasses.replace(common.parse_config(pedclip.Config, pedclip.PRESETS, ["--preset=paper"]),
                              pretrained=False)
    torch.manual_seed(0)
    model = pedclip.build(cfg, _vocab())
    mobe = model.visual.encoder.layers.encoder_layer_11.mlp
    assert isinstance(mobe, pedclip.MoBE) and mobe.w1.shape == (768, 23, 3072)
    assert model.text.config.hidden_size == 768 and model.text.config.num_hidden_layers == 12
    ids = torch.randint(5, 1000, (2, 32))  # the text length is no part of the architecture
    x, xb = torch.randn(2, 3, 224, 224), torch.tensor([7, 21])
    v, t, gates = model(x, ids, torch.ones_like(ids), expert_index=xb)
    l_v2t, l_t2v = pedclip.infonce_losses(v, t, model.logit_scale)
    _step(model, pedclip.total_loss(l_v2t, l_t2v, pedclip.gate_loss(gates, xb), 1.0))
