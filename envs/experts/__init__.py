"""Scripted experts that generate demonstrations for the tasks in :mod:`envs`."""
