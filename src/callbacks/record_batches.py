"""Record which samples every rank trains on (debugging data sharding across devices).

Writes `<out_dir>/batches_rank{r}.jsonl`: one line per training batch with the sample keys
(`meta[i]["key"]`, or the caption when there is no key) and the global step.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RecordBatches(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        meta = batch.get("meta") or [{} for _ in batch["caption"]]
        keys = [
            m.get("key", c) if isinstance(m, dict) else c for m, c in zip(meta, batch["caption"])
        ]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"batches_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "keys": keys}) + "\n")
