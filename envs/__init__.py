"""Simulated tasks for rollout evaluation and their scripted experts.

``envs.make(name, obs=...)`` builds a gymnasium env (``envs.names()`` lists them);
``envs.make_expert(name, env)`` the scripted expert that generates demonstrations.
"""

from envs.registry import EnvSpec, make, make_expert, names, register, spec

__all__ = ["EnvSpec", "make", "make_expert", "names", "register", "spec"]
