"""Reading backbone weights (a file, or a URL through torch.hub) and loading them into a
model by name, shared by the torchvision backbones (backbones.py) and timm's
(timm_backbones.py)."""

from __future__ import annotations

import socket
import urllib.error
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from crack_lightning.errors import WeightsError
from crack_lightning.io import load_safely

# a download that gets no answer for this long is treated as offline
DOWNLOAD_TIMEOUT_S = 60.0


def load_weights_file(path: str | Path) -> Mapping[str, torch.Tensor]:
    """Read a state dict safely (tensors only, no pickled code)."""
    state = load_safely(
        path,
        "model.weights_path",
        WeightsError,
        "Point it at a torchvision state dict (full model or backbone only), or use "
        "model.pretrained=true with internet access.",
    )
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise WeightsError(
            f"model.weights_path={path} holds a {type(state).__name__}, not a state dict "
            f"mapping parameter names to tensors."
        )
    return state


def download_state_dict(url: str) -> Mapping[str, torch.Tensor]:
    """Fetch weights through torch.hub (progress bar, cache under $TORCH_HOME/hub/checkpoints)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=True, weights_only=True
        )
    except (urllib.error.URLError, OSError) as err:
        filename = url.rsplit("/", 1)[-1]
        raise WeightsError(
            f"Could not download pretrained weights from {url} ({err}). If this machine is "
            f"offline, fetch {filename} on one with internet access and either pass "
            f"model.weights_path=/path/to/{filename} or copy it into "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}. "
            f"model.pretrained=false trains on random features instead (far less accurate)."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def load_matching_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    drop: tuple[str, ...],
    source: str,
    hint: str,
    label: str,
) -> None:
    """Load `state` without its keys under the `drop` prefixes (the classifier), refusing
    any mismatch by name or shape in one line that ends with `hint`."""
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    expected = model.state_dict()
    # BatchNorm's batch counters are unused by a frozen backbone; some exporters drop them
    missing = sorted(
        k for k in expected.keys() - state.keys() if not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in state.keys() & expected.keys()
        if state[k].shape != expected[k].shape
    )
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:5])}"
        + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise WeightsError(
            f"Weights from {source} do not fit {label}: " + "; ".join(problems) + ". " + hint
        )
    model.load_state_dict(state, strict=False)
