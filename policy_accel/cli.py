"""Command-line entry points (``policy-accel ...``): thin wrappers over the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DESTINATION_HELP = (
    "folder to write (the files go into a new folder beside it, renamed into place); refused "
    "if it overlaps the source or holds links"
)
OVERWRITE_HELP = "replace a destination that holds files, as a whole (never merged)"


def _convert(args: argparse.Namespace) -> int:
    from policy_accel.policies.loading import convert

    destination = convert(args.source, args.destination, overwrite=args.overwrite)
    print(f"wrote {destination} (policy_accel.json + model.safetensors)")
    return 0


def _export_lerobot(args: argparse.Namespace) -> int:
    import json

    from policy_accel.policies.destination import check_destination
    from policy_accel.policies.lerobot_export import export_lerobot, robot_state_size
    from policy_accel.policies.loading import load_policy

    source = Path(args.source)
    check_destination(args.destination, source=source, overwrite=args.overwrite)  # before loading
    state_size = args.state_size
    if state_size is None:
        env_file = source / "env.json"
        if not env_file.is_file():
            raise SystemExit(f"{source} has no env.json to read the task from; pass --state-size.")
        state_size = robot_state_size(json.loads(env_file.read_text())["env"])
    destination = export_lerobot(
        load_policy(source), args.destination, state_size, overwrite=args.overwrite
    )
    print(f"wrote {destination} (LeRobot: DiffusionPolicy.from_pretrained and its processors)")
    return 0


def _demos(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from policy_accel.data.demos import collect_demos

    bar = tqdm(total=args.n, desc=f"{args.env} demos", unit="ep", disable=args.quiet)
    kept = 0

    def progress(attempt: int, success: bool, length: int) -> None:
        nonlocal kept
        kept += success
        bar.update(int(success))
        bar.set_postfix(attempts=attempt, last_len=length)

    buffer, stats = collect_demos(
        args.env, args.n, obs=args.obs, first_seed=args.seed, on_episode=progress
    )
    bar.close()
    buffer.save(args.out)
    print(
        f"wrote {args.out}: {buffer.n_episodes} episodes, {buffer.n_steps} steps "
        f"(mean length {stats.mean_length:.0f}); expert success {stats.kept}/{stats.attempted} "
        f"= {stats.expert_success:.0%} on seeds {args.seed}..{args.seed + stats.attempted - 1}"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from policy_accel.training import TrainConfig, train

    config = TrainConfig(
        dataset=args.dataset,
        output=args.output,
        task_name=args.task,
        horizon=args.horizon,
        n_obs_steps=args.n_obs_steps,
        n_action_steps=args.n_action_steps,
        down_dims=tuple(args.down_dims),
        diffusion_step_embed_dim=args.step_embed_dim,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_warmup_steps=args.warmup,
        max_steps=args.steps,
        max_minutes=args.minutes,
        seed=args.seed,
        num_threads=args.threads,
        device=args.device,
    )
    train(config)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from policy_accel.control.config import SamplerConfig
    from policy_accel.control.server import serve

    _set_threads(args.threads)
    # the server's warnings (stopped by a signal, failed accepts, load) with their time
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    # connection threads answer pings, /healthz and new clients while plans run in worker
    # threads: a 1 ms GIL switch interval (default 5 ms) keeps them responsive under load
    sys.setswitchinterval(0.001)
    # a sampler config (e.g. one written by `bench --budget-ms`), then the flags on top of it
    base = _load_sampler(args.sampler, args.config_dir) if args.sampler is not None else None
    changes = {
        key: value
        for key, value in (
            ("method", args.method),
            ("budget_ms", args.budget_ms),
            ("tolerance", args.tolerance),
            ("scheduler", args.scheduler),
            ("num_inference_steps", args.steps),
        )
        if value is not None
    }
    if not args.warm_start:
        changes["warm_start"] = False
    sampler = SamplerConfig.from_settings(base, **changes)

    def announce(port: int) -> None:
        print(
            f"serving {args.checkpoint} ({sampler.label}) on ws://{args.host}:{port} "
            "(GET /healthz)",
            flush=True,
        )

    signum = serve(
        args.checkpoint,
        sampler,
        host=args.host,
        port=args.port,
        device=args.device,
        max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        max_workers=args.workers,
        max_connections=args.max_connections,
        api_key=args.api_key or os.environ.get("POLICY_ACCEL_API_KEY") or None,
        max_keyless_connections=args.max_keyless_connections,
        idle_timeout_s=args.idle_timeout or None,
        max_pending=args.max_pending,
        out_of_range=args.out_of_range,
        on_start=announce,
    )
    return 128 + signum  # the shell's code for a process a signal stopped


def _set_threads(threads: int) -> None:
    """The torch thread count, set once per process at its entry point."""
    import torch

    torch.set_num_threads(threads)


def _compose(config_name: str, overrides: list[str], config_dir: Path) -> dict:
    """Compose ``config_name`` with hydra and return plain containers. ``policy=PATH`` naming a
    checkpoint (not a config in ``policy/``) becomes ``policy.path=PATH``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    rewritten = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "policy" and not (config_dir / "policy" / f"{value}.yaml").is_file():
            if not Path(value).exists():
                known = sorted(p.stem for p in (config_dir / "policy").glob("*.yaml"))
                raise ValueError(
                    f"policy={value}: neither a config in {config_dir / 'policy'} ({known}) nor "
                    "an existing checkpoint path."
                )
            override = f"policy.path={value}"
        rewritten.append(override)
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name=config_name, overrides=rewritten)
            return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        groups = {
            group: sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
            for group in ("policy", "env", "sampler", "runtime")
        }
        raise ValueError(
            f"cannot compose {config_name}: {error}. Config groups: {groups}"
        ) from error


def _load_sampler(name_or_path: str, config_dir: Path):
    from omegaconf import OmegaConf

    from policy_accel.control.config import SamplerConfig

    path = Path(name_or_path)
    if not path.is_file():
        path = config_dir / "sampler" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (config_dir / "sampler").glob("*.yaml"))
        raise ValueError(f"sampler {name_or_path!r}: no such file or config (known: {known})")
    return SamplerConfig.from_dict(OmegaConf.to_container(OmegaConf.load(path)), name=path.stem)


def _sampler_configs(config_dir: Path) -> dict[str, dict]:
    from omegaconf import OmegaConf

    return {
        path.stem: OmegaConf.to_container(OmegaConf.load(path))
        for path in sorted((config_dir / "sampler").glob("*.yaml"))
    }


@contextmanager
def progress_bars(quiet: bool):
    """An ``on_progress(label, finished, total)`` callback drawing one tqdm bar per sampler."""
    from tqdm import tqdm

    bars: dict = {}

    def on_progress(label: str, finished: int, total: int) -> None:
        if quiet:
            return
        if label not in bars:
            bars[label] = tqdm(total=total, desc=f"eval {label}", unit="ep")
        bars[label].update(finished - bars[label].n)

    try:
        yield on_progress
    finally:
        for bar in bars.values():
            bar.close()


def _eval(args: argparse.Namespace) -> int:
    from policy_accel.eval.config import eval_config_from_dict
    from policy_accel.eval.evaluate import evaluate

    values = _compose("eval", args.overrides, args.config_dir)
    config = eval_config_from_dict(values, _sampler_configs(args.config_dir))
    _set_threads(config.runtime.threads)
    with progress_bars(args.quiet) as on_progress:
        info, directory = evaluate(config, on_progress=on_progress)
    rows = info.get("compare") or [
        {"sampler": config.sampler.label, **info["aggregated"], **info["latency"]}
    ]
    print(
        f"{'sampler':<18} {'success %':>9} {'score':>6} {'rounds':>7} {'p50 ms':>8} "
        f"{'deadline':>8} {'fallback':>8}"
    )
    for row in rows:
        print(
            f"{row['sampler']:<18} {row.get('pc_success', float('nan')):9.1f} "
            f"{row.get('mean_score', float('nan')):6.3f} {row.get('rounds_mean') or 0:7.1f} "
            f"{row.get('latency_ms_p50') or 0:8.1f} {row.get('deadline_misses') or 0:8d} "
            f"{row.get('fallbacks') or 0:8d}"
        )
        diff = row.get("success_diff_vs_first")
        if diff and diff.get("n") and row is not rows[0]:
            interval = (
                f"95% CI {diff['ci95_low']:+.2f} .. {diff['ci95_high']:+.2f}"
                if diff.get("ci95_low") is not None
                else "no interval from one episode"
            )
            print(
                f"{'':<18} success vs {rows[0]['sampler']}: {diff['diff']:+.2f} "
                f"({interval}, n={diff['n']})"
            )
    print(f"wrote {directory / 'eval_info.json'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from policy_accel.bench.budget import SweepConfig, format_table, run_sweep
    from policy_accel.policies.loading import load_policy

    overrides = list(args.overrides)
    if args.budget_ms is not None:
        overrides.append(f"bench.budget_ms={args.budget_ms}")
    values = _compose("bench", overrides, args.config_dir)
    named = _sampler_configs(args.config_dir)
    bench = dict(values["bench"])
    unknown = [name for name in bench.get("samplers") or [] if name not in named]
    if unknown:
        raise ValueError(f"bench.samplers names {unknown}; known: {sorted(named)}")
    bench["samplers"] = [{**named[name], "name": name} for name in bench.get("samplers") or []]
    sweep = SweepConfig(**bench)
    env = values["env"]
    env_kwargs = dict(env.get("kwargs") or {})
    if env.get("max_episode_steps") is not None:
        env_kwargs["max_episode_steps"] = env["max_episode_steps"]
    if env.get("obs") is not None:
        env_kwargs["obs"] = env["obs"]
    policy = load_policy(values["policy"]["path"], device=values["policy"]["device"])
    _set_threads(values["runtime"]["threads"])
    report = run_sweep(
        policy,
        env["name"],
        env_kwargs,
        sweep,
        threads=values["runtime"]["threads"],
        sampler_dir=args.config_dir / "sampler",
        log=print,
    )
    print(format_table(report["rows"]))
    choice = report.get("choice")
    if choice:
        best, exact = choice["most_accurate_within_budget"], choice["fastest_exact"]
        print(
            f"budget {choice['budget_ms']:g} ms: most accurate within budget: "
            f"{best['label'] if best else 'none fits'}; fastest exact: "
            f"{exact['label'] if exact else 'none'}"
        )
        if "sampler_config" in report:
            name = Path(report["sampler_config"]).stem
            print(f"wrote {report['sampler_config']} (use sampler={name} with eval and serve)")
    print(f"wrote {sweep.output_dir}/{sweep.name}.json, .csv and plots")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="policy-accel", description="policy_accel tools")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert",
        help="rewrite a DiffusionPolicy .ckpt as safetensors + JSON (loads without unpickling)",
    )
    convert.add_argument("source", help="path to a .ckpt or .ckpt.xz file")
    convert.add_argument("destination", help=DESTINATION_HELP)
    convert.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    convert.set_defaults(run=_convert)
    export = commands.add_parser(
        "export-lerobot",
        help="write a lowdim UNet checkpoint in LeRobot's format (config, weights, processors)",
    )
    export.add_argument("source", help="a checkpoint directory policy_accel loads")
    export.add_argument("destination", help=DESTINATION_HELP)
    export.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    export.add_argument(
        "--state-size",
        type=int,
        help="trailing observation entries that are the robot state (default: from env.json)",
    )
    export.set_defaults(run=_export_lerobot)

    demos = commands.add_parser(
        "demos", help="record scripted-expert demonstrations as a DiffusionPolicy zarr buffer"
    )
    demos.add_argument("env", help="task name (see envs.names()), e.g. pusht, robomimic/lift")
    demos.add_argument("n", type=int, help="number of successful episodes to record")
    demos.add_argument("out", help="output .zarr directory (replaced if it exists)")
    demos.add_argument("--obs", default=None, help="observation mode (default: the task's)")
    demos.add_argument("--seed", type=int, default=0, help="first episode seed")
    demos.add_argument("--quiet", action="store_true", help="no progress bar")
    demos.set_defaults(run=_demos)

    train = commands.add_parser(
        "train", help="train a DiffusionPolicy low-dim UNet on a replay buffer (resumable)"
    )
    train.add_argument("dataset", help="replay buffer .zarr written by `policy-accel demos`")
    train.add_argument("output", help="run directory: latest.ckpt, policy/, train_log.json")
    train.add_argument("--task", default="pusht", help="task name recorded in the checkpoint")
    train.add_argument("--horizon", type=int, default=16)
    train.add_argument("--n-obs-steps", type=int, default=2)
    train.add_argument("--n-action-steps", type=int, default=8)
    train.add_argument("--down-dims", type=int, nargs="+", default=[64, 128, 256])
    train.add_argument("--step-embed-dim", type=int, default=128)
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--warmup", type=int, default=500, help="linear warm-up steps")
    train.add_argument("--steps", type=int, default=20000, help="cosine schedule length")
    train.add_argument("--minutes", type=float, default=None, help="stop after this time")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    train.add_argument("--device", default="cpu")
    train.set_defaults(run=_train)

    serve = commands.add_parser(
        "serve", help="serve a policy over websockets (openpi protocol), one Controller per client"
    )
    serve.add_argument("checkpoint", help="a checkpoint load_policy reads (.ckpt, directory)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Api-Key KEY' from clients (default: $POLICY_ACCEL_API_KEY)",
    )
    serve.add_argument(
        "--max-connections", type=int, default=32, help="clients connected at once (more: 503)"
    )
    serve.add_argument(
        "--max-keyless-connections",
        type=int,
        default=0,
        help="with --api-key: slots open to clients without the key (the rest are reserved)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="close a connection after this many seconds without a request (0: never)",
    )
    serve.add_argument(
        "--max-pending",
        type=int,
        default=64,
        help="connections waiting for their handshake at once (more: the oldest is closed)",
    )
    serve.add_argument(
        "--out-of-range",
        choices=("refuse", "flag"),
        default="refuse",
        help="observations far outside the training range: refuse, or serve and flag in reply",
    )
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--method", default=None, help="solver (default: chord or the sampler's)")
    serve.add_argument(
        "--no-warm-start", dest="warm_start", action="store_false", help="cold solves only"
    )
    serve.add_argument("--budget-ms", type=float, default=None, help="per-plan time budget")
    serve.add_argument("--tolerance", type=float, default=None, help="solver tolerance")
    serve.add_argument(
        "--scheduler", default=None, help="ddpm, ddim or dpm_solver (default: the checkpoint's)"
    )
    serve.add_argument("--steps", type=int, default=None, help="inference steps")
    serve.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    serve.add_argument(
        "--max-message-mb", type=float, default=8.0, help="largest request decoded (MiB)"
    )
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--workers", type=int, default=4, help="threads that run plans")
    serve.add_argument(
        "--sampler", default=None, help="a sampler config name in configs/sampler/ or a YAML path"
    )
    serve.add_argument("--config-dir", type=Path, default=CONFIGS, help="hydra config folder")
    serve.set_defaults(run=_serve)

    for name, text in (
        (
            "eval",
            "closed-loop rollouts with task reward (hydra overrides, e.g. env=pusht_keypoints)",
        ),
        ("bench", "latency-budget sweep of sampler configurations (hydra overrides)"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("overrides", nargs="*", help="hydra overrides: group=option, key=value")
        sub.add_argument("--config-dir", type=Path, default=CONFIGS, help="hydra config folder")
        if name == "eval":
            sub.add_argument("--quiet", action="store_true", help="no progress bar")
            sub.set_defaults(run=_eval)
        else:
            sub.add_argument("--budget-ms", type=float, default=None, help="latency budget")
            sub.set_defaults(run=_bench)
    args, extra = parser.parse_known_args(argv)
    if extra:  # hydra overrides may come after flags: `eval --quiet env=pusht_image`
        if getattr(args, "overrides", None) is None or any(
            arg.startswith("-") or "=" not in arg for arg in extra
        ):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args)
    except (OSError, ValueError) as error:  # CheckpointError and ObservationError included
        message = " ".join(str(error).split())  # one line, whatever the error's text holds
        print(f"policy-accel {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
