"""vwm.training.step: the condition-frame noise comes from the step's one generator."""

import torch

from vwm.data.batch import finalize_batch
from vwm.training.step import add_condition_frames, step_keys


def _batch(cond_aug):
    frames = torch.randint(0, 256, (2, 3, 3, 8, 8), dtype=torch.uint8)
    return finalize_batch({"img_seq": frames, "cond_aug": torch.tensor(cond_aug)})


def test_no_augmentation_draws_nothing():
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    batch = add_condition_frames(_batch([0.0, 0.0]), gen)
    assert torch.equal(gen.get_state(), state)
    assert torch.equal(batch["cond_frames"], batch["cond_frames_without_noise"])


def test_noise_is_scaled_per_clip():
    batch = add_condition_frames(_batch([0.0, 0.5]), torch.Generator().manual_seed(3))
    noise = batch["cond_frames"] - batch["cond_frames_without_noise"]
    assert torch.equal(noise[0], torch.zeros_like(noise[0])) and 0.3 < noise[1].std() < 0.7


def test_step_keys_prefer_the_data_position():
    assert step_keys(5, {"data_position": (1, 40)}, 9) == (5, 1, 40)
    assert step_keys(5, {}, 9) == (5, 9)


def test_finalize_batch_refuses_a_second_conversion():
    batch = _batch([0.0, 0.0])
    try:
        finalize_batch(batch)
    except ValueError as err:
        assert "img_seq" in str(err)
    else:
        raise AssertionError("a float batch must be refused")


def test_a_batch_with_its_own_cond_frames_keeps_them():
    """A caller that built `cond_frames` itself (the reference's datasets do) gets them used as given."""
    batch = _batch([0.5, 0.5])
    given = torch.full_like(batch["cond_frames_without_noise"], 0.25)
    batch["cond_frames"] = given
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    out = add_condition_frames(batch, gen)
    assert out["cond_frames"] is given and torch.equal(gen.get_state(), state)
