"""Learning probe for small world-model configs (the demo's): trains in-process and reports how much the model
uses its actions and which way its rollouts turn under "steer left" / "steer right". One JSON line per evaluation.

    python bench/demo_probe.py --config configs/demo/toyworld.yaml --steps 400 [key=value overrides ...]
    python bench/demo_probe.py --ckpt outputs/demo/toyworld.safetensors --indices 0 1 2 3 --sampling 12:3:4:80

Every --eval_every steps, on a fixed held-out batch of explore-policy toy clips and fixed noise per sigma: the x0
error of the non-condition frames with the true actions, with the actions of another clip (shuffled), and with the
action embeddings zeroed. `action_gain` = shuffled / true - 1: > 0 once the model uses the actions. At the end: the
demo's measure (vwm.data.toyworld.lateral_motion) of EMA rollouts from held-out start frames under constant
steering left and right (the demo's sampler settings, scripts/demo.py SAMPLING, unless --n_steps, --cfg_scale,
--sigma_min, --sigma_max say otherwise). The same config trains the same model under train.py; this loop only
leaves out Lightning, so it runs the sweep variants fast and side by side on one GPU.

With --ckpt (an export of bin_to_st.py, e.g. the demo's toyworld.safetensors) it trains nothing and runs only
the rollout test on that model, once per --sampling variant ("n_steps:cfg_scale:sigma_min:sigma_max"): how
sampler settings change the verdict of one trained model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vwm.actions import ACTION_KEYS  # noqa: E402
from vwm.config import build_model, instantiate, load_config  # noqa: E402
from vwm.data.batch import action_batch  # noqa: E402
from vwm.training.step import add_condition_frames  # noqa: E402
from vwm.data.toyworld import ToyWorldSubset, lateral_motion, render_rollout, steering_plan  # noqa: E402
from vwm.eval.psnr import psnr_per_frame  # noqa: E402
from vwm.media import to_uint8_frames  # noqa: E402
from vwm.rollout import Placement, RolloutSettings, rollout, sample_generator  # noqa: E402
from vwm.sampling.actions import normalise_actions  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "scripts"))
from demo import SAMPLING, SPEED_MS, STEER_DEG  # noqa: E402


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def eval_batch(cfg, n: int, seed: int) -> dict:
    """The first batch of n clips of the config's data with its subsets re-seeded (held out from training)."""
    data = copy.deepcopy(cfg.data)
    data.params.batch_size = n
    data.params.num_workers = 0
    for spec in data.params.subsets:
        spec.params.seed = seed
    dm = instantiate(data, seed=seed)
    dm.setup("fit", rank=0, world_size=1)
    return dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)


@torch.no_grad()
def action_use(engine, batch: dict, sigmas: list[float]) -> dict:
    """x0 MSE of the non-condition frames per sigma with true / shuffled / zeroed actions."""
    engine.eval()
    gen = torch.Generator(device=engine.device).manual_seed(1234)
    batch = add_condition_frames(dict(batch), gen)  # the training step adds them; the data's batch has none
    z = engine.latents_of(batch, gen)
    shuffled = dict(batch)
    for k in (*ACTION_KEYS, "action_mask"):
        if k in batch:
            shuffled[k] = batch[k].roll(1, dims=0)
    conditioner = engine.conditioner
    true, zeroed = conditioner.get_unconditional_conditioning(batch, force_uc_zero_embeddings=list(ACTION_KEYS))
    shuf, _ = conditioner.get_unconditional_conditioning(shuffled, force_uc_zero_embeddings=[])
    mask = torch.zeros(z.shape[:2], device=z.device)
    mask[:, 0] = 1.0
    out = {}
    for sigma in sigmas:
        noise = torch.randn(z.shape, generator=gen, device=z.device)
        s = torch.full((z.shape[0],), sigma, device=z.device)
        noised = z + noise * sigma * (1 - mask)[:, :, None, None, None]
        errs = {}
        for name, c in (("true", true), ("shuffled", shuf), ("zeroed", zeroed)):
            pred = engine.denoiser(engine.model, noised, s, c, mask).float()
            errs[name] = float(((pred - z)[:, 1:] ** 2).mean())
        errs["action_gain"] = errs["shuffled"] / errs["true"] - 1.0
        out[f"{sigma:g}"] = {k: round(v, 5) for k, v in errs.items()}
    engine.train()
    return out


@torch.no_grad()
def steering_test(engine, cfg, indices: list[int], settings: RolloutSettings, speed: float, steer_deg: float,
                  prepared: bool = False, ema: bool = True, save: str | None = None) -> dict:
    """The demo's measures on EMA rollouts (the live weights with ema=False) from the held-out TOY start frames
    of sample.py (seed 1): lateral motion and its sign test, PSNR against the true future. `prepared`: the engine
    already holds the weights to sample (an export) and may be changed in place. `save`: an .npz path for the
    generated frames (uint8 (N, T, 3, H, W) per direction). With OpenCV installed, also the action-following
    score of the rollouts (heading error against the commanded trajectory, as scripts/demo.py reports it)."""
    if not prepared:
        use_ema = ema and engine.use_ema
        with engine.model_ema.scope(engine.model) if use_ema else contextlib.nullcontext():
            engine = copy.deepcopy(engine)  # Placement prepares the model for inference in place
    t = engine.num_frames
    h, w = cfg.data.params.target_height, cfg.data.params.target_width
    subset = ToyWorldSubset(t, h, w, length=max(indices) + 1, seed=1)
    frames = torch.stack([subset.load_clip(i).frames[:1] for i in indices]).float() / 127.5 - 1.0
    placement = Placement(engine, engine.device)
    result, psnr, saved, scores = {}, [], {}, []
    try:  # the action-following score (vwm.eval.action_score) tracks points with OpenCV
        from vwm.eval.action_score import agreement, score_clip
        from vwm.eval.action_validation import toy_intrinsics
        camera = toy_intrinsics(h, w)
    except ImportError:
        camera = None
    for name, sign in (("left", 1.0), ("right", -1.0)):
        plan = normalise_actions(steering_plan(speed, sign * steer_deg, seed=1, height=h, width=w,
                                               num_frames=t, start_index=indices[0]))
        video = rollout(engine, frames, [action_batch([plan] * len(indices))],
                        [sample_generator(0, i) for i in indices], settings, placement).video
        clips = [render_rollout([speed] * t, [sign * steer_deg] * t, seed=1, height=h, width=w,
                                start_index=i, num_frames=t) for i in indices]
        truth = [c.frames for c in clips]
        result[name] = [round(lateral_motion(v), 4) for v in video]
        result[name + "_truth"] = [round(lateral_motion(f), 4) for f in truth]
        # the demo's fidelity measure: PSNR of frames 1.. against the true future (frame 0 is the given frame)
        generated = np.stack([to_uint8_frames(v.cpu()).transpose(0, 3, 1, 2) for v in video])
        real = np.stack([f.numpy() for f in truth])
        psnr += [psnr_per_frame(g[1:], r[1:]) for g, r in zip(generated, real)]
        saved[name] = generated
        if camera is not None:
            scores += [score_clip(g, c.actions["trajectory"].numpy(), camera)
                       for g, c in zip(generated, clips)]
    psnr_frames = np.mean(psnr, axis=0)
    result["psnr_db_per_frame"] = [round(float(v), 2) for v in psnr_frames]
    result["psnr_db_mean"] = round(float(psnr_frames.mean()), 3)
    if scores:
        following = agreement(scores)
        result["action_following"] = {k: following[k] for k in ("heading_error_deg", "final_heading_slope",
                                                                  "turn_direction_accuracy")}
    if save is not None:
        np.savez_compressed(save, indices=np.array(indices), **saved)
    left, right = result["left"], result["right"]
    agree = sum(a > b for a, b in zip(left, right))
    result["left_gt_right"] = f"{agree}/{len(left)}"
    result["sign_test_p"] = round(sum(math.comb(len(left), k) for k in range(agree, len(left) + 1))
                                  / 2 ** len(left), 5)
    result["mean_left"] = round(sum(left) / len(left), 4)
    result["mean_right"] = round(sum(right) / len(right), 4)
    result["sampling"] = {k: getattr(settings, k) for k in ("n_steps", "cfg_scale", "sigma_min", "sigma_max",
                                                             "guidance_sigma_min", "sampler",
                                                             "final_antithetic")}
    return result


def evaluate_export(args) -> int:
    """--ckpt: the rollout test of an exported model under each --sampling variant; one JSON line each."""
    from vwm.cli.sample import SampleOptions, load_model, model_config

    opts = SampleOptions(ckpt=args.ckpt)
    cfg, _ = model_config(opts)
    cfg.data = load_config([args.config]).data  # the export carries the model only: frame size from --config
    variants = args.sampling or [":".join(str(v) for v in (args.n_steps, args.cfg_scale, args.sigma_min,
                                                             args.sigma_max))]
    for variant in variants:
        settings = parse_sampling(variant)
        engine = load_model(opts, cfg).to(args.device)
        t0 = time.perf_counter()
        row = steering_test(engine, cfg, args.indices, settings, SPEED_MS, STEER_DEG, prepared=True)
        print(json.dumps({"tag": args.tag, "ckpt": args.ckpt, "device": args.device,
                          "seconds": round(time.perf_counter() - t0, 1), "steering": row}), flush=True)
    return 0


def parse_sampling(variant: str) -> RolloutSettings:
    """"n_steps:cfg_scale:sigma_min:sigma_max[:field=value...]" -> RolloutSettings; the optional trailing fields
    set further RolloutSettings fields, e.g. "12:3:4:80:guidance_sigma_min=10:sampler=heun" (a value is read
    as a number where it is one, else kept as text)."""
    n_steps, cfg_scale, sigma_min, sigma_max, *extra = variant.split(":")
    fields = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or key not in RolloutSettings.__dataclass_fields__ or key in ("n_steps", "cfg_scale"):
            raise ValueError(f"--sampling {variant!r}: {item!r} is not field=value of a RolloutSettings field")
        try:
            fields[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            fields[key] = {"true": True, "false": False}.get(value.lower(), value)
    return RolloutSettings(n_steps=int(n_steps), cfg_scale=float(cfg_scale), sigma_min=float(sigma_min),
                           sigma_max=float(sigma_max), **fields)


def final_variants(engine, cfg, args, common: dict, force: bool = False) -> None:
    """After training (or on a --load_model state): the rollout test under each --sampling variant, with the EMA
    and/or the live weights (--weights); one JSON line each, frames saved under --save_frames."""
    if not args.sampling and args.weights == "ema" and not force:
        return
    for weights in ("ema", "live") if args.weights == "both" else (args.weights,):
        for variant in args.sampling or [None]:
            settings = parse_sampling(variant) if variant else RolloutSettings(
                n_steps=args.n_steps, cfg_scale=args.cfg_scale, sigma_min=args.sigma_min,
                sigma_max=args.sigma_max)
            save = None
            if args.save_frames:
                os.makedirs(args.save_frames, exist_ok=True)
                label = variant.replace(":", "_") if variant else "default"
                save = os.path.join(args.save_frames, f"{args.tag or 'probe'}_{weights}_{label}.npz")
            t0 = time.perf_counter()
            row = steering_test(engine, cfg, args.indices, settings, SPEED_MS, STEER_DEG,
                                ema=weights == "ema", save=save)
            print(json.dumps({**common, "step": args.steps, "weights": weights, "variant": variant,
                              "seconds": round(time.perf_counter() - t0, 1), "steering": row}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "demo", "toyworld.yaml"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    p.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steer_every_eval", action="store_true", help="the rollout test at every evaluation")
    p.add_argument("--n_steps", type=int, default=SAMPLING["n_steps"], help="rollout test: sampler steps")
    p.add_argument("--cfg_scale", type=float, default=SAMPLING["cfg_scale"], help="rollout test: guidance")
    p.add_argument("--sigma_min", type=float, default=SAMPLING["sigma_min"], help="rollout test: last sigma")
    p.add_argument("--sigma_max", type=float, default=SAMPLING["sigma_max"], help="rollout test: first sigma")
    p.add_argument("--ckpt", default=None, help="evaluate this export (bin_to_st.py) instead of training")
    p.add_argument("--sampling", nargs="+", default=None, metavar="STEPS:CFG:SIGMA_MIN:SIGMA_MAX",
                   help="sampler variants to test on the export (--ckpt) or after training (default: the "
                        "flags above)")
    p.add_argument("--weights", choices=("ema", "live", "both"), default="ema",
                   help="after training: rollouts of the EMA weights, the live ones or both")
    p.add_argument("--save_model", default=None, metavar="PATH",
                   help="after training: save the model's state (live and EMA weights) to PATH (torch.save)")
    p.add_argument("--load_model", default=None, metavar="PATH",
                   help="train nothing: load a --save_model state into the config (same overrides) and run the "
                        "rollout test of each --sampling variant")
    p.add_argument("--save_frames", default=None, metavar="DIR",
                   help="after training: save the generated and true frames of each final variant (.npz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args()

    if args.ckpt:
        return evaluate_export(args)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    settings = RolloutSettings(n_steps=args.n_steps, cfg_scale=args.cfg_scale, sigma_min=args.sigma_min,
                               sigma_max=args.sigma_max)
    cfg = load_config([args.config], args.overrides)
    engine = build_model(cfg).to(dev)
    common = {"tag": args.tag, "overrides": args.overrides, "device": str(dev)}
    if args.load_model:
        engine.load_state_dict(torch.load(args.load_model, map_location=dev)["state_dict"])
        final_variants(engine, cfg, args, common, force=True)
        return 0
    engine.train()
    engine.learning_rate = float(cfg.model.get("base_learning_rate", 1e-4))  # as train.py without --scale_lr
    opt = engine.configure_optimizers()
    sched = None
    if isinstance(opt, (list, tuple)):
        (opt,), (sched,) = opt
        sched = sched["scheduler"]
    dm = instantiate(cfg.data, seed=args.seed)
    dm.setup("fit", rank=0, world_size=1)
    held_out = to_device(eval_batch(cfg, 16, seed=1), dev)
    clip = float(cfg.get("lightning", {}).get("trainer", {}).get("gradient_clip_val") or 0.0)
    params = [q for g in opt.param_groups for q in g["params"]]

    step, losses, t0 = 0, [], time.perf_counter()
    while step < args.steps:
        for batch in dm.train_dataloader():
            batch = dm.on_after_batch_transfer(to_device(batch, dev), 0)
            loss = engine.compute_loss(batch, engine.make_generator(step, 0)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            if sched is not None:
                sched.step()
            if engine.use_ema:
                engine.model_ema(engine.model)
            losses.append(float(loss.detach()))
            step += 1
            if step == args.steps and args.save_model:  # before the evaluation: a failing probe keeps the model
                torch.save({"state_dict": engine.state_dict(), "overrides": args.overrides, "steps": step},
                           args.save_model)
            if step % args.eval_every == 0 or step == args.steps:
                window = losses[-args.eval_every:]
                row = {**common, "step": step, "loss": round(sum(window) / len(window), 5),
                       "s_per_step": round((time.perf_counter() - t0) / step, 4),
                       "action_use": action_use(engine, held_out, args.sigmas)}
                if args.steer_every_eval or step == args.steps:
                    row["steering"] = steering_test(engine, cfg, args.indices, settings, SPEED_MS, STEER_DEG)
                print(json.dumps(row), flush=True)
                if step == args.steps:
                    final_variants(engine, cfg, args, common)
            if step == args.steps:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
