"""The paper presets' encoders, built at their real sizes with random weights (no download), each taking
one training step at batch 2, 224 px, on the CPU: the architectures the paper presets train are tested."""

import dataclasses

import pytest
import torch

import common


def _vocab(n=1000):
    return common.tokenizer_from_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *map(str, range(n))])


def _step(model, loss, no_grad=()):
    """Backward: every trainable parameter gets a finite gradient, except exactly those named in no_grad (the
    paper presets leave none out: BERT is built without its pooler, every MoBE expert is in the graph)."""
    loss.backward()
    assert torch.isfinite(loss)
    assert {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None} == set(no_grad)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_pedclip_paper_preset_vit_b16_with_23_experts_and_bert_base():
    import pedclip

    cfg = dataclasses.replace(
        common.parse_config(pedclip.Config, pedclip.PRESETS, ["--preset=paper"]), pretrained=False
    )
    torch.manual_seed(0)
    model = pedclip.build(cfg, _vocab())
    mobe = model.visual.encoder.layers.encoder_layer_11.mlp
    assert isinstance(mobe, pedclip.MoBE) and mobe.w1.shape == (768, 23, 3072)
    assert model.text.config.hidden_size == 768 and model.text.config.num_hidden_layers == 12
    ids = torch.randint(5, 1000, (2, 32))  # the text length is no part of the architecture
    x, xb = torch.randn(2, 3, 224, 224), torch.tensor([7, 21])
    v, t, gates = model(x, ids, torch.ones_like(ids), expert_index=xb)
    l_v2t, l_t2v = pedclip.infonce_losses(v, t, model.logit_scale.exp())
    _step(model, pedclip.total_loss(l_v2t, l_t2v, pedclip.gate_loss(gates, xb), 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("image_encoder", ["resnet50", "swin_t"])
def test_cxrclip_paper_preset_resnet50_or_swin_t_and_bert_base(image_encoder):
    import cxrclip

    cfg = common.parse_config(cxrclip.Config, cxrclip.PRESETS, ["--preset=paper"])
    cfg = dataclasses.replace(cfg, pretrained=False, image_encoder=image_encoder)
    torch.manual_seed(0)
    model = cxrclip.build(cfg, _vocab())
    assert model.image_encoder.out_dim == {"resnet50": 2048, "swin_t": 768}[image_encoder]
    ids = torch.randint(5, 1000, (2, 32))
    t = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    v1, v2, u1, u2 = model(torch.randn(4, 3, 224, 224), t, t)  # 2 studies: x^1 then x^2
    _step(model, cxrclip.cxrclip_loss(v1, v2, u1, u2, model.logit_scale.exp(), 1.0, 0.5)[0])


@pytest.mark.slow
def test_cxrcml_paper_preset_clip_vit_b32():
    import cxrcml

    cfg = common.parse_config(cxrcml.Config, cxrcml.PRESETS, ["--preset=paper"])
    cfg = dataclasses.replace(cfg, init="random")
    torch.manual_seed(0)
    model = cxrcml.build(cfg, _vocab())
    vision = model.clip.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size) == (768, 12, 32)
    ids = torch.randint(5, 1000, (2, 16))
    ids[:, -1] = 3  # [SEP]: CLIP pools at the end-of-text token
    v, u = model(torch.randn(2, 3, 224, 224), ids, torch.ones_like(ids))
    loss = cxrcml.clip_loss(u, v, u, v, model.logit_scale.exp())  # one process: the batch is the global one
    _step(model, loss + cxrcml.triplet_loss(v, torch.tensor([0, 1]), 0.2))


@pytest.mark.slow
def test_dmlm_paper_preset_vit_b16_bert_base_and_four_fusion_layers():
    import dmlm

    cfg = common.parse_config(dmlm.Config, dmlm.PRESETS, ["--preset=paper"])
    cfg = dataclasses.replace(cfg, pretrained=False)
    torch.manual_seed(0)
    model = dmlm.build(cfg, _vocab(), {})
    assert model.visual.encoder.pos_embedding.shape == (1, 197, 768) and len(model.fusion) == 4
    assert model.text.config.hidden_size == 768 and model.text.config.num_hidden_layers == 12
    ids = torch.randint(5, 1000, (2, 32))
    text_mask = torch.rand(ids.shape).argsort(1) < 10
    patch_mask = torch.rand(2, 196).argsort(1) < 59
    x, masked_ids = torch.randn(2, 3, 224, 224), ids.masked_fill(text_mask, 4)  # 4: [MASK]
    out = model(x, ids, torch.ones_like(ids), masked_ids, patch_mask)
    l_dmlm = dmlm.dmlm_loss(out["pred_text"], out["target_text"], text_mask, out["pred_image"],
                            out["target_image"], patch_mask)
    l_align = dmlm.align_contrastive_loss(out["image"], out["text"], model.logit_scale.exp())
    _step(model, dmlm.total_loss(l_dmlm, l_align, cfg.lam))
