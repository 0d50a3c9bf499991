"""Scripted pick-and-place experts for robomimic's Lift, Can and Square.

Each expert reads privileged poses from :meth:`envs.robomimic.RobomimicEnv.sim_state` and runs a
state machine: reach above the grasp point with the gripper's yaw aligned, descend, close, lift,
carry the object above its goal, lower, release and retreat (Lift stops after lifting). Motion is
proportional control toward a target pose: a position step clipped to the episode's speed, and an
axis-angle rotation toward "gripper pointing down at yaw psi", both as OSC_POSE deltas. Missed
grasps and dropped objects send the machine back to the reach phase.

Each episode draws its own speed, heights and grasp offset from ``numpy.random.default_rng(seed)``
so that demonstrations vary.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from scipy.spatial.transform import Rotation

State = dict[str, np.ndarray]
Target = tuple[np.ndarray, float, float]  # eef position, hand yaw, gripper command

MAX_TRANSLATION = 0.05  # metres per step at action 1 (robosuite's OSC_POSE output_max)
MAX_ROTATION = 0.5  # radians per step at action 1
# OSC_POSE sets its goal from the achieved pose each step and the arm covers only about a quarter
# (position) or a fifth (rotation) of a commanded delta before the next step, so deltas act as
# velocity commands; these gains close about half the remaining error per step, without overshoot.
POSITION_GAIN = 2.0
ROTATION_GAIN = 3.0
DOWN = np.diag([1.0, -1.0, -1.0])  # the Panda hand pointing down at yaw 0, as at robosuite's reset
OPEN, CLOSE = -1.0, 1.0
# hand yaws that keep the Panda's last joint (pi/4 - yaw, limits +-2.90) 0.2 rad inside its range
WRIST_YAWS = (np.pi / 4 - 2.7, np.pi / 4 + 2.7)
# nut yaws (its handle's direction) to hold over the peg, with a cost in radians of extra turning:
# the peg is near the edge of the workspace, and a handle pointing away (yaw 0) is out of reach
HANDLE_YAWS_OVER_PEG = ((np.pi, 0.0), (-np.pi / 2, 1.0), (np.pi / 2, 1.0))
CLOSED_FINGER_GAP = 0.004  # finger opening (m) below which a closed gripper holds nothing


def _limit(vector: np.ndarray, norm: float) -> np.ndarray:
    length = float(np.linalg.norm(vector))
    return vector * (norm / length) if length > norm else vector


def _yaw(rotation: Rotation) -> float:
    matrix = rotation.as_matrix()
    return float(np.arctan2(matrix[1, 0], matrix[0, 0]))


def _wrap(angle: float, period: float = 2 * np.pi) -> float:
    """``angle`` shifted by whole periods into [-period/2, period/2)."""
    return float((angle + period / 2) % period - period / 2)


class _PickAndPlaceExpert:
    """Shared state machine. Subclasses say where to grasp, at which yaw, and where to place."""

    hover = 0.08  # height above the grasp point where the descent starts
    carry_height = 1.0  # eef height for carrying over obstacles (table top is at 0.8 to 0.82)
    place_tolerance = 0.01  # how far (m) the object may be off its place point horizontally
    lift_only = False

    def __init__(self, env: gym.Env, seed: int | None = None) -> None:
        self.env = env.unwrapped
        self.rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        """Start a new episode: draw this episode's pace and offsets and plan from the start."""
        self.speed = float(self.rng.uniform(0.7, 1.0))  # largest translation action
        self.hover_height = self.hover + float(self.rng.uniform(-0.01, 0.02))
        self.grasp_offset = self.rng.uniform(-1.0, 1.0, size=2)  # scaled by each task's slack
        self.close_steps = int(self.rng.integers(10, 14))  # the fingers take ~10 steps to close
        self.phase = "reach"
        self.phase_steps = 0
        self.grasp_yaw = 0.0  # planned each time the reach phase starts
        self.release_yaw = 0.0

    # -- task hooks ---------------------------------------------------------------------------
    def grasp_point(self, state: State) -> np.ndarray:
        """Where the grip site should close, in world coordinates."""
        raise NotImplementedError

    def grasp_yaw_for(self, state: State, hand_yaw: float) -> float:
        """The hand yaw to grasp at, given the hand's yaw now."""
        raise NotImplementedError

    def place_point(self, state: State) -> np.ndarray:
        """Where the object's origin should be when it is released."""
        raise NotImplementedError

    def place_yaw(self, state: State) -> float:
        """The gripper yaw to carry and release at (default: keep the grasp yaw)."""
        return self.grasp_yaw

    # -- control --------------------------------------------------------------------------------
    def __call__(self, obs: Any = None) -> np.ndarray:
        """The next action; ``obs`` is not needed, the expert reads the simulator state."""
        state = self.env.sim_state()
        self.phase_steps += 1
        position, yaw, gripper = getattr(self, f"_{self.phase}")(state)
        return self._servo(state, position, yaw, gripper)

    def _goto(self, phase: str) -> None:
        self.phase = phase
        self.phase_steps = 0

    def _servo(self, state: State, position: np.ndarray, yaw: float, gripper: float) -> np.ndarray:
        translation = POSITION_GAIN * (position - state["eef_pos"]) / MAX_TRANSLATION
        current = Rotation.from_quat(state["eef_quat"])
        target = Rotation.from_matrix(Rotation.from_euler("z", yaw).as_matrix() @ DOWN)
        rotation = ROTATION_GAIN * (target * current.inv()).as_rotvec() / MAX_ROTATION
        action = np.concatenate([_limit(translation, self.speed), _limit(rotation, 1.0), [gripper]])
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def _yaw_error(self, state: State, yaw: float) -> float:
        return abs(_wrap(_yaw(Rotation.from_quat(state["eef_quat"])) - yaw))

    def _holding(self, state: State) -> bool:
        gap = state["gripper_qpos"][0] - state["gripper_qpos"][1]
        near = np.linalg.norm(state["object_pos"] - state["eef_pos"]) < 0.1
        return bool(gap > CLOSED_FINGER_GAP and near)

    # -- phases: each returns (eef target position, yaw, gripper) -----------------------------
    def _reach(self, state: State) -> Target:
        if self.phase_steps == 1:
            self.grasp_yaw = self.grasp_yaw_for(state, _yaw(Rotation.from_quat(state["eef_quat"])))
        target = self.grasp_point(state) + [0.0, 0.0, self.hover_height]
        error = target - state["eef_pos"]
        if np.linalg.norm(error[:2]) < 0.01 and abs(error[2]) < 0.02:
            if self._yaw_error(state, self.grasp_yaw) < 0.05:
                self._goto("descend")
        return target, self.grasp_yaw, OPEN

    def _descend(self, state: State) -> Target:
        target = self.grasp_point(state)
        if np.linalg.norm(target - state["eef_pos"]) < 0.008 or self.phase_steps > 40:
            self._goto("grasp")
        return target, self.grasp_yaw, OPEN

    def _grasp(self, state: State) -> Target:
        if self.phase_steps >= self.close_steps:
            self._goto("lift" if self._holding(state) else "reach")
        return self.grasp_point(state), self.grasp_yaw, CLOSE

    def _lift(self, state: State) -> Target:
        target = np.array([*state["eef_pos"][:2], self.carry_height])
        if not self._holding(state):
            self._goto("reach")
        elif not self.lift_only and state["eef_pos"][2] > self.carry_height - 0.03:
            self._goto("carry")
        return target, self.grasp_yaw, CLOSE

    def _carry(self, state: State) -> Target:
        """Move the object (not the hand) over its place point, turning to the place yaw."""
        offset = self.place_point(state)[:2] - state["object_pos"][:2]
        target = np.array([*(state["eef_pos"][:2] + offset), self.carry_height])
        yaw = self.place_yaw(state)
        if not self._holding(state):
            self._goto("reach")
        elif np.linalg.norm(offset) < 2 * self.place_tolerance:
            if self._yaw_error(state, yaw) < 0.05:
                self._goto("lower")
        return target, yaw, CLOSE

    def _lower(self, state: State) -> Target:
        """Lower the object to its place point, pausing whenever it drifts out of line."""
        offset = self.place_point(state) - state["object_pos"]
        aligned = np.linalg.norm(offset[:2]) < self.place_tolerance
        if not aligned:
            offset[2] = 0.0
        if not self._holding(state):
            self._goto("reach")
        elif (aligned and abs(offset[2]) < 0.01) or self.phase_steps > 60:
            self.release_yaw = _yaw(Rotation.from_quat(state["eef_quat"]))
            self._goto("release")
        return state["eef_pos"] + offset, self.place_yaw(state), CLOSE

    def _release(self, state: State) -> Target:
        offset = self.place_point(state)[:2] - state["object_pos"][:2]
        if self.phase_steps >= self.close_steps:
            self._goto("retreat")
        return state["eef_pos"] + [*offset, 0.0], self.release_yaw, OPEN

    def _retreat(self, state: State) -> Target:
        target = np.array([*state["eef_pos"][:2], self.carry_height])
        return target, self.release_yaw, OPEN


class LiftExpert(_PickAndPlaceExpert):
    """Grasp the cube across two opposite faces and lift it."""

    lift_only = True

    def grasp_point(self, state: State) -> np.ndarray:
        return state["object_pos"] + [*(0.005 * self.grasp_offset), 0.0]

    def grasp_yaw_for(self, state: State, hand_yaw: float) -> float:
        # fingers close along the hand's y axis; at hand yaw = cube yaw (mod 90 degrees) they
        # meet two opposite faces
        cube_yaw = _yaw(Rotation.from_quat(state["object_quat"]))
        return hand_yaw + _wrap(cube_yaw - hand_yaw, np.pi / 2)


class CanExpert(_PickAndPlaceExpert):
    """Grasp the can around its middle, carry it over the goal bin's quarter and drop it in.

    The quarter's centre lies at the edge of the Panda's reach at carrying height, so the can goes
    to the quarter's corner nearest the robot, a can's radius and a margin in from the walls.
    """

    carry_height = 0.96  # the can's bottom (4 cm below its origin) clears the 0.9 m bin walls
    quarter_half_size = np.array([0.0975, 0.1225])  # robosuite's bin quarter, x and y
    wall_margin = np.array([0.05, 0.055])  # can radius (3.3 cm), half a wall and some slack

    def grasp_point(self, state: State) -> np.ndarray:
        return state["object_pos"] + [*(0.005 * self.grasp_offset), 0.0]

    def grasp_yaw_for(self, state: State, hand_yaw: float) -> float:
        return hand_yaw  # a cylinder: any yaw grasps it

    def place_point(self, state: State) -> np.ndarray:
        corner = state["target_pos"][:2] - self.quarter_half_size + self.wall_margin
        corner += 0.01 * self.grasp_offset
        return np.array([*corner, state["target_pos"][2] + 0.08])  # can bottom 4 cm above floor


class SquareExpert(_PickAndPlaceExpert):
    """Grasp the square nut by its handle, turn it square to the peg and slide it down the peg.

    The nut's hole leaves 6.75 mm of play on each side of the peg, so the nut is lined up to
    3 mm before it goes down.
    """

    place_tolerance = 0.003

    def reset(self) -> None:
        super().reset()
        self.handle_yaw = np.pi  # both planned with the grasp
        self.final_hand_yaw = 0.0

    def grasp_point(self, state: State) -> np.ndarray:
        along = state["handle_pos"] - state["object_pos"]
        along[2] = 0.0
        along /= np.linalg.norm(along)
        # the handle runs 2.9 to 7.9 cm out from the nut's centre, the ring's edge is at 4.4 cm
        # and its site at 5.4 cm: grasp a little further out so the fingers clear the ring
        return state["handle_pos"] + (0.007 + 0.004 * self.grasp_offset[0]) * along

    def grasp_yaw_for(self, state: State, hand_yaw: float) -> float:
        """Plan the grasp and the turn together: the fingers close across the handle (hand yaw =
        nut yaw or nut yaw + pi) and, once over the peg, the handle should point back at the
        robot (or to its right), because a handle pointing away leaves the hand out of reach.
        Of the plans that keep the wrist (joint 7 = pi/4 - hand yaw) inside its limits, take
        the one with the least turning."""
        nut_yaw = _yaw(Rotation.from_quat(state["object_quat"]))
        plans = []
        for handle_yaw, penalty in HANDLE_YAWS_OVER_PEG:
            turn = _wrap(handle_yaw - nut_yaw)
            for side in (0.0, np.pi):
                for lap in (-2 * np.pi, 0.0, 2 * np.pi):
                    grasp = hand_yaw + _wrap(nut_yaw + side - hand_yaw) + lap
                    final = grasp + turn
                    if all(WRIST_YAWS[0] <= yaw <= WRIST_YAWS[1] for yaw in (grasp, final)):
                        cost = abs(grasp - hand_yaw) + 0.5 * abs(turn) + penalty
                        plans.append((cost, grasp, handle_yaw, final))
        _, grasp, self.handle_yaw, self.final_hand_yaw = min(plans)
        return grasp

    def place_point(self, state: State) -> np.ndarray:
        # the peg's top is 0.1 above its centre; release with the nut's bottom 2.5 cm down it
        return state["target_pos"] + [0.0, 0.0, 0.1 - 0.015]

    def place_yaw(self, state: State) -> float:
        # the planned final yaw, corrected by however much the nut has slipped in the fingers
        hand_yaw = _yaw(Rotation.from_quat(state["eef_quat"]))
        nut_yaw = _yaw(Rotation.from_quat(state["object_quat"]))
        slip = _wrap(self.handle_yaw - nut_yaw - (self.final_hand_yaw - hand_yaw))
        return self.final_hand_yaw + slip
