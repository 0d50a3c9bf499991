"""Simulated tasks for rollout evaluation (PushT, robomimic-style robosuite tasks) and their
scripted experts. Filled by the environments issue; nothing here yet."""
