"""Model cards, and push / load by Hub id against a loopback Hub server (tests/hub_server.py).

Clients run in subprocesses: HF_ENDPOINT must be set before huggingface_hub is imported, and this process has
imported it already (conftest imports hf_vmoe, which imports transformers) with HF_HUB_OFFLINE=1.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config
from hub_server import HubServer

from hf_vmoe import VMoEConfig
from hf_vmoe.cli import main as cli_main
from hf_vmoe.integrations.hub import build_model_card, count_parameters, publish

ROOT = Path(__file__).resolve().parents[1]

# A preamble for client scripts: a tiny model with a fixed seed, built the same way in every script.
PREAMBLE = """
import sys, torch
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8, num_experts=4, num_experts_per_tok=1, num_labels=5)  # = conftest.tiny_config()
"""
MAKE_MODEL = """
import hf_vmoe
from hf_vmoe import VMoEConfig, VMoEForImageClassification, VMoEImageProcessor
torch.manual_seed(0)
config = VMoEConfig(**TINY, superclass_ids=[0, 1, 2, 3, 0])   # conftest's tiny_config (not imported: it sets offline)
model = VMoEForImageClassification(config).eval()
with torch.no_grad():
    model.vmoe.encoder.router.weight.normal_(0, 3.0)   # images go to different experts
processor = VMoEImageProcessor(size={"height": 32, "width": 32})
pixel_values = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
"""


def _run(script: str, env: dict, cwd, timeout=240) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    return result


def _ok(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    return result


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# ----------------------------------------------------------------------------------------------------------------
# Cards (no server)
# ----------------------------------------------------------------------------------------------------------------


def test_card_reports_architecture_params_and_citations():
    config = tiny_config(superclass_ids=[0, 1, 2, 3, 0], id2label={i: f"class{i}" for i in range(5)})
    card = build_model_card(config, "org/tiny", trained_on="a 5-class toy set", datasets=["toy"],
                            eval_results=[{"dataset": "toy", "metric": "accuracy", "value": 0.8, "split": "validation"}])
    text = str(card)
    meta = _front_matter(text)
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "accuracy", "value": 0.8, "name": "accuracy"}
    assert result["dataset"]["type"] == "toy" and result["dataset"]["split"] == "validation"
    assert "image-routing" in meta["tags"] and meta["pipeline_tag"] == "image-classification"
    params = count_parameters(config)
    from hf_vmoe import VMoEForImageClassification

    model = VMoEForImageClassification(config)
    assert params["total"] == sum(p.numel() for p in model.parameters())
    expert = model.vmoe.encoder.layer[-1].mlp.experts
    per_expert = sum(p[0].numel() for p in expert.parameters())
    assert params["total"] - params["active"] == len(config.moe_layers) * 3 * per_expert  # E - k = 3 idle experts
    assert f"{params['total']:,}" in text and f"{params['active']:,}" in text
    assert "**image-level** routing" in text and "1 of 4 experts" in text and "[2, 3] of 4" in text
    assert "| 0 | 2 | class0, class4 |" in text  # super-class table: expert 0 holds classes 0 and 4
    assert "arXiv:2309.04354" in text and "arXiv:2410.15732" in text
    assert "Weights: a 5-class toy set." in text and "randomly initialised" not in text


def test_card_token_routing_and_untrained_honesty():
    card = str(build_model_card(tiny_config(routing_level="token", num_shared_experts=1), "org/tok"))
    assert "**token-level** routing" in card and "vimoe" in _front_matter(card)["tags"]
    assert "randomly initialised" in card and "model-index" not in card
    with pytest.raises(ValueError, match="trained_on"):
        build_model_card(tiny_config(), "org/x", eval_results=[{"dataset": "d", "metric": "accuracy", "value": 1}])
    with pytest.raises(ValueError, match="eval result"):
        build_model_card(tiny_config(), "org/x", trained_on="x", eval_results=[{"dataset": "d"}])
    with pytest.raises(ValueError, match="repo_id"):
        build_model_card(tiny_config(), "")


def test_committed_card_is_generated_by_the_cli(tmp_path):
    out = tmp_path / "README.md"
    assert cli_main(["card", "--preset", "mobile-vmoe-tiny", "--repo-id", "hf-vmoe/mobile-vmoe-tiny", "--out", str(out)]) == 0
    committed = ROOT / "model_cards" / "mobile-vmoe-tiny" / "README.md"
    assert committed.read_text() == out.read_text(), "regenerate with the hf-vmoe card command in docs/hub-accelerate-export.md"
    assert "no trained checkpoint has been published yet" in committed.read_text()
    meta = _front_matter(committed.read_text())
    assert meta["model_name"] == "mobile-vmoe-tiny"
    assert VMoEConfig().num_experts == 10  # the preset is the config default (Mobile V-MoE-Tiny)


def test_upcycled_origin_names_how_the_experts_were_made():
    from hf_vmoe.integrations.hub import describe_origin

    split, _ = describe_origin("runs/dense", upcycled=True, expert_init="split_shared", drop_ratio=0.5)
    assert "a shared expert made of the first half" in split and "50% of its hidden units re-initialised" in split
    with pytest.raises(ValueError, match="expert_init must be one of .*got 'split'"):
        describe_origin("runs/dense", upcycled=True, expert_init="split")


def test_committed_vimoe_card_states_the_recipe_and_the_evidence(tmp_path):
    folder = ROOT / "model_cards" / "vimoe-3x64"
    out = tmp_path / "README.md"
    assert cli_main(["card", "--preset", "vimoe-3x64", "--repo-id", "hf-vmoe/vimoe-3x64", "--recipe",
                     str(folder / "recipe.md"), "--out", str(out)]) == 0
    committed = (folder / "README.md").read_text()
    assert committed == out.read_text(), "regenerate with the hf-vmoe card command in docs/hub-accelerate-export.md"
    recipe = (folder / "recipe.md").read_text().strip()
    assert f"## Recipe and evidence\n\n{recipe}\n" in committed
    assert "--expert_init split_shared" in recipe and "always-on shared expert" in committed
    assert "no trained checkpoint has been published yet" in committed
    missing = ["card", "--preset", "vimoe-3x64", "--repo-id", "hf-vmoe/vimoe-3x64", "--recipe",
               str(tmp_path / "no-recipe.md"), "--out", str(tmp_path / "card" / "README.md")]
    assert cli_main(missing) == 2 and not (tmp_path / "card").exists()  # an error line, nothing written


def test_publish_refuses_offline_in_process(tmp_path, monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1 for this process: publish raises before touching anything."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    from hf_vmoe import VMoEForImageClassification

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE"):
        publish(VMoEForImageClassification(tiny_config()), None, "org/offline")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="repo_id"):
        publish(VMoEForImageClassification(tiny_config()), None, "a/b/c")


# ----------------------------------------------------------------------------------------------------------------
# Loopback Hub
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "hub_storage") as server:
        yield server


@pytest.mark.slow
def test_publish_then_load_by_id(hub, tmp_path):
    env = hub.client_env(home=tmp_path / "home_push")
    _ok(_run(PREAMBLE + MAKE_MODEL + f"""
from hf_vmoe.integrations.hub import publish
from safetensors.torch import save_file
info = publish(model, processor, "org/mobile-vmoe-tiny", trained_on="nothing: test weights")
print("COMMIT", info.oid)
with torch.no_grad():
    out = model(pixel_values=pixel_values, output_router_logits=True)
    hidden = model.vmoe(pixel_values).last_hidden_state
save_file({{"pixel_values": pixel_values, "logits": out.logits, "hidden": hidden,
           "experts": out.router_logits[0].argmax(-1)}}, {str(tmp_path / "ref.safetensors")!r})
model.push_to_hub("org/plain-push")   # transformers' own push path, too
""", env, tmp_path))
    files = hub.repo_files("org/mobile-vmoe-tiny")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_vmoe.py",
                 "configuration_vmoe.py", "image_processing_vmoe.py"):
        assert name in files, files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert "model.safetensors" in hub.repo_files("org/plain-push")
    card = (hub.root / "org" / "mobile-vmoe-tiny" / "README.md").read_text()
    assert "Weights: nothing: test weights." in card and "arXiv:2309.04354" in card
    commits = json.loads((hub.root / "org" / "mobile-vmoe-tiny.json").read_text())["commits"]
    assert len(commits) == 2  # repo creation + one commit with model, processor and card

    # a fresh process and an empty cache: download by id
    env = hub.client_env(home=tmp_path / "home_pull")
    _ok(_run(PREAMBLE + f"""
import hf_vmoe
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification
ref = load_file({str(tmp_path / "ref.safetensors")!r})
model = AutoModelForImageClassification.from_pretrained("org/mobile-vmoe-tiny").eval()
base = AutoModel.from_pretrained("org/mobile-vmoe-tiny").eval()
processor = AutoImageProcessor.from_pretrained("org/mobile-vmoe-tiny")
assert type(model).__name__ == "VMoEForImageClassification" and type(base).__name__ == "VMoEModel"
assert type(processor).__name__ == "VMoEImageProcessor", type(processor)
assert processor.size == {{"height": 32, "width": 32}}, processor.size
with torch.no_grad():
    out = model(pixel_values=ref["pixel_values"], output_router_logits=True)
    hidden = base(ref["pixel_values"]).last_hidden_state
assert torch.equal(out.logits, ref["logits"]), (out.logits - ref["logits"]).abs().max()
assert torch.equal(hidden, ref["hidden"])
assert torch.equal(out.router_logits[0].argmax(-1), ref["experts"])
assert len(set(ref["experts"].tolist())) >= 2
assert model.config.superclass_ids == [0, 1, 2, 3, 0]
print("LOADED")
""", env, tmp_path))
    assert ("GET", "/org/mobile-vmoe-tiny/resolve/main/config.json") in hub.requests or any(
        m == "GET" and p.endswith("/model.safetensors") for m, p in hub.requests)


@pytest.mark.slow
def test_trust_remote_code_without_the_package(hub, tmp_path):
    env = hub.client_env(home=tmp_path / "home_push")
    _ok(_run(PREAMBLE + MAKE_MODEL + f"""
from safetensors.torch import save_file
model.push_to_hub("org/remote")
processor.push_to_hub("org/remote")
with torch.no_grad():
    save_file({{"pixel_values": pixel_values, "logits": model(pixel_values=pixel_values).logits}},
              {str(tmp_path / "ref.safetensors")!r})
""", env, tmp_path))
    env = hub.client_env(home=tmp_path / "home_remote")
    result = _ok(_run(f"""
import sys, torch
sys.modules["hf_vmoe"] = None   # hf_vmoe is not importable in this process
try:
    import hf_vmoe
    raise SystemExit("hf_vmoe should not be importable")
except ImportError:
    pass
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification
ref = load_file({str(tmp_path / "ref.safetensors")!r})
try:
    AutoModelForImageClassification.from_pretrained("org/remote")
    raise SystemExit("loading custom code without trust_remote_code should fail")
except ValueError as err:
    assert "trust_remote_code" in str(err), err
model = AutoModelForImageClassification.from_pretrained("org/remote", trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained("org/remote", trust_remote_code=True)
print("MODULE", type(model).__module__, type(processor).__module__)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    logits = model(pixel_values=ref["pixel_values"]).logits
assert torch.equal(logits, ref["logits"]), (logits - ref["logits"]).abs().max()
assert not any(name == "hf_vmoe" or name.startswith("hf_vmoe.") for name, mod in sys.modules.items() if mod)
print("REMOTE OK")
""", env, tmp_path))
    assert "REMOTE OK" in result.stdout


@pytest.mark.slow
def test_trainer_push_to_hub(hub, tmp_path):
    env = hub.client_env(home=tmp_path / "home_push")
    _ok(_run(PREAMBLE + MAKE_MODEL + f"""
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments
from safetensors.torch import save_file

class Data(Dataset):
    def __len__(self): return 8
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {{"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": torch.tensor(i % 5)}}

model.train()
args = TrainingArguments(output_dir={str(tmp_path / "run")!r}, push_to_hub=True, hub_model_id="org/trained",
                         max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True,
                         save_strategy="no", remove_unused_columns=False, hub_strategy="end")
trainer = Trainer(model=model, args=args, train_dataset=Data(), processing_class=processor)
trainer.train()
trainer.push_to_hub(commit_message="end of training")
model.eval()
with torch.no_grad():
    save_file({{"logits": model(pixel_values=pixel_values).logits, "pixel_values": pixel_values}},
              {str(tmp_path / "ref.safetensors")!r})
""", env, tmp_path, timeout=300))
    files = hub.repo_files("org/trained")
    for name in ("config.json", "model.safetensors", "README.md", "preprocessor_config.json", "modeling_vmoe.py"):
        assert name in files, files
    commits = json.loads((hub.root / "org" / "trained.json").read_text())["commits"]
    assert any(c["summary"] == "end of training" for c in commits)
    env = hub.client_env(home=tmp_path / "home_pull")
    _ok(_run(PREAMBLE + f"""
import hf_vmoe
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification
ref = load_file({str(tmp_path / "ref.safetensors")!r})
model = AutoModelForImageClassification.from_pretrained("org/trained").eval()
with torch.no_grad():
    assert torch.equal(model(pixel_values=ref["pixel_values"]).logits, ref["logits"])
""", env, tmp_path))


@pytest.mark.slow
def test_offline_push_fails_clearly_and_writes_nothing(hub, tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    home = tmp_path / "home_offline"
    env = hub.client_env(home=home, HF_HUB_OFFLINE="1")
    result = _run(PREAMBLE + MAKE_MODEL + """
from huggingface_hub.errors import OfflineModeIsEnabled
from hf_vmoe.integrations.hub import publish
errors = []
for name, push in [("publish", lambda: publish(model, processor, "org/offline")),
                   ("model.push_to_hub", lambda: model.push_to_hub("org/offline")),
                   ("processor.push_to_hub", lambda: processor.push_to_hub("org/offline"))]:
    try:
        push()
    except OfflineModeIsEnabled as err:
        print(f"{name}: {type(err).__name__}: {err}")
        errors.append(name)
assert len(errors) == 3, errors
""", env, work)
    _ok(result)
    assert "publish: OfflineModeIsEnabled: Cannot publish to 'org/offline': HF_HUB_OFFLINE=1 is set" in result.stdout
    assert "model.push_to_hub: OfflineModeIsEnabled" in result.stdout
    assert hub.requests == []  # nothing reached the server
    assert list(hub.root.iterdir()) == []  # no repo on the server
    assert list(work.iterdir()) == []  # nothing in the working directory
    written = [p for p in home.rglob("*") if p.is_file()] if home.exists() else []
    assert written == [], written  # nothing in the cache


def test_dense_card_describes_a_dense_model():
    config = tiny_config(moe_layers=[])
    text = str(build_model_card(config, "org/dense", trained_on="a toy set", trained_from="scratch"))
    assert "A dense Vision Transformer (4 x 32 ViT" in text
    assert f"every block has one MLP of width {config.intermediate_size}" in text
    for moe_only in ("Mixture-of-Experts Transformer", "experts per MoE block", "MoE blocks", "of 4 experts",
                     "Super-classes", "output_router_logits", "balancing losses"):
        assert moe_only not in text, moe_only
    params = count_parameters(config)["total"]
    assert f"| parameters | {params / 1e3:.2f}K ({params:,}), all active |" in text
    tags = _front_matter(text)["tags"]
    assert "dense" in tags and "mixture-of-experts" not in tags and "image-routing" not in tags


def test_upcycled_card_names_its_source_and_total_epochs(tmp_path):
    config = tiny_config()
    text = str(build_model_card(config, "org/moe", trained_on="a toy set", trained_from="org/dense-vit",
                                upcycled=True, dense_epochs=30, total_epochs=45, drop_ratio=0.5))
    assert "Upcycled from the dense model [org/dense-vit](https://huggingface.co/org/dense-vit)" in text
    assert "with a different 50% of its hidden units re-initialised" in text
    assert "The dense model had trained 30 epochs: 45 epochs in all, the dense phase included." in text
    assert "A sparse Vision Mixture-of-Experts Transformer" in text and "experts per MoE block | 4 (k = 1)" in text
