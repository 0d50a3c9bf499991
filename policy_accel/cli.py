"""Command-line entry points (``policy-accel ...``): thin wrappers over the library."""

from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> int:
    from policy_accel.policies.loading import convert

    destination = convert(args.source, args.destination)
    print(f"wrote {destination} (policy_accel.json + model.safetensors)")
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
    from policy_accel.control.server import serve
    from policy_accel.sampling.errors import SolverOptionError

    options = {} if args.tolerance is None else {"tolerance": args.tolerance}

    def announce(port: int) -> None:
        print(f"serving {args.checkpoint} on ws://{args.host}:{port} (GET /healthz)", flush=True)

    try:
        serve(
            args.checkpoint,
            host=args.host,
            port=args.port,
            method=args.method,
            warm_start=args.warm_start,
            budget_ms=args.budget_ms,
            max_message_bytes=int(args.max_message_mb * 1024 * 1024),
            device=args.device,
            max_workers=args.workers,
            on_start=announce,
            **options,
        )
    except SolverOptionError as error:
        print(f"policy-accel serve: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="policy-accel", description="policy_accel tools")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert",
        help="rewrite a DiffusionPolicy .ckpt as safetensors + JSON (loads without unpickling)",
    )
    convert.add_argument("source", help="path to a .ckpt or .ckpt.xz file")
    convert.add_argument("destination", help="directory to write")
    convert.set_defaults(run=_convert)

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
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--method", default="picard", help="solver (sequential, picard, ...)")
    serve.add_argument(
        "--no-warm-start", dest="warm_start", action="store_false", help="cold solves only"
    )
    serve.add_argument("--budget-ms", type=float, default=None, help="per-plan time budget")
    serve.add_argument("--tolerance", type=float, default=None, help="solver tolerance")
    serve.add_argument(
        "--max-message-mb", type=float, default=8.0, help="largest request decoded (MiB)"
    )
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--workers", type=int, default=4, help="threads that run plans")
    serve.set_defaults(run=_serve)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError) as error:
        print(f"policy-accel {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
