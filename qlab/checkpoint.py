"""Load FP32 weights from a Lightning checkpoint or a plain state_dict, whatever wrapped them."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

from qlab.errors import QlabError

PREFIXES = ("module.", "model.", "_orig_mod.")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of PATH with `module.` (DDP) and `model.` (Lightning) prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise QlabError(f"{path} does not exist.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        raise QlabError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'truncated?'}). It may be truncated or "
            f"corrupt: copy it again or retrain the FP32 stage."
        ) from None
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]  # a Lightning checkpoint: the network is LitClassifier.model;
        network = {k: v for k, v in blob.items() if k.removeprefix("module.").startswith("model.")}
        blob = network or blob     # its other buffers (normalize.*) are not the network's
    if not isinstance(blob, dict) or not all(isinstance(v, Tensor) for v in blob.values()):
        raise QlabError(f"{path} holds no state_dict (got {type(blob).__name__}).")
    out = {}
    for key, value in blob.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_fp32_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load FP32 weights into `model`, explaining an architecture or class-count mismatch; every
    quantization flow starts here, so a model's own quantizable form is made here
    (`prepare_quantization`, same logits: AirNet folds its logit scale into the head, so no float
    multiply is left after the INT8 head, and moves its pools behind BN and ReLU to fuse)."""
    state = read_state_dict(path)
    expected = model.state_dict()
    fc_w = state.get("fc.weight")
    if fc_w is not None and fc_w.shape != expected["fc.weight"].shape:
        raise QlabError(
            f"{path} was trained for {fc_w.shape[0]} classes, but this run has "
            f"{expected['fc.weight'].shape[0]} (data.classes). Use the data it was trained on."
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected),
                               ("other shape", sorted(shapes)))
            if keys
        )
        raise QlabError(
            f"{path} does not fit this model ({detail}). It was made for another architecture: "
            f"check model.stem / model.maxpool against the FP32 run's .hydra/config.yaml."
        )
    model.load_state_dict(state)
    if hasattr(model, "prepare_quantization"):
        model.prepare_quantization()
    return model
