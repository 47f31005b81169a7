"""Latent webdataset shards: pre-extracted raw autoencoder latents and text features.

Layout of one split folder (``<root>/train``, ``<root>/val``)::

    <name>-<split>-%06d.tar     samples, keys without dots
    manifest.json               written last: format, encoders, dtypes, shapes, counts
    null_text.safetensors       features of the empty prompt (CFG dropout / unconditional)
    autoencoder.safetensors     fitted state of a ``requires_fit`` autoencoder (PCA) only

Members of one sample ``<key>``:

* ``.latent.npy`` -- the RAW (un-normalised) latent ``(C, t, h, w)``;
* ``.text.npy`` ``(L, D)``, ``.text_mask.npy`` ``(L,)`` bool, ``.pooled.npy`` ``(Dp,)``;
* ``.json`` -- metadata (source key and shard, clip frames/height/width, ...);
* ``.txt`` -- the caption.

Float arrays are stored as float32, float16 or bfloat16; numpy has no bfloat16, so bfloat16 is
stored as its raw bits in a ``uint16`` array and the manifest's ``latent_dtype``/``text_dtype``
says how to read it back. The round trip is bit-exact.

Reading never unpickles: ``.npy`` members go through ``np.load(allow_pickle=False)``, the
safetensors files through safetensors, and a sample with a pickle-capable member (``.pth``,
``.pt``, ...) or any member outside the list above is refused with one line naming the shard,
the key and the member, and counted as skipped (see :func:`src.data.pipeline.refuse_members`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from safetensors.torch import load_file, save_file
from torch import Tensor

from src.data.pipeline import BadSample, SampleDecoder, parse_meta, refuse_members
from src.data.shards import MANIFEST, drop_empty_shard, shard_files

log = logging.getLogger(__name__)

FORMAT = "pyramid-flow-latents"
FORMAT_VERSION = 1
NULL_TEXT = "null_text.safetensors"
AUTOENCODER_STATE = "autoencoder.safetensors"
SIDECARS = (NULL_TEXT, AUTOENCODER_STATE)
MEMBERS = ("latent.npy", "text.npy", "text_mask.npy", "pooled.npy", "json", "txt")
# stored dtype name -> (torch dtype, numpy dtype of the .npy array)
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype(np.float32)),
    "float16": (torch.float16, np.dtype(np.float16)),
    "bfloat16": (torch.bfloat16, np.dtype(np.uint16)),
}


def check_dtype(name: str) -> str:
    """Return ``name`` if it is a storable dtype, else raise a one-line ValueError."""
    if name not in DTYPES:
        raise ValueError(f"latent dtype {name!r} is not storable: choose one of {list(DTYPES)}")
    return name


def shape_key(shape: Iterable[int]) -> str:
    """``(16, 5, 8, 8)`` -> ``"16x5x8x8"`` (the manifest's per-shape count keys)."""
    return "x".join(str(int(n)) for n in shape)


# ------------------------------------------------------------------------------ arrays


def npy_bytes(x: Tensor | np.ndarray, dtype: str | None = None) -> bytes:
    """Serialise an array as ``.npy`` bytes; float tensors are cast to ``dtype`` first."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    x = x.detach().cpu()
    if dtype is not None:
        x = x.to(DTYPES[check_dtype(dtype)][0])
    x = x.contiguous()
    arr = x.view(torch.uint16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """``.npy`` bytes -> array; pickles and object arrays raise ValueError, never load."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise ValueError(f"expected one .npy array, got {type(arr).__name__}")
    return arr


def stored_tensor(arr: np.ndarray, dtype: str) -> Tensor:
    """A loaded array in the stored dtype ``dtype`` -> tensor of that dtype (same bits)."""
    torch_dtype, np_dtype = DTYPES[dtype]
    if arr.dtype != np_dtype:
        raise ValueError(f"stored as {arr.dtype}, the manifest says {dtype} ({np_dtype})")
    t = torch.from_numpy(np.array(arr, copy=True))
    return t.view(torch_dtype) if torch_dtype == torch.bfloat16 else t


# ------------------------------------------------------------------------------ writing


def write_latent_split(
    split_dir: str | os.PathLike,
    samples: Iterable[dict],
    header: dict,
    null_text: Mapping[str, Tensor],
    latent_dtype: str = "bfloat16",
    text_dtype: str | None = None,
    samples_per_shard: int = 250,
    name: str = "latents",
    skipped: Mapping[str, int] | None = None,
    autoencoder_state: Mapping[str, Tensor] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write one split of latent shards, its ``null_text`` and, last, its manifest.

    Args:
        split_dir: ``<root>/<split>``; written into a hidden ``.<split>.partial`` folder and
            moved into place when complete.
        samples: dicts ``{"key", "latent" (C, t, h, w), "tokens" (L, D), "mask" (L,),
            "pooled" (Dp,), "caption", "meta"}``.
        header: manifest fields describing the encoders; needs ``autoencoder`` (a
            ``describe()`` dict with ``latent_channels``) and ``text_encoder`` (with ``dim``,
            ``pooled_dim``, ``max_length``).
        null_text: ``{"tokens": (1, L, D), "mask": (1, L), "pooled": (1, Dp)}``.
        latent_dtype: storage dtype of the latents (see :data:`DTYPES`).
        text_dtype: storage dtype of the text features (default ``latent_dtype``).
        samples_per_shard: samples per tar.
        name: shard file prefix.
        skipped: reason -> count of inputs that produced no sample; read after ``samples`` is
            consumed, so a generator may keep filling it.
        autoencoder_state: fitted buffers of a ``requires_fit`` autoencoder.
        overwrite: replace an existing split.

    Returns:
        The manifest (also written to ``<split_dir>/manifest.json``).
    """
    latent_dtype = check_dtype(latent_dtype)
    text_dtype = check_dtype(text_dtype or latent_dtype)
    name = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    final = Path(split_dir)
    if shard_files(final) and not overwrite:
        raise FileExistsError(f"{final} already holds shards; delete it or pass overwrite=true")
    channels = int(header["autoencoder"]["latent_channels"])
    text = header["text_encoder"]
    text_shape = (int(text["max_length"]), int(text["dim"]))
    pooled_shape = (int(text["pooled_dim"]),)
    tmp = final.parent / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    pattern = str(tmp / f"{name}-{final.name}-%06d.tar")
    writer = wds.ShardWriter(
        pattern, maxcount=samples_per_shard, maxsize=float("inf"), verbose=0, encoder=False
    )
    shapes: Counter[str] = Counter()
    num = 0
    try:
        for s in samples:
            key = str(s["key"])
            if "." in key or not key:
                raise ValueError(f"sample key {key!r} must be non-empty and free of dots")
            latent, tokens = s["latent"], s["tokens"]
            if latent.ndim != 4 or latent.shape[0] != channels:
                raise ValueError(f"{key}: latent {tuple(latent.shape)} is not ({channels},t,h,w)")
            if tuple(tokens.shape) != text_shape or tuple(s["pooled"].shape) != pooled_shape:
                raise ValueError(
                    f"{key}: text {tuple(tokens.shape)} / pooled {tuple(s['pooled'].shape)} "
                    f"is not {text_shape} / {pooled_shape}"
                )
            writer.write(
                {
                    "__key__": key,
                    "latent.npy": npy_bytes(latent, latent_dtype),
                    "text.npy": npy_bytes(tokens, text_dtype),
                    "text_mask.npy": npy_bytes(s["mask"].bool()),
                    "pooled.npy": npy_bytes(s["pooled"], text_dtype),
                    "json": json.dumps(s["meta"], sort_keys=True).encode(),
                    "txt": s["caption"].encode("utf-8"),
                }
            )
            shapes[shape_key(latent.shape)] += 1
            num += 1
    finally:
        writer.close()
    if num == 0:
        drop_empty_shard(tmp)

    null = {k: null_text[k].detach().cpu().clone() for k in ("tokens", "mask", "pooled")}
    save_file(null, tmp / NULL_TEXT)
    if autoencoder_state is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in autoencoder_state.items()}
        save_file(state, tmp / AUTOENCODER_STATE)

    final.mkdir(parents=True, exist_ok=True)
    for path in [*shard_files(final), *(final / f for f in (MANIFEST, *SIDECARS))]:
        path.unlink(missing_ok=True)  # only reached with overwrite (or an empty folder)
    written = sorted(tmp.glob("*.tar"))
    for path in [*written, *(tmp / f for f in SIDECARS)]:
        if path.is_file():
            os.replace(path, final / path.name)
    tmp.rmdir()

    counts = [min(samples_per_shard, num - i * samples_per_shard) for i in range(len(written))]
    skipped = dict(skipped or {})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "split": final.name,
        "num_samples": num,
        "num_skipped": sum(skipped.values()),
        "skipped": skipped,
        "num_shards": len(written),
        "samples_per_shard": samples_per_shard,
        "shards": [{"file": p.name, "num_samples": c} for p, c in zip(written, counts)],
        "shapes": dict(sorted(shapes.items())),
        "latent_channels": channels,
        "latent_dtype": latent_dtype,
        "text_dtype": text_dtype,
        "members": list(MEMBERS),
        "null_text": NULL_TEXT,
        "autoencoder_state": AUTOENCODER_STATE if autoencoder_state is not None else None,
        **header,
    }
    part = final / f".{MANIFEST}.partial"
    part.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(part, final / MANIFEST)
    log.info("wrote %d latent samples in %d shards to %s", num, len(written), final)
    return manifest


# ------------------------------------------------------------------------------ reading


def read_latent_manifest(split_dir: str | os.PathLike) -> dict:
    """The manifest of a latent split; one-line errors name the path and the fix."""
    split_dir = Path(split_dir)
    fix = f"run `python src/extract.py out_dir={split_dir.parent}` to extract latent shards"
    if not shard_files(split_dir):
        raise FileNotFoundError(f"{split_dir} has no latent shards (*.tar): {fix}")
    path = split_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{split_dir} has shards but no {MANIFEST} (an interrupted extraction?): {fix} "
            "with overwrite=true"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a latent-shard manifest (format={manifest.get('format')!r}; video "
            f"shards need data=digits_video): {fix}"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version={manifest.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}: re-extract with `python src/extract.py`"
        )
    return manifest


def _required(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing (its manifest needs it): re-extract with `python src/extract.py "
            f"out_dir={path.parent.parent} overwrite=true`"
        )
    return path


def load_null_text(split_dir: str | os.PathLike) -> dict[str, Tensor]:
    """``{"tokens": (1, L, D), "mask": (1, L) bool, "pooled": (1, Dp)}`` of the empty prompt."""
    return load_file(_required(Path(split_dir) / NULL_TEXT))


def load_autoencoder_state(split_dir: str | os.PathLike, manifest: dict) -> dict | None:
    """Fitted autoencoder buffers stored with the split, or None when it needed no fit."""
    if not manifest.get("autoencoder_state"):
        return None
    return load_file(_required(Path(split_dir) / manifest["autoencoder_state"]))


class LatentDecoder(SampleDecoder):
    """Decode latent-shard samples into float32 tensors, skipping and counting bad ones.

    Args:
        manifest: the split's manifest (channels, dtypes and text dims to check against).
        train: unused by decoding (kept for the :class:`SampleDecoder` interface).
        seed: base seed of the per-epoch RNG.
    """

    regenerate_hint = "re-extract them with `python src/extract.py`"

    def __init__(
        self, manifest: dict, train: bool = False, seed: int = 0, max_bad_fraction: float = 0.25
    ):
        super().__init__(train, seed, max_bad_fraction)
        text = manifest["text_encoder"]
        self.latent_channels = int(manifest["latent_channels"])
        self.latent_dtype = manifest["latent_dtype"]
        self.text_dtype = manifest["text_dtype"]
        self.text_shape = (int(text["max_length"]), int(text["dim"]))
        self.pooled_shape = (int(text["pooled_dim"]),)

    def _array(self, sample: dict, member: str, dtype: str | None) -> Tensor:
        try:
            arr = load_npy(sample[member])
        except (ValueError, OSError, EOFError) as exn:
            raise BadSample("bad_array", f"{member}: {exn}") from exn
        if dtype is None:
            if arr.dtype != np.bool_:
                raise BadSample("bad_dtype", f"{member}: stored as {arr.dtype}, expected bool")
            return torch.from_numpy(np.array(arr, copy=True))
        try:
            return stored_tensor(arr, dtype).float()
        except ValueError as exn:
            raise BadSample("bad_dtype", f"{member}: {exn}") from exn

    def decode(self, sample: dict, rng=None) -> dict:
        """One raw sample -> ``{"latent", "text": {"tokens", "mask", "pooled"}, ...}``."""
        refuse_members(sample, MEMBERS)
        missing = [m for m in MEMBERS if m not in sample]
        if missing:
            raise BadSample("missing_member", f"no {', '.join('.' + m for m in missing)}")
        meta = parse_meta(sample)
        meta.update(key=sample.get("__key__"), url=sample.get("__url__"))
        latent = self._array(sample, "latent.npy", self.latent_dtype)  # (C, t, h, w)
        if latent.ndim != 4 or latent.shape[0] != self.latent_channels:
            raise BadSample(
                "bad_shape",
                f"latent {tuple(latent.shape)} is not ({self.latent_channels}, t, h, w)",
            )
        tokens = self._array(sample, "text.npy", self.text_dtype)  # (L, D)
        mask = self._array(sample, "text_mask.npy", None)  # (L,)
        pooled = self._array(sample, "pooled.npy", self.text_dtype)  # (Dp,)
        got = (tuple(tokens.shape), tuple(mask.shape), tuple(pooled.shape))
        want = (self.text_shape, self.text_shape[:1], self.pooled_shape)
        if got != want:
            raise BadSample("bad_shape", f"text/mask/pooled {got} != manifest {want}")
        caption = sample["txt"].decode("utf-8", "replace").strip()
        text = {"tokens": tokens, "mask": mask, "pooled": pooled}
        return {"latent": latent, "text": text, "caption": caption, "meta": meta}


def collate_latents(samples: list[dict]) -> dict:
    """Stack same-shape latent samples into the batch contract (see ``latent_datamodule``)."""
    shapes = {tuple(s["latent"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"a latent batch needs one shape, got {sorted(shapes)}")
    return {
        "latent": torch.stack([s["latent"] for s in samples]),  # (B, C, t, h, w)
        "text": {
            k: torch.stack([s["text"][k] for s in samples]) for k in ("tokens", "mask", "pooled")
        },
        "caption": [s["caption"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


class ShapeBuckets:
    """Pipeline stage: one buffer per latent shape, a batch emitted whenever one fills up.

    Samples of different shapes (resolution, frame count) never share a batch; incomplete
    buffers left when a finite stream ends are dropped (full batches only, as elsewhere).
    """

    def __init__(self, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        pending: dict[tuple[int, ...], list[dict]] = {}
        for sample in samples:
            shape = tuple(sample["latent"].shape)
            bucket = pending.setdefault(shape, [])
            bucket.append(sample)
            if len(bucket) == self.batch_size:
                del pending[shape]
                yield collate_latents(bucket)
