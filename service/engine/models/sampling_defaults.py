"""Each model's default sampling: what a generation uses for a field the client did not give.

Where the defaults come from, first match wins, field by field (read once, when a GGUF is
prepared, and kept in the prepared directory's manifest; a directory without them, such as one
prepared by an older version or an ONNX directory, gets its family's defaults by its id):

1. the GGUF's own metadata, ``general.sampling.*`` (``temp``, ``top_p``, ``top_k``,
   ``penalty_repeat``: the keys gguf-py's ``Keys.General.SAMPLING_*`` name, written by model
   publishers who state a recommended sampling);
2. the model family's default below (:data:`FAMILY_DEFAULTS`), the family found in the GGUF's
   ``general.basename`` / ``general.name`` or in the model's id;
3. :data:`GENERIC`, which is :class:`~service.engine.types.SamplingParams`' own defaults.

The SmolLM2 values were chosen by measurement (``bench/answers.py``; ``bench/results/answers.json``,
15 scored questions, 96 tokens per reply), by the rule "no loops first, then the most right
answers": greedy 11 right but 2 loops ("la France, la France, ..."), repetition penalty 1.1: 10
right, 1 loop; 1.2: 9 right, no loop; 1.3: 8 right, no loop; the former default (temperature
0.7, no penalty) 9 / 10 / 7 right with 0 / 1 / 1 loops over three seeds. A change of these values
should come with a new run of that benchmark.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    source: str = "generic"  # "gguf", "family:<name>" or "generic": where the values come from

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SamplingDefaults:
        """The inverse of :meth:`to_json`; raises ``TypeError``/``ValueError`` for a bad record."""
        defaults = cls(
            temperature=float(data["temperature"]),
            top_p=float(data["top_p"]),
            top_k=int(data["top_k"]),
            repetition_penalty=float(data["repetition_penalty"]),
            source=str(data["source"]),
        )
        return defaults

    def params(self) -> dict[str, float | int]:
        """The defaults as ``SamplingParams`` keyword arguments."""
        values = asdict(self)
        del values["source"]
        return values


GENERIC: Final = SamplingDefaults()

FAMILY_DEFAULTS: Final[dict[str, SamplingDefaults]] = {
    # bench/results/answers.json: greedy alone loops; a penalty of 1.2 is the least that never did.
    "smollm2": SamplingDefaults(temperature=0.0, repetition_penalty=1.2, source="family:smollm2"),
}

# general.sampling.<key> -> field; gguf-py: Keys.General.SAMPLING_TEMP, _TOP_P, _TOP_K, _PENALTY_REPEAT.
GGUF_KEYS: Final[dict[str, str]] = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def family_of(*names: str | None) -> str | None:
    """The known family that one of ``names`` (a GGUF's basename or name, a model id) belongs to."""
    for name in names:
        if not name:
            continue
        slug = re.sub(r"[^a-z0-9]", "", name.lower())
        for family in FAMILY_DEFAULTS:
            if slug.startswith(family):
                return family
    return None


def for_family(*names: str | None) -> SamplingDefaults:
    family = family_of(*names)
    return FAMILY_DEFAULTS[family] if family is not None else GENERIC


def from_metadata(metadata: Mapping[str, Any], model_id: str | None = None) -> SamplingDefaults:
    """Defaults from GGUF metadata (``key -> value``), over the family's, over the generic ones."""
    base = for_family(metadata.get("general.basename"), metadata.get("general.name"), model_id)
    given: dict[str, Any] = {}
    for key, field in GGUF_KEYS.items():
        value = metadata.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            given[field] = int(value) if field == "top_k" else float(value)
    return replace(base, **given, source="gguf") if given else base


def from_reader(reader: Any, model_id: str | None = None) -> SamplingDefaults:
    """The defaults of the GGUF that ``reader`` (a ``gguf.GGUFReader``) has open."""
    wanted = ("general.basename", "general.name", *GGUF_KEYS)
    metadata = {key: reader.fields[key].contents() for key in wanted if key in reader.fields}
    return from_metadata(metadata, model_id)


def from_gguf(path: Path, model_id: str | None = None) -> SamplingDefaults:
    """Open the GGUF at ``path`` and read its defaults. Slow for a real model (the reader parses
    the whole tokenizer, about 2 s): done once, at preparation, never at each start."""
    from gguf import GGUFReader

    return from_reader(GGUFReader(str(path)), model_id)
