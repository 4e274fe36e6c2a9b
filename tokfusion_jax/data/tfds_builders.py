"""TFDS builders for the benchmark datasets: array_record files of PNG bytes, no TensorFlow.

Needs the `tfds` extra (`pip install tokfusion_jax[tfds]`: tensorflow-datasets, array_record).
TensorFlow is not needed: images are encoded by PIL here and handed to TFDS as PNG bytes, and
they are read back undecoded (`tfds.decode.SkipDecoding`) and decoded by
`tokfusion_jax.data.io`, like folder datasets.

    from tokfusion_jax.data import tfds_builders, pipeline
    tfds_builders.prepare("msrs", manual_dir="data/MSRS", data_dir="tfds_data")
    # or: python -m tokfusion_jax.data.tfds_builders --dataset=msrs --manual_dir=data/MSRS \\
    #         --data_dir=tfds_data
    source = tfds_builders.data_source("msrs", split="train", data_dir="tfds_data")
    ds = pipeline.make_pipeline(source, batch_size=8)

The manual directory is either one dataset folder in the preset's layout (one split, "train")
or a folder whose sub-folders are such dataset folders (one split each, named after the
sub-folder, e.g. MSRS's `train/` and `test/`, or the bundle's `test/` and `val/`). Each
example is {"name": text, "vis": PNG, "ir": PNG}; `vis` holds the visible or MRI image, `ir`
the infrared or CT/PET/SPECT one. PNG files whose channel count already matches are stored
byte for byte (so token-cache keys agree with the folder source); other files are losslessly
re-encoded as PNG, gray-stored-as-RGB files become 1-channel where the slot is gray, and
16-bit images are reduced to 8 bits (TFDS images are uint8).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from tokfusion_jax.data import io as imio
from tokfusion_jax.data import sources
from tokfusion_jax.errors import DataError

try:
    import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - the optional extra is missing
    raise ImportError(
        "tokfusion_jax.data.tfds_builders needs tensorflow-datasets and array_record: "
        "pip install 'tokfusion_jax[tfds]'"
    ) from e

# Channels stored per slot, by preset: (vis slot, ir slot).
CHANNELS = {
    "msrs": (3, 1),
    "roadscene": (3, 1),
    "tno": (3, 1),
    "m3fd": (3, 1),
    "harvard_ct": (1, 1),
    "harvard_pet": (1, 3),
    "harvard_spect": (1, 3),
}
BUILDER_NAMES = {preset: f"tokfusion_{preset}" for preset in CHANNELS}


def png_bytes(ref: imio.ImageRef, channels: int, label: str) -> bytes:
    """PNG bytes with `channels` channels (1 or 3); PNG files already in that form pass as is."""
    data = imio.read_bytes(ref, label)
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
    except (OSError, SyntaxError, ValueError, EOFError):  # reported by the decoder below
        fmt, mode = None, None
    if fmt == "PNG" and mode == ("L" if channels == 1 else "RGB"):
        return data
    image = imio.decode_image(data, label)  # float [0, 1], (H, W) or (H, W, 3)
    if channels == 1 and image.ndim == 3:
        image = imio.to_luma(image)  # exact for gray stored as RGB
    elif channels == 3 and image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    u8 = np.round(image * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG")
    return buf.getvalue()


def _split_name(folder: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", folder)


def discover_splits(preset: str, manual_dir: str) -> dict[str, sources.PairedSource]:
    """Split name -> source: the manual dir itself ("train") or each of its sub-folders."""
    try:
        return {"train": sources.from_preset(preset, manual_dir)}
    except DataError as direct:
        if not os.path.isdir(manual_dir):
            raise
        splits = {}
        for entry in sorted(os.listdir(manual_dir)):
            path = os.path.join(manual_dir, entry)
            if os.path.isdir(path) and not entry.startswith("."):
                try:
                    splits[_split_name(entry)] = sources.from_preset(preset, path)
                except DataError:
                    continue
        if not splits:
            raise DataError(
                f"{manual_dir}: no {preset} dataset folder in it or below it ({direct})"
            ) from None
        return splits


class PairedImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared logic of the builders; subclasses set PRESET."""

    PRESET = ""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Paired images as PNG bytes (vis/MRI slot and ir/functional slot)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Place the dataset as it ships (see tokfusion_jax.data.sources.PRESET_LAYOUTS) in the
    manual directory: either one folder with both modality folders, or one sub-folder per split.
    """

    # TFDS locates a builder's code through `importlib_resources`, a package its dependencies
    # do not always install; this module's own path is what that lookup would find.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> Any:
        from etils import epath

        return epath.Path(__file__)

    def _info(self) -> Any:
        vis_c, ir_c = CHANNELS[self.PRESET]
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Aligned image pairs of the {self.PRESET} layout for image fusion.",
            features=tfds.features.FeaturesDict(
                {
                    "name": tfds.features.Text(),
                    "vis": tfds.features.Image(shape=(None, None, vis_c), encoding_format="png"),
                    "ir": tfds.features.Image(shape=(None, None, ir_c), encoding_format="png"),
                }
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        splits = discover_splits(self.PRESET, os.fspath(dl_manager.manual_dir))
        return {name: self._generate_examples(src) for name, src in splits.items()}

    def _generate_examples(self, source: sources.PairedSource) -> Iterator[tuple[str, dict]]:
        vis_c, ir_c = CHANNELS[self.PRESET]
        for rec in source:
            yield (
                rec["name"],
                {
                    "name": rec["name"],
                    "vis": io.BytesIO(png_bytes(rec["vis"], vis_c, str(rec["vis"]))),
                    "ir": io.BytesIO(png_bytes(rec["ir"], ir_c, str(rec["ir"]))),
                },
            )


def _builder_class(preset: str) -> type:
    return type(
        "Tokfusion" + "".join(p.capitalize() for p in preset.split("_")),
        (PairedImageBuilder,),
        {"PRESET": preset, "name": BUILDER_NAMES[preset], "__module__": __name__},
    )


BUILDERS: dict[str, type] = {preset: _builder_class(preset) for preset in CHANNELS}


class TfdsPairSource:
    """A TFDS array_record split as a pipeline source: records {"name", "vis", "ir": bytes}."""

    def __init__(self, data_source: Any, name: str, modalities: tuple[str, str]) -> None:
        self._ds = data_source
        self.name = name
        self.modalities = modalities

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self._ds[index]
        name = ex["name"]
        return {
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "vis": bytes(ex["vis"]),
            "ir": bytes(ex["ir"]),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


def _check_preset(preset: str) -> None:
    if preset not in BUILDERS:
        raise DataError(f"no TFDS builder for {preset!r}; expected one of {', '.join(BUILDERS)}")


def prepare(preset: str, manual_dir: str, data_dir: str) -> Any:
    """Builds the preset's TFDS dataset from `manual_dir` into `data_dir` (array_record)."""
    _check_preset(preset)
    if not os.path.isdir(manual_dir):
        raise DataError(f"{manual_dir}: manual directory not found")
    discover_splits(preset, os.fspath(manual_dir))  # a one-line DataError before TFDS starts
    builder = BUILDERS[preset](data_dir=os.fspath(data_dir), file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    builder.download_and_prepare(download_config=config)
    return builder


def data_source(preset: str, split: str, data_dir: str) -> TfdsPairSource:
    """A prepared split as a random-access source for `pipeline.make_pipeline`."""
    _check_preset(preset)
    skip = tfds.decode.SkipDecoding()
    ds = tfds.data_source(
        BUILDER_NAMES[preset],
        split=split,
        data_dir=os.fspath(data_dir),
        decoders={"vis": skip, "ir": skip},
    )
    medical = preset.startswith("harvard_")
    mods = ("mri", preset.split("_", 1)[1]) if medical else ("vis", "ir")
    return TfdsPairSource(ds, f"tfds:{BUILDER_NAMES[preset]}/{split}", mods)


class TfdsImageSource:
    """A TFDS split of single images as a source: records {"name", "image": bytes, "domain"}.

    Reads ``image_key`` undecoded; names are ``<split>:<index>`` (or the dataset's ``file_name``
    feature when it has one).
    """

    def __init__(self, data_source: Any, name: str, image_key: str = "image") -> None:
        self._ds = data_source
        self.name = name
        self.image_key = image_key

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self._ds[index]
        label = ex.get("file_name", f"{self.name}:{index}")
        label = label.decode() if isinstance(label, bytes) else str(label)
        return {"name": label, "image": bytes(ex[self.image_key]), "domain": "image"}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


def image_source(name: str, split: str, data_dir: str, image_key: str = "image") -> Any:
    """Single images of a prepared TFDS split, for tokenizer training.

    ``name`` is a preset of this module (``msrs``, ...) or its builder name (``tokfusion_msrs``):
    both images of every pair; or any TFDS dataset with an ``image_key`` image feature (e.g.
    ``imagenet2012``), read undecoded.
    """
    preset = name.removeprefix("tokfusion_")
    if preset in BUILDERS:
        return sources.PairImages(data_source(preset, split, data_dir))
    try:
        ds = tfds.data_source(
            name,
            split=split,
            data_dir=os.fspath(data_dir) if data_dir else None,
            decoders={image_key: tfds.decode.SkipDecoding()},
        )
    except Exception as e:  # TFDS raises many types for a missing or unprepared dataset
        msg = " ".join(str(e).split())[:200]
        raise DataError(f"tfds={name}/{split} (data_dir {data_dir or 'default'}): {msg}") from None
    return TfdsImageSource(ds, f"tfds:{name}/{split}", image_key)


def main(argv: list[str] | None = None) -> None:
    """python -m tokfusion_jax.data.tfds_builders --dataset=msrs --manual_dir=D --data_dir=OUT"""
    from tokfusion_jax.errors import ArgumentParser

    parser = ArgumentParser(
        prog="python -m tokfusion_jax.data.tfds_builders",
        description="Build a TFDS array_record dataset.",
    )
    parser.add_argument("--dataset", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--manual_dir", required=True, help="the dataset as it ships")
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write")
    args = parser.parse_args(argv)
    builder = prepare(args.dataset, args.manual_dir, args.data_dir)
    for split, info in builder.info.splits.items():
        print(f"{BUILDER_NAMES[args.dataset]}/{split}: {info.num_examples} pairs")
    print(f"written to {builder.data_dir}")


if __name__ == "__main__":
    from tokfusion_jax.errors import cli_main

    cli_main(main)()
