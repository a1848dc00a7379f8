"""The manifest: what a bundle holds and how to run, check and watch its model.

`manifest.json` at the root of every bundle is one `Manifest`. Unknown fields are refused
(`extra="forbid"`) so that a typo cannot silently drop a safety setting; the schema evolves
through `manifest_version`. Tensors in health samples are nested JSON lists.

Numbers are strict: `"size": "10"`, `true` or `10.0` where a whole number is required is
refused, not converted. A converted value would also make two different manifests one
canonical form (the signatures cover the parsed manifest), so a string could stand in
for a signed number unnoticed.

File names are unique as a case-insensitive, normalising filesystem sees them (vfat on
an SD card, exFAT, APFS): `model.onnx` and `Model.onnx`, or a name with an accented
letter composed and the same name with it decomposed, unpack as two files on ext4 and
as one there.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    Strict,
    StringConstraints,
    field_validator,
    model_validator,
)

__all__ = [
    "DType",
    "FileEntry",
    "Health",
    "HealthSample",
    "Histogram",
    "LabelSchema",
    "Manifest",
    "ModelFormat",
    "Provenance",
    "Reference",
    "Requires",
    "TensorSpec",
    "check_bundle_path",
]

# semver.org 2.0.0, the official regular expression.
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
RESERVED_PATHS = ("manifest.json", "signatures/")
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 1024

Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
# bool is an int subclass, and lax mode takes "10" and 10.0 for 10: a whole number here is
# a JSON integer and nothing else. A number is a JSON integer or fraction, never a string.
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict()]


class ModelFormat(StrEnum):
    """The serialisation of the model file; decides which runtime can load it."""

    ONNX = "onnx"
    TFLITE = "tflite"


class DType(StrEnum):
    """Element types a tensor may have (ONNX names, lower case)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    FLOAT64 = "float64"
    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    BOOL = "bool"
    STRING = "string"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_bundle_path(path: str) -> str:
    """Check that a path inside a bundle is relative, normalised and not reserved.

    Args:
        path: A POSIX path as it appears in a zip entry or in `files`.

    Returns:
        The path unchanged.

    Raises:
        ValueError: for absolute paths, ``..``, ``.``, empty parts, backslashes, drive
            letters, control characters, names too long to unpack, or the reserved names.
    """
    if not path or path.startswith("/") or "\\" in path or re.match(r"^[A-Za-z]:", path):
        raise ValueError(f"path {path!r} must be relative and use '/'")
    if any(ord(c) < 0x20 for c in path):
        raise ValueError(f"path {path!r} holds a control character")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"path {path!r} must not hold empty, '.' or '..' parts")
    # What every filesystem a device may unpack onto can name (NAME_MAX, well under
    # PATH_MAX with the slot directory in front): longer passes the signature checks and
    # then fails halfway through unpacking, with an error about the disk.
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES or any(
        len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in path.split("/")
    ):
        raise ValueError(
            f"path {path[:60]!r}... is too long (at most {MAX_NAME_BYTES} bytes a name, "
            f"{MAX_PATH_BYTES} in all)"
        )
    if path == RESERVED_PATHS[0] or path.startswith(RESERVED_PATHS[1]):
        raise ValueError(f"path {path!r} is reserved")
    return path


def _folded(path: str) -> str:
    """A path as a case-insensitive, normalising filesystem compares it (vfat, APFS)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", path).casefold())


_FOLDED_MANIFEST = _folded(RESERVED_PATHS[0])
_FOLDED_SIGNATURES = _folded(RESERVED_PATHS[1])


def _check_folded(files: Iterable[str], folders: Iterable[str]) -> None:
    """Refuse two paths one file or folder on a case-insensitive, normalising filesystem.

    Raises:
        ValueError: naming both paths (or the path and the reserved name it meets).
    """
    seen = {_FOLDED_MANIFEST: RESERVED_PATHS[0]}
    for path in sorted(files):
        key = _folded(path)
        if (key + "/").startswith(_FOLDED_SIGNATURES):
            raise ValueError(
                f"path {path!r} and the reserved {RESERVED_PATHS[1]!r} differ only by case or "
                "Unicode normalisation: one name on a case-insensitive filesystem (vfat, APFS)"
            )
        other = seen.setdefault(key, path)
        if other != path:
            raise ValueError(
                f"paths {other!r} and {path!r} differ only by case or Unicode normalisation: "
                "one file on a case-insensitive filesystem (vfat, APFS)"
            )
    for folder in sorted(folders):
        met = seen.get(_folded(folder))
        if met is not None:
            raise ValueError(
                f"path {met!r} and folder {folder!r} differ only by case or Unicode "
                "normalisation: one name on a case-insensitive filesystem (vfat, APFS)"
            )


class FileEntry(_Strict):
    """One file of the bundle, as pack measured it."""

    sha256: Sha256 = Field(description="Lowercase hex sha256 of the file's bytes.")
    size: Int = Field(ge=0, description="Size in bytes; unpacking stops beyond it.")


class TensorSpec(_Strict):
    """A model input or output tensor."""

    name: str = Field(min_length=1, description="Tensor name in the model graph.")
    dtype: DType = Field(description="Element type.")
    shape: list[Int | Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = (
        Field(description='Dimensions: sizes, or a symbolic name such as "N" for the batch.')
    )

    @field_validator("shape")
    @classmethod
    def _sizes_non_negative(cls, shape: list[int | str]) -> list[int | str]:
        if any(isinstance(d, int) and d < 0 for d in shape):
            raise ValueError("dimension sizes must be >= 0; use a name for a free dimension")
        return shape


class LabelSchema(_Strict):
    """Which label space the outputs use; models sharing it are interchangeable."""

    id: str = Field(min_length=1, description='Label space id, e.g. "digits".')
    version: Int = Field(ge=1, description="Bumped when the label list changes meaning.")


class Requires(_Strict):
    """What a device needs to run the model."""

    runtime: str = Field(min_length=1, description='Inference runtime, e.g. "onnxruntime".')
    min_opset: Int | None = Field(default=None, ge=1, description="Minimum ONNX opset.")
    memory_mb: Int | None = Field(default=None, ge=0, description="Working memory needed.")
    accelerators: list[str] = Field(
        default_factory=list,
        description='Accelerators the model needs (e.g. "cuda"); empty means CPU is enough.',
    )


class HealthSample(_Strict):
    """One known input with its expected outputs."""

    input: dict[str, JsonValue] = Field(description="Input tensor name -> nested list.")
    expected: dict[str, JsonValue] = Field(description="Output tensor name -> nested list.")


class Health(_Strict):
    """The install gate: the model must reproduce these outputs in time."""

    samples: list[HealthSample] = Field(default_factory=list)
    tolerance: Number = Field(default=1e-4, ge=0, description="Max absolute difference.")
    max_latency_ms: Number | None = Field(
        default=None, gt=0, description="Max latency of one health sample run."
    )


class Histogram(_Strict):
    """Bin edges and the relative frequency of each bin (frequencies sum to about 1)."""

    name: str | None = Field(default=None, description="Feature name, when it has one.")
    bin_edges: list[Number] = Field(min_length=2, description="Increasing edges, n+1 values.")
    frequencies: list[Number] = Field(description="n relative frequencies, each >= 0.")

    @model_validator(mode="after")
    def _consistent(self) -> Histogram:
        if len(self.frequencies) != len(self.bin_edges) - 1:
            raise ValueError("frequencies must have one value fewer than bin_edges")
        if any(b <= a for a, b in zip(self.bin_edges, self.bin_edges[1:], strict=False)):
            raise ValueError("bin_edges must be strictly increasing")
        if any(f < 0 for f in self.frequencies):
            raise ValueError("frequencies must be >= 0")
        return self


class Reference(_Strict):
    """Statistics of the training data: the baseline drift is measured against."""

    input: str | None = Field(default=None, description="Input tensor the features belong to.")
    features: list[Histogram] = Field(
        default_factory=list, description="One histogram per input feature, in feature order."
    )
    class_prior: list[Number] = Field(
        default_factory=list, description="Training frequency of each label, in label order."
    )
    confidence: Histogram | None = Field(
        default=None, description="Histogram of the top-1 probability on the training data."
    )


class Provenance(_Strict):
    """Where the model came from."""

    dataset_sha256: Sha256 | None = Field(default=None, description="Digest of the data set.")
    training_code: str | None = Field(
        default=None, description="Reference to the training code (module, commit, URL)."
    )
    metrics: dict[str, Number] = Field(
        default_factory=dict, description='Evaluation results, e.g. {"accuracy": 0.97}.'
    )
    created_at: AwareDatetime | None = Field(default=None, description="When it was built.")
    creator: str | None = Field(default=None, description="Who or what built it.")


class Manifest(_Strict):
    """The contents of `manifest.json`."""

    manifest_version: Literal[1] = Field(default=1, description="Schema version of this file.")
    name: str = Field(pattern=NAME_PATTERN, description="Model name, lower case.")
    version: str = Field(
        description="Semantic version (semver.org 2.0.0), monotonic per name.",
        json_schema_extra={"pattern": SEMVER_RE.pattern},
    )
    format: ModelFormat = Field(description="Model file format.")
    model: str = Field(description="Path of the model file inside the bundle.")
    description: str | None = Field(default=None, description="Free text for operators.")
    files: dict[str, FileEntry] = Field(
        default_factory=dict, description="Every file in the bundle except manifest/signatures."
    )
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    labels: list[str] = Field(default_factory=list, description="Class names, index order.")
    label_schema: LabelSchema | None = None
    preprocess: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of the preprocessing stage."
    )
    requires: Requires
    health: Health = Field(default_factory=Health)
    reference: Reference | None = None
    provenance: Provenance = Field(default_factory=Provenance)

    @field_validator("manifest_version", mode="before")
    @classmethod
    def _integer_version(cls, value: Any) -> Any:
        if type(value) is not int:  # `true` equals 1 to a Literal
            raise ValueError("must be the integer 1")
        return value

    @field_validator("version")
    @classmethod
    def _semver(cls, version: str) -> str:
        if not SEMVER_RE.match(version):
            raise ValueError(f"version {version!r} is not semantic versioning (e.g. 1.2.3)")
        return version

    @field_validator("model")
    @classmethod
    def _model_path(cls, path: str) -> str:
        return check_bundle_path(path)

    @field_validator("files")
    @classmethod
    def _file_paths(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for path in files:
            check_bundle_path(path)
        # "a" and "a/b" both pass the zip and the signature checks, but no directory can
        # hold them: unpacking would fail halfway with an error about the disk.
        folders = {
            "/".join(parts[:i])
            for parts in (p.split("/") for p in files)
            for i in range(1, len(parts))
        }
        clash = sorted(folders & set(files))
        if clash:
            raise ValueError(f"path {clash[0]!r} is both a file and a directory")
        _check_folded(files, folders)
        return files

    @model_validator(mode="after")
    def _cross_checks(self) -> Manifest:
        if self.files and self.model not in self.files:
            raise ValueError(f"model file {self.model!r} is not listed in files")
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} tensor names must be unique")
        prior = self.reference.class_prior if self.reference else []
        if prior and self.labels and len(prior) != len(self.labels):
            raise ValueError("reference.class_prior must have one value per label")
        return self

    @property
    def ref(self) -> str:
        """``name@version``, how registries and logs name the bundle."""
        return f"{self.name}@{self.version}"

    @property
    def total_size(self) -> int:
        """Sum of the declared file sizes."""
        return sum(f.size for f in self.files.values())
