"""Readable class names for captions and image labels: ImageNet names from timm's bundled metadata for models of
the ImageNet label space, the class index otherwise."""

from __future__ import annotations

from functools import lru_cache

from featrec_grid.models import Classifier


@lru_cache(maxsize=1)
def _imagenet():
    from timm.data import ImageNetInfo

    return ImageNetInfo()


def class_name(clf: Classifier, c: int, short: bool = False) -> str:
    """'11 goldfinch, Carduelis carduelis' for an ImageNet model (short: '11 goldfinch'), '3' otherwise."""
    if clf.info.get("label_space") != "imagenet" or clf.num_classes != 1000:
        return str(int(c))
    name = _imagenet().index_to_description(int(c))
    return f"{int(c)} {name.split(',')[0] if short else name}"
