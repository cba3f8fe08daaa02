"""Every section of a config is checked when it loads (issue #12 item 8, issue #14 items 3, 4, 6, 10): typos at the
top level and in `lightning.*` fail naming the key (with a suggestion), values are type- and range-checked,
Trainer arguments vwm does not apply are refused with the reason, and `a.b=c` overrides can name a list item."""

from __future__ import annotations

import glob
import os

import pytest
from helpers import REFERENCE_CONFIGS, REPO

from vwm.config import ConfigError, load_config

TINY = os.path.join(REPO, "configs", "tiny", "train.yaml")
PHASE2 = os.path.join(REPO, "configs", "training", "vista_phase2_stage1.yaml")


STANDALONE = [p for p in sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml")))
              if os.sep + "base" + os.sep not in p and os.sep + "data" + os.sep not in p]  # base/, data/: overlays


@pytest.mark.parametrize("path", STANDALONE + sorted(glob.glob(os.path.join(REFERENCE_CONFIGS, "*.yaml"))),
                         ids=os.path.basename)
def test_every_shipped_and_reference_config_passes_the_schema(path):
    load_config(path)


@pytest.mark.parametrize("override, message", [
    # typos anywhere are errors, with the close match
    ("modle.base_learning_rate=1.0", r"<top level>\.modle: unknown key \(did you mean 'model'\?\)"),
    ("lightning.checkpoint.every_n_step=5", r"lightning\.checkpoint\.every_n_step: unknown key \(did you mean "
                                            r"'every_n_steps'\?\)"),
    ("lightning.trainer.max_epoch=3", r"lightning\.trainer\.max_epoch: unknown key \(did you mean 'max_epochs'\?\)"),
    ("lightning.chekpoint.keep_last=2", r"lightning\.chekpoint: unknown key \(did you mean 'checkpoint'\?\)"),
    ("lightning.deepspeed.overlap_com=true", r"lightning\.deepspeed\.overlap_com: unknown key \(did you mean "
                                             r"'overlap_comm'\?\)"),
    # types and ranges, naming the key
    ("lightning.checkpoint.every_n_steps=often", r"lightning\.checkpoint\.every_n_steps='often' is invalid; "
                                                 r"allowed: an integer >= 1"),
    ("lightning.checkpoint.keep_last=0", r"lightning\.checkpoint\.keep_last=0 is invalid"),
    ("model.base_learning_rate=fast", r"model\.base_learning_rate='fast' is invalid; allowed: a finite number >= 0"),
    ("model.base_learning_rate=-1.0e-4", r"model\.base_learning_rate=-0\.0001 is invalid"),
    ("model.base_learning_rate=.inf", r"model\.base_learning_rate=inf is invalid"),
    ("model.params.ema_decay_rate=1.5", r"model\.params\.ema_decay_rate=1\.5 is invalid"),
    ("data.params.target_height=300", r"data\.params\.target_height=300 is invalid; allowed: a positive multiple "
                                      r"of 64"),
    ("data.params.batch_size=0", r"data\.params\.batch_size=0 is invalid"),
    ("lightning.trainer.accumulate_grad_batches=two", r"lightning\.trainer\.accumulate_grad_batches='two' is "
                                                      r"invalid; allowed: int"),
    ("lightning.trainer.gradient_clip_val=-1.0", r"lightning\.trainer\.gradient_clip_val=-1\.0 is invalid"),
    ("lightning.trainer.precision=fp8", r"lightning\.trainer\.precision='fp8' is invalid; allowed: bf16-mixed"),
    ("lightning.trainer.strategy=fsdp", r"lightning\.trainer\.strategy='fsdp' is invalid"),
    ("lightning.trainer.devices=many", r"lightning\.trainer\.devices='many' is invalid"),
    ("lightning.deepspeed.overlap_comm=7", r"lightning\.deepspeed\.overlap_comm=7 is invalid; allowed: true or "
                                           r"false"),
    # shown but not applied: refused with the reason
    ("lightning.trainer.enable_checkpointing=false", r"lightning\.trainer\.enable_checkpointing: vwm always "
                                                     r"writes resumable checkpoints"),
    ("lightning.trainer.default_root_dir=/x", r"lightning\.trainer\.default_root_dir: the run directory is"),
    ("lightning.deepspeed.stage=3", r"lightning\.deepspeed\.stage: the ZeRO stage comes from "
                                    r"lightning\.trainer\.strategy"),
    ("lightning.modelcheckpoint.params.save_top_k=5", r"lightning\.modelcheckpoint\.params\.save_top_k: not "
                                                      r"applied: .*keep_last"),
    ("lightning.trainer.logger=csv", r"lightning\.trainer\.logger='csv' is invalid; allowed: true or false here"),
])
def test_schema_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_a_number_written_as_text_is_explained(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text(f"_base_: {TINY}\nmodel:\n  base_learning_rate: '1e-5'\n")
    with pytest.raises(ConfigError, match=r"model\.base_learning_rate='1e-5' is invalid; allowed: a finite number >= "
                                          r"0 \(YAML reads '1e-5' as text: write it with a decimal point, e\.g\. "
                                          r"1\.0e-5\)"):
        load_config(str(path))


def test_optimizer_learning_rate_is_range_checked():
    with pytest.raises(ConfigError, match=r"model\.params\.optimizer_config\.params\.lr=-0\.1 is invalid"):
        load_config(TINY, ["model.params.optimizer_config={target: torch.optim.AdamW, params: {lr: -0.1}}"])


def test_an_override_names_a_subset_instead_of_retyping_the_list():
    cfg = load_config(PHASE2, ["data.params.subsets.NuScenes.data_root=/data/nusc",
                               "data.params.subsets.NuScenes.anno_file=/data/annos/train.json",
                               "data.params.subsets.YouTube.params.data_root=/data/yt"])
    assert [s["target"] for s in cfg.data.params.subsets] == ["vwm.data.opendv.OpenDVSubset",
                                                               "vwm.data.nuscenes.NuScenesSubset"]
    assert dict(cfg.data.params.subsets[1].params) == {"data_root": "/data/nusc",
                                                       "anno_file": "/data/annos/train.json"}
    assert dict(cfg.data.params.subsets[0].params) == {"data_root": "/data/yt", "anno_file": "annos/YouTube.json"}
    cfg = load_config(TINY, ["data.params.subsets.ToyWorldSubset.length=7"])  # a node answers to its class name
    assert cfg.data.params.subsets[0].params.length == 7
    with pytest.raises(ConfigError, match=r"data\.params\.subsets\.NuScenes names no item .* names there: "
                                          r"\['ToyWorldSubset'\]"):
        load_config(TINY, ["data.params.subsets.NuScenes.data_root=/x"])
    with pytest.raises(ConfigError, match=r"unknown parameter of vwm\.data\.nuscenes\.NuScenesSubset"):
        load_config(PHASE2, ["data.params.subsets.NuScenes.dataroot=/x"])


def test_loggers_are_configurable_and_their_packages_checked_at_load(monkeypatch):
    cfg = load_config(TINY, ["lightning.logger={target: pytorch_lightning.loggers.CSVLogger, params: {name: csv}}"])
    assert cfg.lightning.logger.target == "pytorch_lightning.loggers.CSVLogger"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"lightning\.logger\.target='pytorch_lightning\.loggers\.WandbLogger' "
                                          r"needs the 'wandb' package, which is not installed: pip install wandb"):
        load_config(TINY, ["lightning.logger={target: pytorch_lightning.loggers.WandbLogger, params: {}}"])
    with pytest.raises(ConfigError, match="loggers must be pytorch_lightning.loggers classes"):
        load_config(TINY, ["lightning.logger={target: vwm.training.callbacks.MetricsFile}"])


def test_shipped_configs_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/training/vista_phase2_stage1.yaml")
    assert cfg.data.params.target_height == 320
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("configs/training/nope.yaml")


def test_a_constructor_error_names_the_dotted_key_of_its_node():
    """Values the schema cannot judge (they depend on each other) fail in the constructor; the error still names
    the innermost config node (issue #16 item 5)."""
    from vwm.config import ConstructorError, build_model

    cfg = load_config(TINY, ["model.params.network_config.params.num_heads=3"])
    with pytest.raises(ConstructorError, match=r"^model\.params\.network_config \(vwm\.models\.video_unet\.VideoUNet\): "
                                               r"set exactly one of num_heads \(3\) and num_head_channels"):
        build_model(cfg, device="meta")


def test_param_aliases_name_real_parameters_and_give_a_reason_for_every_drop():
    """The alias layer absorbs the reference's parameter names (issue #16 item 4): every renamed key lands on a
    constructor parameter, every dropped key is one the constructor does not take and says why."""
    import inspect

    from vwm.aliases import PARAM_ALIASES
    from vwm.config import locate

    for target, aliases in PARAM_ALIASES.items():
        params = inspect.signature(locate(target)).parameters
        assert set(aliases.renames.values()) <= set(params), target
        assert not set(aliases.renames) & set(params), target
        assert not set(aliases.drops) & set(params), target
        assert all(reason.strip() for reason in aliases.drops.values()), target
        assert not aliases.renames or aliases.why, target


def test_dropped_reference_keys_are_accepted_but_never_reach_the_constructor():
    from vwm.config import build_model

    drops = ["model.params.network_config.params.spatial_transformer_attn_type=softmax-xformers",
             "model.params.first_stage_config.params.loss_config={target: torch.nn.Identity}",
             "model.params.first_stage_config.params.encoder_config.params.out_ch=3"]
    model = build_model(load_config(TINY, drops), device="meta")
    assert not hasattr(model.first_stage_model, "loss")
