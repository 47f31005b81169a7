"""Collect a Hydra multirun (an ablation sweep) into a Markdown table and PNG plots.

    python src/report.py sweep_dir=logs/train/multiruns/<time> name=stages

For every job folder (``<sweep>/<n>/``) it reads the overrides (``.hydra/overrides.yaml``), the
CSV metrics (``csv/metrics.csv``) and ``FAILED.json`` (a failed job, recorded by src/train.py).
The variant label is the job's overrides minus those shared by every job. Quality is the mean
of the digits metrics logged by the SampleVideo callback (``val/digits_*``); every logged value
is placed on the cumulative-training-FLOPs axis via ``perf/cumulative_flops`` of its step.
"Reached the baseline" is the first cumulative FLOP count at which a variant's quality is at
least the baseline's final quality, and the compute factor is the baseline's total FLOPs
divided by it (a single run per variant: read it as an indication, not a confidence interval).
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


@dataclass
class Job:
    path: Path
    overrides: list[str]
    label: str = ""
    failed: str | None = None
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # flops, value
    steps: int = 0
    flops: float = 0.0
    samples_per_s: float | None = None
    eval_scores: dict | None = None  # <job>/eval/digits/report.json (make eval), if present

    def last(self, key: str) -> float | None:
        c = self.curves.get(key)
        return c[-1][1] if c else None


def read_job(path: Path, quality_metrics: list[str]) -> Job:
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

    keys = ["val/loss", "val/blockiness"] + [f"val/digits_{m}" for m in quality_metrics]
    latest: dict[str, dict[int, float]] = {}  # a rerun/resume appends rows: the last one wins
    for r in rows:
        for k in keys:
            if r.get(k):
                latest.setdefault(k, {})[int(r["step"])] = float(r[k])
    for k, by_step in latest.items():
        job.curves[k] = [(flops_of(st), v) for st, v in sorted(by_step.items())]
    quality: dict[float, list[float]] = {}
    for m in quality_metrics:
        for x, v in job.curves.get(f"val/digits_{m}", []):
            quality.setdefault(x, []).append(v)
    job.curves["quality"] = [
        (x, sum(v) / len(v)) for x, v in sorted(quality.items()) if len(v) == len(quality_metrics)
    ]
    return job


def label_jobs(jobs: list[Job]) -> None:
    shared = set.intersection(*(set(j.overrides) for j in jobs)) if jobs else set()
    for j in jobs:
        own = [o for o in j.overrides if o not in shared]
        j.label = " ".join(own) or f"job {j.path.name}"


def reached(job: Job, target: float) -> float | None:
    """Cumulative FLOPs at which the job's quality first reaches `target`."""
    return next((x for x, v in job.curves.get("quality", []) if v >= target), None)


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def table(jobs: list[Job], base: Job | None, quality_metrics: list[str]) -> str:
    head = ["variant", "status", "steps", "train FLOPs", "samples/s", "quality"]
    head += quality_metrics + ["blockiness", "val/loss", "reached baseline at", "compute factor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    target = base.last("quality") if base else None
    for j in jobs:
        if j.failed:
            error = " ".join(j.failed.split()).replace("|", "/")[:160]  # one table cell
            cells = [j.label, f"failed: {error}"] + ["-"] * (len(head) - 2)
        else:
            at = reached(j, target) if target is not None and j is not base else None
            factor = base.flops / at if at else None
            reach = "(baseline)" if j is base else f"{at:.3g}" if at else "not reached"
            cells = [
                j.label,
                "ok",
                str(j.steps),
                f"{j.flops:.3g}",
                fmt(j.samples_per_s, ".1f"),
                fmt(j.last("quality")),
                *[fmt(j.last(f"val/digits_{m}")) for m in quality_metrics],
                fmt(j.last("val/blockiness")),
                fmt(j.last("val/loss"), ".4f"),
                reach,
                f"{factor:.2f}x" if factor else "-",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_table(jobs: list[Job], quality_metrics: list[str]) -> str | None:
    """The final checkpoints on `make eval`'s digits suite, where it was run."""
    rows = [j for j in jobs if j.eval_scores]
    if not rows:
        return None
    cols = [*quality_metrics, "blockiness", "blockiness_4", "fvd"]
    lines = ["| variant | quality | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for j in rows:
        s = j.eval_scores
        q = sum(s[m] for m in quality_metrics) / len(quality_metrics)
        vals = [fmt(s.get(c)) if isinstance(s.get(c), float) else "-" for c in cols]
        lines.append(f"| {j.label} | {q:.3f} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot(jobs: list[Job], key: str, ylabel: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [j for j in jobs if not j.failed and j.curves.get(key)]
    if not drawn:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for j in drawn:
        xs, ys = zip(*j.curves[key])
        ax.plot(xs, ys, marker="o", markersize=3, label=j.label)
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


def report(cfg: DictConfig) -> dict:
    sweeps = [Path(s) for s in ([cfg.sweep_dir] if cfg.sweep_dir else []) + list(cfg.sweep_dirs)]
    if not sweeps:
        raise ValueError("sweep_dir is not set; fix: sweep_dir=logs/train/multiruns/<time>")
    qm = list(cfg.quality_metrics)
    jobs = [read_job(d, qm) for s in sweeps for d in job_dirs(s)]
    label_jobs(jobs)
    ok = [j for j in jobs if not j.failed]
    base = next((j for j in ok if j.label == cfg.baseline), ok[0] if ok else None)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "quality.png": ("quality", "quality (mean digits metrics)"),
        "blockiness.png": ("val/blockiness", "latent blockiness"),
        "val_loss.png": ("val/loss", "validation loss"),
    }
    drawn = [name for name, (k, y) in plots.items() if plot(jobs, k, y, out / name)]
    md = [
        f"# Ablation report: {cfg.name}",
        "",
        "Sweeps: " + ", ".join(f"`{s}`" for s in sweeps),
        f"Baseline: `{base.label if base else '-'}`; quality = mean of {', '.join(qm)}.",
        "",
        table(jobs, base, qm),
        "",
        *(
            [
                "Final checkpoints, `make eval` digits suite (more prompts than the curves):",
                "",
                et,
                "",
            ]
            if (et := eval_table(jobs, qm))
            else []
        ),
        *[f"![{n}]({n})" for n in drawn],
    ]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:6]))
    print(f"wrote {out / 'report.md'} and {', '.join(drawn) or 'no plots'}")
    return {"jobs": len(jobs), "failed": sum(1 for j in jobs if j.failed), "out": str(out)}


@hydra.main(version_base="1.3", config_path="../configs", config_name="report.yaml")
def main(cfg: DictConfig) -> None:
    report(cfg)


if __name__ == "__main__":
    main()
