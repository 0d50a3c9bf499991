"""A scripted PushT pusher for demonstrations.

Each control step it scores contact points along the T's outline by how well a push there moves
the block toward the goal (translation and rotation together, as a twist), keeps its current
contact unless another is clearly better, walks around the block to the chosen contact's
pre-contact point, and pushes through it. Each episode draws a preferred side (which way to go
around the block, which flank to push from when both are as good), so the demonstrations are
multi-modal the way human PushT demonstrations are.
"""

from __future__ import annotations

import numpy as np

from envs.pusht import T_CENTER_OF_GRAVITY, T_OUTLINE, WORKSPACE, body_to_world

AGENT_RADIUS = 15.0
# the block's radius of gyration about its body origin (pymunk: mass 1, moment 3000): pushes and
# errors compare rotation with translation in these px per radian
ROTATION_RADIUS = float(np.sqrt(3000.0))
ORBIT_RADIUS = 105.0  # clears the T (76 px from its centre of gravity) plus the agent
CONTACT_SPACING = 6.0
# agent and block both have friction 1, so a push up to ~35 degrees off the normal still sticks:
# each contact can push along any of these directions
PUSH_ANGLES = np.deg2rad([-30.0, -15.0, 0.0, 15.0, 30.0])


def _contact_candidates() -> tuple[np.ndarray, np.ndarray]:
    """Points along the T outline (body frame) and their inward push directions."""
    points, directions = [], []
    for a, b in zip(T_OUTLINE, np.roll(T_OUTLINE, -1, axis=0), strict=True):
        edge = b - a
        length = float(np.linalg.norm(edge))
        outward = np.array([edge[1], -edge[0]]) / length
        margin = AGENT_RADIUS * 0.6
        count = max(int((length - 2 * margin) // CONTACT_SPACING) + 1, 1)
        for s in np.linspace(margin, length - margin, count):
            points.append(a + edge * (s / length))
            directions.append(-outward)
    return np.array(points), np.array(directions)


CONTACT_POINTS, CONTACT_DIRECTIONS = _contact_candidates()


def _cross(a: np.ndarray, b: np.ndarray) -> float:
    return float(a[0] * b[1] - a[1] * b[0])


def _wrap(angle: float) -> float:
    return float((angle + np.pi) % (2 * np.pi) - np.pi)


def _distance_to_t(points_body: np.ndarray) -> np.ndarray:
    """Euclidean distance from body-frame points to the T (0 inside)."""

    def to_box(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        outside = np.maximum(np.maximum(lo - points_body, points_body - hi), 0.0)
        return np.linalg.norm(outside, axis=1)

    bar = to_box(np.array([-60.0, 0.0]), np.array([60.0, 30.0]))
    stem = to_box(np.array([-15.0, 30.0]), np.array([15.0, 120.0]))
    return np.minimum(bar, stem)


def _to_body(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    c, s = np.cos(pose[2]), np.sin(pose[2])
    return (points - pose[:2]) @ np.array([[c, -s], [s, c]])


class PushTExpert:
    """``expert(obs) -> action`` for :class:`envs.pusht.PushTEnv` (reads the simulator state)."""

    def __init__(self, env, seed: int | None = None) -> None:
        self.env = env.unwrapped
        self.rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        """Start a new episode: draw the preferred side and pace, forget the contact."""
        self.side = float(self.rng.choice([-1.0, 1.0]))
        self.push_gain = float(self.rng.uniform(0.5, 0.7))
        self.max_speed = float(self.rng.uniform(24.0, 32.0))  # px per control step
        self.contact: int | None = None
        self.pushing = False
        self.orbit: float | None = None
        self.orbit_flipped = False
        self.approach_steps = 0
        self.banned: set[int] = set()

    # -- choosing where to push ---------------------------------------------------------------
    def _desired_twist(self, pose: np.ndarray) -> np.ndarray:
        goal = self.env.goal_pose
        return np.array([*(goal[:2] - pose[:2]), ROTATION_RADIUS * _wrap(goal[2] - pose[2])])

    def _pushes(self, pose: np.ndarray, twist: np.ndarray) -> tuple[np.ndarray, ...]:
        """For every contact: its world point, its best push direction within the friction cone,
        the contact travel that best fits ``twist``, and how much of the error that push removes
        (0..1)."""
        points = body_to_world(CONTACT_POINTS, pose)
        cog = body_to_world(T_CENTER_OF_GRAVITY[None], pose)[0]
        lever = points - cog
        angles = pose[2] + PUSH_ANGLES[None, :]  # (1, A) offsets of the body-frame normal
        normal = np.arctan2(CONTACT_DIRECTIONS[:, 1], CONTACT_DIRECTIONS[:, 0])[:, None] + angles
        directions = np.stack([np.cos(normal), np.sin(normal)], axis=-1)  # (C, A, 2)
        torque = (
            lever[:, None, 0] * directions[..., 1] - lever[:, None, 1] * directions[..., 0]
        ) / ROTATION_RADIUS
        effect = np.concatenate([directions, torque[..., None]], axis=-1)  # (C, A, 3)
        # a push moving the contact by delta px moves the block by delta * effect / |effect|^2,
        # so the best push (delta = effect . twist) removes (effect . twist)^2 / |effect|^2
        projection = effect @ twist
        fit = np.where(projection > 0, projection**2 / np.sum(effect**2, axis=-1), 0.0)
        best = np.argmax(fit, axis=1)
        rows = np.arange(len(points))
        alignment = np.sqrt(fit[rows, best]) / (np.linalg.norm(twist) + 1e-9)
        return points, directions[rows, best], projection[rows, best], alignment

    def _scores(self, pose, twist, agent, points, alignment) -> np.ndarray:
        cog = body_to_world(T_CENTER_OF_GRAVITY[None], pose)[0]
        lever = points - cog
        travel = np.linalg.norm(points - agent, axis=1) / WORKSPACE
        flank = np.sign(lever[:, 0] * twist[1] - lever[:, 1] * twist[0])
        reachable = np.all((points > 25.0) & (points < WORKSPACE - 25.0), axis=1)
        score = alignment - 0.3 * travel + 0.05 * self.side * flank - 2.0 * ~reachable
        score[list(self.banned)] -= 2.0
        return score

    def _choose_contact(self, scores: np.ndarray) -> int:
        best = int(np.argmax(scores))
        if self.contact is None:
            return best
        keep_bonus = 0.25 if self.pushing else 0.1
        if scores[best] > scores[self.contact] + keep_bonus:
            return best
        return self.contact

    # -- moving -------------------------------------------------------------------------------
    def _approach(self, agent: np.ndarray, target: np.ndarray, pose: np.ndarray) -> np.ndarray:
        """Next waypoint toward ``target`` that does not run through the block: straight when the
        way is clear, else out to a circle around the block and along it in one committed
        direction (the episode's preferred side when the two ways are about as long)."""
        path = agent + np.linspace(0.0, 1.0, 12)[:, None] * (target - agent)
        clearance = _distance_to_t(_to_body(path[:-1], pose))
        if np.all(clearance > AGENT_RADIUS + 2.0):
            self.orbit = None
            return target
        cog = body_to_world(T_CENTER_OF_GRAVITY[None], pose)[0]
        here, there = agent - cog, target - cog
        start, goal = np.arctan2(here[1], here[0]), np.arctan2(there[1], there[0])
        if self.orbit is None:
            self.orbit_flipped = False
            gap = _wrap(goal - start)
            self.orbit = np.sign(gap) if abs(gap) < 0.8 * np.pi else self.side
        own_clearance = _distance_to_t(_to_body(agent[None], pose))[0]
        if own_clearance < AGENT_RADIUS + 8.0:  # step away from the block before circling it
            return agent + (here / (np.linalg.norm(here) + 1e-9)) * 20.0
        radius = max(ORBIT_RADIUS, min(np.linalg.norm(here), ORBIT_RADIUS + 40.0))
        waypoint = cog + radius * np.array(
            [np.cos(start + self.orbit * 0.5), np.sin(start + self.orbit * 0.5)]
        )
        at_wall = np.any((agent < 30.0) | (agent > WORKSPACE - 30.0))
        outside = np.any((waypoint < 20.0) | (waypoint > WORKSPACE - 20.0))
        if at_wall and outside and not self.orbit_flipped:
            self.orbit, self.orbit_flipped = -self.orbit, True  # a wall is in the way: go round
            return self._approach(agent, target, pose)
        return waypoint

    def __call__(self, obs=None) -> np.ndarray:
        pose = self.env.block_pose
        agent = self.env.agent_position
        twist = self._desired_twist(pose)
        points, directions, depths, alignment = self._pushes(pose, twist)
        contact = self._choose_contact(self._scores(pose, twist, agent, points, alignment))
        if contact != self.contact:
            self.contact, self.pushing, self.orbit, self.approach_steps = contact, False, None, 0
        point, direction = points[contact], directions[contact]
        c, s = np.cos(pose[2]), np.sin(pose[2])
        normal = np.array([[c, -s], [s, c]]) @ CONTACT_DIRECTIONS[contact]
        pre_contact = point - normal * (AGENT_RADIUS + 4.0)
        staging = point - normal * (AGENT_RADIUS + 30.0)

        if self.pushing and np.linalg.norm(agent - point) > 2.0 * AGENT_RADIUS:
            self.pushing = False  # slipped off: walk back around
        if not self.pushing and np.linalg.norm(agent - pre_contact) < 6.0:
            self.pushing, self.banned = True, set()

        if self.pushing:
            depth = np.clip(self.push_gain * depths[contact], 0.5, self.max_speed)
            waypoint = point + direction * depth - normal * AGENT_RADIUS
        else:
            self.approach_steps += 1
            if self.approach_steps > 40:  # cannot get there: try another contact
                self.banned.add(contact)
                self.contact = None
            in_line = _distance_to_t(_to_body(agent[None], pose))[0] > AGENT_RADIUS + 2.0 and (
                np.dot(agent - point, -normal) > AGENT_RADIUS
                and abs(_cross(agent - point, normal)) < 8.0
            )
            waypoint = pre_contact if in_line else self._approach(agent, staging, pose)
        step = waypoint - agent
        length = np.linalg.norm(step)
        if length > self.max_speed:
            step *= self.max_speed / length
        return np.clip(agent + step, 10.0, WORKSPACE - 10.0).astype(np.float32)
