"""robomimic's Lift, Can and Square tasks on robosuite 1.5, with robomimic's observations.

The tasks are robosuite's ``Lift``, ``PickPlaceCan`` and ``NutAssemblySquare`` with a Panda arm
under the BASIC composite controller (OSC_POSE): a 7-dim action in [-1, 1], ``dx, dy, dz`` (up to
5 cm per step), ``dax, day, daz`` (axis-angle, up to 0.5 rad per step, world frame) and the gripper
(-1 open, +1 close), at 20 Hz, with robosuite's sparse reward (1.0 on success).

* ``obs="lowdim"``: robomimic's low-dim keys concatenated, ``object`` (robosuite's
  ``object-state``), ``robot0_eef_pos``, ``robot0_eef_quat`` (xyzw), ``robot0_gripper_qpos``:
  19 dims for lift, 23 for can and square, DiffusionPolicy's robomimic ``obs_dim``.
  ``env.obs_keys`` gives the layout. Sizes match robomimic's datasets, but robosuite 1.5 orders
  can's and square's ``object-state`` as object-to-eef pose then object pose, where the datasets
  (robosuite 1.2) put the object pose first: a policy trained on those files needs the columns
  swapped.
* ``obs="image"``: ``agentview_image`` and ``robot0_eye_in_hand_image`` as float32 (3, H, W) in
  [0, 1], upright as robomimic stores them, plus the three robot keys above (float32).

An episode terminates when the task succeeds and is truncated after ``max_episode_steps``
(robomimic evaluates all three tasks with 400). Object placement is drawn by robosuite from the
global numpy RNG; :meth:`RobomimicEnv.reset` draws it from a private, seeded RNG instead, so a seed
always gives the same scene and the caller's global RNG is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

ROBOSUITE_TASKS = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}
OBS_MODES = ("lowdim", "image")
MAX_EPISODE_STEPS = {"lift": 400, "can": 400, "square": 400}
CONTROL_FREQ = 20
ROBOT_KEYS = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}
OBJECT_STATE_SIZE = {"lift": 10, "can": 14, "square": 14}
DEFAULT_CAMERAS = ("agentview", "robot0_eye_in_hand")
RENDER_CAMERA = "agentview"


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_robosuite() -> Iterator[None]:
    """Drop robosuite's warnings while it imports and builds: it warns about a missing private
    macro file and optional packages, and about the BASIC config's torso/head/base/legs
    controllers that a Panda does not have. A filter on its logger, not its level, because
    robosuite resets the level when it creates the logger at import."""
    logger = logging.getLogger("robosuite_logs")
    quiet = _BelowError()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _xyzw(wxyz: np.ndarray) -> np.ndarray:
    """MuJoCo's scalar-first quaternion in robosuite's (and scipy's) scalar-last order."""
    return np.array([wxyz[1], wxyz[2], wxyz[3], wxyz[0]])


def _upright(image: np.ndarray) -> np.ndarray:
    """robosuite renders with OpenGL's bottom-up rows; robomimic flips them to upright."""
    return image[::-1]


class RobomimicEnv(gym.Env):
    """One robomimic task (``task`` in lift / can / square) with ``obs`` in lowdim / image.

    Building the robosuite env takes about a second, so it is built once and reused: resets only
    re-place the objects and the arm (robosuite's ``hard_reset=False``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_FREQ}

    def __init__(
        self,
        obs: str = "lowdim",
        task: str = "lift",
        max_episode_steps: int | None = None,
        image_size: int = 84,
        cameras: tuple[str, ...] = DEFAULT_CAMERAS,
        render_mode: str | None = None,
        render_size: int = 256,
    ) -> None:
        if task not in ROBOSUITE_TASKS:
            raise ValueError(f"task must be one of {list(ROBOSUITE_TASKS)}. Got {task!r}.")
        if obs not in OBS_MODES:
            raise ValueError(f"obs must be one of {list(OBS_MODES)}. Got {obs!r}.")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array'. Got {render_mode!r}.")
        self.task = task
        self.obs_mode = obs
        if max_episode_steps is None:
            max_episode_steps = MAX_EPISODE_STEPS[task]
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        self.render_size = render_size
        self.cameras = tuple(cameras)
        use_images = obs == "image"
        # MuJoCo fixes its GL backend when robosuite is first imported, whichever mode asks
        # first; EGL renders headless, on GPUs and (with Mesa) on CPUs
        os.environ.setdefault("MUJOCO_GL", "egl")
        with _quiet_robosuite():
            import robosuite
            from robosuite.controllers import load_composite_controller_config

            self._env = robosuite.make(
                ROBOSUITE_TASKS[task],
                robots="Panda",
                controller_configs=load_composite_controller_config(
                    controller="BASIC", robot="Panda"
                ),
                control_freq=CONTROL_FREQ,
                horizon=self.max_episode_steps,
                ignore_done=True,  # this wrapper truncates; robosuite would raise past its horizon
                reward_shaping=False,
                hard_reset=False,
                has_renderer=False,
                # the render context exists only when asked for, so lowdim stepping stays cheap
                has_offscreen_renderer=use_images or render_mode == "rgb_array",
                use_camera_obs=use_images,
                camera_names=list(self.cameras),
                camera_heights=image_size,
                camera_widths=image_size,
            )
        self._robot = self._env.robots[0]
        self._arm = self._robot.arms[0]

        if obs == "lowdim":
            self.obs_keys = {"object": OBJECT_STATE_SIZE[task], **ROBOT_KEYS}
            size = sum(self.obs_keys.values())
            self.observation_space = spaces.Box(-np.inf, np.inf, (size,), np.float32)
        else:
            self.obs_keys = dict(ROBOT_KEYS)
            image_space = spaces.Box(0.0, 1.0, (3, image_size, image_size), np.float32)
            self.observation_space = spaces.Dict(
                {
                    **{f"{camera}_image": image_space for camera in self.cameras},
                    **{
                        key: spaces.Box(-np.inf, np.inf, (size,), np.float32)
                        for key, size in ROBOT_KEYS.items()
                    },
                }
            )
        self.action_space = spaces.Box(-1.0, 1.0, (self._env.action_dim,), np.float32)
        self._placement_rng: np.random.RandomState | None = None
        self._steps = 0

    # -- gymnasium API ----------------------------------------------------------------------
    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """A new episode. robosuite draws placements and joint noise from the global numpy RNG,
        so the draw runs with the global state swapped for this env's own seeded stream."""
        super().reset(seed=seed)
        if seed is not None or self._placement_rng is None:
            self._placement_rng = np.random.RandomState(seed)
        caller_state = np.random.get_state()
        np.random.set_state(self._placement_rng.get_state())
        try:
            with _quiet_robosuite():  # robosuite reloads the controllers (and warns) every reset
                raw = self._env.reset()
        finally:
            self._placement_rng.set_state(np.random.get_state())
            np.random.set_state(caller_state)
        self._steps = 0
        return self._observation(raw), {"is_success": False}

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != self.action_space.shape or not np.all(np.isfinite(action)):
            raise ValueError(
                f"action must be {self.action_space.shape[0]} finite numbers in [-1, 1] "
                f"(dx, dy, dz, dax, day, daz, gripper), got {action!r}."
            )
        raw, reward, _, _ = self._env.step(action)
        self._steps += 1
        success = bool(self._env._check_success())
        truncated = self._steps >= self.max_episode_steps and not success
        return self._observation(raw), float(reward), success, truncated, {"is_success": success}

    def render(self) -> np.ndarray:
        """The agentview camera as uint8 (render_size, render_size, 3), for videos."""
        if self.render_mode != "rgb_array":
            raise RuntimeError(
                "RobomimicEnv.render needs an offscreen renderer; build the env with "
                "render_mode='rgb_array'."
            )
        frame = self._env.sim.render(
            width=self.render_size, height=self.render_size, camera_name=RENDER_CAMERA
        )
        return np.ascontiguousarray(_upright(frame))

    def close(self) -> None:
        self._env.close()

    # -- privileged state (for experts and tests) --------------------------------------------
    def sim_state(self) -> dict[str, np.ndarray]:
        """Poses read from the simulator, quaternions xyzw as in the observations.

        ``eef_pos``, ``eef_quat``, ``gripper_qpos`` and ``object_pos``, ``object_quat`` for every
        task; can adds ``target_pos`` (centre of the can's quarter of the goal bin, on its floor);
        square adds ``target_pos`` (the square peg) and ``handle_pos`` (the nut's handle).
        """
        env, sim, robot, arm = self._env, self._env.sim, self._robot, self._arm
        state = {
            # the same frames as the observations: grip site position, hand body orientation
            "eef_pos": np.array(sim.data.site_xpos[robot.eef_site_id[arm]]),
            "eef_quat": _xyzw(sim.data.get_body_xquat(robot.robot_model.eef_name[arm])),
            "gripper_qpos": np.array(
                [sim.data.get_joint_qpos(joint) for joint in robot.gripper[arm].joints]
            ),
        }
        if self.task == "lift":
            body = env.cube_body_id
        elif self.task == "can":
            body = env.obj_body_id[env.obj_to_use]
            state["target_pos"] = np.array(env.target_bin_placements[env.object_id])
        else:
            body = env.obj_body_id[env.obj_to_use]
            state["target_pos"] = np.array(sim.data.body_xpos[env.peg1_body_id])
            handle = env.object_site_ids[env.nut_id]
            state["handle_pos"] = np.array(sim.data.site_xpos[handle])
        state["object_pos"] = np.array(sim.data.body_xpos[body])
        state["object_quat"] = _xyzw(sim.data.body_xquat[body])
        return state

    # -- observations -----------------------------------------------------------------------
    def _observation(self, raw: dict[str, np.ndarray]) -> Any:
        if self.obs_mode == "lowdim":
            parts = [raw["object-state"], *(raw[key] for key in ROBOT_KEYS)]
            return np.concatenate(parts).astype(np.float32)
        images = {
            f"{camera}_image": np.ascontiguousarray(
                _upright(raw[f"{camera}_image"]).transpose(2, 0, 1), dtype=np.float32
            )
            / 255.0
            for camera in self.cameras
        }
        return {**images, **{key: raw[key].astype(np.float32) for key in ROBOT_KEYS}}
