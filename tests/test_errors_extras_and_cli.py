"""What a new user meets beyond the recipe: fine-tuning a super-class MoE to new labels, missing extras, our own
errors before upstream's, import noise, a fast `hf-vmoe --help`, docs that match a run."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

from hf_vmoe import VMoEForImageClassification

# ----------------------------------------------------------------------------------------------------------------
# 1. a super-class MoE fine-tuned to a new label set
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def superclass_moe(tmp_path):
    path = tmp_path / "superclass-moe"
    config = tiny_config(num_labels=8, superclass_ids=[0, 0, 1, 1, 2, 2, 3, 3], train_routing="superclass")
    VMoEForImageClassification(config).save_pretrained(path)
    return path


def test_new_labels_reset_the_superclass_map_and_log_it(superclass_moe, caplog):
    with caplog.at_level(logging.WARNING):
        model = AutoModelForImageClassification.from_pretrained(superclass_moe, num_labels=3,
                                                                ignore_mismatched_sizes=True)
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert model.config.superclass_ids is None and model.config.train_routing == "router"
    assert "superclass_ids reset to None" in caplog.text and "learned router" in caplog.text
    assert "8 entries" in caplog.text and "num_labels is now 3" in caplog.text
    same = AutoModelForImageClassification.from_pretrained(superclass_moe, num_labels=8)
    assert same.config.superclass_ids == [0, 0, 1, 1, 2, 2, 3, 3]  # the same label count keeps the map


@pytest.mark.parametrize("superclass_ids", [None, [0, 1, 1]])
def test_an_explicit_superclass_ids_kwarg_is_used(superclass_moe, superclass_ids):
    model = AutoModelForImageClassification.from_pretrained(superclass_moe, num_labels=3, superclass_ids=superclass_ids,
                                                            ignore_mismatched_sizes=True)
    assert model.config.superclass_ids == superclass_ids
    # the saved train_routing="superclass" needs a map: kept with one, back to the router without
    assert model.config.train_routing == ("router" if superclass_ids is None else "superclass")


def test_trainer_fine_tunes_a_superclass_moe_on_new_labels(superclass_moe, tmp_path):
    model = AutoModelForImageClassification.from_pretrained(superclass_moe, num_labels=3, ignore_mismatched_sizes=True)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(12, 3, 32, 32, generator=generator)
    labels = (pixels[:, 0].mean((1, 2)) > 0).long() + (pixels[:, 1].mean((1, 2)) > 0).long()  # learnable labels
    data = [{"pixel_values": p, "labels": y} for p, y in zip(pixels, labels)]
    router_before = model.vmoe.encoder.router.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=3e-3,
                             max_steps=12, use_cpu=True, report_to=[], seed=0, logging_steps=1, save_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3]), losses
    assert not torch.equal(model.vmoe.encoder.router.weight.detach(), router_before)  # the router learns


# ----------------------------------------------------------------------------------------------------------------
# 3. a missing optional dependency names the extra that installs it
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_model(tmp_path):
    path = tmp_path / "model"
    VMoEForImageClassification(tiny_config()).save_pretrained(path)
    return path


def test_export_without_the_onnx_extra_names_it(saved_model, tmp_path, monkeypatch, capsys):
    from hf_vmoe_cli import main

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` raises ModuleNotFoundError
    assert main(["export", str(saved_model), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert 'ONNX export needs onnxscript, which is not installed: pip install "hf-vmoe[onnx]"' in err
    assert "Traceback" not in err and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("module, extra", [("onnxruntime", "onnx"), ("executorch.exir", "executorch"),
                                           ("torchao", "executorch")])
def test_require_names_the_extra(module, extra, monkeypatch):
    from hf_vmoe.integrations.extras import require

    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=re.escape(f'pip install "hf-vmoe[{extra}]"')):
        require(module, purpose="this")


# ----------------------------------------------------------------------------------------------------------------
# 4. our own errors before upstream's
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model", "runs/no/such-model"])
def test_a_mistyped_local_folder_is_named(path):
    from hf_vmoe import VMoEConfig

    for load in (VMoEConfig.from_pretrained, VMoEForImageClassification.from_pretrained):
        with pytest.raises(OSError, match=f"model folder {re.escape(repr(path))} does not exist"):
            load(path)


@pytest.mark.parametrize("argv", [["analyze", "MODEL", "--data-dir", "."], ["export", "MODEL", "--format", "onnx", "-o", "x.onnx"],
                                  ["flops", "--config", "MODEL"], ["superclasses", "show", "x.json", "--model", "MODEL"]],
                         ids=lambda argv: argv[0])
def test_cli_names_a_mistyped_model_folder(argv, capsys):
    from hf_vmoe_cli import main

    assert main([a.replace("MODEL", "./no-such-model") for a in argv]) == 2
    assert "hf-vmoe: error: model folder './no-such-model' does not exist" in capsys.readouterr().err


def _imagefolder(root, classes, per_class=2, mode="RGB"):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new(mode, (32, 32), color=(i * 40,) * len(mode)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such folder"), ("flat", "has no class sub-folders"), ("empty", "hold no images")])
def test_check_imagefolder_names_the_folder(tmp_path, layout, message):
    from hf_vmoe.integrations.data import check_imagefolder

    root = tmp_path / "train"
    if layout != "missing":
        root.mkdir()
    if layout == "flat":
        Image.new("RGB", (8, 8)).save(root / "a.png")
    if layout == "empty":
        (root / "cat").mkdir()
    with pytest.raises(ValueError, match=f"--train_dir {re.escape(str(root))}.*{message}"):
        check_imagefolder(root, "--train_dir")


def test_classification_example_checks_train_dir_first(tmp_path):
    from conftest import load_example

    example = load_example("run_image_classification")
    with pytest.raises(ValueError, match=f"--train_dir {re.escape(str(tmp_path / 'nope'))}: no such folder"):
        example.load_data(example.DataTrainingArguments(train_dir=str(tmp_path / "nope")))


def test_analyze_names_classes_the_model_does_not_have(tmp_path, capsys):
    from hf_vmoe_cli import main

    config = tiny_config(num_labels=2, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    VMoEForImageClassification(config).save_pretrained(tmp_path / "model")
    data = _imagefolder(tmp_path / "data", ["cat", "dog", "emu"])
    assert main(["analyze", str(tmp_path / "model"), "--data-dir", str(data), "--output-dir", str(tmp_path / "r")]) == 2
    assert "class folders ['emu'] are not classes of the model" in capsys.readouterr().err
    unnamed = _imagefolder(tmp_path / "unnamed", ["a", "b", "c"])
    VMoEForImageClassification(tiny_config(num_labels=2)).save_pretrained(tmp_path / "model2")
    assert main(["analyze", str(tmp_path / "model2"), "--data-dir", str(unnamed), "--output-dir", str(tmp_path / "r")]) == 2
    assert "has 3 class folders but the model has 2 classes" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L"])
def test_image_processor_converts_to_rgb(mode):
    from hf_vmoe import VMoEImageProcessor

    processor = VMoEImageProcessor(size={"height": 32, "width": 32})
    source = Image.new("RGBA", (40, 30), color=(200, 100, 50, 128))
    image = (source if "A" in mode else source.convert("RGB")).convert(mode)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    # as transformers' pipelines: transparent pixels over white
    rgb = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA")).convert("RGB")
    expected = processor(images=rgb, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixels, expected)


# ----------------------------------------------------------------------------------------------------------------
# 5. no noise: a silent import, exports without the exporters' chatter, one unit of expert load
# ----------------------------------------------------------------------------------------------------------------

SRC = Path(__file__).resolve().parents[1] / "src"


def _python(code, *args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def test_import_prints_nothing(tmp_path):
    done = _python("import hf_vmoe; from transformers import AutoConfig; print(AutoConfig.for_model('vmoe').model_type)",
                   cwd=tmp_path)
    assert done.returncode == 0 and done.stdout == "vmoe\n" and done.stderr == "", done.stderr


@pytest.mark.slow
def test_exports_print_no_exporter_chatter(saved_model, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("executorch.runtime")
    code = ("import sys; from hf_vmoe_cli import main\n"
            "for fmt, out in (('onnx', 'm.onnx'), ('executorch', 'm.pte')):\n"
            "    assert main(['export', sys.argv[1], '--format', fmt, '-o', out]) == 0")
    done = _python(code, str(saved_model), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote m.onnx" in done.stdout and "wrote m.pte" in done.stdout
    for chatter in ("torchvision is not installed", "cpuinfo_utils", "Failed to load", "pytree"):
        assert chatter not in done.stderr, done.stderr


def test_expert_load_is_one_unit_in_the_logs():
    from hf_vmoe.integrations.callbacks import _RunningStats

    stats = _RunningStats()
    stats.add_counts(torch.tensor([[6.0, 3.0, 1.0, 0.0]]))  # shares 0.6, 0.3, 0.1, 0 of 4 experts
    summary = stats.summary("eval_", per_expert=True)
    assert summary["eval_expert_load_max"] == pytest.approx(2.4) and summary["eval_expert_load_min"] == 0
    assert [summary[f"eval_expert_load_{e}"] for e in range(4)] == pytest.approx([2.4, 1.2, 0.4, 0.0])


# ----------------------------------------------------------------------------------------------------------------
# 6. `hf-vmoe --help` without torch
# ----------------------------------------------------------------------------------------------------------------

VERBS = ["demo", "presets", "flops", "analyze", "convert-vmoe", "export", "card", "superclasses"]


@pytest.mark.parametrize("verb", [[], *[[v] for v in VERBS]], ids=lambda v: " ".join(v) or "hf-vmoe")
def test_help_imports_neither_torch_nor_the_package(verb, tmp_path):
    code = ("import sys, hf_vmoe_cli\n"
            "try:\n    hf_vmoe_cli.main(sys.argv[1:])\nexcept SystemExit as done:\n    assert done.code == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'hf_vmoe') if m in sys.modules]\n"
            "assert not heavy, heavy")
    done = _python(code, *verb, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: hf-vmoe{' ' + verb[0] if verb else ''}")


def test_console_script_is_the_light_module():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((SRC.parent / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["hf-vmoe"] == "hf_vmoe_cli:main"
    assert "hf_vmoe_cli" in project["tool"]["setuptools"]["py-modules"]


def test_analyze_help_lists_each_option_once(capsys):
    from hf_vmoe_cli import main

    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    out = capsys.readouterr().out
    assert "--split SPLIT, --split" not in out and "--task {auto,classification,segmentation}, --task" not in out
    assert "--data-dir DATA_DIR, --data_dir DATA_DIR" in out  # two spellings stay two


def test_cli_choices_match_the_package():
    import hf_vmoe_cli
    from hf_vmoe.integrations.export import ONNX_QUANTIZATION_MODES
    from hf_vmoe.recipes.analysis import DEFAULT_THRESHOLD, PATCH_LABELS

    assert hf_vmoe_cli.PATCH_LABELS == PATCH_LABELS and hf_vmoe_cli.ANALYZE_THRESHOLD == DEFAULT_THRESHOLD
    assert hf_vmoe_cli.ONNX_QUANTIZATION_MODES == ONNX_QUANTIZATION_MODES


# ----------------------------------------------------------------------------------------------------------------
# 7. skip reasons say what the folder outside the checkout is
# ----------------------------------------------------------------------------------------------------------------


def test_reference_skip_reason_says_what_is_missing(monkeypatch, tmp_path):
    import vmoe_reference

    monkeypatch.setattr(vmoe_reference, "VMOE_DIR", tmp_path / "absent")
    reason = vmoe_reference.skip_reason()
    assert reason.startswith(f"Google's vmoe reference code absent: {tmp_path / 'absent'}")
    assert "HF_VMOE_REF_DIR, default ../shared/ref beside the checkout" in reason


@pytest.mark.slow
def test_real_data_skip_reason_says_what_is_missing(tmp_path):
    test = SRC.parent / "tests" / "test_classification_example.py"
    env = {**os.environ, "HF_VMOE_REAL_DATA": str(tmp_path / "absent"), "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           f"{test}::test_tiny_imagenet_subset_few_steps"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert f"real-data folder absent: {tmp_path / 'absent'}" in done.stdout, done.stdout
    assert "HF_VMOE_REAL_DATA, default ../shared/data beside the checkout" in done.stdout
