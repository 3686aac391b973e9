"""vdr: video diffusion models as reward functions for reinforcement learning.

A single-file, heavily commented reference implementation of

    [1] Wang, Wu, Zhang et al. "Goal-Driven Reward by Video Diffusion Models for Reinforcement
        Learning" (GenReward), CVPR 2026, arXiv:2512.00961.

The idea: a video diffusion model finetuned on videos of a domain can *generate a goal video* of a task
from the agent's first frame and a text prompt. The agent is then rewarded for behaving like that video,
at the video level (its frames near the goal video in the diffusion model's own VAE latent space) and at
the frame level (a forward-backward representation's estimate of reaching the goal frame CLIP picks).

  demos (scripted experts)        prompt + first frame
        |                                |
  [1] collect videos  -->  [2] finetune video diffusion  -->  [3] generate goal video
                                                                 |            |
                                         [4] video-level reward (VAE)   [5] CLIP goal frame
                                                 |                            |
                                                 |                   [6] FB representation
                                                 +------------+---------------+
                                                              |
                                            [7] SAC agent  <- r = alpha*r_video + beta*r_FB (+ r_env)
                                                              |
                                            [8] evaluation: success, return, reward quality, plots

Sections of this file, in pipeline order (equation numbers E1-E6 are those of the method notes, README):
  1. Configuration      the Args dataclass, presets `tiny` (CPU, minutes) and `paper` (one CUDA GPU)
  2. Environments       Meta-World v3: state for the agent, rendered frames for the reward; expert demos
  7. SAC                compact soft actor-critic in CleanRL's conventions [4]
  8. Training loop      reward modes, evaluation, reports, the command line
Sections 3-6 (video diffusion E1, video-level reward E2, CLIP goal frame E3, FB reward E4-E5) are built
on top of these and slot in between, in the order of the diagram.

Other references:
    [2] Yu et al. "Meta-World: A Benchmark and Evaluation for Multi-Task and Meta RL", CoRL 2019.
    [3] Haarnoja et al. "Soft Actor-Critic Algorithms and Applications", arXiv:1812.05905, 2018.
    [4] Huang et al. "CleanRL: High-quality Single-file Implementations of Deep RL Algorithms", JMLR 2022.

Usage:
    python vdr.py                                   # the main job on the tiny preset (see README)
    python vdr.py collect --task reach-v3 --episodes 20 --out runs/collect
    python vdr.py train --task reach-v3 --reward dense --steps 50000 --seed 1 --out runs/sac
    python vdr.py train --help                      # every knob, with its one-line doc
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# MuJoCo picks its OpenGL backend when it is first imported. With no display, EGL (Mesa's, which ships
# with the system's libEGL and needs no extra package) renders off-screen; osmesa works too but needs
# `apt-get install libosmesa6` and is ~10x slower. A value the user already set wins.
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _make_torchvision_importable():
    """Compatibility step for CPU torch with the (CUDA-linked) torchvision wheel from PyPI.

    There is no CPU build of torchvision 0.28.0 on PyPI: its compiled ops fail to load next to the CPU
    torch 2.13.0 build, and `import torchvision` then dies with "operator torchvision::nms does not exist"
    because torchvision registers Python fallbacks for two ops it could not define. open_clip, timm and
    diffusers' model classes all import torchvision, so they would fail too. vdr uses none of torchvision's
    compiled ops (nms, roi_align, ...), only its Python transforms, so we declare the two missing op
    schemas and import again. Where torchvision loads normally (a CUDA machine), this does nothing.
    """
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # drop the half-imported package before trying again
    global _TORCHVISION_SHIM  # the Library object must stay alive, or the definitions are dropped
    _TORCHVISION_SHIM = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _TORCHVISION_SHIM.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401


_make_torchvision_importable()


# =====================================================================================================
# 1. Configuration
# =====================================================================================================
# One dataclass holds every knob; the CLI is generated from it (one --flag per field, with the field's
# one-line doc as help). A preset is a named set of overrides applied before the command-line flags.


def arg(default, doc: str):
    """A dataclass field with a one-line doc (shown by `--help`)."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class Args:
    # --- run ---
    preset: str = arg("tiny", "named defaults: 'tiny' (CPU, toy models, minutes) or 'paper' (1 CUDA GPU)")
    task: str = arg("reach-v3", "Meta-World v3 task name, e.g. reach-v3, button-press-topdown-v3")
    seed: int = arg(1, "seed for torch, numpy and the environments' initial states")
    device: str = arg("cpu", "torch device: 'cpu' or 'cuda'")
    out: str = arg("", "output folder for metrics.json, plots, checkpoints (default: runs/<command>/...)")
    cache_dir: str = arg("runs/cache", "where expensive artefacts (demos, models) are cached by a key of their inputs")
    # --- environment (section 2) ---
    image_size: int = arg(64, "side of the square frames the reward sees, in pixels")
    camera: str = arg("corner", "Meta-World camera the frames are rendered from (the paper's)")
    episode_length: int = arg(150, "env steps per episode (the scripted experts finish in ~45-90)")
    episodes: int = arg(20, "expert demo episodes to collect per task")
    # --- pretrained models (sections 3-5); 'toy' = the embedded toy model trained here on the demos ---
    video_model: str = arg("toy", "video diffusion model: 'toy', or a diffusers repo id / local folder")
    clip_model: str = arg("toy", "CLIP model: 'toy', or an open_clip architecture name such as ViT-B-32")
    clip_pretrained: str = arg("", "open_clip pretrained tag or local weights file (with a named clip_model)")
    dtype: str = arg("float32", "dtype of the pretrained models: float32, or bfloat16 on a GPU")
    # --- reinforcement learning (sections 7-8) ---
    reward: str = arg("dense", "reward the agent learns from: dense (Meta-World's shaped) or sparse (success)")
    steps: int = arg(50_000, "environment steps of training")
    learning_starts: int = arg(5_000, "random-action steps before the first gradient update (CleanRL)")
    buffer_size: int = arg(1_000_000, "replay buffer capacity, in transitions")
    batch_size: int = arg(256, "transitions per gradient update")
    hidden: int = arg(256, "width of the two hidden layers of actor and critics")
    gamma: float = arg(0.99, "discount factor")
    tau: float = arg(0.005, "target network soft-update rate (CleanRL)")
    policy_lr: float = arg(3e-4, "actor and temperature learning rate (CleanRL)")
    q_lr: float = arg(1e-3, "critic learning rate (CleanRL)")
    policy_frequency: int = arg(2, "actor updated every this many steps, that many times (TD3-style delay)")
    alpha: float = arg(0.2, "entropy temperature; the initial value when autotune is on")
    autotune: bool = arg(True, "learn the temperature to keep the policy's entropy near -act_dim")
    eval_every: int = arg(5_000, "environment steps between evaluations")
    eval_episodes: int = arg(30, "episodes per evaluation (deterministic actions, held-out initial states)")


PRESETS = {
    "tiny": {},  # the dataclass defaults: everything runs on 2 CPU cores, offline, in minutes
    "paper": dict(  # one CUDA GPU and the real pretrained models (PAPER.md, "published settings")
        device="cuda",
        dtype="bfloat16",
        video_model="THUDM/CogVideoX-5b-I2V",  # the paper's image-to-video base model
        clip_model="ViT-B-32",  # the paper code's CLIP for picking the goal frame (E3)
        clip_pretrained="laion2b_s34b_b79k",
        image_size=480,  # the paper code resizes frames to 480x480 before the VAE (E2)
        episode_length=256,  # the paper's episode length
        steps=1_000_000,  # the paper's budget per run
        eval_every=10_000,  # the paper evaluates every 10k steps over 10 episodes
        eval_episodes=10,
    ),
}
REWARD_MODES = ("dense", "sparse")


class VdrError(Exception):
    """A mistake the user can fix; the CLI prints it as one line, without a traceback."""


def make_args(**overrides) -> Args:
    """Args from a preset plus overrides, validated: `make_args(preset="tiny", task="drawer-open-v3")`."""
    preset = overrides.get("preset", "tiny")
    if preset not in PRESETS:
        raise VdrError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(Args)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise VdrError(f"unknown setting(s) {', '.join(unknown)}; see `python vdr.py --help`")
    args = Args(**{**PRESETS[preset], **overrides})
    check_args(args)
    return args


def check_args(args: Args) -> None:
    """Stop early, in one line, on settings that would fail deep inside a library later."""
    check_task(args.task)
    if args.reward not in REWARD_MODES:
        raise VdrError(f"unknown reward mode {args.reward!r}; choose one of: {', '.join(REWARD_MODES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise VdrError(f"--device {args.device} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                       "use --device cpu (or --preset tiny), or install a CUDA build of torch")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise VdrError(f"unknown device {args.device!r}; use 'cpu' or 'cuda'")
    for name in ("steps", "episodes", "episode_length", "image_size", "batch_size", "eval_episodes"):
        if getattr(args, name) <= 0:
            raise VdrError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.episode_length > 500:
        raise VdrError(f"--episode-length {args.episode_length} is over Meta-World's limit of 500 steps")


# ---- small plumbing used by every section: seeding, atomic files, cache keys, a metrics logger ----

def seed_everything(seed: int) -> np.random.Generator:
    """Seed torch's global generator and return a numpy Generator; same seed -> same numbers on CPU."""
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def atomic_write(path: Path, write) -> Path:
    """Call write(tmp_path), then rename tmp_path to path: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path: Path, obj) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


CACHE_VERSION = 1  # bump when a cached artefact's format or meaning changes, so stale caches are not reused


def cache_path(args: Args, kind: str, suffix: str, **inputs) -> Path:
    """runs/cache/<kind>/<task>-<hash of the inputs>.<suffix>: the same inputs find the same file."""
    key = json.dumps({"v": CACHE_VERSION, **inputs}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(args.cache_dir) / kind / f"{inputs.get('task', 'all')}-{digest}{suffix}"


class Logger:
    """Writes {"step": s, **metrics} lines to out/log.jsonl (and to TensorBoard when it is installed).
    Metric names are grouped as in CleanRL: charts/..., losses/..., eval/..."""

    def __init__(self, out: Path):
        self.file = open(Path(out) / "log.jsonl", "w")  # a new run starts a new log
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def log(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()


# =====================================================================================================
# 2. Environments: Meta-World v3, and expert demos
# =====================================================================================================
# The agent sees Meta-World's 39-d state vector (hand xyz, gripper opening, object poses, the previous
# step's copy of those, goal xyz). The reward side of the method sees only rendered frames:
#     frame: (H, W, 3) uint8, right side up
# The env's own reward (dense, shaped by hand) and its `success` flag are used for evaluation, and as the
# `dense` / `sparse` baselines. Episodes have a fixed length (no termination on success), as in [2].
#
# Initial states. `reset(seed=s)` draws the object and goal positions from a generator seeded with s, so
# every seed is a distinct, reproducible initial state. (Meta-World's MT1 benchmark instead cycles through
# 50 fixed positions; we unfreeze that so held-out initial states are really never seen in training.)
# The seed ranges below keep the roles apart:
DEMO_SEED0 = 1_000_000  # expert demos (the video model's training data) use seeds 1_000_000 + i
HELDOUT_SEED0 = 2_000_000  # held-out initial states for judging generated goal videos
EVAL_SEED0 = 3_000_000  # RL evaluation episodes; RL training episodes draw seeds below 1_000_000

# Text prompts: the goal description given to the video model and CLIP. Written for what is visible.
TASK_PROMPTS = {
    "reach-v3": "the robot arm moves its gripper to the red goal point",
    "push-v3": "the robot arm pushes the puck to the goal",
    "pick-place-v3": "the robot arm picks up the puck and places it at the goal",
    "button-press-topdown-v3": "the robot arm presses the button down from above",
    "drawer-open-v3": "the robot arm pulls the drawer open",
    "drawer-close-v3": "the robot arm pushes the drawer closed",
    "door-open-v3": "the robot arm swings the door open",
    "window-open-v3": "the robot arm slides the window open",
    "pick-out-of-hole-v3": "the robot arm picks the peg out of the hole",
    "bin-picking-v3": "the robot arm moves the cube from one bin to the other",
    "shelf-place-v3": "the robot arm places the block on the shelf",
}


def task_prompt(task: str) -> str:
    """The goal prompt of a task; tasks without a hand-written one get 'the robot arm does <name>'."""
    return TASK_PROMPTS.get(task, "the robot arm does " + task.removesuffix("-v3").replace("-", " "))


def meta_world_tasks() -> list[str]:
    import metaworld
    return sorted(metaworld.ALL_V3_ENVIRONMENTS)


def check_task(task: str) -> None:
    tasks = meta_world_tasks()
    if task not in tasks:
        raise VdrError(f"unknown task {task!r}; Meta-World v3 tasks are: {', '.join(tasks)}")


class MetaWorld:
    """One Meta-World v3 task behind gymnasium's reset/step API, plus `render()` for the reward side.

    obs: (39,) float32 state.  action: (4,) float32 in [-1, 1] (hand dx, dy, dz, gripper).
    info["success"]: 1.0 when the task is solved at this step.  render(): (H, W, 3) uint8 frame.
    """

    def __init__(self, task: str, image_size: int = 64, camera: str = "corner", episode_length: int = 150):
        import metaworld
        import mujoco

        check_task(task)
        self.task, self.camera, self.episode_length, self.t = task, camera, episode_length, 0
        # Meta-World's goal-observable variant of the task's class (the goal xyz is the last 3 numbers of
        # the state, as in MT1). It is built frozen to one initial state; we unfreeze it so that each
        # reset draws a fresh one from the env's seeded generator (see the section notes). MT1 would
        # instead pre-build 50 frozen initial states, at ~3 s per env.
        self.sawyer = metaworld.ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-goal-observable"](seed=0)
        self.sawyer._freeze_rand_vec, self.sawyer.seeded_rand_vec = False, True
        self.observation_space, self.action_space = self.sawyer.observation_space, self.sawyer.action_space
        assert np.all(self.action_space.low == -1) and np.all(self.action_space.high == 1)

        # Off-screen renderer. We use MuJoCo's own Renderer rather than gymnasium's: it makes its GL context
        # current at every render, so several envs (train + eval) can live in one process, and a new env
        # created after another was closed renders correctly. Shadows, reflections and multisampling off:
        # invisible at 64 px, and they take rendering from ~14 to ~180 frames/s on 2 CPU cores (measured).
        self.sawyer.model.vis.quality.offsamples = 0  # no multisample anti-aliasing buffer
        try:
            self.renderer = mujoco.Renderer(self.sawyer.model, image_size, image_size)
        except mujoco.FatalError as err:
            self.sawyer.close()
            raise VdrError(f"MuJoCo cannot render off-screen ({err}); it reads MUJOCO_GL when first imported, so "
                           "set MUJOCO_GL=egl (or osmesa) in the shell, or import vdr before mujoco") from None
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:  # Meta-World ignores reset(seed=...): it reads its own seeded generator
            self.sawyer.seed(seed)
        obs, info = self.sawyer.reset()
        self.t = 0
        return obs.astype(np.float32), info

    def step(self, action: np.ndarray):
        obs, reward, terminated, truncated, info = self.sawyer.step(np.asarray(action, dtype=np.float32))
        self.t += 1
        truncated = truncated or self.t >= self.episode_length  # our time limit (Meta-World's is 500)
        return obs.astype(np.float32), float(reward), terminated, truncated, info

    def render(self) -> np.ndarray:
        self.renderer.update_scene(self.sawyer.data, camera=self.camera)
        frame = self.renderer.render()  # (H, W, 3) uint8
        # Meta-World's 'corner' camera is defined with its image y-axis pointing down (xyaxes
        # "-1 1 0 -0.2 -0.2 -1" in xyz_base.xml), so MuJoCo returns it rotated by 180 degrees.
        if self.camera == "corner":
            frame = frame[::-1, ::-1]
        return np.ascontiguousarray(frame)

    def close(self) -> None:
        # Free the GL context explicitly: left to the garbage collector, EGL prints errors at exit.
        self.renderer.close()
        self.sawyer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_env(args: Args) -> MetaWorld:
    return MetaWorld(args.task, args.image_size, args.camera, args.episode_length)


def expert_policy(task: str):
    """Meta-World's scripted expert for a task: `policy.get_action(obs) -> (4,) action`."""
    from metaworld.policies import ENV_POLICY_MAP
    if task not in ENV_POLICY_MAP:
        raise VdrError(f"Meta-World has no scripted expert for {task!r}")
    return ENV_POLICY_MAP[task]()


def rollout(env: MetaWorld, policy, seed: int, render: bool = True) -> dict:
    """Run one fixed-length episode. `policy(obs) -> action`.

    Returns frames (T+1, H, W, 3) uint8 (empty if not render), states (T+1, 39), actions (T, 4),
    env_rewards (T,), success (T,) bool: the per-step success flag.
    """
    obs, _ = env.reset(seed)
    frames, states, actions, rewards, success = [env.render()] if render else [], [obs], [], [], []
    for _ in range(env.episode_length):
        action = np.clip(policy(obs), -1.0, 1.0).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        states.append(obs); actions.append(action); rewards.append(reward); success.append(info["success"] > 0)
        if render:
            frames.append(env.render())
        if terminated or truncated:
            break
    return dict(frames=np.array(frames, dtype=np.uint8), states=np.array(states, dtype=np.float32),
                actions=np.array(actions, dtype=np.float32), env_rewards=np.array(rewards, dtype=np.float32),
                success=np.array(success, dtype=bool))


def collect_demos(args: Args, task: str | None = None, progress: bool = True) -> dict:
    """Scripted-expert episodes of one task, cached: the domain videos the video model is trained on.

    Returns a dict of stacked arrays (N = args.episodes, T = args.episode_length):
        frames (N, T+1, H, W, 3) uint8, states (N, T+1, 39) float32, actions (N, T, 4) float32,
        env_rewards (N, T) float32, success (N, T) bool, seeds (N,) int64, and prompt (the task's text).
    An episode counts as a success if it succeeded at any step (door-open's expert, for one, opens the
    door and then loses the success flag while it lets go).
    """
    from tqdm import tqdm

    task = task or args.task
    path = cache_path(args, "demos", ".npz", task=task, episodes=args.episodes, image_size=args.image_size,
                      camera=args.camera, episode_length=args.episode_length)
    if path.exists():
        try:
            with np.load(path) as data:
                return {k: (str(data[k]) if k == "prompt" else data[k]) for k in data.files}
        except Exception as err:  # atomic writes never leave a partial file, but disks and hands do
            raise VdrError(f"cached demos {path} are unreadable ({type(err).__name__}); "
                           "delete that file and run again") from None
    expert, episodes = expert_policy(task), []
    with MetaWorld(task, args.image_size, args.camera, args.episode_length) as env:
        bar = tqdm(range(args.episodes), desc=f"collect {task}", disable=not progress)
        for i in bar:
            episodes.append(rollout(env, expert.get_action, seed=DEMO_SEED0 + i))
            bar.set_postfix(success=f"{np.mean([e['success'].any() for e in episodes]):.2f}")
    demos = {k: np.stack([e[k] for e in episodes]) for k in episodes[0]}
    demos.update(seeds=DEMO_SEED0 + np.arange(args.episodes), prompt=task_prompt(task))
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **demos))
    return demos


def save_frame_strip(frames: np.ndarray, path: Path, n: int = 8, scale: int = 2) -> Path:
    """n frames of a video (T, H, W, 3), evenly spaced, side by side in one PNG."""
    from PIL import Image
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    strip = np.concatenate(list(frames[idx]), axis=1)  # (H, n*W, 3)
    img = Image.fromarray(strip)
    return atomic_write(path, lambda tmp: img.resize((img.width * scale, img.height * scale),
                                                      Image.NEAREST).save(tmp, format="PNG"))


# =====================================================================================================
# 7. SAC: soft actor-critic [3], in CleanRL's conventions [4]
# =====================================================================================================
# Maximise  E[ sum_t gamma^t (r_t + alpha * H(pi(.|s_t))) ]  with
#   twin critics      Q_k(s, a), k = 1, 2, trained on   y = r + gamma * (1 - done) *
#                     ( min_k Q_k_target(s', a') - alpha * log pi(a'|s') ),   a' ~ pi(.|s')
#   actor             pi(a|s) = tanh(N(mu(s), sigma(s)^2)), trained on   E[ alpha log pi(a|s) - min_k Q_k(s, a) ]
#   temperature       log_alpha trained so that the policy's entropy stays near -act_dim
# Shapes: obs (B, obs_dim), actions (B, act_dim) in [-1, 1], rewards / dones (B,).

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # bounds on the actor's log std (CleanRL, from Denis Yarats' SAC)


def mlp(inp: int, out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


def tanh_gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor):
    """Reparameterised sample of a = tanh(u), u ~ N(mean, std^2), with its exact log-density.

    log pi(a) = log N(u; mean, std) - sum_i log(1 - tanh(u_i)^2), and
    log(1 - tanh(u)^2) = 2 * (log 2 - u - softplus(-2u)) is the numerically stable form (SpinningUp),
    the same one torch's TanhTransform uses (CleanRL adds 1e-6 inside a log instead).
    Returns action (B, A), log_prob (B,).
    """
    noise = torch.randn_like(mean)
    u = mean + log_std.exp() * noise  # (B, A), reparameterised so gradients reach mean and std
    # log N(u; mean, std) written out: (u - mean) / std is just `noise` (faster than torch.distributions)
    log_prob = (-0.5 * noise.pow(2) - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
    log_prob = log_prob - (2 * (np.log(2) - u - F.softplus(-2 * u))).sum(-1)
    return torch.tanh(u), log_prob


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden)  # one head for mean and log_std

    def forward(self, obs: torch.Tensor):
        mean, log_std = self.net(obs).chunk(2, dim=-1)  # (B, A), (B, A)
        # squash log_std into [LOG_STD_MIN, LOG_STD_MAX] smoothly (CleanRL)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        return mean, log_std

    def get_action(self, obs: torch.Tensor):
        """Returns a sampled action (B, A), its log-prob (B,), and the deterministic action tanh(mean)."""
        mean, log_std = self(obs)
        action, log_prob = tanh_gaussian_sample(mean, log_std)
        return action, log_prob, torch.tanh(mean)


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], dim=-1)).squeeze(-1)  # (B,)


class ReplayBuffer:
    """Fixed-size FIFO of transitions (s, a, r, s', done) in preallocated numpy arrays."""

    def __init__(self, obs_dim: int, act_dim: int, size: int, rng: np.random.Generator):
        self.obs = np.zeros((size, obs_dim), np.float32)
        self.next_obs = np.zeros((size, obs_dim), np.float32)
        self.actions = np.zeros((size, act_dim), np.float32)
        self.rewards = np.zeros(size, np.float32)
        self.dones = np.zeros(size, np.float32)  # 1 only on true termination, never on a time limit
        self.size, self.ptr, self.full, self.rng = size, 0, False, rng

    def __len__(self) -> int:
        return self.size if self.full else self.ptr

    def add(self, obs, actions, rewards, next_obs, dones) -> None:
        """Add a batch of N transitions: obs (N, obs_dim), actions (N, A), rewards (N,), ..."""
        for i in range(len(obs)):
            self.obs[self.ptr], self.actions[self.ptr], self.rewards[self.ptr] = obs[i], actions[i], rewards[i]
            self.next_obs[self.ptr], self.dones[self.ptr] = next_obs[i], dones[i]
            self.ptr = (self.ptr + 1) % self.size
            self.full = self.full or self.ptr == 0

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        idx = self.rng.integers(0, len(self), batch_size)
        return {k: torch.from_numpy(getattr(self, k)[idx])
                for k in ("obs", "actions", "rewards", "next_obs", "dones")}


class SAC:
    """Actor, twin critics with targets, learned temperature, and their optimisers."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        self.args, self.device = args, torch.device(args.device)
        self.actor = Actor(obs_dim, act_dim, args.hidden).to(self.device)
        self.qf1 = QNetwork(obs_dim, act_dim, args.hidden).to(self.device)
        self.qf2 = QNetwork(obs_dim, act_dim, args.hidden).to(self.device)
        self.qf1_target = QNetwork(obs_dim, act_dim, args.hidden).to(self.device)
        self.qf2_target = QNetwork(obs_dim, act_dim, args.hidden).to(self.device)
        self.qf1_target.load_state_dict(self.qf1.state_dict())
        self.qf2_target.load_state_dict(self.qf2.state_dict())
        # fused=True: one kernel for all parameters' Adam step (measured on 2 CPU cores: 1.5 -> 0.6 ms per update)
        self.q_optimizer = torch.optim.Adam([*self.qf1.parameters(), *self.qf2.parameters()], lr=args.q_lr,
                                            fused=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.policy_lr, fused=True)
        self.target_entropy = -float(act_dim)  # heuristic from [3]
        self.log_alpha = torch.tensor(np.log(args.alpha), dtype=torch.float32, device=self.device,
                                      requires_grad=True)
        self.a_optimizer = torch.optim.Adam([self.log_alpha], lr=args.policy_lr)

    @property
    def alpha(self) -> float:
        return self.log_alpha.exp().item() if self.args.autotune else self.args.alpha

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        obs = torch.as_tensor(obs, device=self.device).unsqueeze(0)  # (1, obs_dim)
        action, _, mean_action = self.actor.get_action(obs)
        return (mean_action if deterministic else action)[0].cpu().numpy()

    def update(self, batch: dict[str, torch.Tensor], global_step: int) -> dict[str, float]:
        """One gradient step on the critics; every `policy_frequency` steps, that many actor (and
        temperature) steps; then a soft update of the targets. Returns the losses, for logging."""
        args = self.args
        b = {k: v.to(self.device) for k, v in batch.items()}
        with torch.no_grad():
            next_actions, next_log_pi, _ = self.actor.get_action(b["next_obs"])
            min_q_next = torch.min(self.qf1_target(b["next_obs"], next_actions),
                                   self.qf2_target(b["next_obs"], next_actions)) - self.alpha * next_log_pi
            next_q_value = b["rewards"] + (1 - b["dones"]) * args.gamma * min_q_next  # (B,)
        qf1_a_values, qf2_a_values = self.qf1(b["obs"], b["actions"]), self.qf2(b["obs"], b["actions"])
        qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
        qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
        self.q_optimizer.zero_grad()
        (qf1_loss + qf2_loss).backward()
        self.q_optimizer.step()
        metrics = {"losses/qf1_loss": qf1_loss.item(), "losses/qf2_loss": qf2_loss.item(),
                   "losses/qf1_values": qf1_a_values.mean().item()}

        if global_step % args.policy_frequency == 0:  # delayed actor updates, compensated (CleanRL / TD3)
            for _ in range(args.policy_frequency):
                pi, log_pi, _ = self.actor.get_action(b["obs"])
                min_qf_pi = torch.min(self.qf1(b["obs"], pi), self.qf2(b["obs"], pi))
                actor_loss = (self.alpha * log_pi - min_qf_pi).mean()
                self.actor_optimizer.zero_grad()
                # inputs=: backpropagate through the critics to the actions but skip the critics' own
                # weight gradients, which this step would otherwise compute and never use.
                actor_loss.backward(inputs=list(self.actor.parameters()))
                self.actor_optimizer.step()
                metrics["losses/actor_loss"] = actor_loss.item()
                if args.autotune:
                    alpha_loss = (-self.log_alpha.exp() * (log_pi.detach() + self.target_entropy)).mean()
                    self.a_optimizer.zero_grad()
                    alpha_loss.backward()
                    self.a_optimizer.step()
                    metrics["losses/alpha_loss"] = alpha_loss.item()
            metrics["losses/alpha"] = self.alpha

        with torch.no_grad():  # Polyak averaging of the targets, every step
            for net, target in ((self.qf1, self.qf1_target), (self.qf2, self.qf2_target)):
                for p, tp in zip(net.parameters(), target.parameters()):
                    tp.lerp_(p, args.tau)
        return metrics

    def state_dict(self) -> dict:
        return {name: getattr(self, name).state_dict() for name in
                ("actor", "qf1", "qf2", "qf1_target", "qf2_target", "q_optimizer", "actor_optimizer",
                 "a_optimizer")} | {"log_alpha": self.log_alpha.detach().cpu()}


# =====================================================================================================
# 8. Training loop, evaluation, reports, and the command line
# =====================================================================================================
# Rewards are computed per episode, when it ends, in one call (`episode_rewards`); only then do its
# transitions enter the replay buffer. That costs nothing for the env's own rewards and is the cheap way
# to use a video-level reward, which needs the episode's frames, in one batched encoder call.

def episode_rewards(args: Args, episode: dict) -> np.ndarray:
    """The reward the agent learns from, for each step of one finished episode: (T,) float32.

    dense:  Meta-World's hand-shaped reward (in [0, 10] per step) [2].
    sparse: 1 at the steps where the task is solved, else 0.
    """
    if args.reward == "dense":
        return episode["env_rewards"]
    if args.reward == "sparse":
        return episode["success"].astype(np.float32)
    raise VdrError(f"unknown reward mode {args.reward!r}; choose one of: {', '.join(REWARD_MODES)}")


def evaluate(agent: SAC, env: MetaWorld, episodes: int) -> dict[str, float]:
    """Deterministic policy on `episodes` held-out initial states (the same ones at every evaluation)."""
    runs = [rollout(env, lambda o: agent.act(o, deterministic=True), EVAL_SEED0 + i, render=False)
            for i in range(episodes)]
    return {"eval/success": float(np.mean([r["success"].any() for r in runs])),
            "eval/return": float(np.mean([r["env_rewards"].sum() for r in runs]))}


def default_out(args: Args, command: str) -> Path:
    return Path(args.out) if args.out else Path("runs") / command / f"{args.task}-{args.reward}-s{args.seed}"


def train(args: Args, out: Path | None = None, progress: bool = True) -> dict:
    """Train SAC on one task with the chosen reward; write metrics.json, log.jsonl, learning_curve.png,
    agent.pt under `out`. Returns the metrics dict."""
    from tqdm import tqdm

    out = Path(out or default_out(args, "train"))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "args.json", dataclasses.asdict(args))
    rng = seed_everything(args.seed)
    with make_env(args) as env, make_env(args) as eval_env:
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        agent = SAC(obs_dim, act_dim, args)
        rb = ReplayBuffer(obs_dim, act_dim, min(args.buffer_size, args.steps), rng)
        logger = Logger(out)
        curve, episode, eval_time, start = [], None, 0.0, time.time()
        bar = tqdm(range(args.steps), desc=f"train {args.task} [{args.reward}]", disable=not progress)
        for global_step in bar:
            if episode is None:  # start an episode from a fresh seeded initial state
                obs, _ = env.reset(seed=int(rng.integers(DEMO_SEED0)))
                episode = {k: [] for k in ("obs", "actions", "env_rewards", "success", "next_obs", "dones")}
            if global_step < args.learning_starts:
                action = rng.uniform(-1, 1, act_dim).astype(np.float32)  # uniform exploration (CleanRL)
            else:
                action = agent.act(obs)
            next_obs, reward, terminated, truncated, info = env.step(action)
            for k, v in zip(episode, (obs, action, reward, info["success"] > 0, next_obs, float(terminated))):
                episode[k].append(v)
            obs = next_obs

            if terminated or truncated:  # score the finished episode, then store its transitions
                ep = {k: np.array(v) for k, v in episode.items()}
                rb.add(ep["obs"], ep["actions"], episode_rewards(args, ep), ep["next_obs"], ep["dones"])
                logger.log(global_step, {"charts/episodic_return": float(ep["env_rewards"].sum()),
                                         "charts/episodic_success": float(ep["success"].any())})
                episode = None

            if global_step >= args.learning_starts and len(rb) >= args.batch_size:
                losses = agent.update(rb.sample(args.batch_size), global_step)
                if global_step % 100 == 0:  # log every 100 steps, as CleanRL does
                    sps = (global_step + 1) / (time.time() - start - eval_time)
                    logger.log(global_step, losses | {"charts/SPS": sps})

            if (global_step + 1) % args.eval_every == 0 or global_step + 1 == args.steps:
                t0 = time.time()
                result = evaluate(agent, eval_env, args.eval_episodes)
                eval_time += time.time() - t0
                curve.append({"env_steps": global_step + 1, **result})
                logger.log(global_step + 1, result)
                bar.set_postfix(success=f"{result['eval/success']:.2f}", ret=f"{result['eval/return']:.0f}")
        wall = time.time() - start
        logger.close()

    atomic_write(out / "agent.pt", lambda tmp: torch.save(agent.state_dict(), tmp))
    metrics = {"task": args.task, "reward": args.reward, "seed": args.seed,
               "eval_success": curve[-1]["eval/success"], "eval_return": curve[-1]["eval/return"],
               "env_steps": args.steps, "steps_per_second": args.steps / (wall - eval_time),
               "wall_seconds": wall, "curve": curve}
    write_json(out / "metrics.json", metrics)
    plot_learning_curve(curve, out / "learning_curve.png", f"{args.task} - SAC on the {args.reward} reward")
    return metrics


def plot_learning_curve(curve: list[dict], path: Path, title: str) -> Path:
    """Two panels, eval success and eval return against env steps, saved as a PNG."""
    # A bare Figure, not pyplot: draws to a file without touching the session's backend (a notebook's
    # inline plots keep working after train() has run).
    from matplotlib.figure import Figure

    steps = [c["env_steps"] for c in curve]
    fig = Figure(figsize=(9, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(steps, [c["eval/success"] for c in curve], marker="o")
    ax1.set(xlabel="env steps", ylabel="eval success rate", ylim=(-0.05, 1.05))
    ax2.plot(steps, [c["eval/return"] for c in curve], marker="o", color="tab:orange")
    ax2.set(xlabel="env steps", ylabel="eval return (env reward)")
    fig.suptitle(title)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def collect(args: Args, out: Path | None = None) -> dict:
    """CLI `collect`: expert demos for the task (cached), their success rate, and a frame strip to look at."""
    out = Path(out or default_out(args, "collect"))
    demos = collect_demos(args)
    success = demos["success"].any(axis=1)  # (N,) succeeded at any step
    first = [int(np.argmax(s)) + 1 if s.any() else None for s in demos["success"]]
    metrics = {"task": args.task, "prompt": demos["prompt"], "episodes": int(len(success)),
               "success_rate": float(success.mean()),
               "mean_steps_to_success": float(np.mean([f for f in first if f is not None] or [np.nan]))}
    save_frame_strip(demos["frames"][0], out / "demo_strip.png")
    write_json(out / "metrics.json", metrics)
    print(f"{args.task}: expert success {metrics['success_rate']:.2f} over {len(success)} episodes "
          f"(first success after {metrics['mean_steps_to_success']:.0f} steps on average); "
          f"frames {demos['frames'].shape[1:]} -> {out}")
    return metrics


def run(args: Args) -> dict:
    """The main job (`python vdr.py`): demos for the task, then SAC, then a report folder."""
    out = default_out(args, "run")
    collect(args, out / "demos")
    metrics = train(args, out)
    print(f"\n{args.task} [{args.reward} reward]: eval success {metrics['eval_success']:.2f}, "
          f"eval return {metrics['eval_return']:.0f} after {metrics['env_steps']} env steps "
          f"({metrics['steps_per_second']:.0f} steps/s, {metrics['wall_seconds'] / 60:.1f} min) -> {out}")
    return metrics


COMMANDS = {
    "run": (run, "the main job: demos, then SAC on the task, then a report (the default command)"),
    "collect": (collect, "collect and cache scripted-expert demos of a task; print the success rate"),
    "train": (train, "train SAC on a task with a reward mode; write metrics.json and a learning curve"),
}


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per entry of COMMANDS; each takes every field of Args as --field-name."""
    fields = argparse.ArgumentParser(add_help=False)
    for f in dataclasses.fields(Args):
        flag, doc = "--" + f.name.replace("_", "-"), f.metadata["doc"]
        if f.type == "bool":
            fields.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=doc)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            fields.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"{doc} (default: {f.default})")
    parser = argparse.ArgumentParser(prog="vdr.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, parents=[fields], help=help_, description=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    parsed = vars(build_parser().parse_args(argv))
    command = parsed.pop("command") or "run"
    try:
        args = make_args(**parsed)
        print(f"vdr {command}: preset={args.preset} task={args.task} seed={args.seed} device={args.device} "
              f"torch={torch.__version__} threads={torch.get_num_threads()}")
        COMMANDS[command][0](args)
    except VdrError as err:
        print(f"vdr: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
