"""VideoDataModule: reference configs, batch contract, deterministic + resumable sampling, broken data."""

from __future__ import annotations

import glob
import json
import logging
import os
import time

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from conftest import SHARED_DIR
from fixtures_data import BROKEN_KINDS, nuscenes_entry, truncate, write_frame_folder, write_mp4
from vwm.actions import ACTION_FEATURES, ACTION_KEYS
from vwm.data.base import BrokenSampleError, Clip
from vwm.data.datamodule import Sampler, VideoDataModule
from vwm.data.sources import DataBudgetError
from vwm.training.step import add_condition_frames

T, H, W = 4, 64, 128
SIZE = {"num_frames": T, "target_height": H, "target_width": W}


class FakeSubset:
    """In-memory subset: frame value = index; `broken` indices raise; optional actions and decode delay."""

    def __init__(self, size: int, *, broken: frozenset[int] = frozenset(), actions: bool = False,
                 delay: float = 0.0, num_frames: int = T, target_height: int = H, target_width: int = W):
        self.size, self.broken, self.actions, self.delay = size, broken, actions, delay
        self.num_frames, self.target_height, self.target_width = num_frames, target_height, target_width

    def __len__(self) -> int:
        return self.size

    def load_clip(self, index: int) -> Clip:
        time.sleep(self.delay)
        if index in self.broken:
            raise BrokenSampleError(f"fake/{index}.jpg", "OSError: broken on purpose")
        frames = torch.full((self.num_frames, 3, self.target_height, self.target_width), index % 256,
                            dtype=torch.uint8)
        actions = {}
        if self.actions:
            actions = {k: torch.full((n,), float(index)) for k, n in ACTION_FEATURES.items()
                       if not (k in ("speed", "angle") and index % 3 == 0)}
        return Clip(frames=frames, actions=actions, source=f"fake/{index}")


def _dm(subsets, **kwargs) -> VideoDataModule:
    params = {"batch_size": 2, "samples_per_epoch": 16, "seed": 0, **SIZE, **kwargs}
    return VideoDataModule(subsets=subsets, **params)


def _ids(dm: VideoDataModule, epochs: int = 1) -> list[list[int]]:
    """Sample ids of `epochs` full passes over a new training loader (each pass moves to the next epoch)."""
    loader = dm.train_dataloader()
    return [row for _ in range(epochs) for batch in loader for row in batch["sample_id"].tolist()]


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory):
    """OpenDV frame folders and nuScenes-schema annotations over real JPEG frames."""
    root = tmp_path_factory.mktemp("mixed")
    write_frame_folder(str(root / "YouTube"), "drive_a", 10)
    write_frame_folder(str(root / "YouTube"), "drive_b", 10, tag=1)
    frames = [os.path.relpath(p, root / "nuscenes")
              for p in write_frame_folder(str(root / "nuscenes"), "samples/CAM_FRONT", 6, tag=2)]
    entries = [nuscenes_entry(frames, cmd=i % 4) for i in range(3)]
    entries += [nuscenes_entry(frames, speed=[], angle=[]), nuscenes_entry(frames, z=-1.0),
                nuscenes_entry(frames[1:], speed=[], angle=[], z=-1.0)]
    (root / "annos").mkdir()
    (root / "annos" / "nuScenes.json").write_text(json.dumps(entries))
    (root / "annos" / "YouTube.json").write_text(json.dumps(
        [{"folder_name": f"drive_{c}", "first_frame": f"{i:09d}.jpg"} for c in "ab" for i in range(6)]))
    return root


def _mixed_subsets(root) -> list[dict]:
    return [{"target": "vwm.data.opendv.OpenDVSubset",
             "params": {"data_root": str(root / "YouTube"),
                        "anno_file": str(root / "annos" / "YouTube.json")}},
            {"target": "vwm.data.nuscenes.NuScenesSubset",
             "params": {"data_root": str(root / "nuscenes"),
                        "anno_file": str(root / "annos" / "nuScenes.json"),
                        "turn_repeat": 1, "complete_repeat": 1}}]


# ------------------------------------------------------------------------------------------ configuration

@pytest.mark.parametrize("name", ["training__vista_phase1", "training__vista_phase2_stage1",
                                  "training__vista_phase2_stage2", "example__nusc_train"])
def test_reference_data_sections_construct_unchanged(name, tmp_path, monkeypatch):
    cfg = OmegaConf.load(os.path.join(SHARED_DIR, "reference_configs", f"{name}.yaml"))
    assert cfg.data.target == "vwm.data.dataset.Sampler" and Sampler is VideoDataModule
    dm = Sampler(**cfg.data.params)
    assert dm.subset_specs == list(cfg.data.params.subsets) and dm.num_frames == 25
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data_root='data/(YouTube|nuscenes)' is not an existing"):
        dm.setup("fit")
    write_frame_folder("data/YouTube", "v", 25)
    os.makedirs("data/nuscenes/samples/CAM_FRONT")
    os.makedirs("annos")
    with pytest.raises(FileNotFoundError, match=r"anno_file='annos/(YouTube|nuScenes).json' is not an"):
        Sampler(**cfg.data.params).setup("fit")
    json.dump([{"folder_name": "v", "first_frame": "000000000.jpg"}], open("annos/YouTube.json", "w"))
    frames = [f"samples/CAM_FRONT/{i}.jpg" for i in range(25)]
    json.dump([nuscenes_entry(frames)], open("annos/nuScenes.json", "w"))
    dm = Sampler(**cfg.data.params)
    dm.setup("fit")
    assert [type(s).__name__ for s in dm.dataset.subsets] == [
        {"YouTube": "OpenDVSubset", "NuScenes": "NuScenesSubset"}[s] for s in cfg.data.params.subsets]
    assert len(dm.dataset) == cfg.data.params.samples_per_epoch


def test_constructor_errors_name_the_field(mixed_root):
    with pytest.raises(ValueError, match="subsets item 'Waymo' is not one of"):
        _dm(["Waymo"]).setup()
    with pytest.raises(ValueError, match=r"probs=\[1, 2\] must be 1 non-negative numbers"):
        _dm(["YouTube"], probs=[1, 2])
    with pytest.raises(ValueError, match="target_height=100 must be a positive multiple of 64"):
        _dm(["YouTube"], target_height=100)
    with pytest.raises(ValueError, match="action_visibility='some' must be 'rotate' or 'all'"):
        _dm(["YouTube"], action_visibility="some")
    bad = _mixed_subsets(mixed_root)
    bad[0]["params"]["stride_"] = 2
    with pytest.raises(ValueError, match=r"subsets params \['stride_'\] are not accepted by .*allowed: \["):
        _dm(bad).setup()
    bad[0]["params"] = {"num_frames": 9}
    with pytest.raises(ValueError, match=r"\['num_frames'\] of vwm.data.opendv.OpenDVSubset are derived"):
        _dm(bad).setup()
    with pytest.raises(ValueError, match="prebuilt subset FakeSubset has num_frames=3"):
        _dm([FakeSubset(4, num_frames=3)]).setup()
    wrong = FakeSubset(4)
    wrong.num_frames = 3  # a subset that ignores what it was built with
    dm = _dm([FakeSubset(4)])
    dm.setup()
    dm.dataset.subsets[0] = wrong
    with pytest.raises(ValueError, match=r"subset FakeSubset returned frames \(3, 3, 64, 128\) torch.uint8"):
        dm.dataset[(0, 0)]


# ------------------------------------------------------------------------------------------ batch contract

def test_spawned_workers_give_the_batches_of_in_process_loading(mixed_root):
    """data.params.worker_start=spawn (the remedy for fork's rare start-up deadlock): real OpenDV + nuScenes
    subsets are pickled into fresh interpreters and give exactly the batches loaded in-process."""
    def batches(**kwargs):
        dm = _dm(_mixed_subsets(mixed_root), batch_size=3, samples_per_epoch=6, **kwargs)
        dm.setup()
        loader = dm.train_dataloader()
        method = loader.multiprocessing_context and loader.multiprocessing_context.get_start_method()
        assert method == kwargs.get("worker_start")
        return list(loader)

    spawned, plain = batches(num_workers=2, worker_start="spawn"), batches()
    assert len(spawned) == len(plain) == 2
    for a, b in zip(spawned, plain):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
    with pytest.raises(ValueError, match=r"worker_start='forkserver' must be one of \[None, 'fork', 'spawn'\]"):
        _dm(["YouTube"], worker_start="forkserver")


def test_batch_contract_with_mixed_action_types(mixed_root):
    dm = _dm(_mixed_subsets(mixed_root), batch_size=6, samples_per_epoch=24, convert_on_device=False)
    dm.setup()
    youtube_rows = nuscenes_rows = 0
    for batch in dm.train_dataloader():
        assert batch["img_seq"].shape == (6, T, 3, H, W) and batch["img_seq"].dtype == torch.float32
        assert batch["img_seq"].min() >= -1.0 and batch["img_seq"].max() <= 1.0
        key = "cond_frames_without_noise"  # the noisy cond_frames are the training step's (vwm.training.step)
        assert batch[key].shape == (6, 3, H, W) and torch.equal(batch[key], batch["img_seq"][:, 0])
        assert "cond_frames" not in batch
        for key, value in (("cond_aug", 0.0), ("fps_id", 9.0), ("motion_bucket_id", 127.0)):
            assert batch[key].shape == (6,) and batch[key].dtype == torch.float32
            assert (batch[key] == value).all()
        assert batch["action_mask"].shape == (6, 5) and batch["action_mask"].dtype == torch.bool
        assert batch["n_skipped"].shape == (6,) and batch["n_skipped"].dtype == torch.long
        for i, key in enumerate(ACTION_KEYS):
            assert batch[key].shape == (6, ACTION_FEATURES[key]) and batch[key].dtype == torch.float32
            assert (batch[key][~batch["action_mask"][:, i]] == 0).all()
        subset = batch["sample_id"][:, 2]
        mask = batch["action_mask"]
        assert not mask[subset == 0].any()  # YouTube clips are action-free
        shown = mask[subset == 1]
        steer = shown[:, 2] | shown[:, 3]
        modalities = shown[:, 0].int() + shown[:, 1].int() + steer.int() + shown[:, 4].int()
        assert (modalities == 1).all()  # exactly one modality per nuScenes clip
        youtube_rows += int((subset == 0).sum())
        nuscenes_rows += int((subset == 1).sum())
    assert youtube_rows > 0 and nuscenes_rows > 0


def test_uint8_until_the_device_hook(mixed_root):
    raw_dm = _dm(_mixed_subsets(mixed_root))
    raw_dm.setup()
    raw = next(iter(raw_dm.train_dataloader()))
    assert raw["img_seq"].dtype == torch.uint8 and "cond_frames" not in raw
    converted = raw_dm.on_after_batch_transfer(dict(raw), 0)
    ref_dm = _dm(_mixed_subsets(mixed_root), convert_on_device=False)
    ref_dm.setup()
    ref = next(iter(ref_dm.train_dataloader()))
    assert set(converted) == set(ref)
    for key in ref:
        assert torch.equal(converted[key], ref[key]), key


def test_cond_aug_noise_is_deterministic():
    """The data carries cond_aug; the step draws the noise from its one generator (vwm.training.step)."""
    dm = _dm([FakeSubset(8)], cond_aug=0.02, convert_on_device=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert "cond_frames" not in batch and (batch["cond_aug"] == 0.02).all()
    a = add_condition_frames(dict(batch), torch.Generator().manual_seed(7))
    b = add_condition_frames(dict(batch), torch.Generator().manual_seed(7))
    noise = a["cond_frames"] - a["cond_frames_without_noise"]
    assert torch.equal(a["cond_frames"], b["cond_frames"]) and 0.01 < noise.std() / 0.02 < 1.5


def test_visibility_policies():
    rotate = _dm([FakeSubset(30, actions=True)], samples_per_epoch=200, batch_size=8)
    rotate.setup()
    everything = _dm([FakeSubset(30, actions=True)], samples_per_epoch=200, batch_size=8,
                     action_visibility="all")
    everything.setup()
    counts = torch.zeros(5)
    for shown, full in zip(rotate.train_dataloader(), everything.train_dataloader()):
        assert torch.equal(shown["sample_id"], full["sample_id"])
        no_can = full["sample_id"][:, 3] % 3 == 0
        assert torch.equal(full["action_mask"][:, 2], ~no_can) and full["action_mask"][:, [0, 1, 4]].all()
        assert not (shown["action_mask"] & ~full["action_mask"]).any()  # only available actions are shown
        assert torch.equal(shown["action_mask"][:, 2], shown["action_mask"][:, 3])  # speed + angle together
        assert (shown["action_mask"].sum(1) - shown["action_mask"][:, 3].int() == 1).all()
        counts += shown["action_mask"].sum(0)
    assert (counts > 25).all()  # every modality is drawn


# ------------------------------------------------------------------------------------------ sampling

def test_sampler_is_deterministic_differs_by_rank_seed_epoch_and_ignores_workers():
    def ids(rank=0, seed=0, workers=0, epochs=2):
        dm = _dm([FakeSubset(50), FakeSubset(7)], seed=seed, num_workers=workers, probs=[3, 1])
        dm.setup(rank=rank, world_size=2)
        return _ids(dm, epochs)

    first = ids()
    assert len(first) == 16 and ids() == first
    assert ids(workers=2) == first
    assert [r[1] for r in first[:8]] == [2 * k for k in range(8)]  # rank 0 takes even stream positions
    other_rank = ids(rank=1)
    assert [r[1] for r in other_rank[:8]] == [2 * k + 1 for k in range(8)]
    assert [r[2:] for r in other_rank] != [r[2:] for r in first]
    assert [r[2:] for r in ids(seed=1)] != [r[2:] for r in first]
    assert [r[2:] for r in first[:8]] != [r[2:] for r in first[8:]]  # epochs differ
    plain = _dm([FakeSubset(50), FakeSubset(7)], probs=[3, 1])
    plain.setup()
    assert plain.dataset[2]["sample_id"] == plain.dataset[(0, 2)]["sample_id"] == (0, 2, *first[1][2:])
    from types import SimpleNamespace

    attached = _dm([FakeSubset(5)])
    attached.trainer = SimpleNamespace(global_rank=2, world_size=3)
    attached.setup("fit")
    assert (attached.rank, attached.world_size) == (2, 3)
    both = [r for rank in (0, 1) for r in ids(rank=rank, epochs=1)]
    assert len({r[1] for r in both}) == 16  # ranks partition the stream
    subsets = [r[2] for r in ids(epochs=30)]
    assert 0.65 < subsets.count(0) / len(subsets) < 0.85  # probs 3:1


def test_sequential_mode_visits_every_clip_once():
    dm = _dm([FakeSubset(5), FakeSubset(7)], shuffle=False, samples_per_epoch=None, batch_size=3)
    dm.setup()
    assert sorted((r[2], r[3]) for r in _ids(dm)) == [(0, i) for i in range(5)] + [(1, i) for i in range(7)]


def test_state_dict_restores_the_exact_position():
    def fresh():
        dm = _dm([FakeSubset(40), FakeSubset(9)], batch_size=3, samples_per_epoch=20)
        dm.setup(rank=1, world_size=2)
        return dm

    reference = _ids(fresh(), epochs=3)  # 4 batches of 3 per epoch and rank
    assert [r[0] for r in reference] == [0] * 12 + [1] * 12 + [2] * 12
    dm = fresh()
    consumed = _ids(dm, epochs=2)[: 12 + 6]
    dm.set_position(epoch=1, position=12)  # 2 batches of 3 on each of 2 ranks
    state = dm.state_dict()
    assert state["epoch"] == 1 and state["position"] == 12 and state["world_size"] == 2
    restored = fresh()
    restored.load_state_dict(state)
    loader = restored.train_dataloader()
    loader.sampler.set_epoch(7)  # a trainer's epoch counter does not move the data position
    rest = [r for _ in range(2) for batch in loader for r in batch["sample_id"].tolist()]
    assert consumed + rest == reference
    assert len(loader) == 4  # the loop still sees the full epoch length
    changed = _dm([FakeSubset(40), FakeSubset(9)], batch_size=4, samples_per_epoch=20)
    changed.setup(rank=1, world_size=2)
    with pytest.raises(ValueError, match="data order changed.*batch_size: saved 3, now 4"):
        changed.load_state_dict(state)


@pytest.mark.parametrize("saved_world, batches, new_world", [(2, 3, 1), (4, 1, 2), (1, 3, 2), (2, 2, 3)])
def test_a_new_world_size_continues_the_stream_without_repeating_or_skipping(saved_world, batches, new_world):
    def ranks(world, state=None):
        out = []
        for rank in range(world):
            dm = _dm([FakeSubset(40), FakeSubset(9)], batch_size=2, samples_per_epoch=22)
            dm.setup(rank=rank, world_size=world)
            if state is not None:
                dm.load_state_dict(state)
            out.append(dm)
        return out

    from types import SimpleNamespace

    saved = ranks(saved_world)
    for dm in saved:
        dm.trainer = SimpleNamespace(training=True)  # batches reach training steps
    loaders = [iter(dm.train_dataloader()) for dm in saved]
    before = []
    for _ in range(batches):  # lockstep, as ranks train, each step marking its batch consumed
        for dm, loader in zip(saved, loaders):
            batch = dm.on_before_batch_transfer(next(loader), 0)
            before += batch["sample_id"].tolist()
    assert len({tuple(dm.position()) for dm in saved}) == 1
    state = saved[0].state_dict()
    assert (state["epoch"], state["position"], state["world_size"]) == (0, batches * 2 * saved_world, saved_world)
    after = [row for dm in ranks(new_world, state) for row in _ids(dm)]  # each rank to the end of epoch 0
    positions = sorted(r[1] for r in before + after if r[0] == 0)
    per_step = 2 * new_world
    padded = -(-(22 - state["position"]) // per_step) * per_step + state["position"]
    assert positions == list(range(padded)) and padded - 22 < per_step  # each position once, padding at the end
    reference = {r[1]: r[2:] for r in _ids(ranks(1)[0])}
    assert all(reference[r[1]] == r[2:] for r in before + after if r[1] < 22)  # same clip at each position
    for dm in ranks(new_world, state):  # the cursor then moves to the next epoch on every new rank
        _ids(dm)
        assert dm.position() == (1, 0)


def test_batches_prefetched_for_an_epoch_the_trainer_ends_early_are_drawn_again():
    # A trainer may end its epoch before the data epoch ends (its batch count restored from a run on more ranks,
    # or limit_train_batches), after the workers drew the epoch's last indices; only consumed batches count.
    from types import SimpleNamespace

    dm = _dm([FakeSubset(30)], batch_size=2, samples_per_epoch=8, num_workers=2)
    dm.setup()
    dm.trainer = SimpleNamespace(training=True)
    dm.set_position(0, 6)
    loader = dm.train_dataloader()
    batches = iter(loader)  # the workers draw the last batch (positions 6, 7) at once
    del batches  # and the trainer's epoch ends before using it
    assert dm.position() == (0, 6)
    rest = [r[:2] for batch in loader for r in batch["sample_id"].tolist()]
    assert rest == [[0, 6], [0, 7]]


def test_a_version_1_data_state_counts_batches_per_rank():
    dm = _dm([FakeSubset(40)], batch_size=3, samples_per_epoch=20)
    dm.setup(rank=0, world_size=1)
    state = {**dm.state_dict(), "version": 1, "batches_consumed": 2, "world_size": 2}
    del state["position"]
    dm.load_state_dict(state)
    assert dm.position() == (0, 12)


class _Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        assert batch["img_seq"].dtype == torch.float32 and batch["img_seq"].shape[1:] == (T, 3, H, W)
        self.seen.append(batch["sample_id"][:, 1:].tolist())
        return (self.weight - batch["img_seq"].mean()).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SaveAtEnd(pl.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.path)


def _fit(tmp_path, max_steps: int, ckpt_path: str | None = None) -> _Recorder:
    from pytorch_lightning.callbacks import ModelCheckpoint

    model = _Recorder()
    callbacks = [ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=6, save_top_k=-1),
                 _SaveAtEnd(str(tmp_path / f"end-{max_steps}.ckpt"))]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), callbacks=callbacks)
    dm = _dm([FakeSubset(30), FakeSubset(5)], batch_size=2, samples_per_epoch=8)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_lightning_resume_mid_epoch_sees_the_same_samples(tmp_path):
    uninterrupted = _fit(tmp_path / "u", max_steps=11).seen  # 4 batches per epoch: epochs 0, 1 and 3 of 2
    _fit(tmp_path / "r", max_steps=6)  # checkpoint after step 6: epoch 1, batch 2 of 4
    ckpt = glob.glob(str(tmp_path / "r" / "ckpt" / "*step=6.ckpt"))
    assert len(ckpt) == 1
    checkpoint = torch.load(ckpt[0], weights_only=True)
    state = checkpoint["VideoDataModule"]
    assert (state["epoch"], state["position"]) == (1, 4)
    loader_state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"epoch": 1, "position": 4}]
    resumed = _fit(tmp_path / "r", max_steps=11, ckpt_path=ckpt[0]).seen
    assert resumed == uninterrupted[6:]
    # Checkpoints written when max_steps stops a run (Lightning then counts the cut epoch as finished):
    # mid-epoch after step 6, and exactly at the end of epoch 1 after step 8.
    for stop in (6, 8):
        end = str(tmp_path / "r" / f"end-{stop}.ckpt")
        if stop == 8:
            _fit(tmp_path / "r", max_steps=8)
        state = torch.load(end, weights_only=True)["VideoDataModule"]
        assert (state["epoch"], state["position"]) == {6: (1, 4), 8: (2, 0)}[stop]
        assert _fit(tmp_path / f"e{stop}", max_steps=11, ckpt_path=end).seen == uninterrupted[stop:]


# ------------------------------------------------------------------------------------------ broken data

def test_broken_files_are_skipped_counted_and_logged_once(tmp_path, caplog):
    root = tmp_path / "YouTube"
    entries, broken_paths = [], []
    kinds = ["good0", "truncated", "good1", "random_bytes", "bomb", "good2", "missing", "mp4"]
    for c, kind in enumerate(kinds):
        folder = f"clip{c}"
        if kind == "mp4":
            truncate(write_mp4(str(root / "clip.mp4"), 10), 0.5)
            entries.append({"video": "clip.mp4", "first_frame": 0})
            broken_paths.append(str(root / "clip.mp4"))
            continue
        paths = write_frame_folder(str(root), folder, T)
        entries.append({"folder_name": folder, "first_frame": "000000000.jpg"})
        if not kind.startswith("good"):
            os.remove(paths[2])
            BROKEN_KINDS[kind](paths[2])
            broken_paths.append(paths[2])
    (tmp_path / "anno.json").write_text(json.dumps(entries))
    broken = {1, 3, 4, 6, 7}
    subset = {"target": "vwm.data.opendv.OpenDVSubset",
              "params": {"data_root": str(root), "anno_file": str(tmp_path / "anno.json")}}
    dm = _dm([subset], batch_size=4, samples_per_epoch=40, max_failure_fraction=0.9)
    dm.setup()
    drawn_broken = 0
    for position in range(40):
        attempt = 0
        while dm.dataset.draw(0, position, attempt)[1] in broken:
            drawn_broken, attempt = drawn_broken + 1, attempt + 1
    with caplog.at_level(logging.WARNING, logger="vwm.data.datamodule"):
        skipped = 0
        for batch in dm.train_dataloader():
            assert batch["img_seq"].shape == (4, T, 3, H, W)
            assert not set(batch["sample_id"][:, 3].tolist()) & broken
            skipped += int(batch["n_skipped"].sum())
    assert skipped == drawn_broken > len(broken)
    logged = [r.getMessage() for r in caplog.records if "skipping broken sample" in r.getMessage()]
    assert len(logged) == len(broken)
    for path in broken_paths:
        assert sum(path in m for m in logged) == 1
    assert any("DecompressionBombError" in m or "decompression bomb" in m for m in logged)


@pytest.mark.parametrize("workers", [0, 1])
def test_all_broken_stops_with_a_clear_error(workers):
    dm = _dm([FakeSubset(10, broken=frozenset(range(10)))], num_workers=workers, max_consecutive_failures=12)
    dm.setup()
    start = time.monotonic()
    message = r"12 consecutive broken samples.*rate 12/12 = 100.0%.*fake/\d+\.jpg"
    with pytest.raises(DataBudgetError, match=message):
        next(iter(dm.train_dataloader()))
    assert time.monotonic() - start < 10


def test_failure_fraction_budget():
    dm = _dm([FakeSubset(10, broken=frozenset({0, 1, 2, 3}))], samples_per_epoch=400,
             max_consecutive_failures=50, max_failure_fraction=0.2)
    dm.setup()
    message = r"broken-sample rate \d+/1\d\d = \d+\.\d% .* max_failure_fraction=0.2"
    with pytest.raises(DataBudgetError, match=message):
        _ids(dm)


def test_loader_options_and_timeout_on_a_blocked_decoder():
    dm = _dm([FakeSubset(8, delay=1.5)], batch_size=1, num_workers=1, timeout=0.5, prefetch_factor=1,
             persistent_workers=False)
    dm.setup()
    loader = dm.train_dataloader()
    assert (loader.timeout, loader.prefetch_factor, loader.persistent_workers) == (0.5, 1, False)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"DataLoader timed out after 0.5 seconds"):
        next(iter(loader))
    assert time.monotonic() - start < 3.0  # worker start-up plus the timeout, not the 8 x 1.5 s decode
    quick = _dm([FakeSubset(8)], num_workers=2)
    quick.setup()
    loader = quick.train_dataloader()
    assert loader.persistent_workers and loader.timeout == 600.0 and loader.num_workers == 2
    assert np.isclose(_dm([FakeSubset(8)]).timeout, 600.0)
