"""Drop-ins that put policy_accel's solvers inside other stacks' policies. Each submodule imports
its stack (e.g. :mod:`policy_accel.integrations.lerobot` needs ``lerobot``); this package imports
none of them."""
