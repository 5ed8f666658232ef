"""The vmoe checkpoint converter (hf_vmoe.integrations.convert_vmoe): reading vmoe's sharded and Flax msgpack files, mapping the
tree, presets, bad input (each names what does not fit and writes nothing), the CLI verb, and a converted folder
that loads, runs in the image-classification pipeline, trains with the Trainer and saves like any VMoE.

Checkpoints are written by vmoe's and flax's own code (../shared/ref, jax): those tests skip without them. The
msgpack decoding and the preset mapping are also tested on hand-made files, without jax."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

import vmoe_reference as ref
from conftest import expert_mlp
from hf_vmoe.integrations.convert_vmoe import (
    VMOE_PRESETS,
    convert_vmoe_checkpoint,
    hf_config_from_vmoe,
    infer_vmoe_architecture,
    load_vmoe_params,
    read_flax_msgpack,
    read_vmoe_sharded,
    resolve_vmoe_config,
)

needs_reference = pytest.mark.skipif(ref.skip_reason() is not None, reason=str(ref.skip_reason()))
IMAGE, BATCH = 24, 8


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def _assert_same_tree(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        assert fa[key].shape == fb[key].shape, key
        np.testing.assert_array_equal(fa[key].astype(np.float32), fb[key].astype(np.float32), err_msg=key)


# -- without jax: hand-made files in flax's encoding -------------------------------------------------------------


def _ext_ndarray(array: np.ndarray) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb((array.shape, array.dtype.name, array.tobytes("C")), use_bin_type=True))


def _pack(tree) -> bytes:
    def encode(value):
        if isinstance(value, dict):
            return {k: encode(v) for k, v in value.items()}
        return _ext_ndarray(np.asarray(value))

    return msgpack.packb(encode(tree), use_bin_type=True)


def test_reads_flax_msgpack_encoding_without_jax(tmp_path):
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.array([1, 2], dtype=np.int32)}
    path = tmp_path / "params.msgpack"
    path.write_bytes(_pack(tree))
    _assert_same_tree(read_flax_msgpack(path), tree)


def test_flax_chunked_arrays_and_bfloat16_without_jax(tmp_path):
    big = np.arange(10, dtype=np.float32)
    bf16 = (np.array([1.5, -2.0, 0.0], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    chunked = {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 5},
               "chunks": {"0": _ext_ndarray(big[:6]), "1": _ext_ndarray(big[6:])}}
    bf16_ext = msgpack.ExtType(1, msgpack.packb(((3,), "bfloat16", bf16.tobytes()), use_bin_type=True))
    path = tmp_path / "params.msgpack"
    path.write_bytes(msgpack.packb({"big": chunked, "half": bf16_ext}, use_bin_type=True))
    tree = read_flax_msgpack(path)
    np.testing.assert_array_equal(tree["big"], big.reshape(2, 5))
    np.testing.assert_array_equal(tree["half"], np.array([1.5, -2.0, 0.0], dtype=np.float32))


@pytest.mark.parametrize("cut", [1, 10, 100])
def test_truncated_flax_file_is_a_clear_error(tmp_path, cut):
    path = tmp_path / "params.msgpack"
    data = _pack({"a": np.zeros((8, 8), np.float32)})
    path.write_bytes(data[:-cut])
    with pytest.raises(ValueError, match="params.msgpack"):
        read_flax_msgpack(path)


def test_no_checkpoint_at_path(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at"):
        load_vmoe_params(tmp_path / "nothing")


# -- presets -------------------------------------------------------------------------------------------------------


def test_presets_give_the_released_architectures():
    cases = {
        "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012": dict(
            hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048, moe_layers=(5, 7),
            image_size=384, patch_size=32, num_labels=1000, capacity_factor=1.5, eval_capacity_factor=1.5),
        "vmoe_b16_imagenet21k_randaug_strong": dict(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            moe_layers=(1, 3, 5, 7, 9, 11), image_size=224, patch_size=16, num_labels=21843, capacity_factor=1.05,
            eval_capacity_factor=1.05),
        "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012": dict(
            moe_layers=(1, 3, 5, 7, 9, 11), image_size=384, num_labels=1000, capacity_factor=1.5),
    }
    for name, expected in cases.items():
        kwargs, reference, _ = hf_config_from_vmoe(resolve_vmoe_config(name))
        for key, value in expected.items():
            assert kwargs[key] == value, (name, key, kwargs[key], value)
        assert kwargs["num_experts"] == 8 and kwargs["num_experts_per_tok"] == 2
        assert kwargs["hidden_act"] == "gelu_pytorch_tanh" and kwargs["layer_norm_eps"] == 1e-6
        assert kwargs["router_noise_std"] == 1.0 / 8 and kwargs["router_importance_loss_coef"] == 0.005
        assert kwargs["batch_priority_routing"] is False and kwargs["normalize_router_weights"] is False
        assert reference["group_size"] == 8 * reference["tokens_per_image"]
    ft = hf_config_from_vmoe(resolve_vmoe_config("vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012"))[1]
    assert ft["group_size"] == 1160 and ft["inference_capacity_per_group"] == 436  # ceil(1160*2*1.5/8)=435 -> 436
    b16 = hf_config_from_vmoe(resolve_vmoe_config("vmoe_b16_imagenet21k_randaug_strong"))[1]
    assert b16["group_size"] == 1576 and b16["training_capacity_per_group"] == 416  # 413.7 -> 414 -> 416


def test_s32_pretrained_preset_is_dropless_at_inference_and_has_pre_logits():
    spec = resolve_vmoe_config("vmoe_s32_last2_ilsvrc2012_randaug_light1")
    assert spec["model"]["representation_size"] == 512 and spec["image_size"] == 224
    kwargs, reference, issues = hf_config_from_vmoe(spec)
    assert kwargs["eval_capacity_factor"] is None  # capacity 4.0: 400 per group of 400 tokens, nothing dropped
    assert kwargs["representation_size"] == 512
    assert not [i for i in issues if i.scope == "inference"]


@pytest.mark.parametrize("name", sorted(VMOE_PRESETS))
def test_presets_map_every_parity_option(name):
    """Every released checkpoint converts with nothing that differs at inference: the bfloat16 dispatcher, routing
    groups (padded at inference as vmoe's evaluator pads), vmoe's loss combination and its load loss."""
    from hf_vmoe import VMoEConfig

    kwargs, _, issues = hf_config_from_vmoe(resolve_vmoe_config(name))
    assert [i.message for i in issues if i.scope == "inference"] == []
    assert kwargs["expert_dispatch_dtype"] == "bfloat16"
    assert kwargs["router_group_size"] == 8 * (kwargs["image_size"] // kwargs["patch_size"]) ** 2 + 8
    assert kwargs["router_group_remainder"] == "pad" and kwargs["capacity_multiple_of"] == 4
    assert kwargs["router_aux_loss_layer_reduction"] == "sum"
    assert kwargs["router_load_loss_coef"] == 0.005 and kwargs["router_importance_loss_coef"] == 0.005
    assert kwargs.get("representation_size") == VMOE_PRESETS[name]["model"]["representation_size"]
    VMoEConfig(**kwargs)  # a valid config


@pytest.mark.parametrize("name", ["eee_s32_last2_ilsvrc2012", "eee_s32_last2_ilsvrc2012_ft_cifar100"])
def test_ensemble_presets_are_refused(name):
    with pytest.raises(ValueError, match="E\\^3"):
        resolve_vmoe_config(name)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="vmoe_b16_imagenet21k_randaug_strong"):
        resolve_vmoe_config("vmoe_x99")


def test_config_fields_override_a_preset():
    spec = resolve_vmoe_config(json.dumps({
        "preset": "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012",
        "eval_overrides": {"encoder": {"moe": {"router": {"dispatcher": {"capacity_factor": 8.0}}}}},
    }))
    kwargs, _, _ = hf_config_from_vmoe(spec)
    assert kwargs["eval_capacity_factor"] is None and kwargs["capacity_factor"] == 1.5  # 8.0: dropless at eval


def test_bad_config_fields_are_named():
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_vmoe_config({"model": {}, "capacity": 3})
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_vmoe_config("{not json")
    spec = resolve_vmoe_config("vmoe_b16_imagenet21k_randaug_strong")
    spec["model"]["encoder"]["moe"]["router"]["num_selected_experts"] = 9
    with pytest.raises(ValueError, match="num_selected_experts=9"):
        hf_config_from_vmoe(spec)


# -- vmoe-written checkpoints --------------------------------------------------------------------------------------


def _tiny(**overrides):
    kwargs = dict(k=2, moe_layers=(1, 3), capacity_factor=4.0, group_size=BATCH * 10)
    kwargs.update(overrides)
    config = ref.model_config(**kwargs)
    return config, ref.init_params(config, image_size=IMAGE, batch=BATCH)


def _spec(config, **extra):
    return {"model": config, "image_size": IMAGE, **extra}


@pytest.fixture(scope="module")
def tiny():
    if ref.skip_reason():
        pytest.skip(ref.skip_reason())
    return _tiny()


@needs_reference
def test_reads_vmoe_sharded_checkpoint(tiny, tmp_path):
    _, params = tiny
    prefix = ref.save_sharded(params, tmp_path / "ckpt", num_shards=3, max_chunk_bytes=256)
    assert len(list(tmp_path.glob("ckpt.data-*-of-00003"))) == 3
    _assert_same_tree(read_vmoe_sharded(prefix), ref.to_numpy_tree(params))
    _assert_same_tree(load_vmoe_params(prefix), ref.to_numpy_tree(params))


@needs_reference
def test_reads_sharded_training_state_params_only(tiny, tmp_path):
    _, params = tiny
    m = ref.modules()
    state = {"params": params, "step": m.jnp.asarray(7), "opt_state": {"mu": params}}
    prefix = ref.save_sharded(state, tmp_path / "ckpt", num_shards=2)
    _assert_same_tree(load_vmoe_params(prefix), ref.to_numpy_tree(params))


@needs_reference
@pytest.mark.parametrize("wrap", [False, True], ids=["params", "params-under-key"])
def test_reads_flax_and_vmoe_single_file_checkpoints(tiny, tmp_path, wrap):
    _, params = tiny
    tree = {"params": params} if wrap else params
    flax_file = ref.save_flax_msgpack(tree, tmp_path / "params.msgpack")
    _assert_same_tree(load_vmoe_params(flax_file), ref.to_numpy_tree(params))
    vmoe_file = ref.save_vmoe_single_file(tree, tmp_path / "vmoe_ckpt")
    _assert_same_tree(load_vmoe_params(vmoe_file), ref.to_numpy_tree(params))


@needs_reference
def test_reads_flax_chunked_large_arrays(tiny, tmp_path, monkeypatch):
    _, params = tiny
    m = ref.modules()
    monkeypatch.setattr(m.flax_serialization, "MAX_CHUNK_SIZE", 64)  # every array over 64 bytes is chunked
    path = ref.save_flax_msgpack(params, tmp_path / "params.msgpack")
    raw = msgpack.unpackb(Path(path).read_bytes(), raw=False, ext_hook=lambda c, d: None)
    assert "__msgpack_chunked_array__" in json.dumps(raw, default=str)
    _assert_same_tree(load_vmoe_params(path), ref.to_numpy_tree(params))


@needs_reference
def test_reads_bfloat16_sharded_arrays(tmp_path):
    m = ref.modules()
    tree = {"w": m.jnp.asarray(np.linspace(-3, 3, 40, dtype=np.float32).reshape(8, 5), m.jnp.bfloat16)}
    prefix = ref.save_sharded(tree, tmp_path / "ckpt", num_shards=2, max_chunk_bytes=16)
    np.testing.assert_array_equal(read_vmoe_sharded(prefix)["w"], np.asarray(tree["w"], dtype=np.float32))


def _folder_files(path: Path) -> set[str]:
    """The files that matter (a saved VMoE folder also has the remote-code .py files)."""
    return {p.name for p in path.iterdir() if p.suffix != ".py"}


@needs_reference
def test_converted_folder_loads_runs_in_pipeline_trains_and_saves(tiny, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, Trainer, TrainingArguments, pipeline

    from hf_vmoe import VMoEForImageClassification

    config, params = tiny
    prefix = ref.save_sharded(params, tmp_path / "ckpt")
    labels = [f"class{i}" for i in range(5)]
    result = convert_vmoe_checkpoint(prefix, _spec(config), tmp_path / "hf", labels=labels)
    assert result.inexact == []
    assert _folder_files(tmp_path / "hf") == {"config.json", "model.safetensors", "preprocessor_config.json"}
    model = VMoEForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert model.config.id2label[3] == "class3" and model.config.vmoe_reference["group_size"] == BATCH * 10
    x = ref.images(BATCH, IMAGE)
    theirs = ref.run(config, params, x)
    with torch.no_grad():
        ours = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).logits.numpy()
    assert np.abs(ours - theirs.logits).max() <= 1e-4 * np.abs(theirs.logits).max()

    # the pipeline, with the saved processor (vmoe's value_range(-1, 1): mean = std = 0.5)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert list(processor.image_mean) == [0.5] * 3 and dict(processor.size) == {"height": IMAGE, "width": IMAGE}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    classify = pipeline("image-classification", model=model, image_processor=processor)
    top = classify(image, top_k=5)
    with torch.no_grad():
        probs = model(**processor(image, return_tensors="pt")).logits.softmax(-1)[0]
    assert [r["label"] for r in top] == [labels[int(i)] for i in probs.argsort(descending=True)]

    # trains with the Trainer (batches of whole routing groups: 8 images) and saves / loads like any VMoE
    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"pixel_values": torch.rand(3, IMAGE, IMAGE, generator=g) * 2 - 1, "labels": i % 5}

    args = TrainingArguments(output_dir=str(tmp_path / "train"), per_device_train_batch_size=BATCH, max_steps=2,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model=model, args=args, train_dataset=Data()).train()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("experts.up_proj" in k for k in changed) and any("router.weight" in k for k in changed)
    model.save_pretrained(tmp_path / "trained")
    again = VMoEForImageClassification.from_pretrained(tmp_path / "trained")
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


@needs_reference
def test_cli_convert_vmoe(tiny, tmp_path, capsys):
    from hf_vmoe.cli import main

    config, params = tiny
    prefix = ref.save_sharded(params, tmp_path / "ckpt")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_spec(config)))
    assert main(["convert-vmoe", prefix, "--config", str(spec), "-o", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert "wrote" in capsys.readouterr().out
    assert main(["convert-vmoe", prefix, "--config", "vmoe_b16_imagenet21k_randaug_strong", "-o",
                 str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "hidden_size" in err
    assert not (tmp_path / "other").exists()


# -- bad input: a clear ValueError, nothing written -----------------------------------------------------------------


def _nothing_written(tmp_path: Path, out: str = "hf"):
    assert not (tmp_path / out).exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "a temporary folder was left behind"


@needs_reference
@pytest.mark.parametrize("cut", [1, 200])
def test_truncated_shard(tiny, tmp_path, cut):
    config, params = tiny
    prefix = ref.save_sharded(params, tmp_path / "ckpt", num_shards=3)
    shard = tmp_path / "ckpt.data-00001-of-00003"
    shard.write_bytes(shard.read_bytes()[:-cut])
    with pytest.raises(ValueError, match="ckpt.data-00001-of-00003"):
        convert_vmoe_checkpoint(prefix, _spec(config), tmp_path / "hf")
    _nothing_written(tmp_path)


@needs_reference
def test_missing_shard_and_missing_index(tiny, tmp_path):
    config, params = tiny
    prefix = ref.save_sharded(params, tmp_path / "ckpt", num_shards=3)
    (tmp_path / "ckpt.data-00002-of-00003").unlink()
    with pytest.raises(ValueError, match="ckpt.data-00002-of-00003.*does not exist"):
        convert_vmoe_checkpoint(prefix, _spec(config), tmp_path / "hf")
    (tmp_path / "ckpt.index").unlink()
    with pytest.raises(ValueError, match="index file"):
        convert_vmoe_checkpoint(prefix, _spec(config), tmp_path / "hf")
    _nothing_written(tmp_path)


@needs_reference
def test_shards_of_another_checkpoint(tiny, tmp_path):
    config, params = tiny
    prefix = ref.save_sharded(params, tmp_path / "a" / "ckpt", num_shards=2)
    _, other = _tiny(hidden=24)
    ref.save_sharded(other, tmp_path / "b" / "ckpt", num_shards=2)
    shutil.copy(tmp_path / "b" / "ckpt.data-00000-of-00002", tmp_path / "a" / "ckpt.data-00000-of-00002")
    with pytest.raises(ValueError, match="ckpt.data-00000-of-00002"):
        convert_vmoe_checkpoint(prefix, _spec(config), tmp_path / "hf")
    _nothing_written(tmp_path)


@needs_reference
def test_tree_that_does_not_fit(tiny, tmp_path):
    config, params = tiny
    tree = ref.to_numpy_tree(params)
    del tree["Encoder"]["encoderblock_3"]["Moe"]["Mlp"]["Dense_1"]["bias"]
    tree["Encoder"]["encoderblock_0"]["extra"] = {"kernel": np.zeros(3, np.float32)}
    path = ref.save_flax_msgpack(tree, tmp_path / "params.msgpack")
    with pytest.raises(ValueError) as err:
        convert_vmoe_checkpoint(path, _spec(config), tmp_path / "hf")
    assert "missing: Encoder/encoderblock_3/Moe/Mlp/Dense_1/bias" in str(err.value)
    assert "unexpected: Encoder/encoderblock_0/extra/kernel" in str(err.value)
    _nothing_written(tmp_path)


@needs_reference
def test_a_tree_of_another_model(tmp_path):
    path = tmp_path / "params.msgpack"
    path.write_bytes(_pack({"conv_root": {"kernel": np.zeros((3, 3), np.float32)}}))
    with pytest.raises(ValueError, match="no V-MoE parameter tree"):
        convert_vmoe_checkpoint(path, "vmoe_b16_imagenet21k_randaug_strong", tmp_path / "hf")
    _nothing_written(tmp_path)


@needs_reference
def test_unknown_architecture_wrong_preset(tiny, tmp_path):
    _, params = tiny
    prefix = ref.save_sharded(params, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="does not fit the vmoe config") as err:
        convert_vmoe_checkpoint(prefix, "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012", tmp_path / "hf")
    for field in ("hidden_size", "encoder.num_layers", "encoder.moe.layers", "image_size"):
        assert field in str(err.value)
    _nothing_written(tmp_path)


@needs_reference
def test_ensemble_router_is_refused(tiny, tmp_path):
    config, params = tiny
    tree = ref.to_numpy_tree(params)
    kernel = tree["Encoder"]["encoderblock_1"]["Moe"]["Router"]["dense"]["kernel"]  # (H, E) -> E^3's (H, M, E/M)
    tree["Encoder"]["encoderblock_1"]["Moe"]["Router"]["dense"]["kernel"] = kernel.reshape(kernel.shape[0], 2, -1)
    path = ref.save_flax_msgpack(tree, tmp_path / "params.msgpack")
    with pytest.raises(ValueError, match="E\\^3"):
        convert_vmoe_checkpoint(path, _spec(config), tmp_path / "hf")
    _nothing_written(tmp_path)


@needs_reference
def test_existing_output_is_kept_unless_overwrite(tiny, tmp_path):
    config, params = tiny
    prefix = ref.save_sharded(params, tmp_path / "ckpt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        convert_vmoe_checkpoint(prefix, _spec(config), tmp_path / "hf")
    assert (tmp_path / "hf" / "mine.txt").read_text() == "keep me"
    convert_vmoe_checkpoint(prefix, _spec(config), tmp_path / "hf", overwrite=True)
    assert _folder_files(tmp_path / "hf") == {"config.json", "model.safetensors", "preprocessor_config.json"}


@needs_reference
def test_strict_refuses_what_inference_would_not_reproduce(tmp_path):
    config, params = _tiny(bfloat16=True, capacity_factor=1.0)
    prefix = ref.save_sharded(params, tmp_path / "ckpt")
    from hf_vmoe import VMoEConfig

    assert "capacity_rounding" not in {f.name for f in dataclasses.fields(VMoEConfig)}
    # vmoe's capacity_ceil_or_round="round" has no VMoEConfig option (no released config uses it)
    config["encoder"]["moe"]["router"]["dispatcher"]["capacity_ceil_or_round"] = "round"
    with pytest.raises(ValueError, match="capacity_rounding"):
        convert_vmoe_checkpoint(prefix, _spec(config), tmp_path / "hf", strict=True)
    _nothing_written(tmp_path)
    with pytest.warns(UserWarning, match="capacity_ceil_or_round='round'"):
        result = convert_vmoe_checkpoint(prefix, _spec(config), tmp_path / "hf")
    assert any("capacity_rounding" in m for m in result.inexact)
    # the bfloat16 dispatcher itself converts exactly (expert_dispatch_dtype)
    config["encoder"]["moe"]["router"]["dispatcher"]["capacity_ceil_or_round"] = "ceil"
    result = convert_vmoe_checkpoint(prefix, _spec(config), tmp_path / "exact", strict=True)
    assert result.inexact == [] and result.config.expert_dispatch_dtype == "bfloat16"


@needs_reference
def test_label_list_of_the_wrong_length(tiny, tmp_path):
    config, params = tiny
    prefix = ref.save_sharded(params, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="3 names but the checkpoint has 5 classes"):
        convert_vmoe_checkpoint(prefix, _spec(config), tmp_path / "hf", labels=["a", "b", "c"])
    _nothing_written(tmp_path)


@needs_reference
def test_converted_model_with_eval_capacity_runs_one_image(tmp_path):
    """Released checkpoints route groups of 8 images; a pipeline sends one. vmoe's model cannot route such a batch
    (its evaluator pads the last batch with all-zero examples): the converted model pads the same way, at inference
    (tests/test_vmoe_parity.py compares the result with vmoe's)."""
    from hf_vmoe import VMoEForImageClassification

    config, params = _tiny(capacity_factor=1.0)
    prefix = ref.save_sharded(params, tmp_path / "ckpt")
    convert_vmoe_checkpoint(prefix, _spec(config), tmp_path / "hf")
    model = VMoEForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert model.config.router_group_remainder == "pad"
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        logits = model(pixels[:1], output_router_logits=True)
        padded = model(torch.cat([pixels[:1], torch.zeros(BATCH - 1, 3, IMAGE, IMAGE)])).logits
    assert logits.logits.shape == (1, 5) and torch.isfinite(logits.logits).all()
    assert torch.allclose(logits.logits, padded[:1], atol=1e-6)  # one image = the image and 7 zero images
    assert [tuple(r.shape) for r in logits.router_logits] == [(10, 4), (10, 4)]  # the real tokens only
    model.config.router_group_remainder = "error"
    with pytest.raises(ValueError, match="router_group_size=80 must divide the number of routed tokens"):
        model(pixels[:1])


def _token_model(**overrides):
    from hf_vmoe import VMoEConfig, VMoEForImageClassification

    kwargs = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=16,
                  patch_size=4, num_labels=3, routing_level="token", num_experts=4, num_experts_per_tok=2,
                  moe_layers=(1,), capacity_factor=1.0, eval_capacity_factor=1.0, batch_priority_routing=True)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return VMoEForImageClassification(VMoEConfig(**kwargs))


@pytest.mark.parametrize("router_type", ["top_k", "expert_choice"])
def test_partial_last_group_routes_like_a_group_of_its_own(router_type):
    """router_group_remainder="partial": 3 images of 17 tokens in groups of 34 = one full group (2 images) and a
    last group of 17 tokens with its own capacity, routed exactly as that image alone in a group of 17."""
    from hf_vmoe.modeling_vmoe import expert_capacity

    model = _token_model(router_type=router_type, router_group_size=34, router_group_remainder="partial").eval()
    router = model.vmoe.encoder.layer[1].mlp.router
    hidden = torch.randn(3, 17, 16)
    _, plan = router(hidden)
    router.config.router_group_size = 17
    _, alone = router(hidden[2:])
    if router_type == "top_k":
        assert torch.equal(plan.keep[34:], alone.keep) and not alone.keep.all()
        router.config.router_group_size = 34
        _, pair = router(hidden[:2])
        assert torch.equal(plan.keep[:34], pair.keep)
        assert expert_capacity(17 * 2, 1.0, 4, None) == 9  # the last group's capacity: from its own 17 tokens
    else:
        rows = plan.token_index.view(4, -1)  # expert-major: 2 * ceil(34 / 4) = 9 + 5 per expert
        assert rows.shape[1] == 9 + 5
        assert torch.equal(rows[:, 9:], alone.token_index.view(4, -1) + 34)
    router.config.router_group_size = 34
    model.train()
    loss = model(torch.randn(3, 3, 16, 16), labels=torch.tensor([0, 1, 2])).loss  # losses over both groups
    assert torch.isfinite(loss)


def test_options_default_to_todays_computation():
    """The parity options off (their defaults) compute exactly what the model computed without them."""
    base = _token_model()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = base.eval()(x).logits
        for overrides in (dict(router_aux_loss_layer_reduction="mean", router_load_loss_coef=0.0,
                               router_group_remainder="error", expert_dispatch_dtype=None, use_cls_token=True,
                               representation_size=None),):
            assert torch.equal(_token_model(**overrides).eval()(x).logits, reference)


def test_bfloat16_dispatch_rounds_expert_inputs_and_outputs():
    """expert_dispatch_dtype="bfloat16": y = sum_j w_j * bf16(expert_j(bf16(x))), the sum in float32."""
    model = _token_model(expert_dispatch_dtype="bfloat16").eval()
    block = model.vmoe.encoder.layer[1].mlp
    hidden = torch.randn(2, 17, 16)
    with torch.no_grad():
        _, plan = block.router(hidden)
        out = block(hidden, plan)
        rows = hidden.reshape(-1, 16).to(torch.bfloat16).float()
        expected = torch.zeros_like(rows)
        for slot in range(2):
            for token in range(rows.shape[0]):
                if plan.keep is not None and not plan.keep[token, slot]:
                    continue
                e = int(plan.top_k_index[token, slot])
                y = expert_mlp(block.experts, e, rows[token:token + 1]).to(torch.bfloat16).float()
                expected[token] += plan.top_k_weights[token, slot] * y[0]
        assert torch.allclose(out.reshape(-1, 16), expected, atol=1e-6)
        plain = model.vmoe.encoder.layer[1].mlp.experts
        assert not torch.equal(out, plan.apply(plain, hidden))  # the rounding changes the result


def test_pre_logits_and_no_class_token():
    """representation_size: classifier(tanh(pre_logits(pooled))); use_cls_token=False: no class token, patch-only
    position embeddings, the mean of every token."""
    model = _token_model(representation_size=8, use_cls_token=False, pooling="mean").eval()
    names = dict(model.named_parameters())
    assert names["pre_logits.weight"].shape == (8, 16) and names["classifier.weight"].shape == (3, 8)
    assert "vmoe.embeddings.cls_token" not in names
    assert names["vmoe.embeddings.position_embeddings"].shape == (1, 16, 16)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        pooled = model.vmoe.layernorm(out.hidden_states[-1]).mean(dim=1)
        expected = model.classifier(torch.tanh(model.pre_logits(pooled)))
        assert out.hidden_states[-1].shape == (2, 16, 16)
        assert torch.allclose(out.logits, expected, atol=1e-6)


def test_noisy_training_adds_the_load_loss_and_sums_over_layers():
    from hf_vmoe.modeling_vmoe import vmoe_routing_loss

    model = _token_model(moe_layers=(0, 1), router_noise_std=0.5, router_load_loss_coef=0.1,
                         router_aux_loss_coef=0.0, router_z_loss_coef=0.0).train()
    out = model(torch.randn(2, 3, 16, 16), output_router_logits=True)
    assert out.aux_loss > 0  # the load loss alone
    model.eval()
    assert model.vmoe(torch.randn(2, 3, 16, 16), compute_routing_loss=True).aux_loss == 0  # no noise: no load loss
    config = model.config
    plans = []
    model.train()
    for layer in model.vmoe.encoder.layer:
        plans.append(layer.mlp.router(torch.randn(2, 17, 16))[1])
    mean = vmoe_routing_loss(tuple(plans), config)["aux_loss"]
    config.router_aux_loss_layer_reduction = "sum"
    total = vmoe_routing_loss(tuple(plans), config)["aux_loss"]
    assert torch.allclose(total, 2 * mean)


def test_architecture_errors_name_the_parameter():
    tree = {"embedding": {"kernel": np.zeros((8, 8, 3, 16)), "bias": np.zeros(16)}, "cls": np.zeros((1, 1, 16)),
            "Encoder": {"posembed_input": {"pos_embedding": np.zeros((1, 11, 16))}}}
    with pytest.raises(ValueError, match="encoder blocks"):
        infer_vmoe_architecture(tree)
    tree["Encoder"]["encoderblock_0"] = {"SelfAttention": {"query": {"kernel": np.zeros((16, 2, 8))}},
                                        "Mlp": {"Dense_0": {"kernel": np.zeros((16, 32))}}}
    with pytest.raises(ValueError, match="not a square grid"):
        infer_vmoe_architecture(tree)
    tree["Encoder"]["posembed_input"]["pos_embedding"] = np.zeros((1, 10, 16))
    with pytest.raises(ValueError, match="no classification head"):
        infer_vmoe_architecture(tree)


# -- Soft MoE and expert choice ------------------------------------------------------------------------------------


def _soft(**overrides):
    kwargs = dict(router=ref.SOFT, moe_layers=(1, 3), capacity_factor=1.0, group_size=9, classifier="gap")
    kwargs.update(overrides)
    config = ref.model_config(**kwargs)
    return config, ref.init_params(config, image_size=IMAGE, batch=BATCH)


@needs_reference
@pytest.mark.parametrize("slots", [None, 3], ids=["slots-from-capacity", "num_slots"])
def test_soft_moe_tree_round_trips_through_the_conversion(slots, tmp_path):
    """vmoe's Router/mu (H, E, P) and Router/scale become router.weight (E * P, H) and router.scale; read back
    from the saved folder they rebuild vmoe's arrays exactly. The config: vmoe's slots (round(9 x 1.0 / 4) = 2
    when num_slots is not given), its noise unscaled, the bfloat16 dispatcher, no group size (groups are images)."""
    from safetensors.torch import load_file

    config, params = _soft(num_slots=slots, noise_std=0.5)
    prefix = ref.save_sharded(params, tmp_path / "ckpt", num_shards=2)
    result = convert_vmoe_checkpoint(prefix, _spec(config), tmp_path / "hf")
    hf = result.config
    assert (hf.router_type, hf.num_slots, hf.router_noise_std) == ("soft", slots or 2, 0.5)
    assert hf.expert_dispatch_dtype == "bfloat16" and hf.router_group_size is None and not hf.use_cls_token
    assert result.inexact == []
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    tree = ref.to_numpy_tree(params)
    for block in (1, 3):
        router = tree["Encoder"][f"encoderblock_{block}"]["Moe"]["Router"]
        weight = weights[f"vmoe.encoder.layer.{block}.mlp.router.weight"].numpy()  # (E * P, H)
        np.testing.assert_array_equal(weight.T.reshape(router["mu"].shape), router["mu"])
        assert weights[f"vmoe.encoder.layer.{block}.mlp.router.scale"].shape == ()
        assert float(weights[f"vmoe.encoder.layer.{block}.mlp.router.scale"]) == float(router["scale"])


@needs_reference
def test_soft_moe_conversion_errors_name_what_does_not_fit(tmp_path):
    config, params = _soft()
    prefix = ref.save_sharded(params, tmp_path / "ckpt", num_shards=1)
    wrong_slots = copy.deepcopy(config)
    wrong_slots["encoder"]["moe"]["router"]["num_slots"] = 5
    with pytest.raises(ValueError, match="gives 5 Soft MoE slots per expert .* the checkpoint's mu has 2"):
        convert_vmoe_checkpoint(prefix, _spec(wrong_slots), tmp_path / "a")
    two_images = copy.deepcopy(config)
    two_images["encoder"]["moe"]["group_size"] = 18
    with pytest.raises(ValueError, match=r"group_size=18: hf_vmoe mixes the tokens of each image, .* \(9 tokens\)"):
        convert_vmoe_checkpoint(prefix, _spec(two_images), tmp_path / "b")
    top_k = copy.deepcopy(config)
    top_k["encoder"]["moe"]["router"] = {"name": ref.TOP_K, "dispatcher": {"capacity_factor": 1.0}}
    with pytest.raises(ValueError, match="routers have Soft MoE's mu and scale but the vmoe config names "
                                         "'NoisyTopExpertsPerItemRouter'"):
        convert_vmoe_checkpoint(prefix, _spec(top_k), tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")


@needs_reference
@pytest.mark.parametrize("dispatcher, factors", [
    (dict(capacity_factor=1.0), (1.0, 1.0, 4)),  # ceil(40 / 4) = 10 -> 12: hf's rule with capacity_multiple_of=4
    (dict(capacity_factor=0.7, capacity_ceil_or_round="round", capacity_multiple_of=1), (0.65, 0.65, None)),
    (dict(capacity_factor=None, capacity=6), (0.55, 0.55, None)),  # an absolute capacity: (6 - 1/2) x 4 / 40
], ids=["ceil-multiple-of-4", "round", "absolute"])
def test_expert_choice_router_maps_groups_and_exact_capacities(dispatcher, factors, tmp_path):
    """NoisyTopItemsPerExpertRouter: the group size is set explicitly (inference routes vmoe's groups, padded as
    its evaluator pads), noise / E, no losses; vmoe's capacity per group C is hf_vmoe's min(n, ceil(n x factor /
    E)) rounded to capacity_multiple_of, with the factor (C - 1/2) x E / n where vmoe's rule is not hf's."""
    from hf_vmoe.modeling_vmoe import expert_capacity

    config = ref.model_config(router=ref.EXPERT_CHOICE, moe_layers=(1, 3), group_size=40, noise_std=1.0,
                              **{"capacity_factor": dispatcher.pop("capacity_factor")}, **dispatcher)
    kwargs, reference, issues = hf_config_from_vmoe(resolve_vmoe_config(_spec(config)))
    assert kwargs["router_type"] == "expert_choice" and issues == []
    assert (kwargs["router_group_size"], kwargs["router_group_remainder"]) == (40, "pad")
    assert kwargs["router_noise_std"] == 0.25 and kwargs["router_importance_loss_coef"] == 0.0
    train, evaluation, multiple = factors
    assert kwargs["capacity_factor"] == pytest.approx(train) and kwargs["eval_capacity_factor"] == pytest.approx(evaluation)
    assert kwargs.get("capacity_multiple_of") == multiple
    capacity = reference["inference_capacity_per_group"]
    assert expert_capacity(40, kwargs["eval_capacity_factor"], 4, multiple) == capacity
