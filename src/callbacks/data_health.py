"""Log how much of the training data was unusable: ``data/skipped`` and ``data/bad_fraction``.

Every decoded sample's ``meta`` carries its data stream's running counts (see
``src.data.pipeline``): a stream is one DataLoader worker (or the main process) of this rank.
The callback keeps the latest counts of each stream and logs their totals for this rank.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class DataHealth(Callback):
    def __init__(self):
        self.streams: dict[str, tuple[int, int]] = {}  # stream -> (seen, skipped)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metas = batch.get("meta") if isinstance(batch, dict) else None
        for m in metas or []:
            if isinstance(m, dict) and "data_stream" in m:
                seen, skipped = int(m["data_seen"]), int(m["data_skipped"])
                if seen >= self.streams.get(m["data_stream"], (0, 0))[0]:
                    self.streams[m["data_stream"]] = (seen, skipped)
        if not self.streams:
            return
        seen = sum(s for s, _ in self.streams.values())
        skipped = sum(k for _, k in self.streams.values())
        pl_module.log("data/skipped", float(skipped), on_step=True, on_epoch=False)
        pl_module.log("data/bad_fraction", skipped / max(seen, 1), on_step=True, on_epoch=False)
