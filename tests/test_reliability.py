"""What a run survives (issue #12): partial phase families refused."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_MODEL, build_tiny

from vwm.checkpoint import CheckpointError, load_weights
from vwm.cli.export import main as export_main


# ------------------------------------------------------------------------------ 7. partial phase families


PHASE2 = ("model.params.network_config.params.add_lora=true",)


@pytest.mark.parametrize("family", ["action_control", "cond_time_stack_embed", "lora"])
def test_a_phase_family_may_be_missing_only_as_a_whole(family):
    from vwm.checkpoint import family_of

    source = {k: v for k, v in build_tiny(*PHASE2).state_dict().items() if not k.startswith("model_ema.")}
    members = sorted(k for k in source if family_of(k) == family)
    assert len(members) > 1
    whole = {k: v for k, v in source.items() if family_of(k) != family}
    assert family in load_weights(build_tiny(*PHASE2), whole).initialised
    partial = {k: v for k, v in source.items() if k != members[0]}
    with pytest.raises(CheckpointError, match=rf"has {len(members) - 1} of the {len(members)} {family} tensors.*"
                                              rf"{members[0]}"):
        load_weights(build_tiny(*PHASE2), partial)


def test_orphan_ema_shadows_are_refused_alike_by_finetune_and_export(tmp_path, capsys):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in build_tiny().state_dict().items()}
    state["model_ema.diffusion_modelnosuchlayerweight"] = torch.zeros(3)
    path = str(tmp_path / "orphan.safetensors")
    save_file(state, path)
    message = "EMA shadows without a matching weight: model_ema.diffusion_modelnosuchlayerweight"
    with pytest.raises(CheckpointError, match=message):
        load_weights(build_tiny(), path)
    for flag in ("--ema", "--no-ema"):
        assert export_main([path, str(tmp_path / "o.safetensors"), "--config", TINY_MODEL, flag]) == 2
        assert message in capsys.readouterr().err
