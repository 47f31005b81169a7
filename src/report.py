"""Collect Hydra multiruns (ablation sweeps) into a Markdown table and PNG plots, with the
mean and spread over seeds.

    python src/report.py sweep_dir=logs/train/multiruns/ablation_stages name=stages

For every job folder (``<sweep>/<n>/``) it reads the overrides (``.hydra/overrides.yaml``), the
CSV metrics (``csv/metrics.csv``), ``FAILED.json`` (a failed job, recorded by src/train.py) and,
where `make eval` was run on it, ``eval/digits/report.json``. A variant is a job's overrides
minus those shared by every job and minus ``seed=``: the jobs of one variant that differ only in
the seed are its seeds. Every logged value is placed on the cumulative-training-FLOPs axis via
``perf/cumulative_flops`` of its step, and each metric is reported per variant as the mean over
its seeds with the spread (min-max). "Reached the baseline" is, per seed, the first cumulative
FLOP count at which the seed's target metric (``target``, default digit accuracy) is at least
the baseline variant's final mean; the compute factor is the baseline's FLOPs divided by the
mean of those counts over the seeds that reached it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import rootutils
import yaml
from omegaconf import DictConfig

rootutils.setup_root(__file__, indicator=".project-root", pythonpath=True)

SEED_PREFIX = "seed="


@dataclass
class Job:
    path: Path
    overrides: list[str]
    failed: str | None = None
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # flops, value
    steps: int = 0
    flops: float = 0.0
    samples_per_s: float | None = None
    eval_scores: dict | None = None  # <job>/eval/digits/report.json (make eval), if present

    def last(self, key: str) -> float | None:
        c = self.curves.get(key)
        return c[-1][1] if c else None

    @property
    def seed(self) -> str:
        seeds = [o[len(SEED_PREFIX) :] for o in self.overrides if o.startswith(SEED_PREFIX)]
        return seeds[0] if seeds else "-"


def read_job(path: Path) -> Job:
    over = path / ".hydra" / "overrides.yaml"
    job = Job(path, yaml.safe_load(over.read_text()) if over.is_file() else [])
    if (path / "FAILED.json").is_file():
        job.failed = json.loads((path / "FAILED.json").read_text())["error"]
    ev = path / "eval" / "digits" / "report.json"
    if ev.is_file():
        job.eval_scores = json.loads(ev.read_text())["scores"]
    metrics = path / "csv" / "metrics.csv"
    if not metrics.is_file():
        job.failed = job.failed or "no csv/metrics.csv (the job did not start training)"
        return job
    rows = list(csv.DictReader(metrics.open()))
    flops_at: dict[int, float] = {}
    speeds = []
    for r in rows:
        if r.get("perf/cumulative_flops"):
            flops_at[int(r["step"])] = float(r["perf/cumulative_flops"])
        if r.get("perf/samples_per_sec"):
            speeds.append(float(r["perf/samples_per_sec"]))
    if not flops_at:
        job.failed = job.failed or "no compute accounting in csv/metrics.csv"
        return job
    steps = sorted(flops_at)
    job.steps, job.flops = steps[-1] + 1, flops_at[steps[-1]]
    job.samples_per_s = sorted(speeds)[len(speeds) // 2] if speeds else None

    def flops_of(step: int) -> float:  # validation/sample rows log the step after the batch
        before = [s for s in steps if s <= step]
        return flops_at[before[-1]] if before else 0.0

    latest: dict[str, dict[int, float]] = {}  # a rerun/resume appends rows: the last one wins
    for r in rows:
        for k, v in r.items():
            if v and (k == "val/loss" or k.startswith(("val/digits_", "val/blockiness"))):
                latest.setdefault(k, {})[int(r["step"])] = float(v)
    for k, by_step in latest.items():
        job.curves[k] = [(flops_of(st), v) for st, v in sorted(by_step.items())]
    return job


def spread(values: list[float]) -> tuple[float, float, float] | None:
    """(mean, min, max) of the values, or None when there are none."""
    return (sum(values) / len(values), min(values), max(values)) if values else None


@dataclass
class Variant:
    """The jobs (seeds) that differ only in their seed."""

    label: str
    jobs: list[Job]

    @property
    def ok(self) -> list[Job]:
        return [j for j in self.jobs if not j.failed]

    def final(self, key: str) -> tuple[float, float, float] | None:
        """Mean, min and max over the finished seeds of the last logged value of `key`."""
        return spread([v for j in self.ok if (v := j.last(key)) is not None])

    def evaluated(self, key: str) -> tuple[float, float, float] | None:
        """Mean, min and max over the seeds' `make eval` scores (where run) of `key`."""
        return spread(
            [s[key] for j in self.ok if (s := j.eval_scores) and isinstance(s.get(key), float)]
        )

    def band(self, key: str) -> list[tuple[float, float, float, float]]:
        """(FLOPs, mean, min, max) per evaluation point, over the seeds that logged it: the
        seeds of one variant evaluate at the same steps, hence the same FLOP counts."""
        curves = [j.curves[key] for j in self.ok if j.curves.get(key)]
        n = min((len(c) for c in curves), default=0)
        rows = []
        for i in range(n):
            xs, ys = zip(*(c[i] for c in curves))
            rows.append((sum(xs) / len(xs), *spread(list(ys))))
        return rows


def group_variants(jobs: list[Job]) -> list[Variant]:
    """Label every job by its own overrides (those not shared by all jobs, seed excluded) and
    group the jobs with equal labels, in order of first appearance."""
    shared = set.intersection(*(set(j.overrides) for j in jobs)) if jobs else set()
    groups: dict[str, list[Job]] = {}
    for j in jobs:
        own = [o for o in j.overrides if o not in shared and not o.startswith(SEED_PREFIX)]
        label = " ".join(own) or ("(all jobs)" if len({x.seed for x in jobs}) > 1 else j.path.name)
        groups.setdefault(label, []).append(j)
    return [Variant(label, js) for label, js in groups.items()]


def reached(job: Job, key: str, target: float) -> float | None:
    """Cumulative FLOPs at which the job's `key` first reaches `target`."""
    return next((x for x, v in job.curves.get(key, []) if v >= target), None)


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def fmt_spread(s: tuple[float, float, float] | None, spec: str = ".3f") -> str:
    """'mean (min-max)', or just the mean for a single seed."""
    if s is None:
        return "-"
    mean, lo, hi = s
    return fmt(mean, spec) if lo == hi else f"{mean:{spec}} ({lo:{spec}}-{hi:{spec}})"


def mean_flops(v: Variant) -> float:
    """Mean training FLOPs of the variant's finished seeds."""
    return sum(j.flops for j in v.ok) / max(len(v.ok), 1)


def table(variants: list[Variant], base: Variant | None, metrics: list[str], target: str) -> str:
    key = f"val/digits_{target}"
    head = ["variant", "seeds", "steps", "train FLOPs", "samples/s", *metrics]
    head += ["blockiness", "val/loss", f"reached baseline {target} at", "compute factor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    goal = base.final(key) if base else None
    for v in variants:
        ok, bad = v.ok, [j for j in v.jobs if j.failed]
        seeds = f"{len(ok)}/{len(v.jobs)}"
        if bad:
            error = " ".join(bad[0].failed.split()).replace("|", "/")[:160]  # one table cell
            seeds += f"; failed (seed {bad[0].seed}): {error}"
        if not ok:
            lines.append("| " + " | ".join([v.label, seeds] + ["-"] * (len(head) - 2)) + " |")
            continue
        if v is base:
            reach, factor = "(baseline)", "-"
        elif goal is None:
            reach, factor = "-", "-"
        else:
            at = [x for j in ok if (x := reached(j, key, goal[0])) is not None]
            reach = f"{len(at)}/{len(ok)} seeds"
            reach += f": {fmt_spread(spread(at), '.3g')}" if at else ""
            factor = f"{mean_flops(base) / (sum(at) / len(at)):.2f}x" if at else "-"
        cells = [
            v.label,
            seeds,
            fmt_spread(spread([float(j.steps) for j in ok]), ".0f"),
            fmt(mean_flops(v), ".3g"),
            fmt_spread(spread([j.samples_per_s for j in ok if j.samples_per_s]), ".1f"),
            *[fmt_spread(v.final(f"val/digits_{m}")) for m in metrics],
            fmt_spread(v.final("val/blockiness")),
            fmt_spread(v.final("val/loss"), ".4f"),
            reach,
            factor,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_table(variants: list[Variant], metrics: list[str]) -> str | None:
    """The final checkpoints on `make eval`'s digits suite, where it was run."""
    rows = [v for v in variants if any(j.eval_scores for j in v.ok)]
    if not rows:
        return None
    cols = [*metrics, "blockiness", "blockiness_4", "fvd"]
    lines = ["| variant | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for v in rows:
        n = sum(1 for j in v.ok if j.eval_scores)
        vals = [fmt_spread(v.evaluated(c), ".4f" if c == "fvd" else ".3f") for c in cols]
        lines.append(f"| {v.label} | {n} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot(variants: list[Variant], key: str, ylabel: str, path: Path) -> bool:
    """Mean over seeds against cumulative FLOPs, with the min-max band where seeds differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [(v, b) for v in variants if (b := v.band(key))]
    if not drawn:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for v, b in drawn:
        xs, mean, lo, hi = zip(*b)
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=f"{v.label} (n={len(v.ok)})")
        if len(v.ok) > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def job_dirs(sweep: Path) -> list[Path]:
    """The job folders of a multirun folder, or the folder itself when it is one job (e.g. a
    shared baseline run of another sweep)."""
    if (sweep / ".hydra").is_dir():
        return [sweep]
    if not sweep.is_dir():
        raise FileNotFoundError(f"sweep_dir={str(sweep)!r} does not exist; fix: a multirun folder")
    dirs = sorted(
        (p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    if not dirs:
        raise FileNotFoundError(
            f"sweep_dir={str(sweep)!r} has no job folders (0/, 1/, ...); fix: point it at a "
            "multirun folder (logs/train/multiruns/<time>)"
        )
    return dirs


PLOTS = {  # file name: (logged key, axis label)
    "digit_acc.png": ("val/digits_digit_acc", "digit accuracy"),
    "direction_acc.png": ("val/digits_direction_acc", "direction accuracy"),
    "persistence.png": ("val/digits_persistence", "persistence"),
    "identity.png": ("val/digits_identity_consistency", "identity consistency"),
    "blockiness.png": ("val/blockiness", "latent blockiness (2x2)"),
    "val_loss.png": ("val/loss", "validation loss"),
}


def report(cfg: DictConfig) -> dict:
    sweeps = [Path(s) for s in ([cfg.sweep_dir] if cfg.sweep_dir else []) + list(cfg.sweep_dirs)]
    if not sweeps:
        raise ValueError("sweep_dir is not set; fix: sweep_dir=logs/train/multiruns/<name>")
    metrics, target = list(cfg.metrics), str(cfg.target)
    if target not in metrics:
        raise ValueError(f"target={target!r} is not one of metrics={metrics}; fix: add it")
    jobs = [read_job(d) for s in sweeps for d in job_dirs(s)]
    variants = group_variants(jobs)
    with_ok = [v for v in variants if v.ok]
    base = next((v for v in with_ok if v.label == cfg.baseline), with_ok[0] if with_ok else None)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawn = [name for name, (k, y) in PLOTS.items() if plot(variants, k, y, out / name)]
    md = [
        f"# Ablation report: {cfg.name}",
        "",
        "Sweeps: " + ", ".join(f"`{s}`" for s in sweeps),
        f"Baseline: `{base.label if base else '-'}`. Each cell: the mean over a variant's "
        "seeds of its last evaluation, with the min-max over seeds in brackets; the FLOPs at "
        f"which each seed first reached the baseline's final mean {target}.",
        "",
        table(variants, base, metrics, target),
        "",
        *(
            [
                "Final checkpoints, `make eval` digits suite (more prompts than the curves):",
                "",
                et,
                "",
            ]
            if (et := eval_table(variants, metrics))
            else []
        ),
        *[f"![{n}]({n})" for n in drawn],
    ]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:6]))
    print(f"wrote {out / 'report.md'} and {', '.join(drawn) or 'no plots'}")
    return {
        "jobs": len(jobs),
        "variants": len(variants),
        "failed": sum(1 for j in jobs if j.failed),
        "out": str(out),
    }


@hydra.main(version_base="1.3", config_path="../configs", config_name="report.yaml")
def main(cfg: DictConfig) -> None:
    report(cfg)


if __name__ == "__main__":
    main()
