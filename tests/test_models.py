"""Backbones, heads, DINOv2 weight loading (original key layout, 37x37 grid) and export."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from midnight_train.data.masking import masked_positions
from midnight_train.method.models import Backbone, DINOHead, ModelConfig, SSLNetwork, create_vit

sys.path.insert(0, str(Path(__file__).parent))
from train_fakes import make_trainer, tiny_config, tiny_model  # noqa: E402

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def dinov2_layout(arch: str, kwargs: dict) -> dict[str, torch.Tensor]:
    """A state dict as the public DINOv2 checkpoints store it: 518 px (37x37 grid), mask_token,
    register_tokens with the CLS position inside pos_embed, SwiGLU as w12/w3."""
    torch.manual_seed(0)
    src = timm.create_model(arch, pretrained=False, img_size=518, num_classes=0, **kwargs)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    d = src.embed_dim
    state["mask_token"] = torch.randn(1, d)  # trained: not the zeros a fresh token starts from
    if "reg_token" in state:
        state["register_tokens"] = state.pop("reg_token")
        state["pos_embed"] = torch.cat([torch.zeros(1, 1, d), state["pos_embed"]], dim=1)
    for k in list(state):
        if ".mlp.fc1." in k and "giant" in arch:
            state[k.replace("fc1", "w12")] = state.pop(k)
        elif ".mlp.fc2." in k and "giant" in arch:
            state[k.replace("fc2", "w3")] = state.pop(k)
    return state


@pytest.mark.parametrize("arch", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2",
                                  "vit_giant_patch14_dinov2"])
def test_load_dinov2_weights_interpolates_position_embedding(tmp_path, arch):
    state = dinov2_layout(arch, TINY)
    assert state["pos_embed"].shape[1] == 1 + 37 * 37
    path = tmp_path / "dinov2.pth"
    torch.save(state, path)
    cfg = ModelConfig(arch=arch, img_size=56, timm_kwargs=TINY, pretrained=str(path))
    backbone = Backbone.from_config(cfg)
    vit = backbone.vit
    assert torch.equal(backbone.mask_token, state["mask_token"][0])  # timm's converter drops it
    reg = "reg4" in arch
    grid = vit.pos_embed[:, 0 if reg else 1:]
    assert grid.shape[1] == 4 * 4
    src_grid = state["pos_embed"][:, 1:]
    expected = resample_abs_pos_embed(src_grid, new_size=(4, 4), old_size=(37, 37),
                                      num_prefix_tokens=0)
    assert torch.allclose(grid, expected, atol=1e-6)
    assert torch.equal(vit.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    fc = "w12" if "giant" in arch else "fc1"
    assert torch.equal(vit.blocks[0].mlp.fc1.weight, state[f"blocks.0.mlp.{fc}.weight"])
    if reg:
        assert torch.equal(vit.reg_token, state["register_tokens"])
    # dynamic image size: both crop sizes pass
    with torch.no_grad():
        assert vit.forward_features(torch.randn(1, 3, 56, 56)).shape[1] == 16 + vit.num_prefix_tokens
        assert vit.forward_features(torch.randn(1, 3, 28, 28)).shape[1] == 4 + vit.num_prefix_tokens


def test_wrong_weights_are_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(dinov2_layout("vit_small_patch14_dinov2", {"embed_dim": 48, "depth": 1,
                                                          "num_heads": 2}), path)
    with pytest.raises((ValueError, RuntimeError)):
        Backbone.from_config(ModelConfig(img_size=56, timm_kwargs=TINY, pretrained=str(path)))


def mask_index(masks: torch.Tensor) -> torch.Tensor:
    """The flat indices the loader hands over with ``masks`` (data.masking.masked_positions)."""
    return torch.from_numpy(masked_positions(masks.numpy())[0])


def test_backbone_masking_and_heads():
    cfg = ModelConfig(img_size=28, timm_kwargs=TINY, drop_path_rate=0.2, layer_scale_init=1.0,
                      head_n_prototypes=16, head_hidden_dim=24, head_bottleneck_dim=8,
                      ibot_separate_head=True, ibot_n_prototypes=12)
    net = SSLNetwork(cfg).eval()
    assert net.backbone.vit.blocks[0].ls1.gamma.flatten()[0] == 1.0
    masks = torch.zeros(4, 4, dtype=torch.bool)
    masks[0, :2] = True
    x = torch.randn(4, 3, 28, 28)
    out = net(x, torch.randn(6, 3, 14, 14), masks, mask_index(masks))
    assert out["dino_logits"].shape == (4, 16) and out["dino_local_logits"].shape == (6, 16)
    assert out["ibot_logits"].shape == (2, 12)
    unmasked = net.backbone(x)
    assert torch.allclose(out["cls"][1:], unmasked[1:, 0], atol=1e-6)  # only image 0 masked
    assert not torch.allclose(out["cls"][0], unmasked[0, 0])
    head = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4)
    logits = head(torch.randn(3, 8))
    assert logits.abs().max() <= 1.0 + 1e-5  # cosine between unit bottleneck and unit prototypes
    assert isinstance(net.backbone, Backbone)


def test_drop_path_uniform_gives_every_block_the_rate_as_dinov2():
    """DINOv2's ViT-g config: drop_path_uniform, rate 0.4 in every block; timm's default is a
    linear 0 -> 0.4 (mean 0.2, half the stochastic depth)."""
    deep = {**TINY, "depth": 5}

    def rates(uniform: bool) -> list[float]:
        vit = create_vit(ModelConfig(img_size=28, timm_kwargs=deep, drop_path_rate=0.4,
                                     drop_path_uniform=uniform))
        return [getattr(getattr(b, name), "drop_prob", 0.0) for b in vit.blocks
                for name in ("drop_path1", "drop_path2")]

    assert rates(True) == pytest.approx([0.4] * 10)
    assert rates(False) == pytest.approx([r for r in (0.0, 0.1, 0.2, 0.3, 0.4) for _ in (0, 1)])
    # in training mode a uniform rate drops whole residual branches of some images
    torch.manual_seed(0)
    vit = create_vit(ModelConfig(img_size=28, timm_kwargs=deep, drop_path_rate=0.4,
                                 drop_path_uniform=True)).train()
    x = torch.randn(64, 5, TINY["embed_dim"])
    kept = (vit.blocks[0].drop_path1(x) != 0).flatten(1).any(1).float().mean()
    assert 0.45 < kept < 0.75


def test_ibot_head_keeps_its_own_bottleneck_as_dinov2_vitg():
    cfg = ModelConfig(img_size=28, timm_kwargs=TINY, head_n_prototypes=16, head_hidden_dim=24,
                      head_bottleneck_dim=12, ibot_separate_head=True, ibot_n_prototypes=10,
                      ibot_bottleneck_dim=8)
    net = SSLNetwork(cfg)
    assert net.dino_head.last_layer.weight.shape == (16, 12)
    assert net.ibot_head.last_layer.weight.shape == (10, 8)
    cfg.ibot_bottleneck_dim = None  # the DINO head's, as before
    assert SSLNetwork(cfg).ibot_head.last_layer.weight.shape == (10, 12)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    cfg = ModelConfig(img_size=28, timm_kwargs=TINY, drop_path_rate=0.0, layer_scale_init=1.0)
    a = create_vit(cfg)
    b = create_vit(ModelConfig(**{**cfg.__dict__, "grad_checkpointing": True}))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 28, 28)
    Backbone(a)(x).sum().backward()
    Backbone(b)(x).sum().backward()
    assert b.grad_checkpointing
    assert torch.allclose(a.blocks[0].attn.qkv.weight.grad, b.blocks[0].attn.qkv.weight.grad,
                          atol=1e-5)


def test_export_loads_in_plain_timm_and_embeds(tmp_path):
    from midnight_train.outputs.embed import cls_mean_embedding, embed_inputs
    from midnight_train.outputs.export import export_backbone, read_metadata

    trainer = make_trainer(tiny_config(tmp_path / "run", train={"max_steps": 2}))
    trainer.fit()
    out = export_backbone(tmp_path / "run", tmp_path / "export")
    meta = read_metadata(out)
    assert meta["arch"] == "vit_small_patch14_dinov2"
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                              img_size=28, **TINY)
    weights = load_file(str(out / "model.safetensors"))
    assert torch.equal(weights.pop("mask_token")[0], trainer.teacher.backbone.mask_token)
    model.load_state_dict(weights)  # strict: every other key matches
    model.eval()
    vit = trainer.teacher.backbone.vit
    for name, value in vit.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    x = torch.randn(3, 3, 28, 28)
    emb = cls_mean_embedding(model, x)
    tokens = trainer.teacher.backbone(x)  # the teacher's final-norm tokens
    assert emb.shape == (3, 64)
    assert torch.allclose(emb, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1), atol=1e-5)
    # another resolution: the position embedding is resampled, plain timm still loads it
    out42 = export_backbone(tmp_path / "run", tmp_path / "m42", img_size=42)
    m42 = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                            img_size=42, **TINY)
    m42.load_state_dict({k: v for k, v in load_file(str(out42 / "model.safetensors")).items()
                         if k != "mask_token"})
    # embed command path: images on disk -> .npz
    from PIL import Image

    for i in range(3):
        Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(tmp_path / f"t{i}.png")
    n, dim = embed_inputs(out, [str(tmp_path / f"t{i}.png") for i in range(3)],
                          tmp_path / "emb.npz", batch_size=2)
    assert (n, dim) == (3, 64)


def test_shared_head_single_call_matches_separate_calls():
    """Student and teacher send CLS rows and masked patch rows through a shared head in one call;
    that must be the same function as calling the head on each."""
    cfg = ModelConfig(img_size=28, timm_kwargs=TINY, drop_path_rate=0.0,
                      head_n_prototypes=16, head_hidden_dim=24, head_bottleneck_dim=8)
    net = SSLNetwork(cfg).eval()
    masks = torch.zeros(4, 4, dtype=torch.bool)
    masks[1, 1:] = True
    x, local = torch.randn(4, 3, 28, 28), torch.randn(6, 3, 14, 14)
    out = net(x, local, masks, mask_index(masks))
    tokens = net.backbone(x, masks)
    cls = torch.cat([tokens[:, 0], net.backbone(local)[:, 0]])
    dino = net.dino_head(cls)
    assert torch.allclose(out["dino_logits"], dino[:4], atol=1e-6)
    assert torch.allclose(out["dino_local_logits"], dino[4:], atol=1e-6)
    assert torch.allclose(out["ibot_logits"], net.dino_head(tokens[:, 1:][masks]), atol=1e-6)
    none = torch.zeros_like(masks)
    no_mask = net(x, None, none, mask_index(none))  # no masked patch: empty iBOT rows
    assert no_mask["ibot_logits"].shape == (0, 16) and "dino_local_logits" not in no_mask


def test_mask_token_survives_load_checkpoint_export_and_high_res_start(tmp_path):
    """iBOT starts from the pretrained mask token (timm's converter drops it), trains it, keeps it
    in checkpoints and exports (which plain timm still loads) and carries it into a start from
    the export at another resolution."""
    from midnight_train.loop import checkpoint
    from midnight_train.outputs.export import export_backbone

    kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    state = dinov2_layout("vit_small_patch14_dinov2", kwargs)
    path = tmp_path / "dinov2.pth"
    torch.save(state, path)
    trainer = make_trainer(tiny_config(tmp_path / "run", train={"max_steps": 2},
                                       model={"pretrained": str(path)}))
    pretrained = state["mask_token"][0]
    for net in (trainer.student, trainer.teacher):
        assert torch.equal(net.backbone.mask_token.detach(), pretrained)
    trainer.fit()
    trained = trainer.teacher.backbone.mask_token.detach().clone()
    assert not torch.equal(trained, pretrained)  # it trains (masked patches reach the loss)
    assert torch.allclose(trained, pretrained, atol=0.05)  # from the pretrained token, not zeros
    saved = checkpoint.load(checkpoint.latest(tmp_path / "run"))
    assert torch.equal(saved["teacher"]["backbone.mask_token"], trained)
    out = export_backbone(tmp_path / "run", tmp_path / "export")
    plain = timm.create_model(f"local-dir:{out}", pretrained=True)  # drops the token, loads
    assert torch.equal(plain.pos_embed, trainer.teacher.backbone.vit.pos_embed)
    high = Backbone.from_config(tiny_model(img_size=56, pretrained=str(out / "model.safetensors")))
    assert torch.equal(high.mask_token.detach(), trained)
    assert high.vit.pos_embed.shape[1] == 1 + 4 * 4


def test_head_last_layer_has_dinov2s_trainable_gain_and_init():
    """DINOv2's last layer: weight_norm(nn.Linear) with weight_g filled with 1 and trained (weight
    decay, the last layer's lr and freezing), v with nn.Linear's default init (row norm
    sqrt(1/3) = 0.577, not 0.02 * sqrt(bottleneck) = 0.39 at 384)."""
    from midnight_train.method.student_teacher import param_groups

    torch.manual_seed(0)
    head = DINOHead(16, 4096, hidden_dim=32, bottleneck_dim=384)
    rows = head.last_layer.weight.norm(dim=1)
    assert rows.mean().item() == pytest.approx(3 ** -0.5, rel=0.02)
    assert torch.equal(head.last_layer.weight_g, torch.ones(4096, 1))
    # the same function as torch's weight norm with that v and g
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(384, 4096, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(head.last_layer.weight_g * 2)
        ref.parametrizations.weight.original1.copy_(head.last_layer.weight)
        head.last_layer.weight_g.mul_(2)
    z = torch.nn.functional.normalize(torch.randn(5, 384), dim=-1)
    assert torch.allclose(head.last_layer(z), ref(z), atol=1e-5)
    head(torch.randn(5, 16)).square().sum().backward()
    assert head.last_layer.weight_g.grad.abs().sum() > 0  # trainable
    net = SSLNetwork(tiny_model())
    by_name = {n: g for g in param_groups(net, 1.0, 0.2) for n in g["names"]}
    gain = by_name["dino_head.last_layer.weight_g"]
    assert gain["last_layer"] and gain["wd_mult"] == 1.0 and gain["lr_mult"] == 1.0
