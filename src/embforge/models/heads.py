"""Which pooling head a load builds: a request is resolved against the folder's head, never silently replacing it.

A recipe or call that names a pooling (``pooling: latent``, ``{"name": "latent", "head_dim": 64}``)
while loading a folder gets:

- the folder's trained head, with its weights, when the request agrees with it: every
  setting the request gives equals the folder's (settings left out or None take the
  folder's values; ``init`` only shapes new heads and is not compared);
- a ``ConfigError`` naming each differing field when it does not, unless the caller asks
  for a new head (``new_head=True``; recipes: ``model.new_head: true``), which then starts
  randomly initialised from the request alone;
- the requested head, new, when the folder has no trained head (its pooling is
  parameter-free: mean, cls, last), e.g. NV-Embed's latent head on a bare decoder.
"""

from __future__ import annotations

from embforge.errors import ConfigError
from embforge.modeling.pooling import pooling_config

_NOT_COMPARED = ("init",)  # how a new head starts: irrelevant once trained weights load


def requested_settings(pooling: str | dict) -> dict:
    """A pooling request as ``{"name": ..., <the settings it gives>}`` (None values dropped)."""
    settings = {"name": pooling} if isinstance(pooling, str) else dict(pooling)
    settings.setdefault("name", "mean")
    return {k: v for k, v in settings.items() if v is not None}


def resolve_pooling(
    requested: str | dict,
    saved: str | dict,
    hidden_size: int,
    *,
    trained: bool,
    new_head: bool = False,
    where: str = "the model folder",
) -> tuple[str | dict, bool]:
    """The pooling to build for a load, and whether the folder's head weights load into it.

    Args:
        requested: what the caller or recipe asks for.
        saved: the folder's pooling settings.
        hidden_size: the backbone's width (a head's ``head_dim`` defaults to it).
        trained: the folder holds trained head weights.
        new_head: build ``requested`` anew even where it would discard a trained head.
        where: names the folder in errors.

    Raises:
        ConfigError: ``requested`` conflicts with the folder's trained head (and not ``new_head``).
    """
    if new_head or not trained:
        return requested, False
    request = requested_settings(requested)
    have = pooling_config(requested_settings(saved), hidden_size)
    differing = [
        f"{key}: the folder's {have.get(key)!r}, requested {value!r}"
        for key, value in request.items()
        if key not in _NOT_COMPARED and have.get(key) != value
    ]
    if differing:
        raise ConfigError(
            f"{where} holds a trained {have['name']!r} head that the requested pooling would replace "
            f"with a new random one ({'; '.join(differing)}). Leave the pooling out (or give only matching "
            "settings) to load the trained head, or pass new_head=True (recipes: model.new_head: true; "
            "CLI: --new-head) to start a new head"
        )
    return have, True
