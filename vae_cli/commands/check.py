"""vae-check: the first command on a new machine. It certifies this installation on its own device in
minutes: the environment, every objective against a float64 copy of itself in each speed option the
device allows, every estimator against a closed form, a checkpoint written and resumed, the matmul
floor. A table on stdout, check.json beside it; exit 0 when every line holds, 1 when one does not."""

from __future__ import annotations

import sys
from pathlib import Path

from vae_cli.commands.app import compose_config
from vae_cli.commands.boundary import OneLineParser, command_parser, exit_with, user_errors
from vae_cli.run.files import check_creatable, write_json

# The tiny run the resume check trains twice: dynamic binarization and the IWAE draw from torch's RNG
# every step, so a resume that restored any RNG state wrongly would take other steps.
RESUME_RUN = [
    "objective=iwae",
    "data=synthetic",
    "data.n_train=64",
    "data.n_test=16",
    "data.binarization=dynamic",
    "K=2",
    "model.hidden=32",
    "model.depth=2",
    "n_samples=8",
    "batch_size=16",
    "progress=false",
    "eval.enabled=false",
]


def parser() -> OneLineParser:
    p = command_parser(
        "vae-check",
        "Certify this installation on its own device: every objective's loss and gradient against "
        "a float64 reference in each speed option the device allows, every estimator against the closed form of "
        "a linear-Gaussian model, a checkpoint written and resumed, the matmul floor. One line per check on "
        "stdout, check.json in --out; exit code 0 when every line holds, 1 when one does not (named on stderr), "
        "2 for bad input. About 2 minutes on a 2-core CPU (--quick: 30 s), seconds on a GPU.",
        device=True,
    )
    p.add_argument("--quick", action="store_true", help="fewer draws and images, no torch.compile lines (what CI runs)")
    p.add_argument(
        "--out", type=Path, default=Path("."), metavar="DIR", help="the directory check.json is written to (default .)"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    with user_errors("vae-check"):
        check_creatable(args.out, "output directory")
        default_cfg, resume_cfg = compose_config([]), compose_config(RESUME_RUN)
        # The checks and torch, only now that the command line has been checked.
        from vae_cli.run.machine import resolve_device
        from vae_cli.stages.checking import CHECK_JSON, format_line, header, run_checks

        device = resolve_device(args.device, quiet=True)
        print(header(), flush=True)
        report = run_checks(
            device, args.quick, default_cfg, resume_cfg, lambda line: print(format_line(line), flush=True)
        )
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / CHECK_JSON, report.as_json())
    checks = [line for line in report.lines if line.ok is not None]
    print(
        f"vae-check: {len(checks) - len(report.failed)} of {len(checks)} checks hold on {report.device} "
        f"in {report.seconds:.0f} s; wrote {args.out / CHECK_JSON}"
    )
    if report.failed:
        names = "; ".join(line.name for line in report.failed)
        exit_with("vae-check", "", f"FAILED {len(report.failed)}: {names}", 1)
    sys.exit(0)
