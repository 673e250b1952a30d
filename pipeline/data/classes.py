"""The seven basic expressions, in the project's one class order (contract).

Index ``i`` is RAF-DB's label ``i + 1``. SFEW's emotion folders map into this order *by name*,
never by alphabetical folder order.
"""
from __future__ import annotations

CLASSES: tuple[str, ...] = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
CLASS_TO_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}

class _CaseInsensitiveMap(dict):
    """A dict whose string keys are matched case-insensitively (stored lower-case)."""

    def __init__(self, items: dict[str, int]):
        super().__init__({k.lower(): v for k, v in items.items()})

    def __getitem__(self, key: str) -> int:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default=None):  # type: ignore[override]
        return super().get(key.lower(), default) if isinstance(key, str) else default


#: SFEW 2.0 folder name -> class index, case-insensitive (``SFEW_TO_INDEX["Happy"] == 3``).
SFEW_TO_INDEX: dict[str, int] = _CaseInsensitiveMap({
    "surprise": 0,
    "fear": 1,
    "disgust": 2,
    "happy": 3,
    "sad": 4,
    "angry": 5,
    "neutral": 6,
})

#: The folder names as the official SFEW archives spell them, in class order.
SFEW_FOLDERS: tuple[str, ...] = ("Surprise", "Fear", "Disgust", "Happy", "Sad", "Angry", "Neutral")

#: RAF-DB basic train-set class counts (the published distribution), in class order.
RAFDB_TRAIN_COUNTS: tuple[int, ...] = (1290, 281, 717, 4772, 1982, 705, 2524)


def sfew_index(folder: str) -> int | None:
    """Class index of an SFEW emotion folder (case-insensitive; also accepts the FER names
    such as ``happiness``/``anger``/``sadness``), or None if it is not an emotion folder."""
    key = folder.strip().lower()
    if key in SFEW_TO_INDEX:
        return SFEW_TO_INDEX[key]
    return CLASS_TO_INDEX.get(key)
