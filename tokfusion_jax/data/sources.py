"""Paired-image sources: two modality folders paired by file stem, presets for the official
dataset layouts, and TSV manifests.

Every source is a random-access sequence of records

    {"name": str, "vis": path | bytes, "ir": path | bytes}

where the `vis` slot holds the visible image (or MRI for medical pairs) and the `ir` slot the
infrared image (or the functional CT / PET / SPECT image). Records hold references, not
pixels: the pipeline decodes them (`tokfusion_jax.data.io`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from tokfusion_jax.data import io as imio
from tokfusion_jax.errors import DataError

# Layouts per preset, tried in order: (vis-slot folder, ir-slot folder). Folder names match
# case-insensitively. Each preset also accepts the bundle layout of its own dataset. Layouts
# that cannot be paired by file stem (the original TNO release's per-scene folders, flat
# folders of IR*/VIS* files) are read through a manifest (preset "manifest").
IVIF_BUNDLE = (("vis", "ir"), ("vi", "ir"))
PRESET_LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "msrs": (("vi", "ir"), ("vis", "ir")),
    "roadscene": (("crop_LR_visible", "cropinfrared"), *IVIF_BUNDLE),
    "tno": (*IVIF_BUNDLE, ("visible", "infrared"), ("Test_vi", "Test_ir")),  # last: FusionGAN
    "m3fd": (("Vis", "Ir"), *IVIF_BUNDLE),
    "harvard_ct": (("MRI", "CT"),),
    "harvard_pet": (("MRI", "PET"),),
    "harvard_spect": (("MRI", "SPECT"),),
    "bundle": (*IVIF_BUNDLE, ("mri", "ct"), ("mri", "pet"), ("mri", "spect")),
}
PRESETS = (*PRESET_LAYOUTS, "manifest", "samples")
# The pairs packaged with tokfusion_jax (see assets/samples/ATTRIBUTION.md).
SAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "samples")
SAMPLE_SETS = ("ivif", "mri_pet")
MEDICAL_FOLDERS = ("ct", "pet", "spect")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One aligned pair: `vis` is the visible/MRI image, `ir` the infrared/functional one."""

    name: str
    vis: imio.ImageRef
    ir: imio.ImageRef

    def as_record(self) -> dict[str, Any]:
        return {"name": self.name, "vis": self.vis, "ir": self.ir}


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort key that orders embedded numbers numerically ("2" before "10")."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _short_list(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class PairedSource(Sequence[dict[str, Any]]):
    """Pairs the images of two modality folders of `root` by file stem.

    Args:
      root: the folder holding both modality folders.
      mod_a: folder of the `vis` slot (visible, or MRI), matched case-insensitively.
      mod_b: folder of the `ir` slot (infrared, or CT / PET / SPECT).
      allow_unpaired: skip files present in only one folder (with a warning) instead of
        raising `DataError`.
      modalities: names of the two modalities, e.g. ("mri", "pet"); defaults to the folder
        names in lower case.
      name: a label for messages, e.g. the preset.

    `PNG`, `JPEG`, `BMP` and `TIFF` files may be mixed; hidden and text files are ignored; any
    other file is an unsupported format.
    """

    def __init__(
        self,
        root: imio.PathLike,
        mod_a: str,
        mod_b: str,
        *,
        allow_unpaired: bool = False,
        modalities: tuple[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DataError(f"{self.root}: dataset folder not found")
        dir_a = _find_dir(self.root, mod_a)
        dir_b = _find_dir(self.root, mod_b)
        missing = [m for m, d in ((mod_a, dir_a), (mod_b, dir_b)) if d is None]
        if missing:
            raise DataError(
                f"{self.root}: modality folder {' and '.join(f'{m}/' for m in missing)} missing"
            )
        assert dir_a is not None and dir_b is not None
        self.dirs = (dir_a, dir_b)
        self.modalities = modalities or (mod_a.lower(), mod_b.lower())
        self.name = name or os.path.basename(os.path.normpath(self.root))
        files_a, files_b = list_images(dir_a), list_images(dir_b)
        only_a = sorted(set(files_a) - set(files_b), key=natural_key)
        only_b = sorted(set(files_b) - set(files_a), key=natural_key)
        unpaired = [os.path.join(dir_a, files_a[s]) for s in only_a] + [
            os.path.join(dir_b, files_b[s]) for s in only_b
        ]
        if unpaired:
            message = f"{len(unpaired)} unpaired file(s) in {self.root}: {_short_list(unpaired)}"
            if not allow_unpaired:
                raise DataError(message + " (set allow_unpaired to skip them)")
            warnings.warn("skipping " + message, stacklevel=2)
        stems = sorted(set(files_a) & set(files_b), key=natural_key)
        pairs = [
            Pair(s, os.path.join(dir_a, files_a[s]), os.path.join(dir_b, files_b[s])) for s in stems
        ]
        self._set_pairs(pairs, f"{self.root} ({dir_a}, {dir_b})")

    def _set_pairs(self, pairs: list[Pair], where: str) -> None:
        if not pairs:
            raise DataError(f"{where}: empty dataset, no image pairs found")
        self.pairs = pairs

    @property
    def color_from(self) -> str:
        """The slot whose image carries colour: "vis" (IVIF) or "ir" (PET/SPECT)."""
        return "ir" if self.modalities[0] == "mri" else "vis"

    @property
    def is_medical(self) -> bool:
        return self.modalities[0] == "mri"

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return self.pairs[index].as_record()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (p.as_record() for p in self.pairs)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, {len(self)} pairs, "
            f"{self.modalities[0]}+{self.modalities[1]})"
        )

    def check(self, min_size: int = 0) -> list[tuple[int, int]]:
        """Reads every header: sizes must agree within a pair and be at least `min_size`.

        Returns the (height, width) of each pair; raises `DataError` naming the file(s).
        """
        sizes = []
        for p in self.pairs:
            sizes.append(
                check_pair_sizes(
                    p.vis, p.ir, imio.image_size(p.vis), imio.image_size(p.ir), min_size
                )
            )
        return sizes


def check_pair_sizes(
    vis: imio.ImageRef,
    ir: imio.ImageRef,
    vis_hw: tuple[int, int],
    ir_hw: tuple[int, int],
    min_size: int,
    name: str | None = None,
) -> tuple[int, int]:
    """Raises `DataError` when a pair's sizes differ or fall below `min_size`."""
    if vis_hw != ir_hw:
        raise DataError(
            f"pair sizes differ: {imio.describe(vis, name and name + ' (vis)')} is "
            f"{vis_hw[1]}x{vis_hw[0]}, {imio.describe(ir, name and name + ' (ir)')} is "
            f"{ir_hw[1]}x{ir_hw[0]} (width x height)"
        )
    imio.check_image_size(vis_hw, imio.describe(vis, name), min_size)
    return vis_hw


class ManifestSource(PairedSource):
    """Pairs listed in a TSV file: `name<TAB>path_a<TAB>path_b` per line.

    `path_a` is the vis slot (visible / MRI), `path_b` the ir slot (infrared / functional).
    Relative paths are relative to the manifest's folder. Blank lines and lines starting
    with `#` are skipped. An optional header row starting with `name` may instead name the
    columns by modality (e.g. `name<TAB>ir<TAB>vis`), which fixes the slots by name.
    """

    def __init__(self, path: imio.PathLike, *, allow_unpaired: bool = False) -> None:
        self.root = os.fspath(path)
        if not os.path.isfile(self.root):
            raise DataError(f"{self.root}: manifest file not found")
        base = os.path.dirname(os.path.abspath(self.root))
        with open(self.root, encoding="utf-8") as f:
            lines = [(i + 1, ln.rstrip("\r\n")) for i, ln in enumerate(f)]
        rows = [(i, ln.split("\t")) for i, ln in lines if ln.strip() and not ln.startswith("#")]
        order, self.modalities = (1, 2), ("vis", "ir")
        if rows and rows[0][1][0].strip().lower() == "name":
            order, self.modalities = _manifest_header(self.root, rows[0][0], rows[0][1])
            rows = rows[1:]
        self.name = os.path.basename(self.root)
        self.dirs = (base, base)
        pairs, missing, seen = [], [], set()
        for lineno, cols in rows:
            if len(cols) != 3:
                raise DataError(
                    f"{self.root}:{lineno}: expected 3 tab-separated columns "
                    f"(name, path_a, path_b), got {len(cols)}"
                )
            name = cols[0].strip()
            if name in seen:
                raise DataError(f"{self.root}:{lineno}: duplicate pair name {name!r}")
            seen.add(name)
            va, vb = (os.path.join(base, cols[k].strip()) for k in order)
            absent = [p for p in (va, vb) if not os.path.isfile(p)]
            if absent:
                missing.extend(absent)
                continue
            pairs.append(Pair(name, va, vb))
        if missing:
            message = f"{self.root}: {len(missing)} listed file(s) missing: {_short_list(missing)}"
            if not allow_unpaired:
                raise DataError(message + " (set allow_unpaired to skip those pairs)")
            warnings.warn("skipping pairs: " + message, stacklevel=2)
        self._set_pairs(pairs, self.root)


_VIS_SLOT_NAMES = ("vis", "vi", "visible", "mri", "path_a")
_IR_SLOT_NAMES = ("ir", "infrared", "ct", "pet", "spect", "path_b")


def _manifest_header(
    path: str, lineno: int, cols: list[str]
) -> tuple[tuple[int, int], tuple[str, str]]:
    """Column order (vis, ir) and modality names from a manifest header row."""
    names = [c.strip().lower() for c in cols]
    if len(names) != 3:
        raise DataError(f"{path}:{lineno}: header must have 3 columns (name, path_a, path_b)")
    vis = [k for k in (1, 2) if names[k] in _VIS_SLOT_NAMES]
    ir = [k for k in (1, 2) if names[k] in _IR_SLOT_NAMES]
    if len(vis) != 1 or len(ir) != 1:
        raise DataError(
            f"{path}:{lineno}: header columns {names[1]!r}, {names[2]!r} must name one visible/MRI "
            f"column ({'|'.join(_VIS_SLOT_NAMES)}) and one infrared/functional column "
            f"({'|'.join(_IR_SLOT_NAMES)})"
        )
    mods = (names[vis[0]], names[ir[0]])
    mods = ("vis", "ir") if mods == ("path_a", "path_b") else mods
    return (vis[0], ir[0]), mods


def _find_dir(root: str, name: str) -> str | None:
    """`root/name`, matching the folder name case-insensitively; None if absent."""
    exact = os.path.join(root, name)
    if os.path.isdir(exact):
        return exact
    for entry in sorted(os.listdir(root)):
        if entry.lower() == name.lower() and os.path.isdir(os.path.join(root, entry)):
            return os.path.join(root, entry)
    return None


def list_images(folder: str) -> dict[str, str]:
    """Stem -> file name for the images of one folder (not recursive)."""
    by_stem: dict[str, str] = {}
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if os.path.isdir(path) or imio.is_ignored_file(entry):
            continue
        if not imio.is_image_file(entry):
            raise DataError(
                f"{path}: unsupported image format {os.path.splitext(entry)[1] or '(none)'!r}; "
                f"supported: {', '.join(imio.SUPPORTED_EXTENSIONS)}"
            )
        stem = os.path.splitext(entry)[0]
        if stem in by_stem:
            raise DataError(
                f"{folder}: two files share the stem {stem!r} ({by_stem[stem]}, {entry}); "
                "pairing by stem needs one file per name"
            )
        by_stem[stem] = entry
    return by_stem


def _modalities_for(vis_dir: str, ir_dir: str) -> tuple[str, str]:
    a, b = vis_dir.lower(), ir_dir.lower()
    if a == "mri":
        return "mri", b
    return "vis", "ir"


def from_preset(name: str, root: imio.PathLike, allow_unpaired: bool = False) -> PairedSource:
    """A source for a named dataset layout (see `PRESETS`) rooted at `root`.

    `manifest` takes the TSV file as `root`; `samples` takes "" (the packaged infrared-visible
    pairs) or the name of a packaged set (`SAMPLE_SETS`). The other presets try their official
    layout and then the bundle layout (`ir/` + `vis/`, or `mri/` + `ct|pet|spect/`).
    """
    root = os.fspath(root)
    if name == "manifest":
        return ManifestSource(root, allow_unpaired=allow_unpaired)
    if name == "samples":
        if root and root not in SAMPLE_SETS:
            raise DataError(
                f"samples preset: root must be empty or one of {', '.join(SAMPLE_SETS)}, "
                f"got {root!r}"
            )
        return from_preset("bundle", os.path.join(SAMPLES_DIR, root or "ivif"))
    if name not in PRESET_LAYOUTS:
        raise DataError(f"unknown dataset preset {name!r}; expected one of {', '.join(PRESETS)}")
    if not os.path.isdir(root):
        raise DataError(f"{root}: dataset folder not found (preset {name})")
    layouts = PRESET_LAYOUTS[name]
    found = [(a, b) for a, b in layouts if _find_dir(root, a) and _find_dir(root, b)]
    if name == "bundle":
        medical = [lay for lay in found if lay[0] == "mri"]
        if len(medical) > 1:
            raise DataError(
                f"{root}: ambiguous bundle, mri/ sits beside several functional folders "
                f"({', '.join(b + '/' for _, b in medical)}); use harvard_ct|pet|spect"
            )
    if not found:
        partial = sorted({d + "/" for lay in layouts for d in lay if _find_dir(root, d)})
        expected = " or ".join(f"{a}/+{b}/" for a, b in layouts)
        detail = (
            f"has only {', '.join(partial)}, a modality folder is missing"
            if partial
            else "has none of the modality folders"
        )
        raise DataError(f"{root}: not a {name} dataset folder, expected {expected}; it {detail}")
    vis_dir, ir_dir = found[0]
    return PairedSource(
        root,
        vis_dir,
        ir_dir,
        allow_unpaired=allow_unpaired,
        modalities=_modalities_for(vis_dir, ir_dir),
        name=f"{name}:{os.path.basename(os.path.normpath(root))}",
    )


# --------------------------------------------------------------------------------------------
# Single-image sources (tokenizer training): records {"name": str, "image": path | bytes}
# --------------------------------------------------------------------------------------------


class ImageSource(Sequence[dict[str, Any]]):
    """A random-access sequence of single images: records {"name", "image", "domain"}.

    ``domain`` is "visible", "infrared", "medical" or "image" (a plain folder).
    """

    name: str = "images"

    def __init__(self, items: Sequence[tuple[str, imio.ImageRef, str]], name: str) -> None:
        if not items:
            raise DataError(f"{name}: empty dataset, no images found")
        self.items = list(items)
        self.name = name

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        name, ref, domain = self.items[index]
        return {"name": name, "image": ref, "domain": domain}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images)"


def pair_domains(source: Any) -> tuple[str, str]:
    """(domain of the vis slot, domain of the ir slot) of a paired source.

    Medical pairs (MRI + CT / PET / SPECT) are "medical" on both sides, others "visible" and
    "infrared".
    """
    modalities = getattr(source, "modalities", ("vis", "ir"))
    return ("medical", "medical") if modalities[0] == "mri" else ("visible", "infrared")


class PairImages(ImageSource):
    """Both images of every pair of a paired source, one record each (vis slot first).

    Names are ``<pair>:vis`` and ``<pair>:ir``. Works on any source of {"name", "vis", "ir"}
    records (folders, manifests, TFDS splits); records are read lazily.
    """

    def __init__(self, source: Sequence[dict[str, Any]]) -> None:
        self.source = source
        self.name = str(getattr(source, "name", "pairs"))
        self.domains = pair_domains(source)
        if len(source) == 0:
            raise DataError(f"{self.name}: empty dataset, no image pairs found")

    def __len__(self) -> int:
        return 2 * len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        pair, slot = divmod(int(index), 2)
        rec = self.source[pair]
        key = ("vis", "ir")[slot]
        return {"name": f"{rec['name']}:{key}", "image": rec[key], "domain": self.domains[slot]}


class ImageFolderSource(ImageSource):
    """Every image of one folder (not recursive), in natural name order; domain "image"."""

    def __init__(self, root: imio.PathLike, domain: str = "image") -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"{root}: image folder not found")
        files = list_images(root)
        stems = sorted(files, key=natural_key)
        items = [(s, os.path.join(root, files[s]), domain) for s in stems]
        super().__init__(items, f"folder:{os.path.basename(os.path.normpath(root))}")


class ConcatSource(Sequence[dict[str, Any]]):
    """Several sources one after another (random access by global index)."""

    def __init__(self, parts: Sequence[Sequence[dict[str, Any]]]) -> None:
        if not parts:
            raise DataError("no image sources given")
        self.parts = list(parts)
        self.offsets = [0]
        for p in self.parts:
            self.offsets.append(self.offsets[-1] + len(p))
        self.name = "+".join(str(getattr(p, "name", "?")) for p in self.parts)

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = next(i for i in range(len(self.parts)) if index < self.offsets[i + 1])
        return self.parts[part][index - self.offsets[part]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"ConcatSource({self.name!r}, {len(self)} records)"


FOLDER = "folder"  # image-source spec preset: one folder of single images


def image_source(spec: str, *, allow_unpaired: bool = False, tfds_data_dir: str = "") -> Any:
    """Single images from one spec ``PRESET=ROOT``.

    * ``folder=DIR``: every image of DIR;
    * a paired preset (``msrs=DIR``, ``harvard_ct=DIR``, ``bundle=DIR``, ``manifest=FILE``,
      ``samples=`` ...): both images of every pair;
    * ``tfds=NAME/SPLIT``: a prepared TFDS split in ``tfds_data_dir`` (one of this package's
      paired builders, or any dataset with an ``image`` feature, e.g. ``imagenet2012/train``).
    """
    preset, sep, root = spec.partition("=")
    preset, root = preset.strip(), root.strip()
    if not sep or not preset:
        raise DataError(f"image source {spec!r}: expected PRESET=ROOT (e.g. msrs=data/msrs/train)")
    if preset == FOLDER:
        return ImageFolderSource(os.path.expanduser(root))
    if preset == "tfds":
        from tokfusion_jax.data import tfds_builders

        name, _, split = root.partition("/")
        return tfds_builders.image_source(name, split or "train", tfds_data_dir)
    root = os.path.expanduser(root) if root else root
    return PairImages(from_preset(preset, root, allow_unpaired))


def image_sources(
    specs: str | Sequence[str], *, allow_unpaired: bool = False, tfds_data_dir: str = ""
) -> Any:
    """The images of comma-separated (or listed) specs, concatenated (see `image_source`)."""
    if isinstance(specs, str):
        specs = [specs]
    items = [s.strip() for spec in specs for s in spec.split(",") if s.strip()]
    if not items:
        raise DataError("no image sources given (expected PRESET=ROOT[,PRESET=ROOT...])")
    parts = [
        image_source(s, allow_unpaired=allow_unpaired, tfds_data_dir=tfds_data_dir) for s in items
    ]
    return parts[0] if len(parts) == 1 else ConcatSource(parts)
