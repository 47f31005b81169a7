"""Evaluate a checkpoint on a prompt suite: python src/eval.py ckpt_path=PATH [suite=digits].

Generates the suite's videos with fixed seeds, scores them and writes report.json + report.md
(checkpoint and prompt-file sha256, seeds, steps, guidance, frames, fps, package versions) to
<run>/eval/<suite>/ (or out_dir=...). See src/eval/run.py.
"""

from __future__ import annotations

import hydra
import rootutils
from omegaconf import DictConfig, OmegaConf

rootutils.setup_root(__file__, indicator=".project-root", pythonpath=True)

from src.eval.run import evaluate  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    main()
