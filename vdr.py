"""vdr: video diffusion models as reward functions for reinforcement learning.

A single-file, heavily commented reference implementation of

    [1] Wang, Wu, Zhang et al. "Goal-Driven Reward by Video Diffusion Models for Reinforcement
        Learning" (GenReward), CVPR 2026, arXiv:2512.00961.

The idea: a video diffusion model finetuned on videos of a domain can *generate a goal video* of a task
from the agent's first frame and a text prompt. The agent is then rewarded for behaving like that video,
at the video level (its frames near the goal video in the diffusion model's own VAE latent space) and at
the frame level (a forward-backward representation's estimate of reaching the goal frame CLIP picks).

  expert demos (sec. 2)                    prompt + first frame
        |                                         |
  finetune the video diffusion model (E1, sec. 3) --> generate a goal video (sec. 3f)
                                                          |                    |
                              video-level reward E2 (sec. 4)      CLIP goal frame E3 (sec. 5)
                                                          |                    |
                                                          |        FB representation, r_fb: E4-E5 (sec. 6)
                                                          +---------+----------+
                                                                    |
                                       E6: r = alpha * r_video + beta * r_fb (+ r_env)  (sec. 7)
                                                                    |
                                       SAC (sec. 8), trained on r and evaluated on held-out states (sec. 9)

Where to start:
  - to learn the method, read Part I top to bottom: each section opens with its equation (E1-E6, the
    README's method table) and the shapes it works on; Part II is what measures it;
  - to run it, `python vdr.py` (the main job, section 13); `python vdr.py train --help` lists every knob;
  - for an exercise, change one section of Part I, then let `eval-reward` (section 12) judge the reward on
    held-out episodes before any RL (tutorial.ipynb has four such exercises).

Part I, the method (lines 133-3029)                                                              line lines
   1. Configuration    Args; presets `tiny` (2 CPU cores, minutes) and `paper` (one CUDA GPU)       139   214
   2. Environments     Meta-World v3: state for the agent, frames for the reward; expert demos      353   297
   3. Video diffusion  E1: 3D causal VAE, small CLIP, DiT, training, the paper path, goal videos    650   821
   4. Video reward     E2: cosine of the agent's clip and the goal video in VAE latent space       1471   115
   5. Goal frame       E3: the goal video's frame CLIP scores highest against the goal prompt      1586    31
   6. FB reward        E4-E5: forward-backward representation; r_fb = min_k F_k(s, a, z*)^T z*     1617   347
   7. Total reward     E6: the standardised sum of both; the peers' rewards (VLM-RM, VIPER, ...)   1964   306
   8. SAC              compact soft actor-critic in CleanRL's conventions [4]                      2270   213
   9. Training loop    reward modes (gen, dense, sparse, the peers; alone or +dense), evaluation   2483   439
  10. Plumbing         seeding, atomic files, cache keys, the metrics logger                       2922   108
Part II, experiments and extensions (lines 3031-4219)
  11. eval-video       how good are the goal videos? generated against real, with baselines        3037   100
  12. eval-reward      how good are the rewards? every reward on held-out episodes, before RL      3137   347
  13. Main job, report `python vdr.py`, the whole method on one task; a run's agent vs the expert  3484   152
  14. Bench            tasks x reward modes x seeds in parallel processes, resumable               3636   189
  15. DCS              dm_control tasks [7] under the Distracting Control Suite's distraction [6]  3825   315
  16. Command line     one command per stage; every Args field is a flag                           4140    80

Other references:
    [2] Yu et al. "Meta-World: A Benchmark and Evaluation for Multi-Task and Meta RL", CoRL 2019.
    [3] Haarnoja et al. "Soft Actor-Critic Algorithms and Applications", arXiv:1812.05905, 2018.
    [4] Huang et al. "CleanRL: High-quality Single-file Implementations of Deep RL Algorithms", JMLR 2022.
    [5] Touati & Ollivier. "Learning One Representation to Optimize All Rewards", NeurIPS 2021.
    [6] Stone et al. "The Distracting Control Suite", arXiv:2101.02722, 2021.
    [7] Tassa et al. "DeepMind Control Suite", arXiv:1801.00690, 2018.
    [8] Escontrela et al. "Video Prediction Models as Rewards for Reinforcement Learning" (VIPER), NeurIPS 2023.
    [9] Huang et al. "Diffusion Reward: Learning Rewards via Conditional Video Diffusion", ECCV 2024.
   [10] Luo et al. "Text-Aware Diffusion for Policy Learning" (TADPoLe), NeurIPS 2024.
   [11] Sontakke et al. "RoboCLIP: One Demonstration is Enough to Learn Robot Policies", NeurIPS 2023.
   [12] Rocamonde et al. "Vision-Language Models are Zero-Shot Reward Models for RL" (VLM-RM), ICLR 2024.
   [13] Jeen, Bewley & Cullen. "Zero-Shot Reinforcement Learning from Low Quality Data", NeurIPS 2024.

Usage:
    python vdr.py                                   # the main job: the whole pipeline on drawer-close-v3
    python vdr.py collect --task reach-v3 --episodes 20 --out runs/collect
    python vdr.py distractions                      # dm_control tasks under the DCS distractions (a PNG grid)
    python vdr.py pretrain                          # the toy video model, once for every task
    python vdr.py eval-video --task drawer-open-v3  # finetune, generate goal videos, score them
    python vdr.py eval-reward --task drawer-open-v3 # every reward on held-out episodes, before any RL
    python vdr.py train --task reach-v3 --reward gen  # SAC on the generative reward alone
    python vdr.py train --task reach-v3 --reward dense --steps 50000 --seed 1 --out runs/sac
    python vdr.py train --help                      # every knob, with its one-line doc
"""


from __future__ import annotations
import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
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


# #####################################################################################################
# PART I. THE METHOD: configuration, environments, E1-E6, SAC, and the training loop.
# Read top to bottom, it is the paper's pipeline. It never calls into Part II: other task suites and
# Part II's flag checks plug in through TASK_SUITES (section 2) and ARG_CHECKS (section 1).
# #####################################################################################################


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
    zoom: float = arg(1.0, "Meta-World: the camera's field of view narrowed this many times, i.e. the frames "
                           "rendered zoom x larger and cropped to their centre, the workspace (section 2)")
    episode_length: int = arg(150, "env steps per episode (the scripted experts finish in ~45-90)")
    episodes: int = arg(20, "expert demo episodes to collect per task")
    distraction: str = arg("none", "dm_control tasks: DCS distractions, none, all, or some of color,camera,background")
    difficulty: str = arg("easy", "DCS difficulty: easy, medium, hard (scale 0.1, 0.2, 0.3)")
    dynamic_distraction: bool = arg(False, "DCS: distractions drift within the episode (default: fixed per episode)")
    background_dir: str = arg("", "DCS background videos: a folder of frame folders (DAVIS); empty: procedural")
    # --- pretrained models (sections 3-5); 'toy' = the embedded toy model trained here on the demos ---
    video_model: str = arg("toy", "video diffusion model: 'toy', or a diffusers repo id / local folder")
    clip_model: str = arg("toy", "CLIP model: 'toy', or an open_clip architecture name such as ViT-B-32")
    clip_pretrained: str = arg("", "open_clip pretrained tag or local weights file (with a named clip_model)")
    dtype: str = arg("float32", "dtype of the pretrained models: float32, or bfloat16 on a GPU")
    # --- video diffusion (section 3) ---
    video_frames: int = arg(17, "frames per video, 8k+1 (section 3); a video spans a whole episode")
    shipped_toy: bool = arg(True, "toy: start from the pretrained toy model in assets/ where its settings match "
                                  "(section 3d); --no-shipped-toy trains it")
    pretrain_episodes: int = arg(16, "expert episodes per task for pretraining the toy models")
    clip_steps: int = arg(400, "training steps of the toy CLIP")
    vae_steps: int = arg(450, "training steps of the toy VAE")
    dit_steps: int = arg(1500, "pretraining steps of the toy DiT (all PRETRAIN_TASKS)")
    dit_lr: float = arg(1e-3, "pretraining learning rate of the toy DiT")
    dit_batch: int = arg(4, "videos per DiT training step")
    finetune_steps: int = arg(1000, "finetuning steps on the target task (toy: whole DiT; paper: LoRA)")
    finetune_lr: float = arg(3e-4, "finetuning learning rate")
    lora_rank: int = arg(64, "LoRA rank for finetuning a pretrained --video-model (paper path)")
    sample_steps: int = arg(50, "DDIM denoising steps per generated video")
    eval_videos: int = arg(10, "held-out initial states of eval-video (goal videos) and eval-reward (x 4 behaviours)")
    probe_states: int = arg(5, "eval-reward: held-out states from which the exploit probe optimises each reward "
                               "(section 12); 0: no probe")
    probe_rewards: str = arg("combined,r_video,r_fb,dense", "eval-reward: the rewards the exploit probe optimises, "
                                                            "comma-separated (dense is the control)")
    fb_from: str = arg("", "eval-reward: r_fb and E6's scales from this `train` run's reward.pt (the FB RL trained) "
                           "instead of the offline FB")
    # --- rewards (sections 4-7) ---
    video_clip: str = arg("linspace", "E2's clip of o_{0:t}: 'linspace' (resampled, the paper's) or 'window' (last frames)")
    video_centre: bool = arg(False, "E2: centre latents on exploratory clips' mean (section 4); off: the paper's cosine")
    reward_every: int = arg(25, "E2 is computed every this many env steps and held in between (section 4; the "
                                "paper: 128 of 500)")
    render_every: int = arg(5, "the reward's frames are rendered every this many env steps (and at the episode's "
                               "end) and held in between (section 4); FB's replay keeps the rendered steps")
    fb_reward: str = arg("value", "E5: 'value', F(s,a,z*)^T z* (the paper's); 'advantage', its excess over "
                                  "uniform actions' at s; 'record', its new highs along the episode; 'shaping', "
                                  "gamma Phi(o') - Phi(o), or 'kernel', Phi(o'), with Phi(o) = B(psi(o))^T z* "
                                  "(section 6)")
    fb_steps: int = arg(3000, "training steps of the offline FB (section 6), which eval-reward judges and RL pays from")
    fb_batch: int = arg(256, "FB transitions per step (published: 1024; 256 keeps CPU steps ~4x cheaper)")
    explore_episodes: int = arg(20, "random and noisy-expert episodes in the offline FB's data (section 6)")
    fb_cap: bool = arg(False, "cap r_fb at the highest value F gives its own training data for the goal (section 6)")
    fb_conservative: float = arg(0.0, "weight of FB's value-conservative penalty on actions the data did not take "
                                      "(Jeen et al. 2024; section 6); 0: off")
    video_weight: float = arg(1.0, "alpha of E6: weight of the standardised r_video (section 7)")
    fb_weight: float = arg(1.0, "beta of E6: weight of the standardised r_fb (section 7)")
    hybrid_weight: float = arg(0.1, "gen+dense: alpha and beta are scaled by this, keeping E6 below the env's reward")
    # --- reinforcement learning (sections 8-9) ---
    reward: str = arg("dense", "the agent's reward: gen (E6, reward-free), gen+dense, dense, sparse, clip-text")
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
    obs_norm: bool = arg(True, "standardise SAC's observations by statistics of the random-action steps (section 8)")
    fb_online: bool = arg(False, "gen modes: FB trains online on the agent's replay and r_fb is paid from --fb-freeze "
                                 "on (the paper's code); off: the offline FB, frozen before SAC (section 6)")
    fb_every: int = arg(4, "--fb-online: one FB update every this many env steps (one costs 2-3.6 SAC updates)")
    fb_warmup: int = arg(1000, "--fb-online: FB updates on the exploratory data before SAC starts")
    fb_freeze: int = arg(25_000, "--fb-online: FB stops training, and r_fb starts paying, at this env step (the "
                                 "paper: 100k of 1M)")
    fb_demos: bool = arg(False, "--fb-online: the task's expert demos join FB's replay (section 9); off: the paper's")
    goal_video: str = arg("", "a goal video of your own, a GIF or a folder of PNG/JPG frames, used instead of the "
                              "generated ones by E2, E3, E5 and roboclip (the one-shot-demo setting)")
    goal_pool: int = arg(50, "training episodes start from a fixed pool of this many initial states per task and "
                             "seed (MT1's 50), whose goal videos are made once (section 9); 0: a fresh state each")
    resume: bool = arg(False, "train: continue from OUT/checkpoint.pt (saved after each evaluation) if there is one")
    # The bench's tasks are ones SAC on `dense` solves in --steps (50k) on a CPU, so that success tells the modes
    # apart: dense ends at 0.97 on button-press-v3 and drawer-close-v3, and at 0.00 on their harder siblings
    # button-press-topdown-v3 and drawer-open-v3 (assets/RESULTS.md, section 6), which --bench-tasks can name.
    bench_tasks: str = arg("reach-v3,button-press-v3,drawer-close-v3", "bench: comma-separated tasks")
    bench_modes: str = arg("gen,gen+dense,dense,sparse,clip-text", "bench: comma-separated reward modes")
    bench_seeds: str = arg("3", "bench: seeds per task and mode: a count N (seeds 1..N), or the seeds with commas, "
                                "e.g. 2,3 or 3, (to add seeds to a bench, or split one across machines)")
    workers: int = arg(1, "bench: training runs at once, each in its own process with cores/workers threads")
    slurm: str = arg("", "bench: write a SLURM job-array script to this file (one `train` per array index) and stop")
    eval_every: int = arg(5_000, "environment steps between evaluations")
    eval_episodes: int = arg(30, "episodes per evaluation (deterministic actions, held-out initial states)")
    report_states: int = arg(1, "report: held-out initial states whose episodes it averages (its figures: the first)")
    report_fb_reward: str = arg("", "report: score the episodes with this --fb-reward instead of the run's, to ask "
                                    "how another r_fb would rank the agent the run trained")


PRESETS = {
    "tiny": {},  # the dataclass defaults: everything runs on 2 CPU cores, offline, in minutes
    "paper": dict(  # one CUDA GPU and the real pretrained models (the paper's published settings [1])
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
        video_frames=49,  # CogVideoX's native length; the paper's goal videos have 49 frames
        dit_batch=1,  # LoRA on the 5B DiT at batch 1 is what fits one 80 GB GPU (README: paper preset)
        finetune_steps=12_000,  # the paper's released LoRA was trained 12k steps
        finetune_lr=1e-4,
        fb_batch=1024,  # published
        reward_every=128,  # published
        fb_online=True,  # the published schedule: online until the freeze
        fb_freeze=100_000,  # published
        fb_every=1,
    ),
}
# Reward modes (section 9 says what each one is): the env's own two, and each learned reward alone
# (reward-free) or added to the env's dense reward, "<term>+dense"
TERM_MODES = ("gen", "clip-text", "viper", "diffusion-reward", "tadpole", "roboclip")
REWARD_MODES = ("dense", "sparse", *TERM_MODES, *(m + "+dense" for m in TERM_MODES))
REWARD_MODES_HELP = f"choose dense, sparse, or one of {', '.join(TERM_MODES)}, alone or as <mode>+dense"


class VdrError(Exception):
    """A mistake the user can fix; the CLI prints it as one line, without a traceback."""


# Part II's experiments check their own flags (the bench's seeds, the distractions) by adding a function
# (args) -> None here that raises VdrError, so every mistake stops in check_args, before any work is done.
ARG_CHECKS: list = []


def check_args(args: Args) -> None:
    """Stop early, in one line, on settings that would fail deep inside a library later."""
    check_task(args.task)
    if args.reward not in REWARD_MODES:
        raise VdrError(f"unknown reward mode {args.reward!r}; {REWARD_MODES_HELP}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise VdrError(f"--device {args.device} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                       "use --device cpu (or --preset tiny), or install a CUDA build of torch")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise VdrError(f"unknown device {args.device!r}; use 'cpu' or 'cuda'")
    for task in args.bench_tasks.split(","):
        check_task(task)
    for mode in args.bench_modes.split(","):
        if mode not in REWARD_MODES:
            raise VdrError(f"unknown reward mode {mode!r} in --bench-modes; {REWARD_MODES_HELP}")
    for check in ARG_CHECKS:  # Part II's flags (section 1's ARG_CHECKS)
        check(args)
    if args.fb_reward not in FB_REWARDS:
        raise VdrError(f"unknown --fb-reward {args.fb_reward!r}; choose one of: {', '.join(FB_REWARDS)}")
    if args.report_fb_reward and args.report_fb_reward not in FB_REWARDS:
        raise VdrError(f"unknown --report-fb-reward {args.report_fb_reward!r}; choose one of: {', '.join(FB_REWARDS)}")
    if args.fb_cap and args.fb_reward not in ("value", "record"):
        raise VdrError(f"--fb-cap caps F's value; use it with --fb-reward value or record, not {args.fb_reward!r}")
    if args.video_clip not in VIDEO_CLIP_MODES:
        raise VdrError(f"unknown --video-clip {args.video_clip!r}; choose one of: {', '.join(VIDEO_CLIP_MODES)}")
    for name in ("steps", "episodes", "episode_length", "image_size", "batch_size", "eval_episodes", "fb_steps",
                 "fb_batch", "reward_every", "explore_episodes", "fb_every", "workers", "report_states", "render_every"):
        if getattr(args, name) <= 0:
            raise VdrError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.zoom < 1 or (args.zoom != 1 and task_suite(args.task)):
        raise VdrError(f"--zoom {args.zoom}: give 1 or more, and only for Meta-World tasks (a suite has its own views)")
    if args.goal_pool < 0:
        raise VdrError(f"--goal-pool must be 0 (a fresh initial state per episode) or positive, got {args.goal_pool}")
    if args.video_frames % 8 != 1:  # 4k+1 frames -> k+1 latent frames, and k+1 must be odd (see section 3)
        raise VdrError(f"--video-frames must be 8k+1, e.g. 9, 17 or 49; got {args.video_frames}")
    if args.episode_length > 500:
        raise VdrError(f"--episode-length {args.episode_length} is over Meta-World's limit of 500 steps")


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
    "cartpole-swingup": "the cart swings the pole up and balances it upright",
    "reacher-easy": "the two-link arm moves its fingertip into the red target",
    "finger-spin": "the finger flicks the hinged body so that it spins",
    "cheetah-run": "the cheetah runs forward",
    "walker-walk": "the walker walks forward upright",
    "ball_in_cup-catch": "the cup swings the ball up and catches it",
}


def task_prompt(task: str) -> str:
    """The goal prompt of a task; tasks without a hand-written one get 'the robot arm does <name>'."""
    return TASK_PROMPTS.get(task, "the robot arm does " + task.removesuffix("-v3").replace("-", " "))


def meta_world_tasks() -> list[str]:
    import metaworld
    return sorted(metaworld.ALL_V3_ENVIRONMENTS)


# Other task suites. The method asks of a task only an env with MetaWorld's interface (below) and an expert
# whose episodes are the finetuning videos. Another suite plugs in by adding a TaskSuite to TASK_SUITES, so
# that Part I never names it: Part II adds the DeepMind Control tasks under distraction (section 15).
@dataclass(frozen=True)
class TaskSuite:
    name: str
    tasks: tuple[str, ...]
    make_env: object  # (args) -> the env of args.task
    expert: object  # (args) -> the expert of args.task: policy.get_action(obs) -> action
    data_key: object  # (args) -> dict: the suite's settings that change its frames (part of cache keys)


TASK_SUITES: list[TaskSuite] = []


def task_suite(task: str) -> TaskSuite | None:
    """The suite that holds `task`, or None for a Meta-World task."""
    return next((suite for suite in TASK_SUITES if task in suite.tasks), None)


def check_task(task: str) -> None:
    tasks = meta_world_tasks()
    if task not in tasks and task_suite(task) is None:
        raise VdrError(f"unknown task {task!r}; Meta-World v3 tasks are: {', '.join(tasks)}"
                       + "".join(f"; {suite.name} tasks: {', '.join(suite.tasks)}" for suite in TASK_SUITES))


class MetaWorld:
    """One Meta-World v3 task behind gymnasium's reset/step API, plus `render()` for the reward side.

    obs: (39,) float32 state.  action: (4,) float32 in [-1, 1] (hand dx, dy, dz, gripper).
    info["success"]: 1.0 when the task is solved at this step.  render(): (H, W, 3) uint8 frame.
    """

    def __init__(self, task: str, image_size: int = 64, camera: str = "corner", episode_length: int = 150,
                 zoom: float = 1.0):
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
        # invisible at 64 px, and they cost most of a CPU render's time (assets/RESULTS.md, section 10).
        self.sawyer.model.vis.quality.offsamples = 0  # no multisample anti-aliasing buffer
        try:
            self.renderer = mujoco.Renderer(self.sawyer.model, image_size, image_size)
        except mujoco.FatalError as err:
            self.sawyer.close()
            raise VdrError(f"MuJoCo cannot render off-screen ({err}); it reads MUJOCO_GL when first imported, so "
                           "set MUJOCO_GL=egl (or osmesa) in the shell, or import vdr before mujoco") from None
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        if zoom != 1:  # narrow the camera's field of view: tan(fovy/2) shrinks zoom times, so the image is the
            # central 1/zoom of the full view rendered zoom x larger. The corner camera looks at the workspace,
            # whose goals stay inside at zoom 2 (reach-v3's goal box projects to at least 12 px from any edge).
            # On reach-v3 it lets FB rank the states (its 1-2 px target becomes 3-4 px), not SAC learn them
            # (record, section 4.9), so it is an option
            cam = self.sawyer.model.camera(camera).id
            fovy = np.radians(self.sawyer.model.cam_fovy[cam])
            self.sawyer.model.cam_fovy[cam] = np.degrees(2 * np.arctan(np.tan(fovy / 2) / zoom))

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


def make_env(args: Args):
    """The task's environment: a MetaWorld, or the env of the suite that holds the task (TASK_SUITES)."""
    if suite := task_suite(args.task):
        return suite.make_env(args)
    return MetaWorld(args.task, args.image_size, args.camera, args.episode_length, args.zoom)


def expert_policy(task: str, args: Args | None = None):
    """The task's expert: `policy.get_action(obs) -> action`. Meta-World: its scripted policy. Another
    suite's expert comes from the suite (dm_control's is a SAC trained on the task's reward; needs args)."""
    if suite := task_suite(task):
        return suite.expert(dataclasses.replace(args, task=task))
    from metaworld.policies import ENV_POLICY_MAP
    if task not in ENV_POLICY_MAP:
        raise VdrError(f"Meta-World has no scripted expert for {task!r}")
    return ENV_POLICY_MAP[task]()


def resample(frames, n: int):
    """n frames evenly spaced over a video (T, ...) -> (n, ...): E2's linspace resampling, also used to
    turn a 151-frame episode into a training video."""
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return frames[idx]


def rollout(env: MetaWorld, policy, seed: int, render: bool = True, frames: int | None = None,
            render_every: int = 1) -> dict:
    """Run one fixed-length episode. `policy(obs) -> action`.

    Returns frames (T+1, H, W, 3) uint8 (empty if not render; only `frames` evenly spaced ones if given,
    which saves most of the rendering when only a resampled video is needed; with render_every > 1, every
    step's frame, rendered at that stride and at the end and held in between, as the RL loop renders),
    states (T+1, 39), actions (T, 4), env_rewards (T,), success (T,) bool: the per-step success flag.
    """
    keep = set(resample(np.arange(env.episode_length + 1), frames)) if frames else None
    obs, _ = env.reset(seed)
    images, states, actions, rewards, success = [env.render()] if render else [], [obs], [], [], []
    for t in range(1, env.episode_length + 1):
        action = np.clip(policy(obs), -1.0, 1.0).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        states.append(obs); actions.append(action); rewards.append(reward); success.append(info["success"] > 0)
        if render and (keep is None or t in keep):
            drawn = t % render_every == 0 or terminated or truncated  # as the training loop renders
            images.append(env.render() if drawn else images[-1])
        if terminated or truncated:
            break
    return dict(frames=np.array(images, dtype=np.uint8), states=np.array(states, dtype=np.float32),
                actions=np.array(actions, dtype=np.float32), env_rewards=np.array(rewards, dtype=np.float32),
                success=np.array(success, dtype=bool))


# Behaviours that collect episodes. Only "expert" trains the video model; the others are the failures and
# the exploration that section 12 judges rewards on, and the exploratory data FB (section 6) trains on.
BEHAVIOURS = ("expert", "noisy", "stopped", "random")
NOISE_STD = 1.0  # "noisy": the expert's action plus N(0, 1) per dimension (actions lie in [-1, 1]): some
                 # episodes still succeed, many do not, and none moves like a clean demo
STOP_FRACTION = 1 / 3  # "stopped": the expert acts for this fraction of its time to success. The hand drifts on
                       # after the stop (Meta-World moves it toward a mocap target); stopped at 1/2, a reach
                       # episode ends 6.6 cm from the expert's end, just outside the 5 cm success radius and
                       # ~1 px at 64 px; at 1/3, 12 cm (button, drawer: 30 cm) (measured, 5 states)
ACTION_STREAM = 1  # "noisy" and "random" draw actions from default_rng([seed, ACTION_STREAM]), a stream of
                   # their own: Meta-World places the object with default_rng(seed) (gymnasium's np_random), so
                   # actions drawn from default_rng(seed) would replay those draws and correlate with where the
                   # object lies (on drawer-close, random episodes closed the drawer more often than chance)


def behaviour_policy(env: MetaWorld, task: str, behaviour: str, seed: int, args: Args | None = None):
    """policy(obs) -> action for one episode from initial state `seed`:
    expert   Meta-World's scripted expert;
    noisy    the expert with N(0, NOISE_STD^2) added to each action;
    stopped  the expert for STOP_FRACTION of its time to success from this state, then still (zero
             action): a failure that starts exactly like a success;
    random   uniform random actions (an untrained agent, exploring)."""
    if behaviour not in BEHAVIOURS:
        raise VdrError(f"unknown behaviour {behaviour!r}; choose one of: {', '.join(BEHAVIOURS)}")
    rng = np.random.default_rng([seed, ACTION_STREAM])
    if behaviour == "random":
        return lambda obs: rng.uniform(-1, 1, env.action_space.shape[0])
    expert = expert_policy(task, args)
    if behaviour == "noisy":
        return lambda obs: expert.get_action(obs) + rng.normal(0, NOISE_STD, env.action_space.shape[0])
    if behaviour == "stopped":
        success = rollout(env, expert.get_action, seed, render=False)["success"]  # a dry run, no frames
        stop, t = int(STOP_FRACTION * (int(np.argmax(success)) + 1 if success.any() else len(success))), [0]

        def policy(obs):
            t[0] += 1
            return expert.get_action(obs) if t[0] <= stop else np.zeros(env.action_space.shape[0])
        return policy
    return expert.get_action


def collect_demos(args: Args, task: str | None = None, episodes: int | None = None, seed0: int = DEMO_SEED0,
                  frames: int | None = None, behaviour: str = "expert", progress: bool = True) -> dict:
    """Episodes of one task by one behaviour (default: the scripted expert's demos, the domain videos the
    video model is trained on), cached.

    Episode i starts from initial state seed0 + i (held-out episodes use seed0=HELDOUT_SEED0). With
    `frames`, only that many evenly spaced frames per episode are rendered and kept.
    Returns a dict of stacked arrays (N = episodes or args.episodes, T = args.episode_length):
        frames (N, T+1, H, W, 3) uint8, states (N, T+1, 39) float32, actions (N, T, 4) float32,
        env_rewards (N, T) float32, success (N, T) bool, seeds (N,) int64, and prompt (the task's text).
    An episode counts as a success if it succeeded at any step (door-open's expert, for one, opens the
    door and then loses the success flag while it lets go).
    """
    from tqdm import tqdm

    task, episodes = task or args.task, episodes or args.episodes
    made_by = (behaviour, NOISE_STD, STOP_FRACTION)  # + the action stream of the two that draw actions
    made_by += (ACTION_STREAM,) if behaviour in ("noisy", "random") else ()  # (expert demos keep their cache)
    path = cache_path(args, "demos", ".npz", task=task, episodes=episodes, seed0=seed0, frames=frames,
                      behaviour=made_by, **data_key(args, task))
    if path.exists():
        try:
            with np.load(path) as data:
                return {k: (str(data[k]) if k == "prompt" else data[k]) for k in data.files}
        except Exception as err:  # atomic writes never leave a partial file, but disks and hands do
            raise VdrError(f"cached demos {path} are unreadable ({type(err).__name__}); "
                           "delete that file and run again") from None
    runs = []
    with make_env(dataclasses.replace(args, task=task)) as env, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Constant", UserWarning)  # the experts' gains clip at 1, harmlessly
        bar = tqdm(range(episodes), desc=f"collect {task} [{behaviour}]", disable=not progress)
        for i in bar:
            policy = behaviour_policy(env, task, behaviour, seed0 + i, args)
            runs.append(rollout(env, policy, seed=seed0 + i, frames=frames))
            bar.set_postfix(success=f"{np.mean([e['success'].any() for e in runs]):.2f}")
    demos = {k: np.stack([e[k] for e in runs]) for k in runs[0]}
    demos.update(seeds=seed0 + np.arange(episodes), prompt=task_prompt(task))
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **demos))
    return demos


def save_frame_strip(frames: np.ndarray, path: Path, n: int = 8, scale: int = 2) -> Path:
    """n frames of a video (T, H, W, 3), evenly spaced, side by side in one PNG."""
    from PIL import Image
    strip = np.concatenate(list(resample(frames, n)), axis=1)  # (H, n*W, 3)
    img = Image.fromarray(strip)
    return atomic_write(path, lambda tmp: img.resize((img.width * scale, img.height * scale),
                                                      Image.NEAREST).save(tmp, format="PNG"))


# =====================================================================================================
# 3. Video diffusion: a CogVideoX-style image+text-to-video model (E1)
# =====================================================================================================
# E1. A video V: (F, 3, H, W) in [-1, 1], F = 4k+1 frames, is encoded by a 3D causal VAE into latents
#         x0 = E(V): (k+1, C, h, w)       (time / 4; space / 4 in the toy model, / 8 in CogVideoX)
#     "Causal": latent frame 0 sees frame 0 alone, so an image is a 1-frame video with a 1-frame latent.
#     CogVideoX's decoder upsamples the latent frames after the first in pairs, so k+1 must be odd:
#     F = 8k'+1 (9, 17, ..., 49 as in CogVideoX).
#     Training noises the latents and teaches a diffusion transformer (DiT) to undo it:
#         x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,       eps ~ N(0, I),  t ~ U{0..999}
#         min_theta  E || v_theta(x_t, t, c_text, c_image) - v_t ||^2,   v_t = sqrt(abar_t) eps - sqrt(1 - abar_t) x0
#     c_text: (L, D) the prompt's token features; c_image: (1, C, h, w) the first frame's latent. As in
#     CogVideoX-I2V, c_image is zero-padded to k+1 latent frames and joins x_t along channels, so the
#     DiT reads (k+1, 2C, h, w) and writes (k+1, C, h, w).
#
# Prediction type. The paper writes E1 for eps; we train v ("v-prediction"), the target CogVideoX itself
# was trained on, with its zero-terminal-SNR schedule (abar_T = 0: sampling starts from pure noise, as in
# training). Since ||v_hat - v||^2 = ||eps_hat - eps||^2 / abar_t, this is E1 with a per-timestep weight;
# eps itself is unusable at abar_T = 0 (x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) divides by zero).
# The paper preset finetunes a real checkpoint, so `diffusion_loss` reads the type from its scheduler.
#
# Default ('toy'): the same diffusers classes at toy size, trained here from scratch in two stages like
# the paper's model: *pretrained* on expert videos of several Meta-World tasks (a stand-in for web-scale
# pretraining), then *finetuned* on the target task's videos. A small CLIP (open_clip) is trained first:
# its text tower gives the DiT its c_text, and section 5 uses it to pick the goal frame (E3).
# `paper` preset: THUDM/CogVideoX-5b-I2V from diffusers' `from_pretrained` (its own T5 text encoder),
# finetuned with LoRA, bf16, one CUDA GPU.
#
# A training video is a whole demo episode resampled to `video_frames` frames (np.linspace over its
# T+1 frames), so its last frames show the task done; a goal video is generated the same way.

PRETRAIN_TASKS = ("reach-v3", "push-v3", "pick-place-v3", "button-press-topdown-v3", "drawer-open-v3",
                  "drawer-close-v3", "door-open-v3", "window-open-v3")  # 8 of Meta-World's MT10 tasks


def to_video_tensor(frames: np.ndarray) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float in [-1, 1]: the layout diffusers' VAEs take."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1.0)
    return video.permute(0, 4, 1, 2, 3)  # (B, 3, T, H, W)


def to_frames(video: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8."""
    video = video.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu().numpy()  # (B, T, H, W, 3)


# ---- 3a. the 3D causal VAE ----
# Toy compression. Three blocks = two 2x downsamplings: 64 px -> 16x16 latents, 8 channels (CogVideoX:
# four blocks, 8x, 16 channels). 8x compression (8x8 latents) blurs away the reach target, the
# button and the drawer handle; 4x keeps them. Time is compressed 4x (9 frames -> 3).
TOY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=8,
    down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
    block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=4,  # groups of 4 channels
    temporal_compression_ratio=4, sample_height=64, sample_width=64,
)
VAE_KL_WEIGHT = 1e-6  # a light KL term keeps the posterior near N(0, I), as in LDM's VAEs
VAE_FOREGROUND_WEIGHT = 10.0  # extra weight of pixels that differ from the task's median frame (see below)


def vae_encode(vae, video: torch.Tensor) -> torch.Tensor:
    """E(V): (B, 3, F, H, W) in [-1, 1] -> latents (B, k+1, C, h, w), the posterior MEAN (a deterministic
    reward; the paper's code draws a sample) times the VAE's scaling factor, in the (batch, time, channel) order the DiT takes."""
    latents = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mean  # (B, C, k+1, h, w)
    return (latents * vae.config.scaling_factor).permute(0, 2, 1, 3, 4)  # (B, k+1, C, h, w)


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """D(x0): latents (B, k+1, C, h, w) -> video (B, 3, 4k+1, H, W) in [-1, 1]."""
    latents = latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor  # (B, C, k+1, h, w)
    return vae.decode(latents.to(vae.dtype)).sample


def vae_loss(vae, video: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted reconstruction MSE + VAE_KL_WEIGHT * KL. video (B, 3, F, H, W); weight (B, 1, F, H, W)."""
    posterior = vae.encode(video).latent_dist
    recon = vae.decode(posterior.sample()).sample  # (B, 3, F, H, W); a posterior *sample* while training
    mse = (weight * (recon - video) ** 2).sum() / (weight.sum() * 3)
    return mse + VAE_KL_WEIGHT * posterior.kl().mean() / video[0].numel()


def foreground_weight(frames: np.ndarray, background: np.ndarray) -> torch.Tensor:
    """Per-pixel loss weight (B, 1, T, H, W): 1 + VAE_FOREGROUND_WEIGHT where a frame differs from the
    task's median frame by more than 8/255. Why: the arm, the object and the goal marker cover a few
    percent of a 64 px frame, so a plain MSE is won by drawing the table well and the arm blurred."""
    diff = np.abs(frames.astype(np.int16) - background.astype(np.int16)).max(-1) > 8  # (B, T, H, W)
    return 1.0 + VAE_FOREGROUND_WEIGHT * torch.from_numpy(diff).float().unsqueeze(1)


# ---- 3b. a small CLIP: the DiT's text encoder, and the image features of E3 and FB ----
# Toy sizes: a 64 px ViT with 8 px patches (64 tokens) and a 16-token text transformer. open_clip's own
# BPE tokenizer is bundled with the package, so nothing is downloaded.
TOY_CLIP_NAME = "vdr-toy-clip"
TOY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
# Caption design. A caption names the task AND the frame's place in its video:
#     "<task prompt>, <stage>"   with stage "start", "middle" or "end": the third of the video the frame
#                                 lies in.
# That is all a video dataset gives (a task's text and its frames' order), so no success flag, reward or
# other label of the environment reaches CLIP, and through it E3's goal frame and FB's features: the
# reward-free modes stay reward-free. A training video is a whole demo episode, which ends with the task
# done, so "..., end" comes to mean "the task's final state". Contrastive training on these makes
# "..., end" closer to the frames at a video's end than to the same scene earlier: section 5 (E3) scores a
# goal video's frames against GOAL_STAGE's caption and picks the best, the frame the agent should reach.
# Task prompts alone would not do that: every frame of an episode shares the prompt, so CLIP would learn
# to tell tasks apart, not progress.
STAGES = ("start", "middle", "end")
GOAL_STAGE = "end"


def caption(prompt: str, stage: str) -> str:
    return f"{prompt}, {stage}"


def frame_stages(n: int) -> np.ndarray:
    """Per-frame stage index (n,) of an n-frame video: the third of the video each frame lies in."""
    return np.minimum(np.arange(n) * len(STAGES) // n, len(STAGES) - 1)


def register_toy_clip(cache_dir: str) -> str:
    """Make TOY_CLIP_CONFIG known to open_clip under TOY_CLIP_NAME (open_clip reads configs from JSON)."""
    import open_clip
    path = Path(cache_dir) / "clip" / f"{TOY_CLIP_NAME}.json"
    if not path.exists():
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(TOY_CLIP_CONFIG)))
    open_clip.add_model_config(path)
    return TOY_CLIP_NAME


def create_toy_clip():
    """A randomly initialised toy CLIP (open_clip logs a warning that no pretrained weights were loaded:
    that is the point here, so it is silenced)."""
    import logging
    import open_clip
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    try:
        return open_clip.create_model(TOY_CLIP_NAME)
    finally:
        root.setLevel(level)


def clip_image_features(clip, frames: np.ndarray) -> torch.Tensor:
    """CLIP image embeddings of frames (N, H, W, 3) uint8 -> (N, D), unit norm."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    device = next(clip.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float() / 255  # (N,3,H,W)
    size = clip.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    dtype = next(clip.parameters()).dtype  # a bf16 CLIP (the paper preset) takes bf16 pixels
    return clip.encode_image(((x - mean) / std).to(dtype), normalize=True)


def clip_text_tokens(clip, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token features of the text tower (B, L) -> (B, L, width): the DiT's c_text in the toy model.
    (open_clip's encode_text pools these into one vector; the DiT attends to all of them, as CogVideoX
    attends to all of T5's.)"""
    x = clip.token_embedding(tokens) + clip.positional_embedding  # (B, L, width)
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    return clip.ln_final(x)  # (B, L, width)


def load_clip(args: Args, weights: Path | None = None):
    """(clip, tokenizer). Toy: TOY_CLIP_CONFIG, with trained weights if given. Otherwise the open_clip
    architecture args.clip_model with args.clip_pretrained: a pretrained tag or a local weights file."""
    import open_clip
    dtype = getattr(torch, args.dtype)
    if args.clip_model == "toy":
        name = register_toy_clip(args.cache_dir)
        clip = create_toy_clip()
        if weights is not None:
            clip.load_state_dict(load_checkpoint(weights))
    else:
        if args.clip_model not in open_clip.list_models():
            raise VdrError(f"unknown open_clip architecture {args.clip_model!r}; "
                           "see open_clip.list_models(), or use --clip-model toy")
        try:
            clip = open_clip.create_model(args.clip_model, pretrained=args.clip_pretrained or None)
        except Exception as err:  # no network here, a wrong tag, a wrong file
            raise VdrError(f"could not load CLIP {args.clip_model} / {args.clip_pretrained!r} "
                           f"({type(err).__name__}: {str(err)[:120]}); give a local weights file with "
                           "--clip-pretrained PATH") from None
        name = args.clip_model
    tokenizer = open_clip.get_tokenizer(name)
    return clip.to(args.device, dtype).eval().requires_grad_(False), tokenizer


# ---- 3c. the diffusion transformer (DiT), the scheduler, the loss and the sampler ----
# Toy DiT: 4 layers, width 128, 2x2 latent patches -> 64 tokens per latent frame (5 x 64 for 17 frames),
# plus 16 text tokens in the same attention (CogVideoX's "expert transformer" blocks).
TOY_DIT_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, num_layers=4, time_embed_dim=128,
    in_channels=2 * TOY_VAE_CONFIG["latent_channels"],  # noisy latents + first-frame latents (I2V)
    out_channels=TOY_VAE_CONFIG["latent_channels"],
    text_embed_dim=TOY_CLIP_CONFIG["text_cfg"]["width"], max_text_seq_length=TOY_CLIP_CONFIG["text_cfg"]["context_length"],
    sample_height=16, sample_width=16, sample_frames=17, patch_size=2,
    use_rotary_positional_embeddings=False,  # fixed 3D sin-cos positions, as CogVideoX-2B
)
# CogVideoX's own DDIM scheduler, configured as the 5B checkpoints ship it.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
    clip_sample=False, set_alpha_to_one=True, snr_shift_scale=1.0,
)


def dit_predict(transformer, noisy_latents, timesteps, image_latents, prompt_embeds, image_rotary_emb=None):
    """The DiT's output for x_t (B, k+1, C, h, w) at timesteps (B,), conditioned on c_image (B, 1, C, h, w),
    zero-padded here to k+1 latent frames and joined along channels, and c_text (B, L, D): (B, k+1, C, h, w)."""
    B, n = noisy_latents.shape[:2]
    padding = image_latents.new_zeros(B, n - 1, *image_latents.shape[2:])
    image_latents = torch.cat([image_latents, padding], dim=1)  # (B, k+1, C, h, w): c_image, zero-padded
    model_input = torch.cat([noisy_latents, image_latents], dim=2)  # (B, k+1, 2C, h, w)
    return transformer(hidden_states=model_input, encoder_hidden_states=prompt_embeds, timestep=timesteps,
                       image_rotary_emb=image_rotary_emb, return_dict=False)[0]


def diffusion_loss(transformer, scheduler, latents, image_latents, prompt_embeds, gen: torch.Generator,
                   image_rotary_emb=None) -> torch.Tensor:
    """E1 on one batch. latents (B, k+1, C, h, w) = x0; image_latents (B, 1, C, h, w) = c_image;
    prompt_embeds (B, L, D) = c_text. Noise and timesteps are drawn from `gen` (reproducible)."""
    B = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen).to(latents)  # eps
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (B,), generator=gen).to(latents.device)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)  # x_t
    model_pred = dit_predict(transformer, noisy_latents, timesteps, image_latents, prompt_embeds, image_rotary_emb)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)  # v_t
    else:
        target = noise
    return F.mse_loss(model_pred.float(), target.float())


@torch.no_grad()
def sample_latents(transformer, scheduler, image_latents, prompt_embeds, num_latent_frames: int,
                   gen: torch.Generator, steps: int = 50, image_rotary_emb=None) -> torch.Tensor:
    """DDIM sampling (eta = 0, deterministic given the noise): pure noise (B, k+1, C, h, w) -> x0, with
    the first frame's latents (B, 1, C, h, w) and the prompt tokens (B, L, D) as conditions."""
    B, _, C, h, w = image_latents.shape
    scheduler.set_timesteps(steps)
    latents = torch.randn((B, num_latent_frames, C, h, w), generator=gen).to(image_latents)  # x_T
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_pred = dit_predict(transformer, latents, t.expand(B).to(latents.device), image_latents, prompt_embeds,
                                 image_rotary_emb)  # (B, k+1, C, h, w)
        latents = scheduler.step(model_pred, t, latents, return_dict=False)[0]  # x_t -> x_{t-1}
    return latents


# ---- 3d. training: one resumable loop; CLIP (contrastive), VAE and DiT; pretrain -> finetune ----
SAVE_EVERY = 100  # optimisation steps between resumable training-state checkpoints


def load_checkpoint(path: Path):
    """torch.load with a one-line error for a missing or corrupt file."""
    if not Path(path).exists():
        raise VdrError(f"checkpoint {path} does not exist; run the command that makes it (see README)")
    try:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise VdrError(f"checkpoint {path} is unreadable ({type(err).__name__}); delete it and run again") from None


def load_pretrained(cls, path, what: str, **kwargs):
    """cls.from_pretrained(path) (a local folder or a hub id) with a one-line error when it fails."""
    try:
        return cls.from_pretrained(str(path), **kwargs)
    except Exception as err:
        raise VdrError(f"could not load the {what} from {path} ({type(err).__name__}: {str(err)[:150]}); "
                       "check the name or folder, or delete a corrupt cache folder and run again") from None


def own_random_stream(stage):
    """For a cached stage that trains (it seeds torch's global generator itself): run it in a fork of that
    generator, so that a cache miss leaves the caller's random stream as a cache hit does, and a run gives the
    same numbers whether its caches were cold or warm."""
    @functools.wraps(stage)
    def forked(*args, **kwargs):
        with torch.random.fork_rng():
            return stage(*args, **kwargs)
    return forked


def fit(model: nn.Module, loss_fn, steps: int, lr: float, seed: int, state: Path, desc: str,
        progress: bool = True) -> list[float]:
    """The one training loop of the video models: AdamW on loss_fn(gen) for `steps` steps, with a linear
    warm-up and cosine decay, tqdm showing the loss. Only parameters with requires_grad train (LoRA: the
    adapters). All randomness comes from `gen`, and every SAVE_EVERY steps the trainable weights, the
    optimiser and `gen` are saved to `state`: an interrupted run resumes and ends where an uninterrupted
    one would. Returns the per-step losses (the state file is removed at the end)."""
    from tqdm import tqdm
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    warmup = min(100, steps // 10)  # a short warm-up: Adam's first steps are large with fresh moments
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    start, losses = 0, []
    if state.exists():
        ckpt = load_checkpoint(state)
        model.load_state_dict(ckpt["trainable"], strict=False)
        opt.load_state_dict(ckpt["optimizer"]); schedule.load_state_dict(ckpt["schedule"])
        gen.set_state(ckpt["generator"]); start, losses = ckpt["step"], ckpt["losses"]
    model.train()
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress)
    for step in bar:
        loss = loss_fn(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)  # guards the early steps of attention models
        opt.step(); schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % SAVE_EVERY == 0 and step + 1 < steps:
            ckpt = {"trainable": {n: p.detach() for n, p in params.items()}, "optimizer": opt.state_dict(),
                    "schedule": schedule.state_dict(), "generator": gen.get_state(), "step": step + 1,
                    "losses": losses}
            atomic_write(state, lambda tmp: torch.save(ckpt, tmp))
    model.eval()
    state.unlink(missing_ok=True)
    return losses


def stage_key(args: Args, tasks, init: Path | None) -> dict:
    """Cache-key inputs of a toy CLIP or VAE: pretrained on `tasks` (names or prompts), or continued from
    the weights at `init` on args.task's demos (finetuning on a new domain)."""
    if init is None:  # PRETRAIN_TASKS are Meta-World's
        return dict(task="pretrain", tasks=sorted(tasks), episodes=args.pretrain_episodes, **data_key(args, "pretrain"))
    return dict(task=args.task, init=f"{init.parent.name}/{init.name}", episodes=args.episodes, **data_key(args))


def clip_batch(data: dict, gen: torch.Generator):
    """One frame per (task, stage) caption that the data has: (N, H, W, 3) frames and N unique captions,
    so that each frame's one positive in the contrastive loss is its own caption."""
    frames, texts = [], []
    for prompt, (video, stage) in data.items():
        for s, name in enumerate(STAGES):
            ep_idx, t_idx = np.nonzero(stage == s)
            if len(ep_idx):
                j = int(torch.randint(len(ep_idx), (), generator=gen))
                frames.append(video[ep_idx[j], t_idx[j]]); texts.append(caption(prompt, name))
    return np.stack(frames), texts


@own_random_stream
def train_clip(args: Args, demos: dict[str, dict], progress: bool = True, init: Path | None = None) -> Path:
    """Train the toy CLIP on demo frames and their stage captions (cached), from scratch or, with `init`,
    on from those weights (finetuning on a new domain). Returns the weights path."""
    import open_clip
    path = cache_path(args, "clip", ".pt", **stage_key(args, demos, init), config=TOY_CLIP_CONFIG, steps=args.clip_steps,
                      seed=args.seed, captions=STAGES)
    if path.exists():
        return path
    seed_everything(args.seed)
    register_toy_clip(args.cache_dir)
    clip = create_toy_clip().to(args.device).train()  # every toy model trains on args.device
    if init is not None:
        clip.load_state_dict(load_checkpoint(init))
    tokenizer = open_clip.get_tokenizer(TOY_CLIP_NAME)
    # per prompt: its videos (N, F, H, W, 3) and the stages of those frames (N, F), from their order alone
    data = {d["prompt"]: (d["frames"], np.broadcast_to(frame_stages(d["frames"].shape[1]), d["frames"].shape[:2]))
            for d in demos.values()}
    loss_fn = open_clip.ClipLoss()

    def loss(gen):
        frames, texts = clip_batch(data, gen)
        image = clip_image_features(clip, frames)  # (N, D)
        text = clip.encode_text(tokenizer(texts).to(args.device), normalize=True)  # (N, D)
        return loss_fn(image, text, clip.logit_scale.exp())

    fit(clip, loss, args.clip_steps, lr=1e-3, seed=args.seed, state=path.with_suffix(".state"), desc="clip",
        progress=progress)
    atomic_write(path, lambda tmp: torch.save(clip.state_dict(), tmp))
    return path


VAE_CLIP = 9  # frames per VAE training window: 1 (encoded alone, causally) + 2 x 4 -> 3 latent frames
VAE_BATCH = 4  # windows per step: 36 frames
# Every toy model trains in float32, also where the CPU has native bf16 (AVX512-BF16, AMX) and bf16 would
# be faster (~0.6 s per VAE step against ~1 s): whether a CPU has bf16 must not decide which video model a
# seed makes. (float32 kernels still round differently with their vector width: assets/RESULTS.md, 13.)


@own_random_stream
def train_vae(args: Args, videos: dict[str, np.ndarray], progress: bool = True, init: Path | None = None) -> Path:
    """Train the toy VAE on random VAE_CLIP-frame windows of the training videos (cached, resumable), from
    scratch or, with `init` (a saved VAE folder), on from it.

    videos: {prompt: (N, F, H, W, 3) uint8}. Saves the AutoencoderKLCogVideoX with its scaling_factor set
    so that latents have unit standard deviation (as Stable Diffusion's was chosen); returns the folder."""
    from diffusers import AutoencoderKLCogVideoX
    path = cache_path(args, "vae", "", **stage_key(args, videos, init), frames=args.video_frames, config=TOY_VAE_CONFIG,
                      steps=args.vae_steps, seed=args.seed, dtype="float32")
    if path.exists():
        return path
    seed_everything(args.seed)
    vae = (AutoencoderKLCogVideoX(**TOY_VAE_CONFIG) if init is None else
           load_pretrained(AutoencoderKLCogVideoX, init, "VAE").train().requires_grad_(True)).to(args.device)
    all_videos = np.concatenate(list(videos.values()))  # (N_all, F, H, W, 3)
    backgrounds = np.concatenate([np.repeat(np.median(v, axis=(0, 1))[None], len(v), 0)
                                  for v in videos.values()]).astype(np.uint8)  # (N_all, H, W, 3) per task

    def loss(gen):
        i = torch.randint(len(all_videos), (VAE_BATCH,), generator=gen).numpy()
        t0 = torch.randint(all_videos.shape[1] - VAE_CLIP + 1, (), generator=gen).item()
        frames = all_videos[i, t0:t0 + VAE_CLIP]  # (B, VAE_CLIP, H, W, 3)
        weight = foreground_weight(frames, backgrounds[i][:, None])  # (B, 1, VAE_CLIP, H, W)
        with torch.random.fork_rng():  # (the posterior sample uses torch's global RNG)
            torch.manual_seed(int(torch.randint(2**31, (), generator=gen)))
            return vae_loss(vae, to_video_tensor(frames).to(args.device), weight.to(args.device))

    fit(vae, loss, args.vae_steps, lr=1e-3, seed=args.seed, state=path.with_suffix(".state"), desc="vae",
        progress=progress)
    with torch.no_grad():  # scaling factor = 1 / std of the latents of (up to) 64 training videos
        vae.eval()
        sample = to_video_tensor(all_videos[:: max(1, len(all_videos) // 64)])
        std = torch.cat([vae.encode(v[None].to(args.device)).latent_dist.mean for v in sample]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return atomic_dir(path, vae.save_pretrained)


def training_videos(args: Args, demos: dict) -> np.ndarray:
    """Demo episodes (N, T+1, H, W, 3) -> training videos (N, video_frames, H, W, 3)."""
    return resample(demos["frames"].swapaxes(0, 1), args.video_frames).swapaxes(0, 1)


@torch.no_grad()
def encode_videos(vae, videos: np.ndarray, batch: int = 8):
    """Videos (N, F, H, W, 3) uint8 -> latents (N, k+1, C, h, w) and first-frame latents (N, 1, C, h, w)."""
    latents, image_latents = [], []
    for i in range(0, len(videos), batch):
        video = to_video_tensor(videos[i:i + batch])  # (b, 3, F, H, W)
        latents.append(vae_encode(vae, video))
        image_latents.append(vae_encode(vae, video[:, :, :1]))  # the first frame alone: c_image
    return torch.cat(latents).float(), torch.cat(image_latents).float()


@dataclass
class VideoModel:
    """Everything that generates and scores videos: the VAE (E1, E2), the DiT and its scheduler (E1), and
    the text encoder that conditions it. `clip` is the toy CLIP or the paper's, for E3; `pipe` is the
    diffusers pipeline on the paper path (its T5 encodes the prompts), None in the toy model."""
    vae: nn.Module
    transformer: nn.Module
    scheduler: object
    clip: nn.Module
    tokenizer: object
    pipe: object = None
    name: str = "toy"  # identifies the weights, for cache keys of what the model generates

    @torch.no_grad()
    def prompt_embeds(self, prompts: list[str]) -> torch.Tensor:
        """c_text: (B, L, D). Toy: the CLIP text tower's tokens; paper: CogVideoX's own T5."""
        if self.pipe is not None:
            return self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                           device=self.transformer.device)[0]
        tokens = self.tokenizer(prompts).to(next(self.clip.parameters()).device)  # (B, L)
        return clip_text_tokens(self.clip, tokens).to(self.transformer.device, self.transformer.dtype)

    def rotary(self, latents: torch.Tensor):
        """The DiT's positions for latents (B, k+1, C, h, w): CogVideoX-5B's 3D rotary embeddings, or None
        where the DiT has fixed positions (the toy's, CogVideoX-2B's)."""
        if self.pipe is None or not self.transformer.config.use_rotary_positional_embeddings:
            return None
        s = self.pipe.vae_scale_factor_spatial  # latent -> pixel size
        return self.pipe._prepare_rotary_positional_embeddings(latents.shape[3] * s, latents.shape[4] * s,
                                                               latents.shape[1], latents.device)


def train_dit(args: Args, model: VideoModel, videos: dict[str, np.ndarray], steps: int, lr: float, path: Path,
              desc: str, progress: bool = True, image_rotary_emb=None) -> list[float]:
    """Train model.transformer (or its LoRA adapters) with E1 on videos {prompt: (N, F, H, W, 3)}. The VAE
    and the text encoder stay frozen, so the latents and prompt tokens are computed once, up front."""
    model.vae.requires_grad_(False)
    latents, image_latents, prompt_embeds = [], [], []
    for prompt, v in videos.items():
        lat, img = encode_videos(model.vae, v, batch=1 if model.pipe else 8)
        latents.append(lat); image_latents.append(img)
        prompt_embeds.append(model.prompt_embeds([prompt]).float().cpu().expand(len(v), -1, -1))
    latents, image_latents, prompt_embeds = torch.cat(latents), torch.cat(image_latents), torch.cat(prompt_embeds)
    # (N, k+1, C, h, w), (N, 1, C, h, w), (N, L, D)
    if model.pipe is not None:
        model.pipe.text_encoder.to("cpu")  # T5-XXL (~9 GB in bf16) is not needed again while training
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    dtype = getattr(torch, args.dtype)

    def loss(gen):
        i = torch.randint(len(latents), (args.dit_batch,), generator=gen)
        batch = (x[i].to(args.device, dtype) for x in (latents, image_latents, prompt_embeds))
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            return diffusion_loss(model.transformer, model.scheduler, *batch, gen, image_rotary_emb=image_rotary_emb)

    return fit(model.transformer, loss, steps, lr, args.seed, path.with_suffix(".state"), desc, progress)


def save_toy_model(model: VideoModel, path: Path, losses: list[float], key: dict | None = None,
                   half: bool = False) -> Path:
    """The toy model as one folder in the real checkpoint's layout (vae/, transformer/, scheduler/), plus
    clip.safetensors, the training losses and (pretrained) its key.json; written under a temporary name and
    renamed when complete. half: weights stored in float16 (loaded back into float32)."""
    from safetensors.torch import load_file, save_file

    def write(tmp: Path):
        for name in ("vae", "transformer", "scheduler"):
            getattr(model, name).save_pretrained(tmp / name)
        save_file({k: v.contiguous() for k, v in model.clip.state_dict().items()}, tmp / "clip.safetensors")
        if half:  # rounds each stored weight to float16, halving the folder; the model in memory is unchanged
            for file in tmp.rglob("*.safetensors"):
                save_file({k: v.half() for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
        (tmp / "losses.json").write_text(json.dumps(losses))
        if key is not None:
            (tmp / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
    return atomic_dir(path, write)


def load_toy_model(args: Args, path: Path) -> VideoModel:
    """A folder written by save_toy_model, loaded with the same from_pretrained calls as a real checkpoint
    (in float32, whatever precision the folder stores)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    path = Path(path)
    vae = load_pretrained(AutoencoderKLCogVideoX, path, "VAE", subfolder="vae", torch_dtype=torch.float32)
    transformer = load_pretrained(CogVideoXTransformer3DModel, path, "DiT", subfolder="transformer",
                                  torch_dtype=torch.float32)
    scheduler = load_pretrained(CogVideoXDDIMScheduler, path, "scheduler", subfolder="scheduler")
    clip, tokenizer = load_clip(args, path / "clip.safetensors")
    return VideoModel(vae.to(args.device).eval().requires_grad_(False), transformer.to(args.device).eval(), scheduler,
                      clip, tokenizer, name=path.name)


# The pretrained toy model is shipped with vdr (assets/toy-video-model: `pretrain`'s output at the default
# settings, float16 safetensors, ~14 MB), as CogVideoX is downloaded, not trained: a run starts at
# finetuning. `pretrain` copies it into the cache when the run's settings are the ones it was trained with
# (its key.json equals pretrain_key(args)), and trains from scratch otherwise or with --no-shipped-toy,
# which is how the shipped folder is reproduced. Its weights are stored in float16 whichever way it is
# made, so a trained and a shipped model are the same weights; the rounding leaves the goal videos and
# rewards as they were (assets/RESULTS.md, section 13).
SHIPPED_TOY = Path(__file__).resolve().parent / "assets" / "toy-video-model"


def pretrain_key(args: Args) -> dict:
    """Every setting pretraining reads: its data (tasks, episodes, frames, rendering) and each stage's."""
    key = dict(task="pretrain", tasks=PRETRAIN_TASKS, episodes=args.pretrain_episodes, frames=args.video_frames,
               **data_key(args, "pretrain"), seed=args.seed, weights="float16",
               clip=dict(config=TOY_CLIP_CONFIG, steps=args.clip_steps, captions=STAGES),
               vae=dict(config=TOY_VAE_CONFIG, steps=args.vae_steps),
               dit=dict(config=TOY_DIT_CONFIG, scheduler=SCHEDULER_CONFIG, steps=args.dit_steps,
                        batch=args.dit_batch, lr=args.dit_lr))
    return json.loads(json.dumps(key))  # as key.json reads back (tuples become lists)


@own_random_stream
def pretrain(args: Args, out: Path | None = None, progress: bool = True) -> Path:
    """CLI `pretrain` (toy model): the shipped model where its settings match (see SHIPPED_TOY); otherwise
    demos of PRETRAIN_TASKS -> the small CLIP, the VAE, then the DiT on all tasks' videos. Each stage is
    cached by a key of its inputs and resumable. Returns the folder."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    if args.video_model != "toy":
        raise VdrError("`pretrain` trains the toy model; a pretrained --video-model needs only `finetune`")
    t0 = time.time()
    args = dataclasses.replace(args, zoom=1.0)  # the prior sees the full view; finetuning adapts it to a zoom
    key = pretrain_key(args)
    path = cache_path(args, "video", "", **key)
    shipped = SHIPPED_TOY / "key.json"
    how = "cached"
    if not path.exists() and args.shipped_toy and shipped.exists() and json.loads(shipped.read_text()) == key:
        import shutil
        atomic_dir(path, lambda tmp: shutil.copytree(SHIPPED_TOY, tmp, dirs_exist_ok=True))
        how = f"shipped, from {SHIPPED_TOY.parent.name}/{SHIPPED_TOY.name}"
    elif not path.exists():
        how = "trained"
        # only the frames of the training videos are rendered: ~3x faster collection
        demos = {t: collect_demos(args, t, episodes=args.pretrain_episodes, frames=args.video_frames,
                                  progress=progress) for t in PRETRAIN_TASKS}
        clip_path = train_clip(args, demos, progress)
        videos = {d["prompt"]: training_videos(args, d) for d in demos.values()}
        vae_path = train_vae(args, videos, progress)
        seed_everything(args.seed)
        clip, tokenizer = load_clip(args, clip_path)
        vae = load_pretrained(AutoencoderKLCogVideoX, vae_path, "VAE").to(args.device).eval()
        model = VideoModel(vae, CogVideoXTransformer3DModel(**TOY_DIT_CONFIG).to(args.device),
                           CogVideoXDDIMScheduler(**SCHEDULER_CONFIG), clip, tokenizer)
        losses = train_dit(args, model, videos, args.dit_steps, args.dit_lr, path, "pretrain dit", progress)
        save_toy_model(model, path, losses, key=key, half=True)
    if out:
        write_json(Path(out) / "metrics.json", {"model": str(path), "how": how, "wall_seconds": time.time() - t0})
    print(f"pretrained toy video model ({how}, {time.time() - t0:.0f} s) -> {path}")
    return path


@own_random_stream
def finetune(args: Args, out: Path | None = None, progress: bool = True) -> Path:
    """CLI `finetune`: the pretrained video model finetuned on args.task's demo videos (E1), cached.
    Toy: the whole DiT continues training; paper (a named --video-model): LoRA adapters on its DiT."""
    t0 = time.time()
    demos = collect_demos(args, progress=progress)
    videos = {demos["prompt"]: training_videos(args, demos)}
    if args.video_model != "toy":
        path = finetune_lora(args, videos, progress)
    else:
        base = pretrain(args, progress=progress)
        # A task pretraining never showed (a dm_control task above all, which looks nothing like Meta-World),
        # or a --zoom'd view of one: the toy VAE and CLIP continue on its demos too (clip_steps, vae_steps),
        # then the DiT does. The VAE's latents move with it, so the DiT needs more than the default finetune:
        # reach-v3 at --zoom 2 ended at loss 0.083 after 1000 steps at 3e-4 and 0.043 after 3000 at 1e-3, its
        # goal videos legible only then (record, section 4.9)
        new_domain = {} if args.task in PRETRAIN_TASKS and args.zoom == 1 else {
            "clip": train_clip(args, {args.task: demos}, progress, init=base / "clip.safetensors"),
            "vae": train_vae(args, videos, progress, init=base / "vae")}
        path = cache_path(args, "video", "", task=args.task, base=base.name, episodes=args.episodes,
                          steps=args.finetune_steps, batch=args.dit_batch, lr=args.finetune_lr, **data_key(args),
                          **{k: v.name for k, v in new_domain.items()})
        if not path.exists():
            seed_everything(args.seed)
            model = load_toy_model(args, base)
            if new_domain:
                from diffusers import AutoencoderKLCogVideoX
                model.clip, _ = load_clip(args, new_domain["clip"])
                model.vae = load_pretrained(AutoencoderKLCogVideoX, new_domain["vae"], "VAE").to(args.device).eval()
                model.vae.requires_grad_(False)
            losses = train_dit(args, model, videos, args.finetune_steps, args.finetune_lr, path,
                               f"finetune {args.task}", progress)
            save_toy_model(model, path, losses)
    if out:
        write_json(Path(out) / "metrics.json", {"model": str(path), "wall_seconds": time.time() - t0})
    print(f"finetuned video model for {args.task} ({time.time() - t0:.0f} s) -> {path}")
    return path


# ---- 3e. the paper path: a real pretrained CogVideoX image-to-video checkpoint, finetuned with LoRA ----
# Not runnable offline; the tests run these same calls on a tiny checkpoint they save in the real layout
# (model_index.json, vae/, transformer/, scheduler/, text_encoder/, tokenizer/).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, as diffusers' CogVideoX LoRA script


def load_pipeline(args: Args):
    """diffusers' CogVideoXImageToVideoPipeline from a hub id or a local folder, in args.dtype."""
    from diffusers import CogVideoXImageToVideoPipeline
    pipe = load_pretrained(CogVideoXImageToVideoPipeline, args.video_model, "video model",
                           dtype=getattr(torch, args.dtype))
    pipe.vae.enable_slicing()  # encode/decode one video of a batch at a time: 49 frames at 480 px are large
    drop_learned_positions(pipe.transformer, args.image_size, pipe.vae_scale_factor_spatial)
    return pipe.to(args.device)


def drop_learned_positions(transformer, image_size: int, vae_scale: int) -> bool:
    """CogVideoX-5B-I2V (1.0) adds positional embeddings that it learned for 480x720 frames only (60x90
    latents), and diffusers refuses to run it at any other size. vdr's frames are square (480x480 in the
    paper preset, as the paper code's), so such a checkpoint drops them and keeps its 3D rotary positions,
    which fit any size; the LoRA finetune adapts to the change, and generation drops them the same way.
    CogVideoX's I2V LoRA trainers do this to train at other sizes (their --ignore_learned_positional_embeddings).
    Returns whether it dropped them."""
    cfg = transformer.config
    native = (cfg.sample_height * vae_scale, cfg.sample_width * vae_scale)  # (H, W) in pixels
    # the patch embedding's flag, not the config's (which keeps saying True): a second call is a no-op
    if not transformer.patch_embed.use_learned_positional_embeddings or native == (image_size, image_size):
        return False
    del transformer.patch_embed.pos_embedding  # (1, L, D) buffer, fixed to the native grid
    transformer.patch_embed.use_learned_positional_embeddings = False
    return True


def lora_path(args: Args) -> Path:
    return cache_path(args, "lora", "", task=args.task, model=args.video_model, episodes=args.episodes,
                      rank=args.lora_rank, steps=args.finetune_steps, batch=args.dit_batch, lr=args.finetune_lr,
                      frames=args.video_frames, **data_key(args))


@own_random_stream
def finetune_lora(args: Args, videos: dict[str, np.ndarray], progress: bool = True) -> Path:
    """E1 with LoRA (rank args.lora_rank) on the pretrained DiT; VAE, T5 and the DiT's weights frozen.
    Saves the adapters with diffusers' save_lora_weights. Memory: see the README (paper preset)."""
    from diffusers import CogVideoXImageToVideoPipeline
    try:
        from peft import LoraConfig, get_peft_model_state_dict  # optional: only this path needs peft
    except ImportError:
        raise VdrError("LoRA finetuning needs peft: pip install peft") from None
    path = lora_path(args)
    if path.exists():
        return path
    seed_everything(args.seed)
    pipe = load_pipeline(args)
    transformer = pipe.transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights=True,
                                       target_modules=LORA_TARGETS))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters train in float32, the frozen weights stay in bf16
    if args.device.startswith("cuda"):
        transformer.enable_gradient_checkpointing()  # 49 frames at 480 px: activations dominate memory
    model = VideoModel(pipe.vae, transformer, pipe.scheduler, None, None, pipe=pipe, name=args.video_model)
    rotary = None
    if transformer.config.use_rotary_positional_embeddings:  # CogVideoX-5B: 3D rotary positions
        video = next(iter(videos.values()))
        rotary = pipe._prepare_rotary_positional_embeddings(video.shape[2], video.shape[3],
                                                            (args.video_frames - 1) // 4 + 1, args.device)
    train_dit(args, model, videos, args.finetune_steps, args.finetune_lr, path, f"LoRA {args.task}", progress,
              image_rotary_emb=rotary)
    lora = get_peft_model_state_dict(transformer)
    return atomic_dir(path, lambda tmp: CogVideoXImageToVideoPipeline.save_lora_weights(tmp, transformer_lora_layers=lora))


def load_video_model(args: Args, finetuned: bool = True) -> VideoModel:
    """The video model for args.task: toy (pretrained, then finetuned on the task, both cached) or the
    named pretrained checkpoint with the task's LoRA adapters loaded (if finetuned)."""
    if args.video_model == "toy":
        return load_toy_model(args, finetune(args) if finetuned else pretrain(args))
    pipe = load_pipeline(args)
    name = args.video_model
    if finetuned:
        path = finetune(args)
        pipe.load_lora_weights(str(path))
        name = f"{name}+{path.name}"
    clip, tokenizer = load_clip(args)
    return VideoModel(pipe.vae, pipe.transformer, pipe.scheduler, clip, tokenizer, pipe=pipe, name=name)


# ---- 3f. goal videos ----
GUIDANCE_SCALE = 6.0  # CogVideoX's default classifier-free guidance (paper path only; the toy DiT is
                      # trained without prompt dropout, so it has no unconditional mode to guide against)


@torch.no_grad()
def generate_video(model: VideoModel, first_frame: np.ndarray, prompt: str, num_frames: int, seed: int,
                   steps: int = 50) -> np.ndarray:
    """E1 at inference: a goal video (num_frames, H, W, 3) uint8 from the agent's first frame (H, W, 3)
    and the task prompt. Same seed -> same video."""
    if model.pipe is not None:  # the paper path: diffusers' pipeline (adds rotary positions and CFG)
        from PIL import Image
        H, W = first_frame.shape[:2]
        video = model.pipe(image=Image.fromarray(first_frame), prompt=prompt, height=H, width=W,
                           num_frames=num_frames, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE,
                           generator=torch.Generator(model.transformer.device).manual_seed(seed),
                           output_type="np").frames[0]  # (F, H, W, 3) in [0, 1]
        return (np.asarray(video) * 255).round().astype(np.uint8)
    gen = torch.Generator().manual_seed(seed)
    image_latents = vae_encode(model.vae, to_video_tensor(first_frame[None, None]))  # (1, 1, C, h, w)
    latents = sample_latents(model.transformer, model.scheduler, image_latents, model.prompt_embeds([prompt]),
                             (num_frames - 1) // 4 + 1, gen, steps)  # (1, k+1, C, h, w)
    return to_frames(vae_decode(model.vae, latents))[0]  # (F, H, W, 3)


def frame_hash(frame: np.ndarray) -> str:
    """A frame's identity for caches: the SHA-1 of its pixels."""
    return hashlib.sha1(np.ascontiguousarray(frame).tobytes()).hexdigest()


def goal_video(args: Args, model: VideoModel, first_frame: np.ndarray, seed: int) -> np.ndarray:
    """generate_video, cached by the model, the first frame and the seed (a goal video is reused by every
    reward computed against it)."""
    path = cache_path(args, "goal", ".npy", task=args.task, model=model.name, frames=args.video_frames,
                      steps=args.sample_steps, seed=seed,
                      first_frame=frame_hash(first_frame))
    if path.exists():
        return np.load(path)
    video = generate_video(model, first_frame, task_prompt(args.task), args.video_frames, seed, args.sample_steps)
    atomic_write(path, lambda tmp: np.save(tmp, video))
    return video


def load_goal_video(args: Args) -> np.ndarray:
    """--goal-video: a user's own goal video, a GIF or a folder of PNG/JPG frames (in name order), resized to
    the model's frames and resampled to video_frames: (F, H, W, 3) uint8. One clear line if it cannot be read."""
    from PIL import Image, ImageSequence
    path, size = Path(args.goal_video), (args.image_size, args.image_size)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise VdrError(f"--goal-video {path}: no .png or .jpg frames in this folder")
        images = [Image.open(f) for f in files]
    elif path.suffix.lower() == ".gif" and path.is_file():
        try:
            images = [frame.copy() for frame in ImageSequence.Iterator(Image.open(path))]
        except OSError as err:
            raise VdrError(f"--goal-video {path} is not a readable GIF ({err}); give a GIF or a folder of frames") from None
    else:
        raise VdrError(f"--goal-video {path}: give a .gif file or a folder of .png/.jpg frames (an MP4 can be "
                       "split into frames with `ffmpeg -i video.mp4 frames/%04d.png`)")
    frames = np.stack([np.asarray(im.convert("RGB").resize(size, Image.BICUBIC)) for im in images])  # (N, H, W, 3)
    return resample(frames, args.video_frames)


def save_gif(frames: np.ndarray, path: Path, fps: int = 8) -> Path:
    """A video (T, H, W, 3) uint8 as an animated GIF (8 fps, the paper's goal-video rate), looping."""
    from PIL import Image
    images = [Image.fromarray(f) for f in frames]
    return atomic_write(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True,
                                                          append_images=images[1:], duration=1000 // fps, loop=0))


def goal(args: Args, out: Path | None = None) -> dict:
    """CLI `goal`: a goal video for the task from the first frame of held-out initial state
    HELDOUT_SEED0 + seed; writes goal.gif and goal_strip.png."""
    out = Path(out or default_out(args, "goal"))
    model = load_video_model(args)
    with make_env(args) as env:
        env.reset(seed=HELDOUT_SEED0 + args.seed)
        first_frame = env.render()
    t0 = time.time()
    video = generate_video(model, first_frame, task_prompt(args.task), args.video_frames, args.seed,
                           args.sample_steps)
    seconds = time.time() - t0
    save_gif(video, out / "goal.gif")
    save_frame_strip(video, out / "goal_strip.png", n=min(9, len(video)))
    metrics = {"task": args.task, "prompt": task_prompt(args.task), "frames": len(video),
               "seconds_per_video": seconds, "model": model.name}
    write_json(out / "metrics.json", metrics)
    print(f"goal video for {args.task} ({len(video)} frames, {seconds:.1f} s): '{task_prompt(args.task)}' -> {out}")
    return metrics


# =====================================================================================================
# 4. Video-level reward (E2)
# =====================================================================================================
# E2. The agent's frames so far, o_{0:t}, and the goal video are encoded by the same VAE encoder E (the
# video model's own; the finetune leaves it unchanged, as a LoRA finetune does) and compared by cosine:
#     r_video(t) = <z_t - m, z_goal - m> / (|z_t - m| |z_goal - m|),   z_t = flatten(E(clip_t)),
#                                                                       z_goal = flatten(E(V_goal))
#     clip_t: (F, H, W, 3), F = args.video_frames; z: (k+1) * C * h * w numbers (5 * 8 * 16 * 16 = 10240)
# The paper's E2 is the plain cosine, m = 0. Two ways to turn o_{0:t} into a clip of F frames:
#     "linspace": resample o_{0:t} to F frames (np.linspace), as the paper's code does;
#     "window":   the last F frames at the goal video's frame spacing (the first frame repeated before t=0).
# The default is the paper's: plain cosine (m = 0) of linspace clips. Two variants are offered and
# measured beside it by `eval-reward` (section 12):
#   centring, m = the mean clip latent of exploratory episodes (--video-centre): every clip of a scene
#     shares the static background, so the plain cosine lives in [0.90, 0.97]; subtracting m spreads it
#     over [-0.2, 0.8]. But it also makes random-policy episodes' reward climb with time (the clip of a
#     random episode drifts away from m as it fills with motion, and so does the goal's): on reach-v3,
#     correlation with time on random episodes 0.77 centred vs 0.04 plain (generated goal), which the
#     agent would be paid for doing anything. So it is off by default.
#   window, the last F frames at the goal's spacing (--video-clip window): it judges the recent past only.
# E uses the posterior mean, so the reward is deterministic (the paper's code draws a sample).
# All rewards of an episode are computed in one batched call when it ends; the reward is computed every
# `reward_every` steps and held constant in between. The paper computes it every 128 of 500 steps (4 per
# episode); vdr every 25 of 150 (6), since each computation encodes a whole clip through the VAE and that
# encode was most of the reward's cost at every 10 steps. At 25, eval-reward's numbers stayed within the
# noise of every 10 steps; at 50 (3 per episode) E6's correlation with time fell from 0.88 to 0.72 on
# reach-v3 (assets/RESULTS.md, section 4).
# What E2 reads, and so what must be rendered: a clip resamples o_{0:t} to F = 17 frames, whose spacing t/16
# is ~9 env steps at the end of a 150-step episode. So the frames are rendered every `render_every` = 5
# steps (and at the episode's end) and each step shows the last rendered frame (`hold_frames`): o_t is then
# at most 4 steps old, the same approximation E2's hold makes of the reward in time. Where every frame a
# clip picks is a rendered one, the strided reward equals the full one (a test checks it). FB's replay keeps
# only the steps whose next frame was rendered (section 6): a fifth of the transitions.
VIDEO_CLIP_MODES = ("linspace", "window")


def agent_clips(frames: np.ndarray, times: np.ndarray, num_frames: int, mode: str, spacing: float) -> np.ndarray:
    """For each t in times, the agent's clip (num_frames, H, W, 3) of its frames o_{0:t} (frames: (T+1, H, W, 3)).
    Returns (len(times), num_frames, H, W, 3)."""
    if mode not in VIDEO_CLIP_MODES:
        raise VdrError(f"unknown video clip mode {mode!r}; choose one of: {', '.join(VIDEO_CLIP_MODES)}")
    clips = []
    for t in times:
        if mode == "linspace":
            clips.append(resample(frames[:t + 1], num_frames))
        else:
            clips.append(frames[np.clip(np.round(t - spacing * np.arange(num_frames)[::-1]).astype(int), 0, None)])
    return np.stack(clips)


def rendered_steps(T: int, every: int) -> np.ndarray:
    """The steps 0..T of an episode whose frames the reward renders: 0, every, 2 every, ..., and T. (n,)"""
    return np.unique(np.append(np.arange(0, T + 1, every), T))


def hold_frames(frames: np.ndarray, every: int) -> np.ndarray:
    """frames (T+1, H, W, 3) as a renderer that draws only the rendered_steps leaves them: every step shows the
    last frame rendered at or before it (a zero-order hold, at most every-1 steps old). every=1: unchanged."""
    if every == 1:
        return frames
    return frames[rendered_steps(len(frames) - 1, every)[last_rendered(len(frames) - 1, every)]]  # (T+1, H, W, 3)


def last_rendered(T: int, every: int) -> np.ndarray:
    """For each step 0..T, the position in rendered_steps(T, every) of the last rendered step at or before
    it: (T+1,). Indexes what was computed on the rendered frames alone (frames, CLIP features) per step."""
    steps = rendered_steps(T, every)
    return np.searchsorted(steps, np.arange(T + 1), side="right") - 1


def scored_steps(T: int, every: int) -> np.ndarray:
    """The steps of a T-step episode at which E2 is computed: every, 2 every, ..., and T. (n,)"""
    return np.unique(np.append(np.arange(every, T + 1, every), T))


def hold(times: np.ndarray, scores: np.ndarray, T: int) -> np.ndarray:
    """Per-step rewards (T,) from scores at `times`: step t (1..T) gets the score of the first scored step
    >= t, i.e. the reward for the steps since the previous computation."""
    return scores[np.searchsorted(times, np.arange(1, T + 1))].astype(np.float32)


@torch.no_grad()
def clip_latents(vae, frames: np.ndarray, num_frames: int, every: int = 10, mode: str = "linspace",
                 batch: int = 16) -> torch.Tensor:
    """E(clip_t) for the scored steps t of one episode, frames (T+1, H, W, 3) -> (n, (k+1)*C*h*w) float32."""
    T = len(frames) - 1
    times = scored_steps(T, every)
    spacing = T / (num_frames - 1)  # the goal video's spacing, in env steps, for "window"
    clips = agent_clips(frames, times, num_frames, mode, spacing)  # (n, F, H, W, 3)
    return torch.cat([vae_encode(vae, to_video_tensor(clips[i:i + batch])).flatten(1).float().cpu()
                      for i in range(0, len(clips), batch)])  # (n, (k+1)*C*h*w)


@torch.no_grad()
def latent_similarity(z: torch.Tensor, z_goal: torch.Tensor, reference: torch.Tensor | None) -> np.ndarray:
    """E2's cosine of clip latents z (n, D) with the goal's z_goal (D,), both centred on `reference` (D,)
    when one is given: (n,) in [-1, 1]."""
    if reference is not None:
        z, z_goal = z - reference, z_goal - reference
    return F.cosine_similarity(z, z_goal[None], dim=1).numpy()


def video_reward(vae, frames: np.ndarray, goal_latents: torch.Tensor, num_frames: int, every: int = 10,
                 mode: str = "linspace", reference: torch.Tensor | None = None,
                 latents: torch.Tensor | None = None) -> np.ndarray:
    """E2 for every step of one episode: frames (T+1, H, W, 3) uint8 -> r_video (T,) float32 in [-1, 1].

    goal_latents: vae_encode of the goal video (any shape with (k+1)*C*h*w numbers); reference: m, or None
    for the paper's plain cosine; latents: clip_latents(...) of these frames if the caller has them. Step
    t's reward scores o_{0:t}, computed at t = every, 2 every, ..., T and held until the next computation."""
    T = len(frames) - 1
    z = clip_latents(vae, frames, num_frames, every, mode) if latents is None else latents  # (n, D)
    return hold(scored_steps(T, every), latent_similarity(z, goal_latents.flatten().float().cpu(), reference), T)


# =====================================================================================================
# 5. Goal frame by CLIP (E3)
# =====================================================================================================
# E3.  I* = argmax_k cos(CLIP_img(frame_k), CLIP_txt(prompt)),  frames of the generated goal video.
# The text target is the normalised mean of the prompts' embeddings. Default (toy CLIP): one prompt, the
# task's "end" caption (section 3b explains why the toy CLIP can tell a video's end from its middle). The
# paper's code uses five generic grasp prompts with open_clip ViT-B-32; vdr uses the two that
# the paper quotes, and those are what the `paper` preset uses.
PAPER_GOAL_PROMPTS = ("robot arm grasping an object", "robotic gripper holding something")


def goal_prompts(args: Args) -> list[str]:
    if args.clip_model == "toy":
        return [caption(task_prompt(args.task), GOAL_STAGE)]
    return list(PAPER_GOAL_PROMPTS)


@torch.no_grad()
def text_target(clip, tokenizer, prompts: list[str]) -> torch.Tensor:
    """The normalised mean of the prompts' CLIP text embeddings: (D,) float32 on the CPU."""
    device = next(clip.parameters()).device
    return F.normalize(clip.encode_text(tokenizer(prompts).to(device), normalize=True).float().mean(0), dim=0).cpu()


def select_goal_frame(clip, tokenizer, frames: np.ndarray, prompts: list[str]) -> tuple[int, np.ndarray]:
    """E3: (index of the goal frame I*, CLIP scores (F,)) for a video (F, H, W, 3) and text prompts."""
    image = clip_image_features(clip, frames).float().cpu()  # (F, D), unit norm
    scores = (image @ text_target(clip, tokenizer, prompts)).numpy()  # (F,) cosine similarities
    return int(scores.argmax()), scores


# =====================================================================================================
# 6. Forward-backward representation and the frame-level reward (E4, E5)
# =====================================================================================================
# E4 (Touati & Ollivier [5]). F(s, a, z): (d,) and B(g): (d,) factor the successor measure,
#     M(s, a, dg) ~ F(s, a, z)^T B(g) rho(dg),
# the discounted probability of reaching g from (s, a), relative to the data distribution rho. Trained on
# replay transitions (s_i, a_i, s'_i, a'_i), a'_i the action taken next in the data (so M is the measure of
# the policy that collected the data), with g_j = s'_j of the same batch as the goals:
#     M_ij    = F(s_i, a_i, z_i)^T B(g_j)                                   (per F head)
#     Mbar_ij = min_k F_target,k(s'_i, a'_i, z_i)^T B_target(g_j)
#     L_FB    = 1/2 mean_{i != j} (M_ij - gamma Mbar_ij)^2  -  mean_i M_ii
#     L_ortho = mean_{i != j} (B_i^T B_j)^2  -  2 mean_i |B_i|^2          (pushes E[B B^T] toward I)
#     loss    = L_FB + lambda_ortho L_ortho
# z is drawn on the sphere of radius sqrt(d), half uniformly and half as B of the batch's frames (B's output
# is normalised onto the same sphere), and F reads the state standardised by its training data's statistics.
# The agent's side, F, sees the state and action; the goal side, B, sees image features psi(frame) of a
# rendered frame, so that a goal *image* (E3's goal frame) can be fed to it. psi is ONE frozen extractor,
# the CLIP image encoder, at training and at reward time. (The published code feeds B a learned projection
# of the agent's CNN features in training and DINOv3 features at reward time; vdr does not copy that mix.)
#
# E5.  z* = sqrt(d) normalize(B(psi(I*))),   r_fb(s, a) = min_k F_k(s, a, z*)^T z*
# F(s, a, z*)^T z* is a value: the discounted visits to the goal expected of the policy that collected
# FB's data, after (s, a). Paid at every step, it pays holding a state F rates highly as much as reaching
# the goal, and eval-reward's exploit probe finds such states from every state it tries (assets/RESULTS.md,
# section 4.2); with FB trained as section 6's offline FB is, from 2 of 5 on button-press-v3 and still from
# every state on reach-v3 (section 4.4). It stays the default: the candidates below did worse.
# --fb-reward shaping pays instead the change of B's goal kernel, a potential of the frame:
#     Phi(o) = B(psi(o))^T z*,    r_fb(t) = gamma Phi(o_{t+1}) - Phi(o_t)       (gamma: SAC's discount)
# potential-based shaping (Ng, Harada & Russell 1999; VIP's reward has this form), which changes no
# policy's ranking by itself: an episode's shaped return telescopes to ~Phi(o_T) - Phi(o_0), so it pays
# arriving at frames B places near the goal, not lingering anywhere. It reads B only, not F. Measured
# (assets/RESULTS.md, section 4.3): with eval-reward's FB, Phi does not rise along the expert's episodes,
# so the shaped term ranks nothing (AUROC at chance) and the probe still beats the expert; off by default.
# --fb-reward kernel pays the potential itself, at the frame the step arrives at:
#     r_fb(t) = Phi(o_{t+1}) = B(psi(o_{t+1}))^T z*
# the reward whose value F(s, a, z*)^T z* is, in FB's own terms (z_r = E_rho[r(s) B(s)] with E[B B^T] ~ I
# makes r(s) = B(s)^T z): it pays the agent at each step for the frame it is in, and leaves the credit
# assignment to SAC's own critic. It reads B only, a function of the frame, so no action F never saw can
# raise it. Measured (assets/RESULTS.md, section 4.4): it ranks episodes worse than F's value (AUROC 0.48
# on reach-v3, 0.80 on button-press-v3) and the probe finds frames B places nearer the goal frame than the
# expert's from every state; off by default.
# Two guards on the value against the probe's exploit, both off by default:
# --fb-conservative w adds the value-conservative term of Jeen, Bewley & Cullen [13] to E4's loss,
#     w * mean_i [ log mean_k exp Q_z(s_i, a_k) - Q_z(s_i, a_i) ],   Q_z(s, a) = F(s, a, z)^T z,
# a_k ~ U[-1, 1]^A (FB_OOD_ACTIONS of them): it lowers F's value at actions the data did not take, relative
# to those it did, against a policy that picks actions F overrates. Measured (assets/RESULTS.md, section
# 4.5): at w = 1 it changes nothing the probe sees (reach-v3 0.00, button-press-v3 0.60 -> 0.40), since
# the probe's plans are paid for the states they hold, not for odd actions; and it makes FB's training ~3x
# slower.
# --fb-cap holds r_fb at or below the highest value F gives the data it was trained on, for the same goal,
#     r_fb(s, a) = min(F(s, a, z*)^T z*, max_{(s', a') in FB's data} F(s', a', z*)^T z*)
# (on FB_CAP_SAMPLES of its (state, action) pairs): F's value where F was trained, and no more elsewhere.
# Measured (assets/RESULTS.md, section 4.5): it never binds on the held-out episodes and binds on some of
# the probe's plans, which still beat the expert: they hold a state F rates near the top of its data's
# range for most of the episode, where the expert spends only the steps after it arrives. A per-step
# value pays that, whatever bounds its range.
# --fb-reward advantage pays what the action adds to the state's value instead of the value itself,
#     Q(s, a) = min_k F_k(s, a, z*)^T z*,    r_fb(s, a) = Q(s, a) - mean_j Q(s, a_j),
# a_j FB_ADV_ACTIONS fixed actions drawn once from U[-1, 1]^A: its mean over those actions is 0 at every
# state, so holding a state F rates highly is paid nothing for the state, and a policy that maximises it
# step by step takes F's greedy action, FB's own policy for z* (pi_z*(s) = argmax_a F(s, a, z*)^T z*).
# Measured (assets/RESULTS.md, section 4.7): it ranks episodes at chance (AUROC 0.33 on reach-v3, 0.52 on
# button-press-v3), since F barely prefers the expert's actions to random ones along the expert's path,
# and the probe beats the expert as often as with the value: plans that take the actions F prefers are
# paid more than the task. Off by default.
# --fb-reward record pays the value's new highs along the episode, the progress a step makes past the
# best the episode had reached before it,
#     r_fb(t) = M_t - M_{t-1},   M_t = max_{tau <= t} Q(s_tau, a_tau),   M_{-1} = Q(s_0, a_0),
# which is never negative and sums over an episode to max_t Q - Q(s_0, a_0): each state is paid once, when
# the episode first gets that far, and holding it pays nothing, so the value pays reaching, not parking.
# It is a function of the episode so far, not of (s, a), as E2's o_{0:t} is. Measured (assets/RESULTS.md,
# section 4.8): on seven agents RL trained on the value, E6 with record ranks the expert first on 6 (the
# value: 3); the probe's E6 score on button-press-v3 is 0.80 (the value: 0.60), and on reach-v3 both are
# beaten, F rating other states above the goal. In RL, reward-free, 50k steps, 3 seeds: button-press-v3
# 0.00 -> 0.54, drawer-close-v3 0.17 (seed 1) -> 0.69, reach-v3 and window-open-v3 near 0 with either.
# Not the default, for all that: it pays each state once, so SAC learns later, and at the main job's 12k
# steps it had not yet learned drawer-close-v3 (0.00, where the value reaches 0.80). Use it for longer runs.
FB_REWARDS = ("value", "advantage", "record", "shaping", "kernel")
FB_DIM = 64  # d, published
FB_HIDDEN = 512  # published
FB_LR = 1e-4  # published (Adam)
FB_ORTHO = 1.0  # lambda_ortho, published
FB_TAU = 0.01  # target soft update, published
FB_OOD_ACTIONS = 8  # uniform actions per state in --fb-conservative's soft maximum
FB_CAP_SAMPLES = 4096  # (state, action) pairs of FB's data on which --fb-cap takes F's highest value
FB_ADV_ACTIONS = 16  # uniform actions whose mean value is --fb-reward advantage's baseline (Meta-World's A = 4)
FB_Z_FROM_B = 0.5  # share of training z's that are B of a batch frame (controllable_agent's and Meta Motivo's 0.5)
FB_GAMMA = 0.98  # horizon ~50 steps: the scripted experts reach the goal in 30-90 steps (FB's own papers
                 # use 0.98 for goal reaching)


def sample_z(n: int, d: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """n task vectors on the sphere of radius sqrt(d): (n, d)."""
    return math.sqrt(d) * F.normalize(torch.randn(n, d, generator=gen), dim=-1)

def mlp(inp: int, out: int, hidden: int) -> nn.Sequential:
    """Two hidden ReLU layers: the networks of FB (here) and SAC (section 8)."""
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


class ForwardMap(nn.Module):
    """F(s, a, z) -> (2, n, d): twin heads, as twin critics in SAC (the min fights overestimation)."""

    def __init__(self, obs_dim: int, act_dim: int, d: int = FB_DIM, hidden: int = FB_HIDDEN):
        super().__init__()
        self.heads = nn.ModuleList([mlp(obs_dim + act_dim + d, d, hidden) for _ in range(2)])
        # F reads the state standardised by its data's mean and std (set_obs_stats), clipped to +-OBS_CLIP as
        # SAC's input is: Meta-World's state mixes metres (positions ~0.1-1) with quaternions and zero padding,
        # and a state the data never reached, scaled by a small std, would be an extreme input from which F
        # extrapolates without bound. Identity until set.
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def set_obs_stats(self, obs: torch.Tensor) -> None:
        """Standardise by the mean and std of obs (N, obs_dim); a dimension that never moves keeps scale 1."""
        std = obs.std(0)
        self.obs_mean.copy_(obs.mean(0)); self.obs_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, obs, actions, z):
        obs = ((obs - self.obs_mean) / self.obs_std).clamp(-OBS_CLIP, OBS_CLIP)  # (n, obs_dim), as SAC's (sec. 8)
        x = torch.cat([obs, actions, z], dim=-1)  # (n, obs_dim + act_dim + d)
        return torch.stack([head(x) for head in self.heads])  # (2, n, d)


class BackwardMap(nn.Module):
    """B(psi(frame)) -> (n, d) on the sphere of radius sqrt(d)."""

    def __init__(self, feature_dim: int, d: int = FB_DIM, hidden: int = FB_HIDDEN):
        super().__init__()
        self.net, self.d = mlp(feature_dim, d, hidden), d

    def forward(self, features):
        return math.sqrt(self.d) * F.normalize(self.net(features), dim=-1)  # (n, d)


def fb_loss(M: torch.Tensor, M_target: torch.Tensor, B: torch.Tensor, gamma: float,
            ortho: float = FB_ORTHO) -> tuple[torch.Tensor, dict]:
    """E4's loss from the batch's measure matrices. M (2, n, n): M_ij per F head; M_target (n, n): Mbar_ij
    (already the min over heads, no gradient); B (n, d): B(g_j). Returns (loss, metrics)."""
    n = B.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=B.device)  # (n, n) the i != j entries
    diff = M - gamma * M_target  # (2, n, n)
    l_fb = (0.5 * diff[:, off].pow(2).mean(-1) - M.diagonal(dim1=1, dim2=2).mean(-1)).sum()  # both heads
    cov = B @ B.T  # (n, n): B_i^T B_j
    l_ortho = cov[off].pow(2).mean() - 2 * cov.diagonal().mean()
    loss = l_fb + ortho * l_ortho
    return loss, {"losses/fb": l_fb.item(), "losses/ortho": l_ortho.item(), "fb/M_diag": M.diagonal(dim1=1, dim2=2).mean().item()}


class FB(nn.Module):
    """The FB representation with its targets and optimiser; `update(batch)` is one step of E4 and
    `reward(obs, actions, goal_features)` is E5. A batch is a dict of tensors: obs (n, obs_dim),
    actions (n, act_dim), next_obs (n, obs_dim), next_actions (n, act_dim), next_features (n, feature_dim)
    = psi of the frame after each transition. (An nn.Module so that state_dict() saves all four nets.)"""

    def __init__(self, obs_dim: int, act_dim: int, feature_dim: int, gamma: float = FB_GAMMA, d: int = FB_DIM,
                 hidden: int = FB_HIDDEN, lr: float = FB_LR, tau: float = FB_TAU, seed: int = 0,
                 conservative: float = 0.0):
        import copy
        super().__init__()
        with torch.random.fork_rng():  # the nets' initialisation is a function of `seed`, and the caller's
            torch.manual_seed(seed)    # global random stream is left as it was
            self.F, self.B = ForwardMap(obs_dim, act_dim, d, hidden), BackwardMap(feature_dim, d, hidden)
        self.F_target, self.B_target = copy.deepcopy(self.F), copy.deepcopy(self.B)
        self.opt = torch.optim.Adam([*self.F.parameters(), *self.B.parameters()], lr=lr)
        self.gamma, self.tau, self.d, self.act_dim, self.conservative = gamma, tau, d, act_dim, conservative
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, batch: dict) -> dict:
        n = len(batch["obs"])
        z = sample_z(n, self.d, self.gen)  # (n, d), one z per transition
        # Half the z's are B of goals in the batch (B(psi(o'_j)) for a shuffled j, as both FB references do),
        # the rest uniform on the sphere: the reward's z* = B(psi(I*)) is such a z, and F is then trained where
        # it will be read, not only on random directions B never outputs.
        from_b = torch.rand(n, generator=self.gen) < FB_Z_FROM_B  # (n,)
        with torch.no_grad():
            goals = batch["next_features"][torch.randperm(n, generator=self.gen)]  # (n, D)
            z = torch.where(from_b[:, None], self.B(goals), z)  # (n, d): B's output lies on the same sphere
            B_target = self.B_target(batch["next_features"])  # (n, d)
            F_next = self.F_target(batch["next_obs"], batch["next_actions"], z)  # (2, n, d)
            M_target = (F_next @ B_target.T).min(0).values  # (n, n)
        B = self.B(batch["next_features"])  # (n, d): g_j = s'_j
        F_data = self.F(batch["obs"], batch["actions"], z)  # (2, n, d)
        loss, metrics = fb_loss(F_data @ B.T, M_target, B, self.gamma)  # M: (2, n, n)
        if self.conservative > 0:
            penalty = self.conservative_penalty(batch["obs"], F_data, z)
            loss, metrics = loss + self.conservative * penalty, metrics | {"losses/conservative": penalty.item()}
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():  # Polyak averaging of the targets
            for net, target in ((self.F, self.F_target), (self.B, self.B_target)):
                for p, tp in zip(net.parameters(), target.parameters()):
                    tp.lerp_(p, self.tau)
        return metrics

    def conservative_penalty(self, obs: torch.Tensor, F_data: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The value-conservative term: soft maximum of Q_z(s, a) = F(s, a, z)^T z over FB_OOD_ACTIONS uniform
        actions, minus Q_z at the data's action, per F head. obs (n, obs_dim), F_data (2, n, d), z (n, d)."""
        n, K = len(obs), FB_OOD_ACTIONS
        actions = 2 * torch.rand(K * n, self.act_dim, generator=self.gen) - 1  # (K n, act_dim) uniform in [-1, 1]
        zk = z.repeat(K, 1)  # (K n, d)
        q_ood = (self.F(obs.repeat(K, 1), actions, zk) * zk).sum(-1).reshape(2, K, n)  # (2, K n) -> (2, K, n)
        q_data = (F_data * z).sum(-1)  # (2, n)
        return (torch.logsumexp(q_ood, dim=1) - math.log(K) - q_data).mean(-1).sum()

    def set_obs_stats(self, obs: torch.Tensor) -> None:
        """F's (and its target's) input scale from FB's training states (N, obs_dim), once, before training."""
        self.F.set_obs_stats(obs); self.F_target.set_obs_stats(obs)

    @torch.no_grad()
    def goal_z(self, goal_features: torch.Tensor) -> torch.Tensor:
        """z* = sqrt(d) normalize(B(psi(I*))): (feature_dim,) -> (d,)."""
        return math.sqrt(self.d) * F.normalize(self.B(goal_features[None])[0], dim=-1)

    @torch.no_grad()
    def reward(self, obs: torch.Tensor, actions: torch.Tensor, goal_features: torch.Tensor) -> torch.Tensor:
        """E5: r_fb = min_k F_k(s, a, z*)^T z* for a batch (n, obs_dim), (n, act_dim) -> (n,)."""
        z = self.goal_z(goal_features).expand(len(obs), -1)  # (n, d)
        return (self.F(obs, actions, z) * z).sum(-1).min(0).values  # (n,)

    @torch.no_grad()
    def advantage(self, obs: torch.Tensor, actions: torch.Tensor, goal_features: torch.Tensor) -> torch.Tensor:
        """--fb-reward advantage: Q(s, a) - mean_j Q(s, a_j), Q = E5's value, (n, obs_dim), (n, act_dim) -> (n,).
        The a_j are the same FB_ADV_ACTIONS actions at every call, so the reward is a function of (s, a)."""
        n, K = len(obs), FB_ADV_ACTIONS
        baseline = 2 * torch.rand(K, self.act_dim, generator=torch.Generator().manual_seed(0)) - 1  # (K, act_dim)
        q_base = self.reward(obs.repeat_interleave(K, 0), baseline.repeat(n, 1), goal_features)  # (n K,)
        return self.reward(obs, actions, goal_features) - q_base.reshape(n, K).mean(1)  # (n K,) -> (n, K) -> (n,)

    @torch.no_grad()
    def potential(self, features: torch.Tensor, goal_features: torch.Tensor) -> torch.Tensor:
        """Phi(o) = B(psi(o))^T z* for frames' features (n, feature_dim) -> (n,) (--fb-reward shaping)."""
        return self.B(features) @ self.goal_z(goal_features)  # (n, d) @ (d,) -> (n,)


def shaping(phi: torch.Tensor, gamma: float) -> torch.Tensor:
    """Potential-based shaping gamma Phi(o_{t+1}) - Phi(o_t) along the last axis: (..., T+1) -> (..., T)."""
    return gamma * phi[..., 1:] - phi[..., :-1]


def record_gain(q: np.ndarray) -> np.ndarray:
    """--fb-reward record: each step's rise of the running maximum of q along the last axis, 0 at t = 0:
    (..., T) -> (..., T), summing to max_t q_t - q_0."""
    best = np.maximum.accumulate(q, axis=-1)  # M_t: (..., T)
    return np.diff(best, axis=-1, prepend=best[..., :1])  # M_t - M_{t-1}, M_{-1} = M_0: (..., T)


def fb_potential_reward(phi: torch.Tensor, args: Args) -> torch.Tensor:
    """r_fb from the potential of frames o_0..o_T, (..., T+1) -> (..., T): shaping or kernel (section 6)."""
    return shaping(phi, args.gamma) if args.fb_reward == "shaping" else phi[..., 1:]


@torch.no_grad()
def frame_features(clip, frames: np.ndarray, batch: int = 256) -> torch.Tensor:
    """psi, the frozen image features B sees: CLIP image embeddings of frames (N, H, W, 3) -> (N, D) float32."""
    return torch.cat([clip_image_features(clip, frames[i:i + batch]).float().cpu()
                      for i in range(0, len(frames), batch)])


def split_episodes(data: dict) -> list[dict]:
    """collect_demos' stacked arrays (N, ...) -> a list of N episode dicts."""
    keys = ("frames", "states", "actions", "env_rewards", "success")
    return [{k: data[k][i] for k in keys} for i in range(len(data["states"]))]


def fb_transitions(episodes: list[dict], clip, every: int = 1) -> dict[str, torch.Tensor]:
    """E4's dataset from whole episodes (states (T+1, 39), actions (T, 4), frames (T+1, H, W, 3)):
    (s_t, a_t, s_{t+1}, a_{t+1}, psi(o_{t+1})) for t = 0..T-2 (the last step has no next action a'), or, with
    every > 1, for the t whose next frame o_{t+1} was rendered (rendered_steps): B never reads a held frame."""
    parts = {k: [] for k in ("obs", "actions", "next_obs", "next_actions", "next_features")}
    for ep in episodes:
        T = len(ep["actions"])
        t = rendered_steps(T, every)
        t = t[(t >= 1) & (t <= T - 1)] - 1  # (n,) steps whose next frame was rendered; all 0..T-2 if every = 1
        for k, v in zip(parts, (ep["states"][t], ep["actions"][t], ep["states"][t + 1], ep["actions"][t + 1],
                                frame_features(clip, ep["frames"][t + 1]))):
            parts[k].append(torch.as_tensor(v, dtype=torch.float32))
    return {k: torch.cat(v) for k, v in parts.items()}  # each (sum of n, ...)


def cap_sample(episodes: list[dict], seed: int) -> dict[str, torch.Tensor]:
    """FB_CAP_SAMPLES (state, action) pairs drawn from episodes' steps, for --fb-cap: {"obs", "actions"}."""
    obs = torch.as_tensor(np.concatenate([ep["states"][:-1] for ep in episodes]), dtype=torch.float32)  # (N, obs_dim)
    actions = torch.as_tensor(np.concatenate([ep["actions"] for ep in episodes]), dtype=torch.float32)  # (N, act_dim)
    idx = torch.randint(len(obs), (FB_CAP_SAMPLES,), generator=torch.Generator().manual_seed(seed))
    return {"obs": obs[idx], "actions": actions[idx]}


def train_fb(args: Args, clip, episodes: list[dict], key: dict, progress: bool = True) -> FB:
    """FB trained offline for args.fb_steps on the transitions of `episodes` (cached by `key`, a description
    of the data, and the settings). The RL loop (section 9) trains the same FB online instead."""
    from tqdm import tqdm
    data = None
    path = cache_path(args, "fb", ".pt", task=args.task, steps=args.fb_steps, batch=args.fb_batch, seed=args.seed,
                      dim=FB_DIM, hidden=FB_HIDDEN, gamma=FB_GAMMA, z_from_b=FB_Z_FROM_B, obs_scaled=OBS_CLIP,
                      render_every=args.render_every, **key, **({"conservative": args.fb_conservative,
                      "ood_actions": FB_OOD_ACTIONS} if args.fb_conservative else {}))
    if not path.exists():  # the steps whose frames were rendered, as the RL loop's replay keeps them
        data = fb_transitions(episodes, clip, args.render_every)
    dims = (episodes[0]["states"].shape[-1], episodes[0]["actions"].shape[-1],
            frame_features(clip, episodes[0]["frames"][:1]).shape[-1])  # obs_dim, act_dim, psi's D
    fb = FB(*dims, seed=args.seed, conservative=args.fb_conservative)
    fb.cap_data = cap_sample(episodes, args.seed)  # what --fb-cap measures F's range on (above)
    if path.exists():
        fb.load_state_dict(load_checkpoint(path))
        return fb
    fb.set_obs_stats(data["obs"])
    gen = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.fb_steps), desc=f"train FB {args.task}", disable=not progress)
    for step in bar:
        idx = torch.randint(len(data["obs"]), (args.fb_batch,), generator=gen)
        metrics = fb.update({k: v[idx] for k, v in data.items()})
        if step % 100 == 0:
            bar.set_postfix(fb=f"{metrics['losses/fb']:.2f}", ortho=f"{metrics['losses/ortho']:.2f}")
    atomic_write(path, lambda tmp: torch.save(fb.state_dict(), tmp))
    return fb


# FB's schedule. The paper's code trains FB online on the agent's replay and pays r_fb only once FB is
# frozen (at 100k of 1M steps). vdr's default trains FB before RL on reward-free data of the task, and
# freezes it before SAC's first step: the expert demos the video model is finetuned on (states and actions,
# no rewards), and exploratory episodes of random actions and of the expert with N(0, 1) action noise
# (eval-reward's data, section 12, so eval-reward judges the very FB that RL pays from). What it buys: every
# stored reward comes from one FB, so the replay never mixes rewards from thousands of FB versions; F^T z*
# and B are trained on data that reaches the goal; and RL pays no FB updates (assets/RESULTS.md, section 7).
# --fb-online restores the paper's schedule (r_fb is 0 until --fb-freeze, then paid from the frozen FB).
def offline_fb(args: Args, model, demos: list[dict] | None = None, explore: list[dict] | None = None,
               noisy: list[dict] | None = None, progress: bool = True) -> FB:
    """The offline FB of a task and seed (cached): E4 for args.fb_steps on the expert demos and the random and
    noisy exploratory episodes from training initial states 0..explore_episodes-1, collected here unless
    given (each is cached by collect_demos too)."""
    demos = demos or split_episodes(collect_demos(args, progress=progress))
    explore = explore or split_episodes(collect_demos(args, episodes=args.explore_episodes, seed0=0,
                                                      behaviour="random", progress=progress))
    noisy = noisy or split_episodes(collect_demos(args, episodes=args.explore_episodes, seed0=0,
                                                  behaviour="noisy", progress=progress))
    return train_fb(args, model.clip, demos + explore + noisy, key=offline_fb_key(args, model), progress=progress)


def offline_fb_key(args: Args, model) -> dict:
    """What the offline FB's data is made of, for train_fb's cache key."""
    return {"clip": model.name, "demos": args.episodes, "explore": args.explore_episodes, "noise": NOISE_STD,
            "actions": ACTION_STREAM, **data_key(args)}


# =====================================================================================================
# 7. The total reward (E6)
# =====================================================================================================
# E6.  r_t = alpha * (r_video(t) - mu_video(t)) / sigma_video  +  beta * (r_fb(t) - mu_fb(t)) / sigma_fb  (+ r_env)
# mu(t) is the term's mean at step t over exploratory (random-policy) episodes scored against the same
# goal, and sigma its spread around mu(t), pooled over t. The paper adds alpha = 0.01 * r_video and
# beta = 1e-5 * r_fb to Meta-World's dense reward (0-10 per step): weights set against the raw terms'
# scales, which depend on the VAE, d and gamma. Without an env reward to set them against, vdr puts both
# terms on one scale, what exploring gives (mean 0, spread 1), and weighs them equally, alpha = beta = 1
# (--video-weight, --fb-weight). In the hybrid (gen+dense), both weights are scaled by --hybrid-weight
# (0.1): at 1, E6 paid the agent more than the dense reward did and the hybrid fell behind dense
# (assets/RESULTS.md, section 8.6).
# A step scores above 0 when it looks more like the goal than exploring does at the same step.
# Why mu depends on t: E2 of a random episode creeps up with t (its clip o_{0:t} fills with motion, and the
# goal video is all motion), a rise the agent would be paid for doing anything; on
# button-press-topdown-v3 the rank correlation of r_video with time on random episodes is 0.85.
# Subtracting what exploring earns at step t removes that rise. It shifts every episode's return by the
# same amount, so it changes no ranking of episodes (AUROC) and no optimal policy.
def e6_weights(args: Args) -> tuple[float, float]:
    """(alpha, beta) of E6: --video-weight and --fb-weight, times --hybrid-weight in gen+dense."""
    scale = args.hybrid_weight if args.reward == "gen+dense" else 1.0
    return args.video_weight * scale, args.fb_weight * scale


@dataclass
class Goal:
    """One goal video and what every reward needs of it."""
    video: np.ndarray  # (F, H, W, 3) uint8
    latents: torch.Tensor  # ((k+1)*C*h*w,) E(V_goal) flattened, for E2
    frame_index: int  # I*, E3
    clip_scores: np.ndarray  # (F,) E3's score of every frame
    features: torch.Tensor  # (D,) psi(I*), for E5
    stats: dict  # {"r_video": (mu (T,), sigma), "r_fb": (mu (T,), sigma)} on the exploratory episodes, E6


class GenerativeReward:
    """E2 + E3 + E5 + E6 for one task, all frozen: the video model's VAE and CLIP, a trained FB, and the
    exploratory episodes that set E2's reference latent m and E6's scales.
    `reward(episode, goal(video))` -> (T,) for one finished episode."""

    def __init__(self, args: Args, vae, clip, tokenizer, fb: FB, exploratory: list[dict] | None = None,
                 state: dict | None = None):
        """From the exploratory episodes, or from a state_dict() of a reward built from them before."""
        self.args, self.vae, self.clip, self.tokenizer, self.fb = args, vae, clip, tokenizer, fb
        state = state or {  # the episodes have one length T (Meta-World never terminates early)
            "explore_latents": torch.stack([self.latents(ep) for ep in exploratory]),  # (N, n, D)
            "explore_obs": torch.as_tensor(np.stack([ep["states"][:-1] for ep in exploratory])),  # (N, T, obs_dim)
            "explore_actions": torch.as_tensor(np.stack([ep["actions"] for ep in exploratory])),  # (N, T, act_dim)
            "explore_features": torch.stack([self.features(ep) for ep in exploratory]),  # (N, T+1, D)
            **{"cap_" + k: v for k, v in (fb.cap_data if hasattr(fb, "cap_data") else
                                          cap_sample(exploratory, args.seed)).items()}}
        if "cap_obs" not in state:  # a reward.pt of an older vdr: its exploratory steps stand in for FB's data
            state = state | {"cap_obs": state["explore_obs"].flatten(0, 1),
                             "cap_actions": state["explore_actions"].flatten(0, 1)}
        self.explore_latents, self.explore_obs, self.explore_actions, self.explore_features, self.cap_obs, \
            self.cap_actions = (state[k] for k in self.state_dict_keys)
        self.reference = self.explore_latents.flatten(0, 1).mean(0) if args.video_centre else None  # m of E2: (D,)

    state_dict_keys = ("explore_latents", "explore_obs", "explore_actions", "explore_features", "cap_obs",
                       "cap_actions")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.state_dict_keys}

    def latents(self, episode: dict) -> torch.Tensor:
        """E(clip_t) at the scored steps of an episode: (n, D). The costly half of E2, goal-independent. The
        frames are read as rendered every render_every steps (hold_frames), whoever rendered them."""
        return clip_latents(self.vae, hold_frames(episode["frames"], self.args.render_every),
                            self.args.video_frames, self.args.reward_every, self.args.video_clip)

    def features(self, episode: dict) -> torch.Tensor:
        """psi of every frame o_0..o_T as rendered every render_every steps and held: (T+1, D). Only the
        rendered frames go through CLIP."""
        T = len(episode["frames"]) - 1
        steps = rendered_steps(T, self.args.render_every)  # (n,)
        psi = frame_features(self.clip, episode["frames"][steps])  # (n, D)
        return psi[last_rendered(T, self.args.render_every)]  # (T+1, D)

    def r_fb(self, episode: dict, goal: Goal) -> np.ndarray:
        """E5 for every step of an episode, (T,): F's value at (s_t, a_t), or with --fb-reward record its new
        highs, shaping gamma Phi(o_{t+1}) - Phi(o_t), kernel Phi(o_{t+1}) (section 6)."""
        if self.args.fb_reward in ("shaping", "kernel"):
            return fb_potential_reward(self.fb.potential(self.features(episode), goal.features), self.args).numpy()
        q = self.value(torch.as_tensor(episode["states"][:-1]), torch.as_tensor(episode["actions"]),
                       goal)  # r_fb(s_t, a_t), t = 0..T-1
        return record_gain(q) if self.args.fb_reward == "record" else q

    def value(self, obs: torch.Tensor, actions: torch.Tensor, goal: Goal) -> np.ndarray:
        """E5's value r_fb = min_k F_k(s, a, z*)^T z* for (n, obs_dim), (n, act_dim) -> (n,), capped with --fb-cap
        at the highest value F gives its training data for this goal (goal.stats["r_fb_cap"]), or with
        --fb-reward advantage its excess over uniform actions'."""
        return np.minimum(self.fb_pairs(obs, actions, goal.features).numpy(), goal.stats["r_fb_cap"])

    def fb_pairs(self, obs: torch.Tensor, actions: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """r_fb of (state, action) pairs, uncapped: F's value, or its advantage (--fb-reward advantage)."""
        return (self.fb.advantage if self.args.fb_reward == "advantage" else self.fb.reward)(obs, actions, features)

    @torch.no_grad()
    def goal(self, video: np.ndarray, known: Goal | None = None) -> Goal:
        """What every reward needs of one goal video. `known`: an earlier Goal of the same video, whose E3,
        E(V_goal) and psi(I*) are reused (they depend on the frozen VAE and CLIP only); E6's scales are
        always recomputed, since r_fb's depend on FB, which may have trained since."""
        if known is None:
            index, scores = select_goal_frame(self.clip, self.tokenizer, video, goal_prompts(self.args))  # E3
            latents = vae_encode(self.vae, to_video_tensor(video[None])).flatten().float().cpu()
            features = frame_features(self.clip, video[index:index + 1])[0]  # psi(I*): (D,)
        else:
            index, scores, latents, features = known.frame_index, known.clip_scores, known.latents, known.features
        N, T = self.explore_obs.shape[:2]
        times = scored_steps(T, self.args.reward_every)
        r_video = np.stack([hold(times, latent_similarity(z, latents, self.reference), T)
                            for z in self.explore_latents])  # (N, T)
        cap = (float(self.fb.reward(self.cap_obs, self.cap_actions, features).max()) if self.args.fb_cap
               else math.inf)  # --fb-cap's ceiling; none without it
        if self.args.fb_reward in ("shaping", "kernel"):
            phi = self.fb.potential(self.explore_features.flatten(0, 1), features).reshape(N, T + 1)  # (N, T+1)
            r_fb = fb_potential_reward(phi, self.args).numpy()  # (N, T)
        else:
            r_fb = self.fb_pairs(self.explore_obs.flatten(0, 1), self.explore_actions.flatten(0, 1),
                                 features).numpy().reshape(N, T)  # (N*T,) -> (N, T)
            r_fb = np.minimum(r_fb, cap)
            r_fb = record_gain(r_fb) if self.args.fb_reward == "record" else r_fb  # (N, T)
        stats = {name: (r.mean(0), float((r - r.mean(0)).std()) + 1e-8)  # mu(t): (T,), pooled sigma
                 for name, r in (("r_video", r_video), ("r_fb", r_fb))} | {"r_fb_cap": cap}
        return Goal(video, latents, index, scores, features, stats)

    def terms(self, episode: dict, goal: Goal, latents: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """The raw r_video (E2) and r_fb (E5) of every step of an episode: {name: (T,)}. `latents`:
        self.latents(episode), when the caller already has them (they do not depend on the goal)."""
        r_video = video_reward(self.vae, hold_frames(episode["frames"], self.args.render_every), goal.latents,
                               self.args.video_frames, self.args.reward_every, self.args.video_clip,
                               self.reference, latents)
        return {"r_video": r_video, "r_fb": self.r_fb(episode, goal).astype(np.float32)}

    @staticmethod
    def standardise(terms: dict[str, np.ndarray], goal: Goal) -> dict[str, np.ndarray]:
        """Each term on exploring's scale, (r(t) - mu(t)) / sigma: {name: (T,)}."""
        T = len(terms["r_video"])
        return {k: (terms[k] - goal.stats[k][0][:T]) / goal.stats[k][1] for k in ("r_video", "r_fb")}

    def combine(self, terms: dict[str, np.ndarray], goal: Goal, fb_paid: bool = True) -> np.ndarray:
        """E6 on the standardised terms: (T,) float32. fb_paid=False: r_video's term alone (--fb-online, before
        FB is frozen)."""
        z = self.standardise(terms, goal)
        alpha, beta = e6_weights(self.args)
        return (alpha * z["r_video"] + (beta * z["r_fb"] if fb_paid else 0)).astype(np.float32)

    def reward(self, episode: dict, goal: Goal) -> np.ndarray:
        return self.combine(self.terms(episode, goal), goal)


# ---- 7b. the CLIP-text reward of VLM-RM, a baseline and a reward mode of its own ----
def clip_text_prompts(args: Args) -> list[str]:
    """VLM-RM's text: the task's description, as VLM-RM prompts a CLIP trained elsewhere. (Not the toy
    CLIP's "<task>, end" caption, which it learned from this task's demo videos; eval-reward reports that
    one as `clip_text_end`.)"""
    return [task_prompt(args.task)]


@torch.no_grad()
def clip_text_reward(clip, tokenizer, frames: np.ndarray, prompts: list[str]) -> np.ndarray:
    """VLM-RM [12]: r_t = cos(CLIP_img(o_t), CLIP_txt(prompt)) for t = 1..T -> (T,)."""
    return (frame_features(clip, frames[1:]) @ text_target(clip, tokenizer, prompts)).numpy()


# ---- 7c. the peers' rewards, from the same video model: VIPER, Diffusion Reward, TADPoLe, RoboCLIP ----
# The rewards the paper compares against, each computed from vdr's own finetuned video model (its VAE, DiT
# and text encoder) or its CLIP, so that they differ from E6 in the reward alone: the same model, tasks and
# agent. Three read the DiT's noise predictions on clips of the agent's recent frames: at E2's scored steps t,
# the last F frames at the goal video's spacing (E2's "window" clip), encoded by the VAE into x0, noised as in
# training, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, at the PEER_TIMESTEPS levels with one fixed eps per
# level for every clip and episode (so that two episodes are compared under the same noise); eps_hat(x_t, c)
# is the DiT's prediction turned into noise (from v, under v-prediction); c = (the clip's first frame, the
# task's prompt), the conditions the model was trained with. Each is held between scored steps, as E2 is.
#   viper             VIPER [8]: the log-likelihood of the agent's frames under a video model of expert
#                     videos, r(t) = log p(clip_t | c). VIPER's model is autoregressive and gives it exactly;
#                     a diffusion model gives a lower bound (the ELBO), estimated up to a constant and
#                     per-level weights (equal here) by minus the denoising error:
#                         r(t) = -mean_levels |eps_hat(x_t, c) - eps|^2
#   diffusion-reward  Diffusion Reward [9]: minus the conditional entropy of the model's prediction given
#                     the agent's history, -H(x | o_t): an expert-like history leaves the model less to guess.
#                     Estimated as the original does, by the ELBO of the model's own sample: one DDIM sample x
#                     continuing from o_t (PEER_SAMPLE_STEPS steps, fixed noise), scored as viper scores a clip.
#                     The original adds an RND exploration bonus and the env's sparse success reward; this
#                     mode is the entropy term alone (reward-free), without RND.
#   tadpole           TADPoLe [10], in its video form (Video-TADPoLe scores sliding windows of frames):
#                     how much the task's text changes, and improves, the noise prediction on the agent's clip,
#                     against an unconditioned prediction eps_0:
#                         r_align = |eps_y - eps_0|^2,   r_rec = |eps_0 - eps|^2 - |eps_y - eps|^2
#                         r(t) = symlog(r_align) + symlog(r_rec),   symlog(x) = sign(x) log(1 + |x|)
#                     TADPoLe weighs the two terms by tuned weights; vdr weighs them equally. The toy DiT was
#                     trained without prompt dropout, so it has no unconditioned mode: eps_0 is the mean
#                     prediction over the pretraining tasks' prompts (the prompts it knows, marginalised).
#   roboclip          RoboCLIP [11]: one similarity per episode, paid at its last step, between the agent's
#                     whole video and the task: the task's text, or a demo video (--goal-video), the one-shot
#                     setting RoboCLIP is known for. RoboCLIP embeds videos with S3D, a video-language
#                     model; vdr with its CLIP: frame embeddings averaged over ROBOCLIP_FRAMES frames.
# In RL each is put on exploring's scale as E6's terms are (section 7), (r(t) - mu(t)) / sigma over the
# exploratory episodes (Diffusion Reward's code standardises its reward too); "<mode>+dense" adds it, times
# --hybrid-weight, to the env's dense reward, and so does clip-text+dense (clip-text alone pays VLM-RM's
# raw cosine).
PEER_MODES = ("viper", "diffusion-reward", "tadpole", "roboclip")
PEER_TIMESTEPS = (200, 500)  # of 1000 training timesteps: low and mid noise, where the prediction still
                             # depends on the frames (at 999, zero terminal SNR, x_t is pure noise); two levels,
                             # since each costs a DiT pass per clip (tadpole's: 1 + len(PRETRAIN_TASKS))
PEER_SAMPLE_STEPS = 10  # DDIM steps of diffusion-reward's sample (goal videos take --sample-steps, 20)
ROBOCLIP_FRAMES = 16  # frames of a video that CLIP embeds (S3D, RoboCLIP's encoder, reads 32)
PEER_STREAM = 4  # the fixed noise comes from a generator seeded seed * 1_000_003 + PEER_STREAM: a stream of its own


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) log(1 + |x|): TADPoLe's compression of its two terms."""
    return torch.sign(x) * torch.log1p(x.abs())


@torch.no_grad()
def video_embedding(clip, frames: np.ndarray) -> torch.Tensor:
    """roboclip's embedding of a video (N, H, W, 3): the normalised mean CLIP embedding of ROBOCLIP_FRAMES
    frames resampled from it -> (D,) float32."""
    return F.normalize(frame_features(clip, resample(frames, ROBOCLIP_FRAMES)).mean(0), dim=0)


class PeerReward:
    """One peer's reward (section 7c), raw, from the frozen video model: `raw(episode)` -> (T,) float32.
    goal: roboclip's demo video (F, H, W, 3), or None for the task's text."""

    def __init__(self, args: Args, model: VideoModel, mode: str, goal: np.ndarray | None = None):
        if mode not in PEER_MODES:
            raise VdrError(f"unknown peer reward {mode!r}; choose one of: {', '.join(PEER_MODES)}")
        self.args, self.model, self.mode = args, model, mode
        self.device, self.dtype = model.transformer.device, model.transformer.dtype
        self.prompt = model.prompt_embeds([task_prompt(args.task)])  # (1, L, D): c_text
        if mode == "tadpole":
            self.others = model.prompt_embeds([task_prompt(t) for t in PRETRAIN_TASKS])  # (P, L, D)
        if mode == "roboclip":
            self.target = (video_embedding(model.clip, goal) if goal is not None else
                           text_target(model.clip, model.tokenizer, [task_prompt(args.task)]))  # (D,)

    @torch.no_grad()
    def raw(self, episode: dict) -> np.ndarray:
        """The reward of every step of one episode (frames (T+1, H, W, 3)), unstandardised: (T,) float32."""
        frames = hold_frames(episode["frames"], self.args.render_every)  # (T+1, H, W, 3), as E2 reads them
        T = len(frames) - 1
        if self.mode == "roboclip":
            r = np.zeros(T, np.float32)
            r[-1] = float(video_embedding(self.model.clip, frames) @ self.target)
            return r
        times = scored_steps(T, self.args.reward_every)  # (n,)
        clips = agent_clips(frames, times, self.args.video_frames, "window", T / (self.args.video_frames - 1))
        latents, first = encode_videos(self.model.vae, clips)  # (n, k+1, C, h, w), (n, 1, C, h, w)
        latents, first = latents.to(self.device, self.dtype), first.to(self.device, self.dtype)
        if self.mode == "viper":
            scores = self.elbo(latents, first, self.prompt)
        elif self.mode == "diffusion-reward":  # the model's own continuation of o_t, then its ELBO
            now = encode_videos(self.model.vae, frames[times][:, None])[1].to(self.device, self.dtype)  # (n, 1, C, h, w)
            gen = torch.Generator().manual_seed(self.args.seed * 1_000_003 + PEER_STREAM)
            sample = sample_latents(self.model.transformer, self.model.scheduler, now, self.prompts(len(now)),
                                    latents.shape[1], gen, PEER_SAMPLE_STEPS, self.model.rotary(latents))
            scores = self.elbo(sample, now, self.prompt)
        else:
            scores = self.tadpole(latents, first)
        return hold(times, scores.float().cpu().numpy(), T)

    def prompts(self, n: int, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """c_text for a batch of n: (1, L, D) -> (n, L, D); embeds already (n, L, D) pass through."""
        embeds = self.prompt if embeds is None else embeds
        return embeds.expand(n, -1, -1) if len(embeds) == 1 else embeds

    def noise(self, x0: torch.Tensor) -> list[torch.Tensor]:
        """One fixed eps (k+1, C, h, w) per level of PEER_TIMESTEPS, the same for every clip and episode."""
        gen = torch.Generator().manual_seed(self.args.seed * 1_000_003 + PEER_STREAM)
        return [torch.randn(x0.shape[1:], generator=gen).to(x0) for _ in PEER_TIMESTEPS]

    def eps_hat(self, x0: torch.Tensor, eps: torch.Tensor, level: int, first: torch.Tensor,
                prompt: torch.Tensor) -> torch.Tensor:
        """The DiT's noise prediction for x0 (n, k+1, C, h, w) noised by eps at timestep `level`: (n, k+1, C, h, w)."""
        scheduler, n = self.model.scheduler, len(x0)
        t = torch.full((n,), level, dtype=torch.long, device=x0.device)
        x_t = scheduler.add_noise(x0, eps.expand_as(x0), t)
        pred = dit_predict(self.model.transformer, x_t, t, first, self.prompts(n, prompt), self.model.rotary(x0))
        if scheduler.config.prediction_type != "v_prediction":
            return pred.float()
        abar = scheduler.alphas_cumprod[level].to(x0.device)
        return (abar.sqrt() * pred + (1 - abar).sqrt() * x_t).float()  # eps = sqrt(abar) v + sqrt(1 - abar) x_t

    def elbo(self, x0: torch.Tensor, first: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Minus the denoising error averaged over PEER_TIMESTEPS: (n, k+1, C, h, w) -> (n,)."""
        errors = [(self.eps_hat(x0, eps, level, first, prompt) - eps.float()).pow(2).flatten(1).mean(1)
                  for level, eps in zip(PEER_TIMESTEPS, self.noise(x0))]
        return -torch.stack(errors).mean(0)

    def tadpole(self, x0: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """symlog(r_align) + symlog(r_rec), each averaged over PEER_TIMESTEPS: (n, k+1, C, h, w) -> (n,)."""
        align, rec = 0.0, 0.0
        for level, eps in zip(PEER_TIMESTEPS, self.noise(x0)):
            eps_y = self.eps_hat(x0, eps, level, first, self.prompt)
            P, n = len(self.others), len(x0)
            eps_0 = self.eps_hat(x0.repeat(P, 1, 1, 1, 1), eps, level, first.repeat(P, 1, 1, 1, 1),
                                 self.others.repeat_interleave(n, 0))  # (P n, k+1, C, h, w): prompt-major
            eps_0 = eps_0.reshape(P, n, *eps_0.shape[1:]).mean(0)  # (P n, ...) -> (P, n, ...) -> (n, ...)
            error = lambda e: (e - eps.float()).pow(2).flatten(1).mean(1)  # (n,)
            align = align + (eps_y - eps_0).pow(2).flatten(1).mean(1)
            rec = rec + error(eps_0) - error(eps_y)
        return symlog(align / len(PEER_TIMESTEPS)) + symlog(rec / len(PEER_TIMESTEPS))


# =====================================================================================================
# 8. SAC: soft actor-critic [3], in CleanRL's conventions [4]
# =====================================================================================================
# Maximise  E[ sum_t gamma^t (r_t + alpha * H(pi(.|s_t))) ]  with
#   twin critics      Q_k(s, a), k = 1, 2, trained on   y = r + gamma * (1 - done) *
#                     ( min_k Q_k_target(s', a') - alpha * log pi(a'|s') ),   a' ~ pi(.|s')
#   actor             pi(a|s) = tanh(N(mu(s), sigma(s)^2)), trained on   E[ alpha log pi(a|s) - min_k Q_k(s, a) ]
#   temperature       log_alpha trained so that the policy's entropy stays near -act_dim
#   inputs            s standardised per dimension by the mean and std of the random-action steps, frozen
#                     at the first update (--obs-norm; one change to CleanRL; assets/RESULTS.md, section 5)
# Shapes: obs (B, obs_dim), actions (B, act_dim) in [-1, 1], rewards / dones (B,).

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # bounds on the actor's log std (CleanRL, from Denis Yarats' SAC)
OBS_STD_MIN = 0.01  # std floor of a standardised observation dimension: 1 cm, Meta-World's positions are in metres
OBS_CLIP = 10.0  # standardised observations are clipped to +-10 std (Stable-Baselines3's VecNormalize default)


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

    def state_dict(self) -> dict:
        n = len(self)  # only the filled part is saved (as tensors: torch.load(weights_only=True) takes no numpy)
        arrays = {k: torch.from_numpy(getattr(self, k)[:n].copy()) for k in ("obs", "next_obs", "actions", "rewards",
                                                                              "dones")}
        return arrays | {"ptr": self.ptr, "full": self.full}

    def load_state_dict(self, state: dict) -> None:
        for k in ("obs", "next_obs", "actions", "rewards", "dones"):
            getattr(self, k)[:len(state[k])] = state[k].numpy()
        self.ptr, self.full = state["ptr"], state["full"]

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
        # fused=True: one kernel for all parameters' Adam step, not one per tensor (a CPU update's largest saving)
        self.q_optimizer = torch.optim.Adam([*self.qf1.parameters(), *self.qf2.parameters()], lr=args.q_lr,
                                            fused=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.policy_lr, fused=True)
        self.target_entropy = -float(act_dim)  # heuristic from [3]
        self.log_alpha = torch.tensor(np.log(args.alpha), dtype=torch.float32, device=self.device,
                                      requires_grad=True)
        self.a_optimizer = torch.optim.Adam([self.log_alpha], lr=args.policy_lr)
        self.obs_stats = None  # (mean, std), each (obs_dim,): the observation standardisation; see set_obs_stats

    def set_obs_stats(self, obs: np.ndarray) -> None:
        """Freeze a per-dimension standardisation x -> clip((x - mean) / std, +-OBS_CLIP) of the networks' input.

        obs (N, obs_dim): the random-action steps before learning_starts. Meta-World's state is positions
        in metres. On reach-v3's random-action steps the hand's and the goal's coordinates sit near 0.6 m
        with stds of 3-7 cm, and success needs the hand within 5 cm of the goal: raw, the networks must read
        centimetre differences off inputs ten times larger; standardised, 5 cm is about one unit. (Its effect on
        reach-v3: assets/RESULTS.md, section 5.) Frozen rather than
        running, so the critics' inputs never drift under them. Dimensions that random actions never move
        (an untouched object, the zero padding) get std OBS_STD_MIN, so a later move reads as large, not inf.
        """
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        self.obs_stats = (obs.mean(0), obs.std(0).clamp_min(OBS_STD_MIN))  # (obs_dim,), (obs_dim,)

    def normalise(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (B, obs_dim) -> the networks' input (B, obs_dim); unchanged until set_obs_stats is called."""
        if self.obs_stats is None:
            return obs
        mean, std = self.obs_stats
        return ((obs - mean) / std).clamp(-OBS_CLIP, OBS_CLIP)

    @property
    def alpha(self) -> float:
        return self.log_alpha.exp().item() if self.args.autotune else self.args.alpha

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        obs = torch.as_tensor(obs, device=self.device).unsqueeze(0)  # (1, obs_dim)
        action, _, mean_action = self.actor.get_action(self.normalise(obs))
        return (mean_action if deterministic else action)[0].cpu().numpy()

    def update(self, batch: dict[str, torch.Tensor], global_step: int) -> dict[str, float]:
        """One gradient step on the critics; every `policy_frequency` steps, that many actor (and
        temperature) steps; then a soft update of the targets. Returns the losses, for logging."""
        args = self.args
        b = {k: v.to(self.device) for k, v in batch.items()}
        b["obs"], b["next_obs"] = self.normalise(b["obs"]), self.normalise(b["next_obs"])
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

    PARTS = ("actor", "qf1", "qf2", "qf1_target", "qf2_target", "q_optimizer", "actor_optimizer", "a_optimizer")

    def state_dict(self) -> dict:
        parts = {name: getattr(self, name).state_dict() for name in self.PARTS}
        stats = None if self.obs_stats is None else [t.cpu() for t in self.obs_stats]
        return parts | {"log_alpha": self.log_alpha.detach().cpu(), "obs_stats": stats}

    def load_state_dict(self, state: dict) -> None:
        for name in self.PARTS:
            getattr(self, name).load_state_dict(state[name])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        stats = state["obs_stats"]
        self.obs_stats = None if stats is None else tuple(t.to(self.device) for t in stats)


# =====================================================================================================
# 9. The training loop: SAC on a reward mode, evaluated on held-out states
# =====================================================================================================
# Reward modes (--reward), all in one loop:
#     gen        E6 alone, reward-free: alpha * r_video + beta * r_fb, standardised (section 7); the env's
#                reward and success flag are used only to evaluate. The default of the method.
#     gen+dense  the paper's hybrid: Meta-World's dense reward + E6, its weights scaled by --hybrid-weight.
#     dense      Meta-World's hand-shaped reward (in [0, 10] per step) [2].
#     sparse     1 at the steps where the task is solved, else 0.
#     clip-text  VLM-RM: CLIP similarity of each frame to the task's text (section 7b).
#     viper, diffusion-reward, tadpole, roboclip: the peers' rewards on the same video model (section 7c),
#                standardised on the exploratory episodes as E6's terms are.
#     <term>+dense  any of the learned rewards, standardised, times --hybrid-weight, plus the dense reward
#                (gen+dense scales E6's two weights instead): clip-text+dense is the control that tells
#                whether the video model helps or any extra shaping does.
# Rewards are computed per episode, when it ends, in one batched call; only then do its transitions enter
# the replay buffer. That costs nothing for the env's own rewards and is the cheap way to use a
# video-level reward, which needs the episode's frames, in one batched encoder call.
# The generative modes, per episode: a goal video generated from the episode's first frame, E2 on the
# episode's frames, and E5 from the task's offline FB, trained before RL and frozen (section 6).
# The goal pool. Training episodes start from a fixed pool of --goal-pool initial states per task and seed
# (50, as Meta-World's MT1 benchmark has; every reward mode draws from the same pool), so each state's goal
# video is generated once, cached on disk by the video model and the first frame, and reused, with its E3
# goal frame and E(V_goal). What it changes: the agent trains on 50 starts, not a new one per episode, and
# is still evaluated on held-out states it never trained from, so the evaluation measures generalisation
# across initial states, as MT1's test states do. What it saves: a goal video per episode (the paper's own
# cost wall: ~64 s per video at full size) becomes 50 per run, and none on a rerun. --goal-pool 0 restores
# a fresh state, and a goal video of its own, every episode.
# The first learning_starts steps (random actions) are held back: they are the exploratory episodes that
# set E2's reference and E6's scales; when they are in, they are scored and SAC starts.
# --fb-online, the paper's schedule: FB starts untrained, trains fb_warmup steps on the held-back episodes,
# then on its own replay (psi features of the frames are stored, not the frames) every fb_every env steps
# until fb_freeze, and is frozen after; r_fb is paid from fb_freeze on (0 before), so every stored r_fb
# comes from the frozen FB. Its data is the agent's: F^T z* estimates how much the policy that collected
# FB's data visits the goal frame after (s, a) (E4), which only data that reaches the goal can teach, and
# the agent's replay holds no goal until the agent gets there. With r_fb paid from an FB still training,
# SAC on button-press-topdown-v3 raised the arm and held it still, a pose F rated above the expert's whole
# path (assets/RESULTS.md, section 8). --fb-demos adds the task's expert demos to that replay.
# What the reward costs is timed in parts (EpisodeRewards.seconds; metrics.json's reward_seconds_by_part):
# rendering the frames, generating goal videos, scoring (E2 encodes, E3, E5, E6, or CLIP-text), and with
# --fb-online psi features of the frames for FB's replay and FB's updates. What it pays is logged in parts
# too: each episode's standardised r_video and r_fb returns (log.jsonl), whose means between evaluations are
# the third panel of learning_curve.png, so a run shows which term the agent earns while its success rises
# or falls.
GEN_MODES = ("gen", "gen+dense")


def split_mode(mode: str) -> tuple[str, bool]:
    """A reward mode -> (its learned term or the env's reward, whether the dense reward is added):
    'viper+dense' -> ('viper', True), 'gen' -> ('gen', False), 'dense' -> ('dense', False)."""
    return (mode[:-len("+dense")], True) if mode.endswith("+dense") else (mode, False)


def needs_video_model(mode: str) -> bool:
    """Every mode but the env's own rewards reads frames through the video model's VAE, DiT or CLIP."""
    return mode not in ("dense", "sparse")


class TermReward:
    """One learned term put on exploring's scale, (raw(episode) - mu(t)) / sigma, mu(t) its mean at step t over
    the exploratory episodes and sigma its spread around mu(t), pooled over the steps where it varies (all of
    them, or roboclip's last): E6's standardisation (section 7) for a single term. `__call__(episode)` -> (T,)."""

    def __init__(self, raw, exploratory: list[dict] | None = None, state: dict | None = None):
        self.raw = raw
        if state is None:
            r = np.stack([raw(ep) for ep in exploratory])  # (N, T)
            dev = r - r.mean(0)  # (N, T)
            state = {"mu": r.mean(0), "sigma": float(dev[:, np.abs(dev).sum(0) > 0].std()) + 1e-8}
        self.mu, self.sigma = np.asarray(state["mu"]), state["sigma"]  # (T,): a fitted array or a saved tensor

    def state_dict(self) -> dict:  # torch, not numpy: a checkpoint loads with torch.load(weights_only=True)
        return {"mu": torch.from_numpy(self.mu), "sigma": self.sigma}

    def __call__(self, episode: dict) -> np.ndarray:
        r = self.raw(episode)
        return ((r - self.mu[:len(r)]) / self.sigma).astype(np.float32)


def term_raw(args: Args, model, given: np.ndarray | None = None):
    """The raw term of a one-term mode (clip-text or a peer; alone or +dense): episode -> (T,) float32."""
    base = split_mode(args.reward)[0]
    if base in PEER_MODES:
        return PeerReward(args, model, base, goal=given).raw
    prompts = clip_text_prompts(args)
    return lambda ep: clip_text_reward(model.clip, model.tokenizer, ep["frames"], prompts)


REWARD_COST_PARTS = ("render", "goal_video", "scoring", "fb_features", "fb_updates")


class EpisodeRewards:
    """`rewards(episode, step)` -> [(episode, rewards (T,) float32, returns), ...]: the finished episodes that
    are ready for the replay buffer (none, while the generative modes hold exploratory episodes back), with
    what to log of each: `returns` = {"charts/reward_return": the return SAC maximises} and, in the generative
    modes, each term's standardised return (before E6's weights), so a log shows which term the agent earns.
    An episode is a dict of arrays: states (T+1, obs_dim), actions (T, act_dim), env_rewards (T,), success
    (T,), and frames (T+1, H, W, 3) in the modes that need them (`needs_frames`)."""

    def __init__(self, args: Args, obs_dim: int, act_dim: int, progress: bool = True):
        self.args, self.pending, self.reward, self.episodes = args, [], None, 0
        self.goals = {}  # the pool's goals by their first frame's hash: E3 and E(V_goal) made once
        self.seconds = dict.fromkeys(REWARD_COST_PARTS, 0.0)  # wall time of each part of the reward
        self.needs_frames = needs_video_model(args.reward)
        self.base, self.hybrid = split_mode(args.reward)
        self.term = None  # the standardised term of the peers' modes and clip-text+dense, once exploring is done
        if self.needs_frames:
            self.model = load_video_model(args)  # cached; the toy model trains on first use (~11 min)
        self.given = load_goal_video(args) if args.goal_video else None  # --goal-video: one goal for all
        if self.base in TERM_MODES and self.base != "gen":
            self.raw = term_raw(args, self.model, self.given)
        if args.reward in GEN_MODES:
            self.fb_data, self.fb_parts = None, []  # --fb-online's replay: fb_transitions() dicts, joined when sampled
            self.fb_gen = torch.Generator().manual_seed(args.seed)
            if not args.fb_online:  # trained before RL on the task's reward-free data, and frozen (section 6)
                self.fb = offline_fb(args, self.model, progress=progress)
            else:
                psi_dim = frame_features(self.model.clip, np.zeros((1, 8, 8, 3), np.uint8)).shape[-1]
                self.fb = FB(obs_dim, act_dim, psi_dim, seed=args.seed, conservative=args.fb_conservative)
                if args.fb_demos:  # the finetuning demos (cached), with their states and actions
                    self.fb_parts.append(fb_transitions(split_episodes(collect_demos(args, progress=False)),
                                                        self.model.clip))

    @contextlib.contextmanager
    def timed(self, part: str):
        """Add the wall time of the `with` block to self.seconds[part]."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - t0

    def __call__(self, episode: dict, step: int) -> list[tuple[dict, np.ndarray, dict]]:
        mode = self.args.reward
        if mode in ("dense", "sparse", "clip-text"):  # per episode, unstandardised (VLM-RM pays the raw cosine)
            if mode == "dense":
                r = episode["env_rewards"]
            elif mode == "sparse":
                r = episode["success"].astype(np.float32)
            else:
                with self.timed("scoring"):
                    r = self.raw(episode)
            return [(episode, r, {"charts/reward_return": float(r.sum())})]
        if mode not in GEN_MODES:  # one standardised term: held back while exploring sets its scale
            if self.term is None:
                self.pending.append(episode)
                if step + 1 < self.args.learning_starts:
                    return []
                with self.timed("scoring"):
                    self.term = TermReward(self.raw, self.pending)
                ready, self.pending = self.pending, []
            else:
                ready = [episode]
            return [self.score_term(ep) for ep in ready]
        if self.args.fb_online and step < self.args.fb_freeze:  # FB's data: psi of the frames, computed once
            with self.timed("fb_features"):
                self.fb_parts.append(fb_transitions([episode], self.model.clip, self.args.render_every))
        if self.reward is None:  # still exploring: hold the episode back
            self.pending.append(episode)
            if step + 1 < self.args.learning_starts:
                return []
            if self.args.fb_online:
                self.update_fb(self.args.fb_warmup)
            with self.timed("scoring"):  # E2's encodes of the exploratory episodes
                self.reward = GenerativeReward(self.args, self.model.vae, self.model.clip, self.model.tokenizer,
                                               self.fb, self.pending)
            ready, self.pending = self.pending, []
        else:
            ready = [episode]
        return [self.score(ep, step) for ep in ready]

    def score_term(self, episode: dict) -> tuple[dict, np.ndarray, dict]:
        """A standardised term, times --hybrid-weight plus the dense reward in "<term>+dense", and the returns
        to log: SAC's and the term's standardised return."""
        with self.timed("scoring"):
            z = self.term(episode)
        r = self.args.hybrid_weight * z + episode["env_rewards"] if self.hybrid else z
        return episode, r.astype(np.float32), {"charts/reward_return": float(r.sum()),
                                               "charts/term_std_return": float(z.sum())}

    def score(self, episode: dict, step: int) -> tuple[dict, np.ndarray, dict]:
        """E6 (+ the env's reward in gen+dense) against a goal video generated from the episode's first frame,
        and the returns to log: SAC's, and each term's standardised return (r_fb's is 0 while it is unpaid)."""
        self.episodes += 1
        fb_paid = not self.args.fb_online or step >= self.args.fb_freeze  # only a frozen FB pays
        if self.given is not None:  # --goal-video: the user's video is every episode's goal
            key, video = "given", self.given
        elif self.args.goal_pool:  # a pool state: its goal video is made once (cached on disk), then reused
            key = frame_hash(episode["frames"][0])
            with self.timed("goal_video"):
                video = goal_video(self.args, self.model, episode["frames"][0], seed=self.args.seed)
        else:  # a fresh state every episode: a goal video of its own
            key = None
            with self.timed("goal_video"):
                video = generate_video(self.model, episode["frames"][0], task_prompt(self.args.task),
                                       self.args.video_frames, seed=self.args.seed * 1_000_003 + self.episodes,
                                       steps=self.args.sample_steps)
        with self.timed("scoring"):
            goal = self.reward.goal(video, known=self.goals.get(key))
        if key is not None:
            self.goals[key] = goal
        with self.timed("scoring"):
            terms = self.reward.terms(episode, goal)
            r = self.reward.combine(terms, goal, fb_paid)
        if self.args.reward == "gen+dense":
            r = r + episode["env_rewards"]
        z = self.reward.standardise(terms, goal)  # what each term pays this episode, before E6's weights
        if not fb_paid:
            z["r_fb"] = np.zeros_like(z["r_fb"])
        return episode, r, {"charts/reward_return": float(r.sum()), "charts/r_video_std_return":
                            float(z["r_video"].sum()), "charts/r_fb_std_return": float(z["r_fb"].sum())}

    def state_dict(self) -> dict:
        """What a resumed run needs: FB with its optimiser and data, the held-back episodes, and the frozen
        parts of the generative reward (exploratory latents, m, and the exploratory transitions); in the
        one-term modes, the held-back episodes and the term's scale."""
        pending = [{k: torch.from_numpy(v) for k, v in ep.items()} for ep in self.pending]  # no numpy
        if self.args.reward in ("dense", "sparse", "clip-text"):
            return {}
        if self.args.reward not in GEN_MODES:
            return {"pending": pending, "term": None if self.term is None else self.term.state_dict()}
        reward = None if self.reward is None else self.reward.state_dict()
        return {"fb": self.fb.state_dict(), "fb_opt": self.fb.opt.state_dict(), "fb_gen": self.fb_gen.get_state(),
                "fb_fb_gen": self.fb.gen.get_state(), "fb_data": self.fb_data, "fb_parts": self.fb_parts,
                "pending": pending, "reward": reward, "episodes": self.episodes}

    def load_state_dict(self, state: dict) -> None:
        if self.args.reward in ("dense", "sparse", "clip-text"):
            return
        if self.args.reward not in GEN_MODES:
            self.pending = [{k: v.numpy() for k, v in ep.items()} for ep in state["pending"]]
            self.term = None if state["term"] is None else TermReward(self.raw, state=state["term"])
            return
        self.fb.load_state_dict(state["fb"]); self.fb.opt.load_state_dict(state["fb_opt"])
        self.fb_gen.set_state(state["fb_gen"]); self.fb.gen.set_state(state["fb_fb_gen"])
        self.fb_data, self.fb_parts, self.episodes = state["fb_data"], state["fb_parts"], state["episodes"]
        self.pending = [{k: v.numpy() for k, v in ep.items()} for ep in state["pending"]]
        if state["reward"] is not None:  # rebuilt from its saved parts (the exploratory frames are gone)
            self.reward = GenerativeReward(self.args, self.model.vae, self.model.clip, self.model.tokenizer, self.fb,
                                           state=state["reward"])

    def update_fb(self, updates: int) -> dict:
        """`updates` steps of E4 on FB's replay (uniform batches of args.fb_batch transitions)."""
        with self.timed("fb_updates"):
            first = self.fb_data is None
            if self.fb_parts:  # join the episodes added since the last update
                self.fb_data = {k: torch.cat(([self.fb_data[k]] if self.fb_data else []) + [p[k] for p in self.fb_parts])
                                for k in self.fb_parts[0]}
                self.fb_parts = []
            if first:  # F's input scale, from the data of FB's first update
                self.fb.set_obs_stats(self.fb_data["obs"])
            metrics = {}
            for _ in range(updates):
                idx = torch.randint(len(self.fb_data["obs"]), (self.args.fb_batch,), generator=self.fb_gen)
                metrics = self.fb.update({k: v[idx] for k, v in self.fb_data.items()})
        return metrics


def evaluate(agent: SAC, env: MetaWorld, episodes: int) -> dict[str, float]:
    """Deterministic policy on `episodes` held-out initial states (the same ones at every evaluation)."""
    runs = [rollout(env, lambda o: agent.act(o, deterministic=True), EVAL_SEED0 + i, render=False)
            for i in range(episodes)]
    return {"eval/success": float(np.mean([r["success"].any() for r in runs])),
            "eval/return": float(np.mean([r["env_rewards"].sum() for r in runs]))}


# Fields that say where a run writes and how `bench` schedules it, not what it computes: a checkpoint resumes
# under a bench with other tasks, modes, seeds or workers, or from a copied folder.
NOT_RUN_SETTINGS = ("out", "resume", "bench_tasks", "bench_modes", "bench_seeds", "workers", "report_states",
                    "report_fb_reward", "slurm", "shipped_toy")  # (a shipped and a trained toy model are the same weights)


def run_settings(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if k not in NOT_RUN_SETTINGS}


POOL_STREAM = 2  # the pool's states are drawn from default_rng([seed, POOL_STREAM]), apart from training's own draws


def goal_pool(args: Args) -> np.ndarray:
    """The initial states (reset seeds, below DEMO_SEED0) that training draws its episodes from: (goal_pool,),
    or (0,) for a fresh state every episode."""
    return np.random.default_rng([args.seed, POOL_STREAM]).choice(DEMO_SEED0, args.goal_pool, replace=False)


def train(args: Args, out: Path | None = None, progress: bool = True) -> dict:
    """Train SAC on one task with the chosen reward; write metrics.json, log.jsonl, learning_curve.png,
    agent.pt under `out`. Returns the metrics dict."""
    from tqdm import tqdm

    out = Path(out or default_out(args, "train"))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    resume = load_checkpoint(checkpoint) if args.resume and checkpoint.exists() else None
    if resume is not None and run_settings(resume["args"]) != run_settings(dataclasses.asdict(args)):
        raise VdrError(f"{checkpoint} was written by a run with other settings; resume with the same flags "
                       "(see its args.json), or use another --out")
    if resume is not None and "reward_seconds" not in resume:  # saved before the reward was timed in parts
        raise VdrError(f"{checkpoint} was written by an older vdr and cannot be resumed; rerun without --resume "
                       "(it starts over), or use another --out")
    write_json(out / "args.json", dataclasses.asdict(args))
    rng = seed_everything(args.seed)
    pool = goal_pool(args)
    with make_env(args) as env, make_env(args) as eval_env:
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        agent = SAC(obs_dim, act_dim, args)
        rb = ReplayBuffer(obs_dim, act_dim, min(args.buffer_size, args.steps), rng)
        rewards = EpisodeRewards(args, obs_dim, act_dim, progress)
        curve, episode, eval_time, first_step, save_due = [], None, 0.0, 0, False
        window = []  # what each episode finished since the last evaluation logged: its rewards' returns, success
        if resume is not None:  # every piece of state the loop carries, as it was at the checkpoint
            agent.load_state_dict(resume["agent"]); rb.load_state_dict(resume["buffer"])
            rewards.load_state_dict(resume["rewards"])
            rng.bit_generator.state = resume["rng"]; torch.set_rng_state(resume["torch_rng"])
            curve, eval_time, rewards.seconds = resume["curve"], resume["eval_time"], resume["reward_seconds"]
            window = resume.get("window", [])  # absent from checkpoints of an older vdr: one interval's means
            first_step = resume["step"]
        logger = Logger(out, keep_bytes=resume["log_bytes"] if resume else None)
        start = time.time() - (resume["elapsed"] if resume else 0.0)
        bar = tqdm(range(first_step, args.steps), initial=first_step, total=args.steps,
                   desc=f"train {args.task} [{args.reward}]", disable=not progress)
        for global_step in bar:
            if episode is None:  # start an episode: a state of the pool, or a fresh seeded one (--goal-pool 0)
                obs, _ = env.reset(seed=int(pool[rng.integers(len(pool))] if len(pool) else rng.integers(DEMO_SEED0)))
                episode = {k: [] for k in ("states", "actions", "env_rewards", "success", "dones", "frames")}
                episode["states"].append(obs)
                if rewards.needs_frames:
                    with rewards.timed("render"):
                        episode["frames"].append(env.render())
            if global_step < args.learning_starts:
                action = rng.uniform(-1, 1, act_dim).astype(np.float32)  # uniform exploration (CleanRL)
            else:
                action = agent.act(obs)
            obs, reward, terminated, truncated, info = env.step(action)
            for k, v in zip(episode, (obs, action, reward, info["success"] > 0, float(terminated))):
                episode[k].append(v)
            if rewards.needs_frames:  # rendered every render_every steps and at the end, else held (section 4)
                with rewards.timed("render"):  # what the reward costs, in parts: rewards.seconds
                    t = len(episode["actions"])
                    rendered = t % args.render_every == 0 or terminated or truncated
                    episode["frames"].append(env.render() if rendered else episode["frames"][-1])

            if terminated or truncated:  # score the finished episode(s), then store the transitions
                ep = {k: np.array(v) for k, v in episode.items()}  # states (T+1, obs_dim), frames (T+1, H, W, 3)
                for done_ep, r, returns in rewards(ep, global_step):  # goal videos, scoring, FB's features (timed)
                    rb.add(done_ep["states"][:-1], done_ep["actions"], r, done_ep["states"][1:], done_ep["dones"])
                    logger.log(global_step, returns)  # the return SAC maximises (and each generative term's)
                    window.append(returns)
                logger.log(global_step, {"charts/episodic_return": float(ep["env_rewards"].sum()),
                                         "charts/episodic_success": float(ep["success"].any())})
                window.append({"charts/episodic_success": float(ep["success"].any())})
                episode = None

            if global_step >= args.learning_starts and len(rb) >= args.batch_size:
                if args.obs_norm and agent.obs_stats is None:  # before the first update: the random-action steps
                    agent.set_obs_stats(rb.obs[:len(rb)])
                losses = agent.update(rb.sample(args.batch_size), global_step)
                if (args.fb_online and rewards.reward is not None and global_step < args.fb_freeze
                        and global_step % args.fb_every == 0):
                    losses |= rewards.update_fb(1)  # --fb-online: FB learns online until it is frozen
                if global_step % 100 == 0:  # log every 100 steps, as CleanRL does
                    sps = (global_step + 1) / (time.time() - start - eval_time)
                    logger.log(global_step, losses | {"charts/SPS": sps})

            if (global_step + 1) % args.eval_every == 0 or global_step + 1 == args.steps:
                t0 = time.time()
                result = evaluate(agent, eval_env, args.eval_episodes)
                eval_time += time.time() - t0
                # The training episodes since the last evaluation, as means: their success and the returns of
                # the reward SAC saw (the figure's third panel shows which term the agent earns as it learns).
                result |= {"train/" + k.split("/")[1]: float(np.mean([w[k] for w in window if k in w]))
                           for k in dict.fromkeys(k for w in window for k in w)}
                window = []
                curve.append({"env_steps": global_step + 1, **result})
                logger.log(global_step + 1, result)
                bar.set_postfix(success=f"{result['eval/success']:.2f}", ret=f"{result['eval/return']:.0f}")
                save_due = True
            # A checkpoint after each evaluation, at the first episode boundary (no half episode to save).
            if save_due and episode is None and global_step + 1 < args.steps:
                logger.file.flush()
                state = {"args": dataclasses.asdict(args) | {"resume": False}, "step": global_step + 1,
                         "agent": agent.state_dict(), "buffer": rb.state_dict(), "rewards": rewards.state_dict(),
                         "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "curve": curve,
                         "window": window, "eval_time": eval_time, "reward_seconds": rewards.seconds,
                         "elapsed": time.time() - start, "log_bytes": logger.file.tell()}
                atomic_write(checkpoint, lambda tmp: torch.save(state, tmp))
                save_due = False
        wall = time.time() - start
        logger.close()

    atomic_write(out / "agent.pt", lambda tmp: torch.save(agent.state_dict(), tmp))
    if rewards.reward is not None:  # the generative reward as trained (FB) and frozen (E6's exploring data)
        atomic_write(out / "reward.pt", lambda tmp: torch.save(
            {"fb": rewards.fb.state_dict(), "reward": rewards.reward.state_dict()}, tmp))
    metrics = {"task": args.task, "reward": args.reward, "seed": args.seed,
               "eval_success": curve[-1]["eval/success"], "eval_return": curve[-1]["eval/return"],
               "env_steps": args.steps, "steps_per_second": args.steps / (wall - eval_time),
               "wall_seconds": wall, "eval_seconds": eval_time, "curve": curve,
               "reward_seconds": sum(rewards.seconds.values()),  # what the reward cost, all parts
               "reward_seconds_by_part": rewards.seconds}
    write_json(out / "metrics.json", metrics)
    plot_learning_curve(curve, out / "learning_curve.png", f"{args.task} - SAC on the {args.reward} reward")
    checkpoint.unlink(missing_ok=True)  # the run is complete: nothing left to resume
    return metrics


def plot_learning_curve(curve: list[dict], path: Path, title: str) -> Path:
    """Eval success and eval return against env steps and, where the curve has them (train() adds them), the
    training episodes' success and rewards' returns, each the mean over the interval that ends there."""
    # A bare Figure, not pyplot: draws to a file without touching the current backend (a notebook's
    # inline plots keep working after train() has run).
    from matplotlib.figure import Figure

    steps = [c["env_steps"] for c in curve]
    train = any("train/reward_return" in c for c in curve)  # an interval may have scored no episode: NaN
    get = lambda key: [c.get(key, np.nan) for c in curve]
    fig = Figure(figsize=(13.5 if train else 9, 3.2))
    ax1, ax2, *ax3 = fig.subplots(1, 3 if train else 2)
    ax1.plot(steps, [c["eval/success"] for c in curve], marker="o", label="eval (held-out states)")
    ax1.set(xlabel="env steps", ylabel="success rate", ylim=(-0.05, 1.05))
    ax2.plot(steps, [c["eval/return"] for c in curve], marker="o", color="tab:orange")
    ax2.set(xlabel="env steps", ylabel="eval return (env reward)")
    if train:
        ax1.plot(steps, get("train/episodic_success"), marker=".", ls="--", color="tab:gray",
                 label="training episodes")
        ax1.legend(fontsize=8)
        names = {"reward_return": "the reward SAC maximises", "r_video_std_return": "r_video (standardised)",
                 "r_fb_std_return": "r_fb (standardised)", "term_std_return": "the learned term (standardised)"}
        for key, label in names.items():
            if any("train/" + key in c for c in curve):
                ax3[0].plot(steps, get("train/" + key), marker=".", label=label)
        ax3[0].axhline(0, color="k", lw=0.5)
        ax3[0].set(xlabel="env steps", ylabel="return per training episode")
        ax3[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


# =====================================================================================================
# 10. Plumbing used by every section: seeding, atomic files, cache keys, a metrics logger
# =====================================================================================================
# Grouped here so that the method reads without them: each is short, and none holds a method's idea.


def seed_everything(seed: int) -> np.random.Generator:
    """Seed torch's global generator and return a numpy Generator; same seed -> same numbers on CPU."""
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def default_out(args: Args, command: str) -> Path:
    return Path(args.out) if args.out else Path("runs") / command / f"{args.task}-{args.reward}-s{args.seed}"


def atomic_write(path: Path, write) -> Path:
    """Call write(tmp_path), then rename tmp_path to path: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0); os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # what open() would have given (mkstemp makes it private: 0600)
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_dir(path: Path, write) -> Path:
    """Call write(tmp_dir), then rename tmp_dir to path: the same for a folder (a saved model)."""
    import shutil
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # the folder exists: another process wrote it first (two runs finetuning one model)
            if not path.is_dir():  # a cache entry is a function of its key, so theirs is as good as ours
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def write_json(path: Path, obj) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


CACHE_VERSION = 1  # bump when a cached artefact's format or meaning changes, so stale caches are not reused


def data_key(args: Args, task: str | None = None) -> dict:
    """The settings that make the data (frames, episodes) of `task` (default args.task) what it is: part of
    every trained model's key. A suite's own settings (the DCS distractions) count only for its tasks:
    Meta-World ignores them, so a DCS run reuses the Meta-World demos and pretrained models."""
    key = {"image_size": args.image_size, "camera": args.camera, "episode_length": args.episode_length}
    if args.zoom != 1 and task != "pretrain":  # only when set, so the unzoomed caches keep their keys;
        key["zoom"] = args.zoom                 # pretraining always sees the full view (see finetune)
    if suite := task_suite(task or args.task):
        key |= suite.data_key(args)
    return key


def cache_path(args: Args, kind: str, suffix: str, **inputs) -> Path:
    """runs/cache/<kind>/<task>-<hash of the inputs>.<suffix>: the same inputs find the same file."""
    key = json.dumps({"v": CACHE_VERSION, **inputs}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(args.cache_dir) / kind / f"{inputs.get('task', 'all')}-{digest}{suffix}"


class Logger:
    """Writes {"step": s, **metrics} lines to out/log.jsonl (and to TensorBoard when it is installed).
    Metric names are grouped as in CleanRL: charts/..., losses/..., eval/..."""

    def __init__(self, out: Path, keep_bytes: int | None = None):
        """A new log; or, with keep_bytes (a resumed run), the old one cut back to its first keep_bytes."""
        if keep_bytes is None:
            self.file = open(Path(out) / "log.jsonl", "w")
        else:
            self.file = open(Path(out) / "log.jsonl", "r+")
            self.file.truncate(keep_bytes)
            self.file.seek(keep_bytes)
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


# #####################################################################################################
# PART II. EXPERIMENTS AND EXTENSIONS: what a researcher uses to measure the method.
# eval-video, eval-reward and its baselines, the main job and its report, the bench, the Distracting
# Control Suite, and the command line. Each section uses Part I's functions; none changes them.
# #####################################################################################################


# =====================================================================================================
# 11. How good are the goal videos? `eval-video`
# =====================================================================================================
# On held-out initial states, the scripted expert's real video is the reference. The task changes few
# pixels (arm, object), so the score looks only there: the mask is where the real video's last frame
# differs from its first. Every video is compared as a VAE decoder output (the real one and the baselines
# after the same round trip D(E(V)), the generated one as decoded), so the VAE's blur counts against no
# method; the VAE's own error on the mask is reported beside. All methods are scored on the same states, so
# each baseline is compared with the generator state by state (paired), with the standard error of the mean
# difference: one goal video is one draw of the sampler, and with 10 states that error is as large as the
# differences between methods (assets/RESULTS.md, section 3).
MASK_THRESHOLD = 24  # uint8 levels (~10% of 255) a pixel must change by to count as changed by the task:
                     # the arm and the object, not faint shading


@torch.no_grad()
def round_trip(vae, videos: np.ndarray) -> np.ndarray:
    """D(E(V)) for videos (N, F, H, W, 3) uint8 -> same shape."""
    return np.concatenate([to_frames(vae_decode(vae, vae_encode(vae, to_video_tensor(v[None])))) for v in videos])


def latent_cosine(vae, a: np.ndarray, b: np.ndarray) -> float:
    """E2's similarity between two videos (F, H, W, 3): cosine of their flattened VAE latents."""
    with torch.no_grad():
        za, zb = (vae_encode(vae, to_video_tensor(v[None])).flatten() for v in (a, b))
    return float(F.cosine_similarity(za, zb, dim=0))


def eval_video(args: Args, out: Path | None = None, progress: bool = True) -> dict:
    """CLI `eval-video`: generated goal videos vs the expert's real videos on held-out initial states,
    against two baselines: (a) the first frame repeated, (b) the training demo with the nearest first
    frame. Writes metrics.json ({method: {final_frame_mse, latent_cosine}, with per-state errors and, for each
    baseline, the paired difference generated - baseline and its standard error}) and side_by_side.png."""
    from tqdm import tqdm
    out = Path(out or default_out(args, "eval-video"))
    model = load_video_model(args)
    demos = training_videos(args, collect_demos(args, progress=progress))  # (N, F, H, W, 3)
    real = training_videos(args, collect_demos(args, seed0=HELDOUT_SEED0, episodes=args.eval_videos,
                                               progress=progress))  # (M, F, H, W, 3)
    t0, generated = time.time(), []
    for i, video in enumerate(tqdm(real, desc="generate", disable=not progress)):
        generated.append(goal_video(args, model, video[0], seed=args.seed + i))
    seconds = (time.time() - t0) / len(real)
    nearest = [demos[np.argmin(((demos[:, 0].astype(np.float32) - v[0]) ** 2).sum(axis=(1, 2, 3)))] for v in real]
    methods = {"generated": np.stack(generated), "first_frame_repeated": np.repeat(real[:, :1], real.shape[1], 1),
               "nearest_demo": np.stack(nearest)}
    real_rt = round_trip(model.vae, real)
    # mask (M, H, W): pixels where the task changed the real video
    mask = np.abs(real[:, -1].astype(np.int16) - real[:, 0]).max(-1) > MASK_THRESHOLD

    def masked_mse(a, b):  # a, b (M, H, W, 3) uint8 -> (M',) the MSE on each video's mask, in [0, 1]^2
        err = ((a.astype(np.float32) - b) / 255) ** 2
        return np.array([e[m].mean() for e, m in zip(err, mask) if m.any()])

    metrics = {"task": args.task, "videos": len(real), "frames": args.video_frames,
               "mask_fraction": float(mask.mean()), "seconds_per_video": seconds,
               "vae_reconstruction_mse": float(masked_mse(real_rt[:, -1], real[:, -1]).mean())}
    # every video is scored as one VAE decoder output: the real video and the baselines after one round
    # trip D(E(.)), the generated one as generated, D(x0) (a second round trip would blur it twice)
    rts = {name: videos if name == "generated" else round_trip(model.vae, videos) for name, videos in methods.items()}
    errors = {name: masked_mse(rts[name][:, -1], real_rt[:, -1]) for name in methods}  # each (M',)
    for name, videos in methods.items():
        metrics[name] = {"final_frame_mse": float(errors[name].mean()),
                         "final_frame_mse_per_video": errors[name].tolist(),
                         "latent_cosine": float(np.mean([latent_cosine(model.vae, v, r) for v, r in zip(videos, real)]))}
        if name != "generated":  # paired over the same states: generated minus this baseline, and its std error
            diff = errors["generated"] - errors[name]  # (M',)
            sem = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            metrics[name].update(generated_minus_this=float(diff.mean()), generated_minus_this_sem=float(sem))
    metrics["generated"]["final_frame_mse_after_another_round_trip"] = float(masked_mse(
        round_trip(model.vae, methods["generated"])[:, -1], real_rt[:, -1]).mean())
    write_json(out / "metrics.json", metrics)
    side_by_side(real, real_rt, methods, out / "side_by_side.png")
    print(f"\n{args.task}: goal videos vs the expert's real video on {len(real)} held-out initial states "
          f"({seconds:.1f} s per generated video)")
    print(f"{'method':24s} {'final_frame_mse':>16s} {'latent_cosine':>14s} {'generated - this (paired, sem)':>31s}")
    for name in methods:
        m = metrics[name]
        paired = "" if name == "generated" else \
            f"{m['generated_minus_this']:+.4f} ± {m['generated_minus_this_sem']:.4f}"
        print(f"{name:24s} {m['final_frame_mse']:16.4f} {m['latent_cosine']:14.3f} {paired:>31s}")
    print(f"{'(VAE round trip alone)':24s} {metrics['vae_reconstruction_mse']:16.4f}")
    return metrics


def side_by_side(real, real_rt, methods: dict, path: Path, rows: int = 3, n: int = 6) -> Path:
    """PNG: for `rows` held-out states, strips of n frames: real, its VAE round trip, then each method."""
    from PIL import Image, ImageDraw
    strips = []
    for i in range(min(rows, len(real))):
        for name, videos in {"real": real, "real (VAE)": real_rt, **methods}.items():
            strip = np.concatenate(list(resample(videos[i], n)), axis=1)  # (H, n*W, 3)
            label = np.full((strip.shape[0], 150, 3), 255, np.uint8)
            img = Image.fromarray(label); ImageDraw.Draw(img).text((4, strip.shape[0] // 2 - 6), name, fill=0)
            strips.append(np.concatenate([np.asarray(img), strip], axis=1))
        strips.append(np.full((6, strips[-1].shape[1], 3), 255, np.uint8))  # a gap between states
    grid = Image.fromarray(np.concatenate(strips))
    return atomic_write(path, lambda tmp: grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(tmp, format="PNG"))


# =====================================================================================================
# 12. How good are the rewards before any RL? `eval-reward`, with the baselines
# =====================================================================================================
# For each reward, on held-out initial states, with episodes of every behaviour (section 2):
#   voc         Spearman correlation of the per-step reward with time, averaged over the successful
#               expert episodes (value-order correlation: a good reward rises as the task progresses);
#   voc_random  the same on random-policy episodes: a control. A reward that rises with time whatever the
#               agent does (e.g. because the clip o_{0:t} fills with motion) is no reward; want ~0;
#   auroc       how well the episode's reward sum separates successful from failed episodes (all
#               behaviours pooled): the probability that a random success outscores a random failure.
# Every reward is run against two goals per initial state: the generated goal video, and an oracle (the
# expert's real video from that state), so that goal-video quality and reward design can be told apart.
def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (ties get their mean rank); 0 when either side is constant."""
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v)); r[order] = np.arange(len(v))
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        return (np.bincount(inverse, r) / counts)[inverse]  # mean rank of each tie group
    rx, ry = ranks(np.asarray(x)), ranks(np.asarray(y))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def pixel_reward(frames: np.ndarray, goal_frame: np.ndarray) -> np.ndarray:
    """The negative mean squared pixel distance of o_t (t = 1..T) to the goal frame, in [0, 1] units -> (T,)."""
    diff = (frames[1:].astype(np.float32) - goal_frame.astype(np.float32)) / 255
    return -(diff ** 2).mean(axis=(1, 2, 3))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def reward_quality(rewards: dict[str, list[np.ndarray]], behaviours: list[str], success: np.ndarray) -> dict:
    """{name: {"voc", "voc_random", "auroc"}} from per-step rewards {name: [(T,) per episode]}."""
    success, behaviours = np.asarray(success), np.asarray(behaviours)
    out = {}
    for name, per_episode in rewards.items():
        def voc(mask):
            corr = [spearman(np.arange(len(r)), r) for r, m in zip(per_episode, mask) if m]
            return float(np.mean(corr)) if corr else float("nan")
        out[name] = {"voc": voc((behaviours == "expert") & success), "voc_random": voc(behaviours == "random"),
                     "auroc": auroc(np.array([r.sum() for r in per_episode]), success)}
    return out


def auroc_by_failure(rewards: dict[str, list[np.ndarray]], behaviours: list[str], success: np.ndarray) -> dict:
    """{name: {behaviour: auroc}}: all successes against the failures of one behaviour at a time (which
    failures a reward cannot tell from success)."""
    success, behaviours = np.asarray(success), np.asarray(behaviours)
    out = {}
    for name, per_episode in rewards.items():
        sums = np.array([r.sum() for r in per_episode])
        out[name] = {b: auroc(sums[success | (behaviours == b)], success[success | (behaviours == b)])
                     for b in BEHAVIOURS if ((behaviours == b) & ~success).any()}
    return out


# ---- the exploit probe: a behaviour that optimises the reward under test ----
# The four behaviours are made without looking at the reward, so a reward can rank them well and still pay
# an agent for something none of them does: on button-press-v3, SAC found a pose that E6 pays more than the
# expert's press (assets/RESULTS.md, section 8.1). The probe plays that agent without RL's cost: from each of
# the first `probe_states` held-out states, the cross-entropy method (CEM) searches open-loop action plans in
# the simulator for the one the reward under test pays most. It reads that reward only, never the env's
# reward or success flag (except when the reward under test is `dense`, the control).
#   auroc_exploit        the successes of every behaviour against the probe's failed episodes: can the
#                        reward tell success from what it pays most? (nan where no probe episode fails)
#   expert_over_exploit  the share of probe states where the probe's best plan fails the task and earns less
#                        than the expert, or succeeds: 1 = nothing found that the reward pays above the task
# A plan holds each of PROBE_SEGMENTS actions for T / PROBE_SEGMENTS steps (40 numbers for 150 steps of 4):
# enough to move the hand anywhere and hold it there, which is what RL's exploit did.
PROBE_SEGMENTS = 10
PROBE_POPULATION = 24  # plans per CEM iteration
PROBE_ELITES = 6  # the best quarter, whose per-number mean and std draw the next iteration's plans
PROBE_ITERATIONS = 4
PROBE_STD = 0.6  # the first iteration's std (actions lie in [-1, 1]); later ones get +0.05, so CEM keeps looking
PROBE_REWARDS = ("combined", "r_video", "r_fb", "dense", *PEER_MODES)  # what --probe-rewards may name


def check_probe_rewards(args: Args) -> None:
    unknown = set(args.probe_rewards.split(",")) - set(PROBE_REWARDS)
    if unknown:
        raise VdrError(f"unknown --probe-rewards {', '.join(sorted(unknown))}; choose from: {', '.join(PROBE_REWARDS)}")


ARG_CHECKS.append(check_probe_rewards)  # a bad --probe-rewards stops in check_args, before any work
PROBE_STREAM = 3  # the plans are drawn from default_rng([seed, PROBE_STREAM]), a stream of their own


def plan_policy(plan: np.ndarray, T: int):
    """policy(obs) -> action that plays plan (S, act_dim): action s for steps [s T/S, (s+1) T/S)."""
    t = [0]

    def policy(obs):
        a = plan[min(t[0] * len(plan) // T, len(plan) - 1)]
        t[0] += 1
        return a
    return policy


def exploit_episode(env: MetaWorld, seed: int, score, gen: np.random.Generator, render: bool = True,
                    render_every: int = 1) -> dict:
    """The episode from initial state `seed` that `score(episode) -> float` rates highest among the
    PROBE_ITERATIONS x PROBE_POPULATION plans CEM draws (section 12's probe)."""
    T, act_dim = env.episode_length, env.action_space.shape[0]
    mean, std = np.zeros((PROBE_SEGMENTS, act_dim)), np.full((PROBE_SEGMENTS, act_dim), PROBE_STD)
    best, best_score = None, -np.inf
    for _ in range(PROBE_ITERATIONS):
        plans = np.clip(mean + std * gen.standard_normal((PROBE_POPULATION, *mean.shape)), -1, 1)  # (P, S, A)
        scores = []
        for plan in plans:
            episode = rollout(env, plan_policy(plan, T), seed, render=render, render_every=render_every)
            scores.append(score(episode))
            if scores[-1] > best_score:
                best, best_score = episode, scores[-1]
        elite = plans[np.argsort(scores)[-PROBE_ELITES:]]  # (E, S, A)
        mean, std = elite.mean(0), elite.std(0) + 0.05
    return best


def probe_metrics(success_returns: np.ndarray, expert_returns: np.ndarray, exploit_returns: np.ndarray,
                  exploit_success: np.ndarray) -> dict:
    """The probe's two numbers for one reward: success_returns, the reward's returns of every successful
    held-out episode; expert_returns, exploit_returns, exploit_success: per probe state (n,)."""
    failed = exploit_returns[~exploit_success]
    scores = np.concatenate([success_returns, failed])
    labels = np.concatenate([np.ones(len(success_returns), bool), np.zeros(len(failed), bool)])
    held = exploit_success | (exploit_returns < expert_returns)
    return {"auroc_exploit": auroc(scores, labels), "expert_over_exploit": float(held.mean()),
            "exploit_success": float(exploit_success.mean())}


def exploit_probe(args: Args, g: GenerativeReward, goals: list[Goal], held_out: list[dict],
                  rewards: dict[str, list[np.ndarray]], success: np.ndarray, progress: bool = True,
                  peers: dict | None = None) -> dict:
    """The probe on the rewards --probe-rewards names: E6 ("combined"), each of its terms, the env's dense
    reward (the control), or a peer's (`peers`: {mode: PeerReward}), from the first args.probe_states held-out
    states; held_out[i] is the expert's episode from state i. Returns
    {reward: probe_metrics(...) | {"expert_returns", "exploit_returns"}}."""
    from tqdm import tqdm
    scores = {  # the reward under test of one episode from state i, and whether it needs frames
        "combined": (lambda ep, i: g.reward(ep, goals[i]).sum(), True),
        "r_video": (lambda ep, i: g.terms(ep, goals[i])["r_video"].sum(), True),
        "r_fb": (lambda ep, i: g.r_fb(ep, goals[i]).sum(), args.fb_reward in ("shaping", "kernel")),
        "dense": (lambda ep, i: ep["env_rewards"].sum(), False),
        **{m: (lambda ep, i, p=p: p.raw(ep).sum(), True) for m, p in (peers or {}).items()}}
    n, out = min(args.probe_states, args.eval_videos), {}
    if n == 0:
        return out
    with make_env(args) as env:
        for name in args.probe_rewards.split(","):
            score, frames = scores[name]
            gen = np.random.default_rng([args.seed, PROBE_STREAM])
            found = [exploit_episode(env, HELDOUT_SEED0 + i, lambda ep: score(ep, i), gen, frames, args.render_every)
                     for i in tqdm(range(n), desc=f"probe [{name}]", disable=not progress)]
            exploit = np.array([score(ep, i) for i, ep in enumerate(found)])
            expert = np.array([rewards[name][i].sum() for i in range(n)])
            sums = np.array([r.sum() for r in rewards[name]])
            out[name] = probe_metrics(sums[success], expert, exploit, np.array([ep["success"].any() for ep in found]))
            out[name] |= {"expert_returns": expert.tolist(), "exploit_returns": exploit.tolist()}
    return out


# The settings a `train` run's reward depends on: --fb-from needs them equal, or its FB reads other features
RUN_REWARD_SETTINGS = ("task", "video_model", "clip_model", "image_size", "camera", "episode_length", "episodes",
                       "video_frames", "pretrain_episodes", "clip_steps", "vae_steps", "dit_steps", "dit_lr",
                       "dit_batch", "finetune_steps", "finetune_lr", "reward_every", "render_every", "video_clip",
                       "video_centre")


def run_fb(args: Args, fb: FB) -> dict:
    """--fb-from: load the FB of a finished `train` run into `fb` (in place) and return the state of its
    generative reward (E2's exploratory latents, E6's exploring data), after checking that the run's reward
    was made with these settings."""
    run = Path(args.fb_from)
    if not (run / "reward.pt").exists():
        raise VdrError(f"--fb-from {run}: no reward.pt there; give the --out folder of a finished `train` run "
                       "with a generative reward")
    run_args = json.loads((run / "args.json").read_text())
    differ = [k for k in RUN_REWARD_SETTINGS if run_args.get(k) != getattr(args, k)]
    if differ:
        flag = lambda k, v: (f"--{'' if v else 'no-'}{k}" if isinstance(v, bool) else f"--{k} {v}")
        raise VdrError(f"--fb-from {run}: that run's reward used other settings; add "
                       + " ".join(flag(k.replace("_", "-"), run_args.get(k)) for k in differ))
    saved = load_checkpoint(run / "reward.pt")
    fb.load_state_dict(saved["fb"])
    return saved["reward"]


def eval_reward(args: Args, out: Path | None = None, progress: bool = True) -> dict:
    """CLI `eval-reward`: every reward (r_video, r_fb, E6's combination, and baselines) on held-out episodes
    of every behaviour, against generated and oracle goal videos. Writes metrics.json
    ({reward: {voc, voc_random, auroc}}, the oracle's under "oracle"), reward_curves.png, goal_frames.png."""
    from diffusers import AutoencoderKLCogVideoX
    from tqdm import tqdm
    out = Path(out or default_out(args, "eval-reward"))
    t0 = time.time()
    model = load_video_model(args)
    # data: FB trains on the expert demos + exploratory episodes; the exploratory (random) ones also set
    # E2's reference and E6's scales. All from training initial states; judging uses held-out ones.
    demos = split_episodes(collect_demos(args, progress=progress))
    explore = split_episodes(collect_demos(args, episodes=args.explore_episodes, seed0=0, behaviour="random",
                                           progress=progress))
    noisy = split_episodes(collect_demos(args, episodes=args.explore_episodes, seed0=0, behaviour="noisy",
                                         progress=progress))
    fb = offline_fb(args, model, demos, explore, noisy, progress)  # the FB the RL loop pays r_fb from (section 6)
    run_reward = run_fb(args, fb) if args.fb_from else None  # or the FB that a `train` run trained, and its E6 data
    held_out, behaviours = [], []
    for b in BEHAVIOURS:
        held_out += split_episodes(collect_demos(args, episodes=args.eval_videos, seed0=HELDOUT_SEED0, behaviour=b,
                                                 progress=progress))
        behaviours += [b] * args.eval_videos
    success = np.array([ep["success"].any() for ep in held_out])
    # r_video's variants, each a row: centred on the exploratory mean latent; a window of the last frames
    # instead of linspace; and through a VAE of the same architecture that never trained (what training buys)
    g = GenerativeReward(args, model.vae, model.clip, model.tokenizer, fb, explore, state=run_reward)
    variants = {"vdr": g}
    for name, change in (("r_video_centred", dict(video_centre=True)), ("r_video_window", dict(video_clip="window"))):
        same_clips = change.get("video_clip", args.video_clip) == args.video_clip  # then reuse g's encoded clips
        variants[name] = GenerativeReward(dataclasses.replace(args, **change), model.vae, model.clip, model.tokenizer,
                                          fb, explore, state=g.state_dict() if same_clips else None)
    if args.video_model == "toy":
        torch.manual_seed(args.seed)
        untrained = AutoencoderKLCogVideoX(**TOY_VAE_CONFIG).eval()
        untrained.register_to_config(scaling_factor=model.vae.config.scaling_factor)
        variants["r_video_untrained"] = GenerativeReward(args, untrained, model.clip, model.tokenizer, fb, explore)
    latents, encoded = {}, {}  # E(clip_t) of every held-out episode, per variant (shared where VAE and clips agree)
    for k, v in variants.items():
        key = (id(v.vae), v.args.video_clip)
        if key not in encoded:
            encoded[key] = [v.latents(ep) for ep in tqdm(held_out, desc=f"encode [{k}]", disable=not progress)]
        latents[k] = encoded[key]
    expert = [ep for ep, b in zip(held_out, behaviours) if b == "expert"]
    given = load_goal_video(args) if args.goal_video else None  # --goal-video: the "generated" row's goal
    goal_videos = {"generated": [goal_video(args, model, ep["frames"][0], seed=args.seed + i) if given is None
                                 else given for i, ep in enumerate(tqdm(expert, desc="goal videos", disable=not progress))],
                   "oracle": [resample(ep["frames"], args.video_frames) for ep in expert]}
    # the peers' rewards (section 7c) read no goal video (roboclip reads --goal-video, if given), so each one's
    # row is the same against both goals below
    peers = {m: PeerReward(args, model, m, goal=given) for m in PEER_MODES}
    peer_rewards = {m: [p.raw(ep) for ep in tqdm(held_out, desc=f"score [{m}]", disable=not progress)]
                    for m, p in peers.items()}
    prompts = clip_text_prompts(args)
    metrics = {"task": args.task, "episodes": {b: behaviours.count(b) for b in BEHAVIOURS},
               "success_rate": {b: float(success[np.array(behaviours) == b].mean()) for b in BEHAVIOURS}}
    curves = {}
    for kind, videos in goal_videos.items():
        goals = {k: [v.goal(video) for video in videos] for k, v in variants.items()}
        rewards = {name: [] for name in ("combined", "r_video", "r_fb", *list(variants)[1:], "clip_text",
                                         "pixel_distance", "clip_text_end", *PEER_MODES, "dense")}
        for j, ep in enumerate(held_out):
            i = j % args.eval_videos  # the initial state, hence the goal, of this episode
            goal = goals["vdr"][i]
            terms = g.terms(ep, goal, latents["vdr"][j])
            rewards["combined"].append(g.combine(terms, goal))
            rewards["r_video"].append(terms["r_video"]); rewards["r_fb"].append(terms["r_fb"])
            for name in list(variants)[1:]:
                rewards[name].append(variants[name].terms(ep, goals[name][i], latents[name][j])["r_video"])
            rewards["clip_text"].append(clip_text_reward(model.clip, model.tokenizer, ep["frames"], prompts))
            if args.clip_model == "toy":
                rewards["clip_text_end"].append(clip_text_reward(model.clip, model.tokenizer, ep["frames"],
                                                                  goal_prompts(args)))
            rewards["pixel_distance"].append(pixel_reward(ep["frames"], goal.video[goal.frame_index]))
            for m in PEER_MODES:
                rewards[m].append(peer_rewards[m][j])
            rewards["dense"].append(ep["env_rewards"])
        rewards = {k: v for k, v in rewards.items() if v}
        quality = reward_quality(rewards, behaviours, success)
        if kind == "generated":
            metrics.update(quality)
            metrics["auroc_by_failure"] = auroc_by_failure(rewards, behaviours, success)
            metrics["probe"] = exploit_probe(args, g, goals["vdr"], held_out, rewards, success, progress, peers)
            curves = rewards
            plot_goal_frames(goals["vdr"][:3], out / "goal_frames.png")
        else:
            metrics["oracle"] = quality
    metrics["wall_seconds"] = time.time() - t0
    write_json(out / "metrics.json", metrics)
    plot_reward_curves(curves, behaviours, out / "reward_curves.png", args.task)
    episodes = ", ".join(f"{n} {b} ({metrics['success_rate'][b]:.0%} successful)"
                         for b, n in metrics["episodes"].items())
    print(f"\n{args.task}: rewards on {len(held_out)} held-out episodes: {episodes} ({metrics['wall_seconds']:.0f} s)")
    print(f"{'':20s} {'given goal' if given is not None else 'generated goal':^26s} | {'oracle goal':^26s} | "
          "auroc, successes vs failed:")
    print(f"{'reward':20s} {'voc':>6s} {'voc_random':>11s} {'auroc':>6s}  | {'voc':>6s} {'voc_random':>11s} {'auroc':>6s}  | "
          + " ".join(f"{b:>7s}" for b in metrics["auroc_by_failure"]["dense"]))
    for name in curves:
        g, o = metrics[name], metrics["oracle"][name]
        print(f"{name:20s} {g['voc']:6.2f} {g['voc_random']:11.2f} {g['auroc']:6.2f}  | "
              f"{o['voc']:6.2f} {o['voc_random']:11.2f} {o['auroc']:6.2f}  | "
              + " ".join(f"{v:7.2f}" for v in metrics["auroc_by_failure"][name].values()))
    if metrics["probe"]:
        print(f"exploit probe, {args.probe_states} held-out states (CEM on each reward; section 12):")
        print(f"{'reward':20s} {'auroc_exploit':>13s} {'expert_over_exploit':>19s} {'exploit_success':>15s}  "
              "return per state: expert / exploit")
        for name, p in metrics["probe"].items():
            pairs = " ".join(f"{e:.4g}/{x:.4g}" for e, x in zip(p["expert_returns"], p["exploit_returns"]))
            print(f"{name:20s} {p['auroc_exploit']:13.2f} {p['expert_over_exploit']:19.2f} "
                  f"{p['exploit_success']:15.2f}  {pairs}")
    return metrics


def plot_reward_curves(rewards: dict[str, list[np.ndarray]], behaviours: list[str], path: Path, task: str) -> Path:
    """One panel per reward: per-step reward against t for every held-out episode, coloured by behaviour."""
    from matplotlib.figure import Figure
    colours = {"expert": "tab:blue", "noisy": "tab:orange", "stopped": "tab:green", "random": "tab:red"}
    cols = 4
    fig = Figure(figsize=(4 * cols, 3 * math.ceil(len(rewards) / cols)))
    axes = fig.subplots(math.ceil(len(rewards) / cols), cols, squeeze=False).flatten()
    for ax, (name, per_episode) in zip(axes, rewards.items()):
        for r, b in zip(per_episode, behaviours):
            ax.plot(np.arange(1, len(r) + 1), r, color=colours[b], alpha=0.5, lw=1)
        ax.set(title=name, xlabel="env step t")
    for b, c in colours.items():
        axes[0].plot([], [], color=c, label=b)
    axes[0].legend(fontsize=8)
    for ax in axes[len(rewards):]:
        ax.axis("off")
    fig.suptitle(f"{task}: per-step rewards on held-out episodes (generated goal)")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))


def plot_goal_frames(goals: list[Goal], path: Path) -> Path:
    """For each goal: its frames with E3's CLIP score under each, the chosen frame I* boxed in red."""
    from matplotlib.figure import Figure
    F_ = len(goals[0].video)
    fig = Figure(figsize=(F_ * 0.9, 1.3 * len(goals)))
    axes = fig.subplots(len(goals), F_, squeeze=False)
    for row, goal in zip(axes, goals):
        for k, ax in enumerate(row):
            ax.imshow(goal.video[k]); ax.set_xticks([]); ax.set_yticks([])
            ax.set_xlabel(f"{goal.clip_scores[k]:.2f}", fontsize=7)
            if k == goal.frame_index:
                for side in ax.spines.values():
                    side.set(color="red", linewidth=3)
    fig.suptitle("generated goal videos; E3's CLIP score under each frame, I* boxed")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))


# =====================================================================================================
# 13. The main job, and the report of a finished run
# =====================================================================================================
# `run` (the default command) is the whole method on one task, at a budget of minutes on a CPU: demos, the
# video model, SAC on the generative reward, evaluation, then `report`. `report` rolls out a finished
# run's agent, the scripted expert and random actions from held-out states and scores each with the run's
# own reward, term by term: what the agent is paid for, next to what the expert would be.
#
# The main job's budget: what `python vdr.py` (the `run` command, tiny preset) changes from the tiny
# defaults so that the whole pipeline takes minutes on 2 CPU cores (assets/RESULTS.md, section 1). Its task
# is drawer-close-v3, the one on which the reward-free reward teaches SAC within this budget (sections 1
# and 6 of the record); on reach-v3, whose target is 1-2 px in a 64 px frame, it did not reliably do so
# (0.00-0.30 success at this budget). It starts from the shipped pretrained toy model (section 3d) and
# finetunes it on the task at 400 steps instead of 1000 (its own cache key; eval-video and eval-reward use
# the full finetune). SAC gets 12k steps: 3k of random actions (20 episodes, as many as eval-reward explores
# with, to set E6's scales) and 9k of learning; FB trains before them, offline (section 6). Any flag on the
# command line overrides these.
RUN_BUDGET = dict(task="drawer-close-v3", reward="gen", steps=12_000, learning_starts=3_000, finetune_steps=400,
                  sample_steps=20)


def run(args: Args, out: Path | None = None) -> dict:
    """The main job (`python vdr.py`): the whole pipeline on one task, each stage cached: expert demos, the
    video model (pretrain, finetune), SAC trained on the chosen reward (gen: E6, with the offline FB), and a
    report folder (learning curve, goal video and goal frame, rewards over time, the agent's rollout)."""
    t0 = time.time()
    out = Path(out or default_out(args, "run"))
    collect(args, out / "demos")
    if needs_video_model(args.reward):
        load_video_model(args)  # pretrain + finetune (cached), so the train bar below is SAC's alone
    metrics = train(args, out)
    metrics |= report(args, out)
    metrics["pipeline_seconds"] = time.time() - t0
    write_json(out / "metrics.json", metrics)
    print(f"\n{args.task} [{args.reward} reward]: eval success {metrics['eval_success']:.2f}, "
          f"eval return {metrics['eval_return']:.0f} after {metrics['env_steps']} env steps "
          f"({metrics['steps_per_second']:.0f} steps/s); whole pipeline {metrics['pipeline_seconds'] / 60:.1f} min")
    where = (f"episode from held-out state {EVAL_SEED0}" if args.report_states == 1 else
             f"episodes, mean of {args.report_states} held-out states")
    for name, m in metrics.get("report", {}).items():
        print(f"  {name:8s} {where}: success {m['success']:g}, env return "
              f"{m['env_return']:.0f}" + (f", generative return {m['gen_return']:+.0f}" if "gen_return" in m else ""))
    print(f"report -> {out}: learning_curve.png, rollout.gif" +
          (", goal_video.gif, goal_frame.png, reward_vs_time.png" if args.reward in GEN_MODES else "") +
          ", metrics.json")
    return metrics


@torch.no_grad()
def report(args: Args, out: Path, tag: str = "") -> dict:
    """The trained agent, the scripted expert and a random policy from --report-states held-out initial
    states (the main job: one). From the first state: the agent's rollout GIF and, in the generative modes, the
    goal video generated from it, E3's goal frame, and each episode's r_video, r_fb and E6 over time against
    that goal. Per behaviour, averaged over the states: success, env return and, in the generative modes, E6's
    return and each term's standardised return (before E6's weights); in the one-term modes (clip-text, the
    peers), the term's raw return. -> {"report": {behaviour: {...}}}.
    `tag` goes into the name of the one figure that depends on the reward's settings."""
    with make_env(args) as env:
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        agent = SAC(obs_dim, act_dim, args)
        agent.load_state_dict(load_checkpoint(out / "agent.pt"))
        states = []  # per held-out initial state: {behaviour: episode}
        for seed in range(EVAL_SEED0, EVAL_SEED0 + args.report_states):
            policies = {"agent": lambda o: agent.act(o, deterministic=True),
                        "expert": behaviour_policy(env, args.task, "expert", seed, args),
                        "random": behaviour_policy(env, args.task, "random", seed, args)}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Constant", UserWarning)  # the expert's gains clip at 1, harmlessly
                states.append({name: rollout(env, policy, seed) for name, policy in policies.items()})
    save_gif(np.repeat(np.repeat(states[0]["agent"]["frames"][::2], 2, axis=1), 2, axis=2),  # 2x upscaled
             out / "rollout.gif", fps=16)  # every other env step, 16 fps: a 150-step episode plays in ~5 s
    rows = [{name: {"success": float(ep["success"].any()), "env_return": float(ep["env_rewards"].sum())}
             for name, ep in episodes.items()} for episodes in states]
    if args.reward in GEN_MODES:
        model, saved = load_video_model(args), load_checkpoint(out / "reward.pt")
        fb = FB(obs_dim, act_dim, saved["fb"]["B.net.0.weight"].shape[1], seed=args.seed)  # psi's width
        fb.load_state_dict(saved["fb"])
        reward = GenerativeReward(args, model.vae, model.clip, model.tokenizer, fb, state=saved["reward"])
        for i, episodes in enumerate(states):
            goal = reward.goal(load_goal_video(args) if args.goal_video else
                               generate_video(model, episodes["agent"]["frames"][0], task_prompt(args.task),
                                              args.video_frames, seed=args.seed, steps=args.sample_steps))
            curves = {}
            for name, ep in episodes.items():
                terms = reward.terms(ep, goal)
                curves[name] = terms | {"E6": reward.combine(terms, goal)}
                z = reward.standardise(terms, goal)  # each term before E6's weights
                rows[i][name] |= {"r_video_std_return": float(z["r_video"].sum()),
                                  "r_fb_std_return": float(z["r_fb"].sum()),
                                  "gen_return": float(curves[name]["E6"].sum())}
            if i == 0:
                save_gif(np.repeat(np.repeat(goal.video, 2, axis=1), 2, axis=2), out / "goal_video.gif")
                plot_goal_frames([goal], out / "goal_frame.png")
                plot_reward_vs_time(curves, out / f"reward_vs_time{tag}.png", args.task)
    elif needs_video_model(args.reward):  # one learned term: its raw return, which orders the episodes as
        raw = term_raw(args, load_video_model(args),  # the standardised one does (the same mu(t), sigma for all)
                       load_goal_video(args) if args.goal_video else None)
        for row, episodes in zip(rows, states):
            for name, ep in episodes.items():
                row[name]["term_return"] = float(raw(ep).sum())
    return {"report": {name: {k: float(np.mean([row[name][k] for row in rows])) for k in rows[0][name]}
                       for name in rows[0]}}


def report_run(args: Args, out: Path | None = None) -> dict:
    """CLI `report --out RUN`: the report of a finished `train` or main-job folder, under the run's own
    settings (its args.json); only --report-states and --device are read from the command line. Writes
    report.json and the report's figures into RUN and prints the per-term table of assets/RESULTS.md, section 8."""
    if out is None or not (out / "args.json").exists() or not (out / "agent.pt").exists():
        raise VdrError(f"report needs --out RUN, the folder of a finished `train` or main job (with args.json and "
                       f"agent.pt); got {out or 'no --out'}")
    stored = json.loads((out / "args.json").read_text())
    known = {f.name for f in dataclasses.fields(Args)}  # a folder from an older vdr may hold retired fields
    run_args = make_args(**{k: v for k, v in stored.items() if k in known} |
                         dict(report_states=args.report_states, device=args.device))
    tag = ""
    if args.report_fb_reward and args.report_fb_reward != run_args.fb_reward:  # the same FB, another r_fb
        run_args, tag = dataclasses.replace(run_args, fb_reward=args.report_fb_reward), f"_fb-{args.report_fb_reward}"
    print(f"report of {out}, with the run's settings (its args.json): task {run_args.task}, reward {run_args.reward}, "
          f"seed {run_args.seed}" + (f"; r_fb scored as --fb-reward {run_args.fb_reward}" if tag else ""))
    result = report(run_args, out, tag)["report"]
    write_json(out / f"report{tag}.json", {"held_out_states": run_args.report_states,
                                           "fb_reward": run_args.fb_reward, "report": result})
    columns = [k for k in ("success", "env_return", "r_video_std_return", "r_fb_std_return", "gen_return",
                           "term_return") if k in result["agent"]]
    weights = " (alpha, beta = {:g}, {:g})".format(*e6_weights(run_args)) if "gen_return" in columns else ""
    what = (f"r_video and r_fb standardised as E6 sees them, then weighted into E6{weights}" if "gen_return" in columns
            else f"term_return: the return of {split_mode(run_args.reward)[0]}'s raw term" if "term_return" in columns
            else "the env's reward")
    print(f"mean of {run_args.report_states} held-out initial state(s); {what}\n"
          "| episode | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
    formats = {"success": "{:.2f}", "env_return": "{:.0f}", "term_return": "{:+.4g}"}  # E6's terms: "{:+.0f}"
    for name, values in result.items():
        print(f"| {name} | " + " | ".join(formats.get(k, "{:+.0f}").format(values[k]) for k in columns) + " |")
    return result


def plot_reward_vs_time(curves: dict[str, dict[str, np.ndarray]], path: Path, task: str) -> Path:
    """One panel per reward term (r_video, r_fb, E6), one line per episode."""
    from matplotlib.figure import Figure
    names = list(next(iter(curves.values())))
    fig = Figure(figsize=(4 * len(names), 3))
    for ax, term in zip(fig.subplots(1, len(names)), names):
        for episode, terms in curves.items():
            ax.plot(np.arange(1, len(terms[term]) + 1), terms[term], label=episode)
        ax.set(title=term, xlabel="env step t")
    ax.legend(fontsize=8)
    fig.suptitle(f"{task}: rewards against the goal video generated from the episode's first frame")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))


# =====================================================================================================
# 14. The benchmark: tasks x reward modes x seeds, in parallel processes, resumable
# =====================================================================================================
# `bench` makes one `train` run per (task, reward mode, seed), each in a worker process with its share of
# the cores, skips finished runs and resumes interrupted ones, then writes results.csv, curves.csv,
# summary.md and one learning-curve figure per task. Each seed's video model is trained once, before the
# workers start.
def bench_seed_list(spec: str | int) -> list[int]:
    """--bench-seeds: '3' -> [1, 2, 3] (a count); '2,3' -> [2, 3] and '3,' -> [3] (the seeds themselves)."""
    try:
        seeds = [int(p) for p in str(spec).split(",") if p.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) <= 0 or len(set(seeds)) < len(seeds):
        raise VdrError(f"--bench-seeds must be a count such as 3 or distinct positive seeds such as 2,3; got {spec!r}")
    return seeds if "," in str(spec) else list(range(1, seeds[0] + 1))


ARG_CHECKS.append(lambda args: bench_seed_list(args.bench_seeds))  # a bad --bench-seeds stops in check_args


def bench_run(job: tuple) -> dict:
    """One training run of the bench, in a worker process: (args, out, threads) -> its metrics."""
    args, out, threads = job
    torch.set_num_threads(threads)  # workers share the cores instead of fighting over them
    return train(args, out, progress=False)


def train_command(args: Args, out: Path) -> str:
    """The `python vdr.py train ...` line that makes the run `train(args, out)` makes: every field that
    differs from its preset's value, as a flag."""
    import shlex
    base = make_args(preset=args.preset, device=args.device)
    flags = ["train", "--preset", args.preset]
    for f in dataclasses.fields(Args):
        value = getattr(args, f.name)
        scheduling = f.name in NOT_RUN_SETTINGS and f.name != "resume"  # where it writes, how bench runs it
        if f.name == "preset" or scheduling or value == getattr(base, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return "python vdr.py " + " ".join(shlex.quote(t) for t in [*flags, "--out", str(out)])


def write_slurm_script(path: Path, jobs: list[tuple[Args, Path]], out: Path) -> Path:
    """A SLURM job array with one `vdr.py train` per index: the runs `bench --workers` would make, as
    CleanRL's benchmark utility hands a grid to a cluster. Each run resumes if it was interrupted; each seed's
    video model is trained by the first run that needs it and cached atomically, so others wait or reuse it."""
    import shlex
    runs = "\n".join(f"  {shlex.quote(train_command(a, o))}" for a, o in jobs)
    text = f"""#!/bin/bash
#SBATCH --job-name=vdr-bench
#SBATCH --array=0-{max(0, len(jobs) - 1)}
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --output={out}/slurm-%A_%a.out
# Written by `python vdr.py bench --slurm {path}`: {len(jobs)} training runs, one per array index. Submit it
# from the repository's folder with `sbatch {path}`; when every task is done, rerun the same bench command
# without --slurm: it finds the runs finished and writes results.csv, summary.md and the curves.
set -euo pipefail
RUNS=(
{runs}
)
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
eval "${{RUNS[$SLURM_ARRAY_TASK_ID]}}"
"""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def bench(args: Args, out: Path | None = None) -> dict:
    """CLI `bench`: train every (task, reward mode, seed) of --bench-tasks x --bench-modes x --bench-seeds
    for --steps env steps. Finished runs are skipped and interrupted ones resume, so rerunning the command
    continues the bench. Writes results.csv (a row per run), curves.csv (a row per evaluation), summary.md,
    and curves_<task>.png."""
    import csv
    import multiprocessing
    from tqdm import tqdm
    out = Path(out or Path("runs") / "bench")
    tasks, modes, seeds = args.bench_tasks.split(","), args.bench_modes.split(","), bench_seed_list(args.bench_seeds)
    jobs, threads = [], max(1, (os.cpu_count() or 1) // args.workers)
    for task in tasks:
        if any(needs_video_model(m) for m in modes) and not args.slurm:
            for seed in seeds:  # each seed's video model (its key holds the seed), trained
                load_video_model(dataclasses.replace(args, task=task, seed=seed))  # here once, not by each worker
        for mode in modes:
            for seed in seeds:
                run_out = out / "runs" / f"{task}-{mode}-s{seed}"
                if not (run_out / "metrics.json").exists():
                    run_args = dataclasses.replace(args, task=task, reward=mode, seed=seed, resume=True)
                    jobs.append((run_args, run_out, threads))
    if args.slurm:  # the same runs, for a cluster: one array task each; a rerun of bench merges them
        write_slurm_script(Path(args.slurm), [(a, o) for a, o, _ in jobs], out)
        print(f"bench: {len(jobs)} runs to do -> {args.slurm}; submit it with `sbatch {args.slurm}`, then rerun "
              "this command without --slurm to merge them")
        return {}
    print(f"bench: {len(tasks)} tasks x {len(modes)} modes x {len(seeds)} seeds, {args.steps} steps each; "
          f"{len(jobs)} runs to do, {args.workers} at a time with {threads} threads each")
    if jobs:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for _ in tqdm(pool.imap_unordered(bench_run, jobs), total=len(jobs), desc="bench"):
                pass
    rows = []
    for task in tasks:
        for mode in modes:
            for seed in seeds:
                m = json.loads((out / "runs" / f"{task}-{mode}-s{seed}" / "metrics.json").read_text())
                keys = ("task", "reward", "seed", "eval_success", "eval_return", "env_steps", "steps_per_second",
                        "wall_seconds", "reward_seconds")
                parts = m.get("reward_seconds_by_part", {})  # absent in runs made before it was timed in parts
                rows.append({k: m[k] for k in keys} | {f"{p}_seconds": parts.get(p, float("nan"))
                                                       for p in REWARD_COST_PARTS} | {"curve": m["curve"]})

    def write_csv(path: Path, fields: list[str], table: list[dict]):
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                writer.writeheader(); writer.writerows(table)
        atomic_write(path, write)
    write_csv(out / "results.csv", [k for k in rows[0] if k != "curve"], rows)
    # Every evaluation of every run, a row each: the learning curves as data, small enough to keep beside the
    # figures, so a band over seeds can be redrawn once the run folders (checkpoints, logs) are gone
    write_csv(out / "curves.csv", ["task", "reward", "seed", "env_steps", "eval/success", "eval/return"],
              [{"task": r["task"], "reward": r["reward"], "seed": r["seed"]} | c for r in rows for c in r["curve"]])
    lines = [f"# vdr bench: SAC, {args.steps} env steps, seeds {', '.join(map(str, seeds))}, evaluated at the end: "
             f"success rate (Meta-World) or the task's return (dm_control), mean ± std over seeds\n",
             "| task | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    summary = {}
    for task in tasks:
        # dm_control is judged by the task's return, Meta-World by success (its return is the next table)
        key, fmt, metrics = ("eval_return", ".0f", ("eval/return",)) if task in DMC_TASKS else \
            ("eval_success", ".2f", ("eval/success", "eval/return"))
        cells = []
        for mode in modes:
            s_ = [r[key] for r in rows if r["task"] == task and r["reward"] == mode]
            summary[f"{task}/{mode}"] = (float(np.mean(s_)), float(np.std(s_)))
            cells.append(f"{np.mean(s_):{fmt}} ± {np.std(s_):{fmt}}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
        plot_bench_curves([r for r in rows if r["task"] == task], modes, out / f"curves_{task}.png", task, metrics)
    # The paper's metric on Meta-World: the eval episodes' return of the dense reward, and each mode's
    # ratio to dense's (the paper's hybrid: 2.1-5.3x on its three tasks).
    metaworld = [t for t in tasks if t not in DMC_TASKS]
    if metaworld:
        lines += ["", "Meta-World: eval return of the dense reward, mean ± std over seeds (÷ `dense`'s mean)", "",
                  "| task | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
        for task in metaworld:
            ret = {m: [r["eval_return"] for r in rows if r["task"] == task and r["reward"] == m] for m in modes}
            base = np.mean(ret["dense"]) if "dense" in ret else None
            lines.append(f"| {task} | " + " | ".join(
                f"{np.mean(v):.1f} ± {np.std(v):.1f}" + (f" ({np.mean(v) / base:.2f}x)" if base and m != "dense" else "")
                for m, v in ret.items()) + " |")
    # Cost per env step, in ms (mean over runs): the whole step (SAC's act and update, the env, the reward;
    # evaluations excluded), then each part of the reward.
    lines += ["", "| reward mode | env steps/s | ms per env step | reward's share of wall time | "
              + " | ".join(f"{p} (ms/step)" for p in REWARD_COST_PARTS) + " |", "|---" * (4 + len(REWARD_COST_PARTS)) + "|"]
    for mode in modes:
        rs = [r for r in rows if r["reward"] == mode]
        parts = [np.mean([1000 * r[f"{p}_seconds"] / r["env_steps"] for r in rs]) for p in REWARD_COST_PARTS]
        lines.append(f"| {mode} | {np.mean([r['steps_per_second'] for r in rs]):.0f} | "
                     f"{np.mean([1000 / r['steps_per_second'] for r in rs]):.1f} | "
                     f"{np.mean([r['reward_seconds'] / r['wall_seconds'] for r in rs]):.0%} | "
                     + " | ".join(f"{v:.2f}" for v in parts) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    return summary


def plot_bench_curves(rows: list[dict], modes: list[str], path: Path, task: str,
                      metrics: tuple[str, ...] = ("eval/success",)) -> Path:
    """Eval metrics (Meta-World: success and return; dm_control: the task's return) against env steps, one
    panel each, mean over seeds with the min-max band, one line per reward mode (rows' "reward")."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6 * len(metrics), 3.6))
    for ax, metric in zip(np.atleast_1d(fig.subplots(1, len(metrics))), metrics):
        for mode in modes:
            curves = [r["curve"] for r in rows if r["reward"] == mode]
            steps = [c["env_steps"] for c in curves[0]]
            values = np.array([[c[metric] for c in curve] for curve in curves])  # (seeds, evals)
            ax.plot(steps, values.mean(0), marker="o", ms=3, label=mode)
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
        ax.set(xlabel="env steps", ylabel={"eval/success": "eval success rate", "eval/return": "eval return"}[metric],
               title=f"{task}: SAC per reward mode")
        if metric == "eval/success":
            ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


# =====================================================================================================
# 15. The Distracting Control Suite [6]: dm_control tasks [7] under distraction
# =====================================================================================================
# The same interface as MetaWorld: state for the agent (dm_control's observation dict, flattened), frames for
# the reward, the task's own reward to evaluate. dm_control rewards lie in [0, 1] per control step; an
# episode is the suite's 1000 control steps, played at action repeat DMC_ACTION_REPEAT (so 250 agent steps;
# --episode-length is Meta-World's), and its return (at most 1000) is the number DCS papers report.
# info["success"]: the step's reward is at least 0.9 (reacher and ball_in_cup pay exactly 1 in the target).
#
# DCS [6] adds three distractions to the frames, each at a difficulty scale s (easy 0.1, medium 0.2,
# hard 0.3, as published), drawn at reset and, if dynamic, drifting within the episode:
#   color       every material's and geom's RGB shifted by U(-s, s) per channel (dynamic: a random walk
#               with step std 0.03 s, kept within s of the original);
#   camera      the camera orbits its look-at point: azimuth and elevation by U(-pi/2 s, pi/2 s), roll by the
#               same, distance scaled by U(1 - 0.5 s, 1 + 1.5 s) (dynamic: random-walk velocities, std 0.1 s,
#               at most 0.4 s per step; roll std pi/300 s, at most pi/50 s); but for reacher, the camera stays
#               above its original elevation ("upper quadrant"), so it never looks from under the floor;
#   background  the sky replaced by a video (a folder of frames: DAVIS 2017, which DCS uses; by default a
#               procedural moving pattern, since no dataset downloads here), and the floor made see-through
#               (alpha 0.3; reacher 0; cheetah and walker keep it opaque), as DCS does. Videos per difficulty
#               as in DCS: 4 / 8 / all (procedural: 16). Dynamic: the video plays, one frame per agent step.
# DCS edits the camera in the model and uploads the video into the skybox texture; vdr does the same
# things to the picture without touching the model: the camera is moved in the rendered scene (after
# MuJoCo has placed it, so tracking cameras still track), and the background is composited where a
# segmentation render shows sky (and, blended, floor). No distraction changes the physics.
DMC_TASKS = ("cartpole-swingup", "reacher-easy", "finger-spin", "cheetah-run", "walker-walk", "ball_in_cup-catch")
DMC_ACTION_REPEAT = 4  # the usual choice for these tasks at this budget (PlaNet, DrQ: 2-8)
DIFFICULTY_SCALE = {"easy": 0.1, "medium": 0.2, "hard": 0.3}
DISTRACTIONS = ("color", "camera", "background")
BACKGROUND_VIDEOS = {"easy": 4, "medium": 8, "hard": None}  # None: every video in the folder
PROCEDURAL_VIDEOS = 16  # the procedural background's "all"
FLOOR_ALPHA = {"reacher": 0.0, "cheetah": 1.0, "walker": 1.0}  # DCS's ground-plane alpha; others 0.3


def check_distractions(distraction: str, difficulty: str) -> tuple[str, ...]:
    """'none' or a comma-separated subset of DISTRACTIONS ('all' = every one) -> the tuple of them."""
    if difficulty not in DIFFICULTY_SCALE:
        raise VdrError(f"unknown --difficulty {difficulty!r}; choose one of: {', '.join(DIFFICULTY_SCALE)}")
    if distraction == "none":
        return ()
    names = DISTRACTIONS if distraction == "all" else tuple(distraction.split(","))
    for name in names:
        if name not in DISTRACTIONS:
            raise VdrError(f"unknown distraction {name!r}; use 'none', 'all' or a comma-separated subset of: "
                           f"{', '.join(DISTRACTIONS)}")
    return names


def rotate(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """v (3,) rotated by `angle` radians about the unit vector `axis` (Rodrigues' formula)."""
    return v * np.cos(angle) + np.cross(axis, v) * np.sin(angle) + axis * (axis @ v) * (1 - np.cos(angle))


def load_backgrounds(folder: str, videos: int | None, size: int) -> list[np.ndarray]:
    """The first `videos` videos (all if None) of a folder of videos, each a sub-folder of frames (as
    DAVIS's JPEGImages/480p/<video>/00000.jpg), or a single folder of frames: [(T, size, size, 3) uint8]."""
    from PIL import Image
    root = Path(folder)
    if not root.is_dir():
        raise VdrError(f"background folder {folder} does not exist; give a folder of videos (e.g. DAVIS 2017 "
                       "JPEGImages/480p) or leave --background-dir empty for the procedural background")
    images = (".jpg", ".jpeg", ".png")
    dirs = sorted(d for d in root.iterdir() if d.is_dir()) or [root]
    out = []
    for d in dirs[:videos]:
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in images)
        if files:
            out.append(np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR))
                                 for f in files]))
    if not out:
        raise VdrError(f"no .jpg/.png frames found in {folder} or its sub-folders")
    return out


class ProceduralVideo:
    """The default background video number `index`: three coloured sinusoidal gratings drifting in their own
    directions, with the video's own colours and speeds. video[t] -> (size, size, 3) uint8, made on demand."""

    def __init__(self, index: int, size: int, length: int = 1000):
        g = np.random.default_rng(index)  # the video's fixed parameters
        self.waves = [(g.uniform(0, 2 * np.pi), g.uniform(2, 6), g.uniform(0.05, 0.2), g.uniform(0, 2 * np.pi),
                       g.uniform(0, 1, 3)) for _ in range(3)]  # angle, frequency, speed, phase, colour
        self.y, self.x = np.mgrid[0:size, 0:size] / size  # (size, size) each, in [0, 1)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, t: int) -> np.ndarray:
        img = 0.0
        for angle, freq, speed, phase, colour in self.waves:
            along = self.x * np.cos(angle) + self.y * np.sin(angle)  # (size, size)
            img = img + (0.5 + 0.5 * np.sin(2 * np.pi * freq * along + speed * t + phase))[..., None] * colour
        return (255 * img / img.max()).astype(np.uint8)  # (size, size, 3)


class DMControl:
    """A dm_control suite task behind the MetaWorld interface, with DCS distractions on its frames.

    obs: (obs_dim,) float32, dm_control's observations flattened.  action: (act_dim,) float32 in [-1, 1].
    info["success"]: 1.0 when the step's reward is >= 0.9.  render(): (H, W, 3) uint8, distracted."""

    def __init__(self, task: str, image_size: int = 64, camera: int = 0, distraction: str = "none",
                 difficulty: str = "easy", dynamic: bool = False, background_dir: str = ""):
        import gymnasium
        import mujoco
        from dm_control import suite

        self.task, self.domain, self.camera, self.image_size = task, task.split("-")[0], camera, image_size
        self.env = suite.load(self.domain, task.split("-")[1])
        self.physics, self.episode_length, self.t = self.env.physics, 1000 // DMC_ACTION_REPEAT, 0
        obs_dim = sum(int(np.prod(v.shape)) for v in self.env.observation_spec().values())
        spec = self.env.action_spec()
        assert np.all(spec.minimum == -1) and np.all(spec.maximum == 1)
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, spec.shape, np.float32)
        model = self.physics.model.ptr
        model.vis.quality.offsamples = 0  # as for Meta-World: no multisampling, no shadows, no reflections
        self.renderer = mujoco.Renderer(model, image_size, image_size)
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0

        self.distractions = check_distractions(distraction, difficulty)
        self.scale, self.dynamic = DIFFICULTY_SCALE[difficulty], dynamic
        self.rgba0 = {"mat_rgba": model.mat_rgba.copy(), "geom_rgba": model.geom_rgba.copy()}  # the originals
        if "background" in self.distractions:
            videos = BACKGROUND_VIDEOS[difficulty]
            self.backgrounds = (load_backgrounds(background_dir, videos, image_size) if background_dir else
                                [ProceduralVideo(i, image_size) for i in range(videos or PROCEDURAL_VIDEOS)])
            self.floor = [i for i in range(model.ngeom) if model.geom_type[i] == mujoco.mjtGeom.mjGEOM_PLANE]
            self.floor_alpha = FLOOR_ALPHA.get(self.domain, 0.3)
        self.rng = np.random.default_rng(0)

    def obs(self, time_step) -> np.ndarray:
        return np.concatenate([np.ravel(v) for v in time_step.observation.values()]).astype(np.float32)

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:  # dm_control draws initial states from its task's RandomState
            self.env.task.random.seed(seed)
            self.rng = np.random.default_rng([seed, 1])  # the distractions' own stream: same seed, same frames
        time_step = self.env.reset()
        self.t = 0
        s = self.scale
        if "color" in self.distractions:
            self.color = {k: self.rng.uniform(-s, s, v[:, :3].shape) for k, v in self.rgba0.items()}
            self.set_colors()
        if "camera" in self.distractions:  # azimuth, elevation, roll (radians), distance factor
            low = np.array([-np.pi / 2 * s, -np.pi / 2 * s, -np.pi / 2 * s, 1 - 0.5 * s])
            high = np.array([np.pi / 2 * s, np.pi / 2 * s, np.pi / 2 * s, 1 + 1.5 * s])
            if self.domain != "reacher":
                low[1] = 0.0  # DCS's "upper quadrant": never below the original elevation
            self.cam_bounds, self.cam, self.cam_vel = (low, high), self.rng.uniform(low, high), np.zeros(4)
        if "background" in self.distractions:
            self.video = self.backgrounds[self.rng.integers(len(self.backgrounds))]
            self.frame0 = int(self.rng.integers(len(self.video)))
        return self.obs(time_step), {}

    def step(self, action: np.ndarray):
        reward = 0.0
        for _ in range(DMC_ACTION_REPEAT):
            time_step = self.env.step(np.asarray(action, dtype=np.float64))
            reward += time_step.reward or 0.0
        self.t += 1
        if self.dynamic:
            self.drift()
        truncated = time_step.last()
        return self.obs(time_step), reward, False, truncated, {"success": float(reward >= 0.9 * DMC_ACTION_REPEAT)}

    def drift(self) -> None:
        """One step of the dynamic distractions' random walks."""
        s = self.scale
        if "color" in self.distractions:
            for k in self.color:
                self.color[k] = np.clip(self.color[k] + self.rng.normal(0, 0.03 * s, self.color[k].shape), -s, s)
            self.set_colors()
        if "camera" in self.distractions:
            std = np.array([0.1 * s, 0.1 * s, np.pi / 300 * s, 0.1 * s])  # azimuth, elevation, roll, zoom
            vmax = np.array([0.4 * s, 0.4 * s, np.pi / 50 * s, 0.4 * s])
            self.cam_vel = np.clip(self.cam_vel + self.rng.normal(0, std), -vmax, vmax)
            low, high = self.cam_bounds
            self.cam = self.cam + self.cam_vel
            bounced = (self.cam < low) | (self.cam > high)  # reflect off the bounds
            self.cam = np.clip(self.cam, low, high)
            self.cam_vel[bounced] *= -1

    def set_colors(self) -> None:
        model = self.physics.model.ptr
        for k, rgba0 in self.rgba0.items():
            getattr(model, k)[:, :3] = np.clip(rgba0[:, :3] + self.color[k], 0, 1)

    def render(self) -> np.ndarray:
        import mujoco
        self.renderer.update_scene(self.physics.data.ptr, camera=self.camera)
        if "camera" in self.distractions:
            self.move_camera()
        frame = self.renderer.render()  # (H, W, 3) uint8
        if "background" in self.distractions:
            self.renderer.enable_segmentation_rendering()
            seg = self.renderer.render()  # (H, W, 2): object id (-1 where nothing is hit: the sky), type
            self.renderer.disable_segmentation_rendering()
            t = self.t if self.dynamic else 0
            bg = self.video[(self.frame0 + t) % len(self.video)].astype(np.float32)  # (H, W, 3)
            floor = np.isin(seg[..., 0], self.floor) & (seg[..., 1] == mujoco.mjtObj.mjOBJ_GEOM)
            alpha = np.where(seg[..., 0] == -1, 0.0, np.where(floor, self.floor_alpha, 1.0))[..., None]  # (H, W, 1)
            frame = (alpha * frame + (1 - alpha) * bg).round().astype(np.uint8)
        return frame

    def move_camera(self) -> None:
        """Orbit the scene's camera about its look-at point: the point on its view axis level with the body
        it is attached to (or tracks)."""
        azimuth, elevation, roll, zoom = self.cam
        data, model = self.physics.data.ptr, self.physics.model.ptr
        for gl in self.renderer.scene.camera:  # the two eyes of MuJoCo's stereo pair, identical in mono
            pos, fwd, up = np.array(gl.pos), np.array(gl.forward), np.array(gl.up)
            target = data.xpos[model.cam_bodyid[self.camera]]
            lookat = pos + fwd * max(float((target - pos) @ fwd), 0.5)  # 0.5 m: never behind or at the lens
            right = np.cross(fwd, up)
            # raise by `elevation` about the camera's right axis (a negative angle lifts the lens), then swing
            offset, up, fwd = (rotate(v, right, -elevation) for v in (pos - lookat, up, fwd))
            z = np.array([0.0, 0.0, 1.0])
            offset, up, fwd = (rotate(v, z, azimuth) for v in (offset, up, fwd))  # ... around the vertical
            gl.pos[:] = lookat + zoom * offset
            gl.forward[:] = fwd
            gl.up[:] = rotate(up, fwd, roll)

    def close(self) -> None:
        self.renderer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def distractions(args: Args, out: Path | None = None) -> dict:
    """CLI `distractions`: one frame of every DMC task (rows) under each distraction at none / easy / medium /
    hard (columns), the same state in each row (20 zero-action steps from seed args.seed): distractions.png."""
    from PIL import Image
    out = Path(out or Path("runs") / "distractions")
    rows = []
    for task in DMC_TASKS:
        row = []
        for distraction in DISTRACTIONS:
            for difficulty in ("none", *DIFFICULTY_SCALE):
                clean = difficulty == "none"
                with DMControl(task, args.image_size, 0, "none" if clean else distraction,
                               "easy" if clean else difficulty, background_dir=args.background_dir) as env:
                    env.reset(seed=args.seed)
                    for _ in range(20):
                        env.step(np.zeros(env.action_space.shape, np.float32))
                    row.append(env.render())
        rows.append(np.concatenate(row, axis=1))  # (H, 12 W, 3)
    grid = Image.fromarray(np.concatenate(rows, axis=0))  # (6 H, 12 W, 3)
    atomic_write(out / "distractions.png", lambda tmp: grid.resize((grid.width * 2, grid.height * 2),
                                                                    Image.NEAREST).save(tmp, format="PNG"))
    metrics = {"tasks": list(DMC_TASKS), "columns": [f"{d}:{lvl}" for d in DISTRACTIONS
                                                     for lvl in ("none", *DIFFICULTY_SCALE)]}
    write_json(out / "metrics.json", metrics)
    print(f"distraction grid: {len(DMC_TASKS)} tasks x (none, easy, medium, hard) x {', '.join(DISTRACTIONS)} "
          f"-> {out / 'distractions.png'}")
    return metrics


DMC_EXPERT_STEPS = 50_000  # SAC steps (agent steps, action repeat 4) for a dm_control expert: assets/RESULTS.md, 9


class Expert:
    """A trained SAC actor as a scripted-expert stand-in: get_action(obs) -> its deterministic action."""

    def __init__(self, agent: "SAC"):
        self.agent = agent

    def get_action(self, obs: np.ndarray) -> np.ndarray:
        return self.agent.act(obs, deterministic=True)


def dmc_expert(args: Args) -> Expert:
    """dm_control's stand-in for a scripted expert: SAC trained DMC_EXPERT_STEPS on the task's own (dense)
    reward from state, cached. The agent sees state, so the distractions (frames only) do not matter to it:
    one expert serves every distraction setting, and its episodes are rendered with the distractions on."""
    expert_args = dataclasses.replace(args, reward="dense", steps=DMC_EXPERT_STEPS, distraction="none", seed=0,
                                      resume=True)
    path = cache_path(args, "expert", ".pt", task=args.task, steps=DMC_EXPERT_STEPS, hidden=args.hidden,
                      lr=(args.q_lr, args.policy_lr), repeat=DMC_ACTION_REPEAT, obs_norm=args.obs_norm)
    if not path.exists():  # trained in a folder next to the cache file: an interrupted run resumes
        print(f"training a SAC expert for {args.task} on its own reward ({DMC_EXPERT_STEPS} steps, cached)")
        metrics = train(expert_args, path.with_suffix(".run"))
        print(f"{args.task} expert: eval return {metrics['eval_return']:.0f} (of at most 1000)")
        atomic_write(path, lambda tmp: torch.save(load_checkpoint(path.with_suffix(".run") / "agent.pt"), tmp))
    with make_env(expert_args) as env:
        agent = SAC(env.observation_space.shape[0], env.action_space.shape[0], expert_args)
    agent.load_state_dict(load_checkpoint(path))
    return Expert(agent)


def dmc_env(args: Args) -> DMControl:
    camera = 0 if args.camera == "corner" else int(args.camera)  # 'corner' is Meta-World's; DCS renders camera 0
    return DMControl(args.task, args.image_size, camera, args.distraction, args.difficulty,
                     args.dynamic_distraction, args.background_dir)


def dmc_data_key(args: Args) -> dict:
    """The DCS settings that change a dm_control task's frames (none when undistracted)."""
    if args.distraction == "none":
        return {}
    return {"distraction": args.distraction, "difficulty": args.difficulty,
            "dynamic": args.dynamic_distraction, "background": args.background_dir}


# The dm_control tasks join Part I's task list, and the distraction flags its checks (sections 1 and 2).
TASK_SUITES.append(TaskSuite("DeepMind Control (section 15)", DMC_TASKS, dmc_env, dmc_expert, dmc_data_key))
ARG_CHECKS.append(lambda args: check_distractions(args.distraction, args.difficulty))


# =====================================================================================================
# 16. The command line: one command per stage, every Args field a flag
# =====================================================================================================


def collect(args: Args, out: Path | None = None) -> dict:
    """CLI `collect`: expert demos for the task (cached), their success rate, and a frame strip to look at."""
    out = Path(out or default_out(args, "collect"))
    demos = collect_demos(args)
    success = demos["success"].any(axis=1)  # (N,) succeeded at any step
    first = [int(np.argmax(s)) + 1 if s.any() else None for s in demos["success"]]
    metrics = {"task": args.task, "prompt": demos["prompt"], "episodes": int(len(success)),
               "success_rate": float(success.mean()),
               "mean_steps_to_success": float(np.mean([f for f in first if f is not None] or [np.nan])),
               "mean_return": float(demos["env_rewards"].sum(1).mean())}  # dm_control's measure of an expert
    save_frame_strip(demos["frames"][0], out / "demo_strip.png")
    write_json(out / "metrics.json", metrics)
    print(f"{args.task}: expert success {metrics['success_rate']:.2f} over {len(success)} episodes "
          f"(first success after {metrics['mean_steps_to_success']:.0f} steps on average; return "
          f"{metrics['mean_return']:.0f}); frames {demos['frames'].shape[1:]} -> {out}")
    return metrics


COMMANDS = {
    "run": (run, "the main job: the whole pipeline on one task, ending in a report folder (the default)"),
    "distractions": (distractions, "a grid of frames of every dm_control task under each DCS distraction and difficulty"),
    "collect": (collect, "collect and cache scripted-expert demos of a task; print the success rate"),
    "pretrain": (pretrain, "train the toy video model (CLIP, VAE, DiT) on expert videos of several tasks"),
    "finetune": (finetune, "finetune the video model on the task's expert videos (toy: whole DiT; paper: LoRA)"),
    "goal": (goal, "generate a goal video from a held-out first frame and the task prompt (GIF + PNG)"),
    "eval-video": (eval_video, "score generated goal videos against the expert's real videos, with baselines"),
    "eval-reward": (eval_reward, "judge every reward (r_video, r_fb, E6, baselines) on held-out episodes"),
    "train": (train, "train SAC on a task with a reward mode; write metrics.json and a learning curve"),
    "report": (report_run, "a finished run's agent, expert and random episodes on held-out states, per reward term"),
    "bench": (bench, "SAC on tasks x reward modes x seeds, in parallel, resumable; results.csv and summary.md"),
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
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("--") and argv[0] != "--help":  # `vdr.py --steps 5000` runs the main job
        argv = ["run", *argv]
    parsed = vars(build_parser().parse_args(argv))
    command = parsed.pop("command") or "run"
    if command == "run" and parsed.get("preset", "tiny") == "tiny":
        parsed = {**RUN_BUDGET, **parsed}  # the main job's budget, under any flag given
    try:
        args = make_args(**parsed)
        # `report` takes its settings from the run's args.json and prints that run's task, reward and seed
        setting = "" if command == "report" else f"preset={args.preset} task={args.task} seed={args.seed} "
        print(f"vdr {command}: {setting}device={args.device} torch={torch.__version__} "
              f"threads={torch.get_num_threads()}")
        COMMANDS[command][0](args, Path(args.out) if args.out else None)
    except VdrError as err:
        print(f"vdr: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
