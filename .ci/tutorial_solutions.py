"""Reference solutions of tutorial.ipynb's exercises, for course staff (remove this file from the copy
students get). `VDR_SOLUTIONS=1` makes the notebook use them; CI runs the notebook with and without them."""
import numpy as np
import torch

import vdr


def l2_similarity(z: torch.Tensor, z_goal: torch.Tensor, reference: torch.Tensor | None) -> np.ndarray:
    """Exercise 1 (E2): -||z - z_goal|| per clip latent, after centring both on the reference if given."""
    if reference is not None:
        z, z_goal = z - reference, z_goal - reference
    return -torch.linalg.norm(z - z_goal[None], dim=1).numpy()


def last_frame(clip, tokenizer, frames: np.ndarray, prompts: list[str]) -> tuple[int, np.ndarray]:
    """Exercise 2 (E3): the video's last frame is the goal frame; CLIP's scores are kept for the plot."""
    _, scores = vdr.select_goal_frame(clip, tokenizer, frames, prompts)
    return len(frames) - 1, scores


def fb_loss_without_ortho(M, M_target, B, gamma, ortho=vdr.FB_ORTHO):
    """Exercise 3 (E4): L_FB alone, lambda_ortho = 0."""
    return vdr.fb_loss(M, M_target, B, gamma, ortho=0.0)


def paper_combine(terms: dict, goal) -> np.ndarray:
    """Exercise 4 (E6): the paper's weights on the raw terms, alpha = 0.01, beta = 1e-5."""
    return 0.01 * terms["r_video"] + 1e-5 * terms["r_fb"]
