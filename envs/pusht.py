"""PushT with DiffusionPolicy's observations, on gym-pusht's physics.

gym-pusht ports DiffusionPolicy's pymunk simulation (same T, PD gains, 10 Hz control with 10
physics substeps, coverage by polygon intersection), but not its keypoint observation nor its way
of drawing start states. This env adds both:

* ``obs="keypoints"``: 9 keypoints fixed on the T, in world coordinates, then the agent position:
  ``[kx0, ky0, ..., kx8, ky8, agent_x, agent_y]`` (20 dims), DiffusionPolicy's low-dim PushT input.
  The keypoints are drawn once by farthest-point sampling over the T's area, as DiffusionPolicy's
  ``PymunkKeypointManager`` does over the rendered T mask; they are constants of the task.
* ``obs="image"``: ``{"image": float32 (3, 96, 96) in [0, 1], "agent_pos": float32 (2,)}``.
* ``obs="state"``: ``[agent_x, agent_y, block_x, block_y, block_angle]``.

Success is coverage of the goal > 0.95 (the episode terminates). ``info["score"]`` is
DiffusionPolicy's test score: the running maximum of ``min(coverage / 0.95, 1)``, which is also the
reward. ``legacy_seeds=True`` draws start states as DiffusionPolicy does
(``numpy.random.RandomState(seed)``), so seeds 100000-100049 are the paper's test episodes.
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
from gym_pusht.envs.pusht import PushTEnv as _GymPushT  # noqa: E402

SUCCESS_COVERAGE = 0.95
MAX_EPISODE_STEPS = 300
N_KEYPOINTS = 9
LEGACY_TEST_SEED = 100000
"""DiffusionPolicy's PushT evaluation uses seeds 100000 + i (its ``test_start_seed``)."""
WORKSPACE = 512.0

# The T in the block's body frame (gym-pusht's ``add_tee`` with scale 30): a 120x30 bar on top of
# a 30x90 stem. Outline counter-clockwise, used by the keypoints and by the expert.
T_OUTLINE = np.array(
    [
        [-60.0, 0.0],
        [60.0, 0.0],
        [60.0, 30.0],
        [15.0, 30.0],
        [15.0, 120.0],
        [-15.0, 120.0],
        [-15.0, 30.0],
        [-60.0, 30.0],
    ]
)
T_CENTER_OF_GRAVITY = np.array([0.0, 45.0])
GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])


def _inside_t(points: np.ndarray) -> np.ndarray:
    x, y = points[:, 0], points[:, 1]
    bar = (np.abs(x) <= 60) & (y >= 0) & (y <= 30)
    stem = (np.abs(x) <= 15) & (y >= 30) & (y <= 120)
    return bar | stem


def t_keypoints_local(n: int = N_KEYPOINTS, seed: int = 0) -> np.ndarray:
    """``n`` points spread over the T (body frame): farthest-point sampling on a 1-pixel grid
    from a seeded start, plus a seeded sub-pixel shift, as DiffusionPolicy draws its keypoints."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(-60, 61, 1.0), np.arange(0, 121, 1.0))
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
    grid = grid[_inside_t(grid)]
    chosen = [int(rng.integers(len(grid)))]
    distance = np.linalg.norm(grid - grid[chosen[0]], axis=1)
    for _ in range(n - 1):
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(grid - grid[chosen[-1]], axis=1))
    return grid[chosen] + rng.uniform(0, 1, size=(n, 2))


KEYPOINTS_LOCAL = t_keypoints_local()


def body_to_world(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Body-frame points of the T at pose ``(x, y, angle)`` in world coordinates."""
    c, s = np.cos(pose[2]), np.sin(pose[2])
    rotation = np.array([[c, -s], [s, c]])
    return points @ rotation.T + pose[:2]


def legacy_start_state(seed: int) -> np.ndarray:
    """DiffusionPolicy's PushT start state for ``seed``: agent xy, block xy, block angle."""
    rs = np.random.RandomState(seed=seed)
    return np.array(
        [
            rs.randint(50, 450),
            rs.randint(50, 450),
            rs.randint(100, 400),
            rs.randint(100, 400),
            rs.randn() * 2 * np.pi - np.pi,
        ],
        dtype=np.float64,
    )


class PushTEnv(gym.Env):
    """PushT with ``obs`` in ``keypoints`` / ``image`` / ``state``; actions are target agent
    positions in pixels ([0, 512]^2), tracked by a PD controller."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        obs: str = "keypoints",
        legacy_seeds: bool = False,
        max_episode_steps: int = MAX_EPISODE_STEPS,
        image_size: int = 96,
        render_size: int = 384,
        render_mode: str | None = "rgb_array",
    ) -> None:
        if obs not in ("keypoints", "image", "state"):
            raise ValueError(f"PushT obs must be 'keypoints', 'image' or 'state', got {obs!r}.")
        self.obs_mode = obs
        self.legacy_seeds = legacy_seeds
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        self._sim = _GymPushT(
            obs_type="state",
            render_mode="rgb_array",
            observation_width=image_size,
            observation_height=image_size,
            visualization_width=render_size,
            visualization_height=render_size,
        )
        self.action_space = spaces.Box(0.0, WORKSPACE, shape=(2,), dtype=np.float32)
        if obs == "keypoints":
            self.observation_space = spaces.Box(
                -WORKSPACE, 2 * WORKSPACE, shape=(2 * N_KEYPOINTS + 2,), dtype=np.float32
            )
        elif obs == "state":
            high = np.array([WORKSPACE] * 4 + [2 * np.pi], dtype=np.float32)
            self.observation_space = spaces.Box(0.0, high, dtype=np.float32)
        else:
            self.observation_space = spaces.Dict(
                {
                    "image": spaces.Box(0.0, 1.0, (3, image_size, image_size), np.float32),
                    "agent_pos": spaces.Box(0.0, WORKSPACE, (2,), np.float32),
                }
            )
        self._steps = 0
        self._score = 0.0

    # -- privileged state (for experts and tests) --------------------------------------------
    @property
    def agent_position(self) -> np.ndarray:
        return np.array(self._sim.agent.position, dtype=np.float64)

    @property
    def agent_velocity(self) -> np.ndarray:
        return np.array(self._sim.agent.velocity, dtype=np.float64)

    @property
    def block_pose(self) -> np.ndarray:
        block = self._sim.block
        return np.array([block.position.x, block.position.y, block.angle], dtype=np.float64)

    @property
    def goal_pose(self) -> np.ndarray:
        return GOAL_POSE.copy()

    def coverage(self) -> float:
        return float(self._sim._get_coverage())

    # -- gymnasium API ----------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        if options.get("reset_to_state") is None and self.legacy_seeds:
            if seed is None:
                raise ValueError(
                    "PushT with legacy_seeds=True needs reset(seed=...): DiffusionPolicy draws "
                    "the start state from numpy.random.RandomState(seed)."
                )
            options["reset_to_state"] = legacy_start_state(seed)
        self._sim.reset(seed=seed, options=options)
        self._steps = 0
        self._score = 0.0
        return self._observation(), self._info(coverage=self.coverage(), success=False)

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (2,) or not np.all(np.isfinite(action)):
            raise ValueError(
                f"PushT action must be 2 finite numbers (target agent x, y in pixels), "
                f"got {action!r}."
            )
        _, reward, terminated, _, info = self._sim.step(action)
        self._steps += 1
        coverage = float(info["coverage"])
        self._score = max(self._score, float(reward))
        truncated = self._steps >= self.max_episode_steps and not terminated
        return (
            self._observation(),
            float(reward),
            bool(terminated),
            truncated,
            self._info(coverage=coverage, success=bool(terminated)),
        )

    def render(self) -> np.ndarray:
        return self._sim.render()

    def close(self) -> None:
        self._sim.close()

    def record(self) -> dict[str, np.ndarray]:
        """This step's entries in DiffusionPolicy's PushT replay buffer (``keypoint``,
        ``state``, and ``img`` in image mode), for demonstrations the original code can read."""
        pose = self.block_pose
        entry = {
            "keypoint": self.keypoints().astype(np.float32),
            "state": np.array([*self.agent_position, *pose], dtype=np.float32),
        }
        if self.obs_mode == "image":
            entry["img"] = self._sim._render(visualize=False).astype(np.uint8)
        return entry

    # -- observations -----------------------------------------------------------------------
    def keypoints(self) -> np.ndarray:
        """The 9 T keypoints in world coordinates, (9, 2)."""
        return body_to_world(KEYPOINTS_LOCAL, self.block_pose)

    def _observation(self):
        agent = self.agent_position
        if self.obs_mode == "keypoints":
            return np.concatenate([self.keypoints().ravel(), agent]).astype(np.float32)
        if self.obs_mode == "state":
            pose = self.block_pose
            state = [*agent, pose[0], pose[1], pose[2] % (2 * np.pi)]
            return np.array(state, dtype=np.float32)
        pixels = self._sim._render(visualize=False)
        image = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / 255.0
        return {"image": image, "agent_pos": agent.astype(np.float32)}

    def _info(self, coverage: float, success: bool) -> dict[str, Any]:
        return {
            "coverage": coverage,
            "is_success": success,
            "score": self._score,
            "block_pose": self.block_pose,
            "agent_pos": self.agent_position,
        }
